"""lm2.py's memory, which no HF model has: each equation of the paper against a written-out computation, the gates'
bounds, causality across segments, the memory carrying past the attention window, segments and documents, truncated
BPTT, the KV cache and generation with the memory on, saving and reloading it. With the memory off lm2.py is HF Llama,
checked module by module in test_parity.py (as are a fresh memory on real SmolLM2 weights and the sliding window).

Run: python -m pytest tests/test_lm2_memory.py -q
"""
import dataclasses
import itertools
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lm2  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = dict(atol=1e-5, rtol=1e-5)  # fp32, tiny models: differences are summation order only
EXACT = dict(atol=0, rtol=0)
# test_parity.py's lm2 family config (2 blocks, dim 64, GQA 4/2, vocab 97), as ModelArgs
TINY = lm2.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, vocab_size=97,
                     rope_theta=10000.0, max_seq_len=256, tie_embeddings=False)


def randomize_memory(model, seed=1):
    """A trained-looking memory: the fresh one has W_V = 0 and reads nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mem in (m for m in model.modules() if isinstance(m, lm2.Memory)):
            for p in mem.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 2 else 1.0))
    return model


def random_memory():
    mem = randomize_memory(lm2.Memory(dataclasses.replace(TINY, mem_slots=5, mem_heads=2)))
    assert mem.v_proj.weight.abs().min() > 0  # not the fresh W_V = 0, which would make E_mem = 0
    return mem


def lm2_tiny(seed=0, **kw):
    torch.manual_seed(seed)
    args = dataclasses.replace(TINY, **{"mem_slots": 6, "segment_len": 8, **kw})
    return randomize_memory(lm2.LM2(args).eval(), seed + 1)


def tokens(B, T, seed=0, high=97):
    return torch.randint(0, high, (B, T), generator=torch.Generator().manual_seed(seed))


def test_memory_read_and_write_written_out():
    """The paper's equations, one batch row and head at a time: the read (softmax over slots, output gate) and the
    write (softmax over the kept tokens: each slot's view, then the input and forget gates)."""
    mem, d, H = random_memory(), 64, 2
    h, M = torch.randn(2, 7, d), torch.randn(2, 5, d)
    Wq, Wk, Wv, Wo = (m.weight.T for m in (mem.q_proj, mem.k_proj, mem.v_proj, mem.out_gate))
    keep = torch.tensor([[False, False, True, True, True, True, True], [True] * 7])
    out, E = torch.zeros(2, 7, d), torch.zeros(2, 5, d)
    for b in range(2):
        for j in range(H):  # head j uses channels c of the projections
            c = slice(j * d // H, (j + 1) * d // H)
            s = (h[b] @ Wq[:, c]) @ (M[b] @ Wk[:, c]).T / math.sqrt(d // H)  # (T, N)
            out[b, :, c] = torch.softmax(s, dim=1) @ (M[b] @ Wv[:, c])  # read: softmax over slots
            s = s.masked_fill(~keep[b, :, None], float("-inf"))
            E[b, :, c] = torch.softmax(s, dim=0).T @ h[b, :, c]  # write: softmax over tokens, slot i's view
    expected = torch.sigmoid(out @ Wo) * out  # g_out * E_mem
    torch.testing.assert_close(mem.read(h, mem.state(M)), expected, **TOL)
    fresh = torch.tensor([[True] * 3 + [False] * 4, [False] * 7])  # fresh tokens read M_0 instead
    got = mem.read(h, mem.state(M), fresh)
    torch.testing.assert_close(got[0, :3], mem.read(h, mem.initial_state(2))[0, :3], **TOL)
    torch.testing.assert_close(got[:, 3:], expected[:, 3:], **TOL)
    g_in, g_f = torch.sigmoid(mem.in_gate(E)), torch.sigmoid(mem.forget_gate(E))
    new = mem.write(h, mem.state(M), keep)
    torch.testing.assert_close(new[0], g_in * torch.tanh(E) + g_f * M, **TOL)
    for a, b in zip(new, mem.state(new[0])):  # the new bank comes with its keys and values
        torch.testing.assert_close(a, b, **TOL)
    # a document that began in this segment is written on top of M_0, not on the other document's bank
    fresh = torch.tensor([True, False])
    torch.testing.assert_close(mem.write(h, mem.state(M), keep, fresh)[0][0],
                               mem.write(h, mem.initial_state(2), keep)[0][0], **TOL)


def test_gates_in_range_and_memory_bounded():
    mem = random_memory()
    pre = {}
    for name in ("out_gate", "in_gate", "forget_gate"):
        getattr(mem, name).register_forward_hook(lambda m, i, o, name=name: pre.__setitem__(name, o))
    M = mem.bank.expand(3, -1, -1)
    for step in range(20):  # large inputs saturate the gates; the bank must stay bounded
        h = torch.randn(3, 9, 64) * 10
        mem.read(h, mem.state(M))
        M_next = mem.write(h, mem.state(M))[0]
        for name, o in pre.items():
            g = torch.sigmoid(o)
            assert g.min() >= 0 and g.max() <= 1 and torch.isfinite(g).all(), name
        # |g_in * tanh(.)| < 1 and 0 < g_forget < 1: each write adds at most 1 and never grows M itself
        assert (M_next.abs() <= M.abs() + 1 + 1e-6).all()
        M = M_next
    assert torch.isfinite(M).all()
    fresh = lm2.Memory(dataclasses.replace(TINY, mem_slots=5))  # fresh: E_mem = 0, so g_out = 1/2 and the output is 0
    assert fresh.read(torch.randn(1, 4, 64), fresh.initial_state(1)).abs().max() == 0


@pytest.mark.parametrize("window", [None, 3])
def test_causality_across_segments(window):
    model, x = lm2_tiny(attn_window=window), tokens(2, 40)
    y = x.clone()
    y[:, 13] = (y[:, 13] + 1) % 97  # a token in the middle of segment 1
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :13], b[:, :13], **TOL)  # earlier outputs never change
    assert (a[:, 13:16] - b[:, 13:16]).abs().amax(-1).min() > 0  # (the test would notice a no-op change)


def test_memory_carries_beyond_the_window():
    """Window 2, two blocks: attention reaches 2 tokens back. Token 3 still changes outputs two segments
    later (positions >= 16) through the memory, and only through it."""
    x = tokens(1, 32)
    y = x.clone()
    y[:, 3] = (y[:, 3] + 1) % 97
    with torch.no_grad():
        for mem_layers, changes in ((None, True), ((), False)):
            model = lm2_tiny(attn_window=2, mem_layers=mem_layers)
            diff = (model(x) - model(y))[0].abs().amax(-1)
            assert diff[:3].max() == 0 and diff[6:8].max() == 0  # before it, and beyond the window in seg 0
            assert bool(diff[16:].min() > 1e-6) == changes


def test_segmentwise_equals_one_pass():
    x = tokens(2, 45)
    with torch.no_grad():
        for window in (None, 5):  # memory off: segmenting is an implementation detail
            one = lm2_tiny(mem_layers=(), attn_window=window, segment_len=64)
            seg = lm2_tiny(mem_layers=(), attn_window=window, segment_len=7)
            torch.testing.assert_close(seg(x), one(x), **TOL)
        model = lm2_tiny(attn_window=5)  # memory on: a prefix's logits do not depend on what follows
        full = model(x)
        for p in (8, 13, 16, 45):
            torch.testing.assert_close(model(x[:, :p]), full[:, :p], **TOL)
        # the first segment only reads M_0: equal to the memory-free model plus the read of M_0
        assert not torch.allclose(full[:, :8], lm2_tiny(mem_layers=(), attn_window=5)(x)[:, :8])


def test_packed_documents():
    """Memory on (memory off, against HF: test_parity.py's test_packed_documents_match_separate_runs[lm2])."""
    model = lm2_tiny()
    a, b = tokens(1, 16, seed=1), tokens(1, 21, seed=2)  # a spans exactly two segments
    docs = torch.tensor([[0] * 16 + [1] * 21])
    with torch.no_grad():
        packed = model(torch.cat([a, b], 1), docs)
        torch.testing.assert_close(packed[:, :16], model(a), **TOL)
        torch.testing.assert_close(packed[:, 16:], model(b), **TOL)  # b starts on the segment grid: exact
        # a document starting mid-segment: nothing of the previous one leaks into it
        c, c2 = tokens(1, 11, seed=3), tokens(1, 11, seed=4)
        docs = torch.tensor([[0] * 11 + [1] * 21])
        one, two = model(torch.cat([c, b], 1), docs), model(torch.cat([c2, b], 1), docs)
        torch.testing.assert_close(one[:, 11:], two[:, 11:], **TOL)


def test_truncated_bptt():
    """Loss on the last segment (4); tokens 90..96 occur only in segment 0 and attention (window 2, 2 blocks)
    reaches 2 tokens back, so their embedding gradient comes through the memory (read also by the last
    tokens of segment 3, which segment 4 attends to)."""
    x = torch.cat([torch.arange(90, 97)[None], tokens(1, 33, high=90)], 1)  # 40 tokens, 5 segments of 8
    grads, logits = {}, {}
    for bptt in (None, 1, 4, 5):
        model = lm2_tiny(attn_window=2, bptt_segments=bptt).train()
        logits[bptt] = model(x)
        F.cross_entropy(logits[bptt][0, 32:-1], x[0, 33:]).backward()
        grads[bptt] = model.model.embed_tokens.weight.grad[90:97].abs().sum()
        torch.testing.assert_close(logits[bptt], logits[None], **EXACT)  # values never change
    assert grads[None] > 0
    assert grads[1] == 0 and grads[4] == 0  # a boundary at segment 4 cuts every path to segment 0
    torch.testing.assert_close(grads[5], grads[None], atol=1e-5, rtol=1.3e-6)  # one chunk holds all 5: untruncated


@pytest.mark.parametrize("window", [None, 3])
def test_cached_forward_equals_full(window):
    """Chunks within segments of 8, then one token at a time, each reading what the earlier ones cached."""
    model, x = lm2_tiny(attn_window=window), tokens(2, 29)
    ends = [5, 8, 16, *range(17, 30)]
    with torch.no_grad():
        full = model(x)
        model.setup_cache(2, 32)
        cached = torch.stack([model.forward_cached(x[:, lo:hi], torch.arange(lo, hi))
                              for lo, hi in itertools.pairwise([0, *ends])], dim=1)
    model.clear_cache()
    torch.testing.assert_close(cached, full[:, [e - 1 for e in ends]], **TOL)
    with pytest.raises(ValueError, match="segment boundary"):
        model.setup_cache(1, 32)
        model.forward_cached(x[:1, :10], torch.arange(10))
    model.clear_cache()


def test_generate_greedy_equals_recompute_and_batching():
    model = lm2_tiny(attn_window=4)
    prompts = [tokens(1, 5, seed=5)[0].tolist(), tokens(1, 19, seed=6)[0].tolist()]
    out = model.generate(prompts, max_new_tokens=20, stop_tokens=[])
    with torch.no_grad():
        for p, o in zip(prompts, out):
            seq = list(p)
            for _ in range(20):  # recompute everything for every token, no cache
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
            assert o == seq[len(p):]
            assert model.generate([p], max_new_tokens=20, stop_tokens=[]) == [o]  # alone == batched
    stop = out[1][3]
    assert model.generate(prompts[1:], 20, stop_tokens=[stop])[0] == out[1][:out[1].index(stop)]


def test_save_and_reload_keep_the_memory(tmp_path):
    """config.json (memory settings under "lm2") and the state dict, read back by from_pretrained: the same args and
    bit-identical logits. (Transformers reading the base of such a folder: test_parity.py.)"""
    ours = lm2_tiny(mem_slots=5)
    (tmp_path / "config.json").write_text(json.dumps(ours.args.to_hf_config()))
    save_file(ours.state_dict(), tmp_path / "model.safetensors")
    again, x = lm2.LM2.from_pretrained(tmp_path), tokens(1, 30)
    assert again.args == ours.args
    with torch.no_grad():
        torch.testing.assert_close(again(x), ours(x), **EXACT)
