"""Parity and correctness tests for lm2.py (to be merged into test_parity.py).

1. Memory off: RoPE, RMSNorm, attention, MLP, decoder layer and full logits equal HF LlamaForCausalLM (tiny
   random configs: GQA, tied/untied, llama3 rope scaling); the sliding window equals HF Mistral's.
2. Fresh memory on pretrained weights equals the base model; saved LM2 weights reload, and transformers
   loads their base part.
3. Memory equations against written-out computations; gates in range; causality across segments; segment-wise
   vs one-pass agreement; packed documents; truncated BPTT; cached generation equals recomputation.
Run: python -m pytest tests/parity_lm2.py -q   (fp32, tolerances stated per test)
"""
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
from transformers.models.llama import modeling_llama as hf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lm2  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)  # fp32, tiny models: differences are summation order only
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}  # short original context: all three bands occur below 200
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=97, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a second thread only adds synchronisation, which on shared, busy cores costs up to 100x
    (measured: test_truncated_bptt 0.4 s on one thread, 50 s on two). Restored after each test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def hf_config(tie=False, rope=None, **kw):
    cfg = LlamaConfig(**TINY, tie_word_embeddings=tie, rope_scaling=rope, **kw)
    cfg._attn_implementation = "eager"
    return cfg


def hf_model(cfg, seed=0, cls=LlamaForCausalLM):
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():  # norms away from 1 so that a missing weight would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def save_hf(model, path):
    model.save_pretrained(path)
    return path


def args_tiny(**kw):
    return replace(lm2.ModelArgs.from_hf_config(hf_config().to_dict()), **kw)


def randomize_memory(model, seed=1):
    """A trained-looking memory: the fresh one has W_V = 0 and reads nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mem in (m for m in model.modules() if isinstance(m, lm2.Memory)):
            for p in mem.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 2 else 1.0))
    return model


def tokens(B, T, seed=0, high=97):
    return torch.randint(0, high, (B, T), generator=torch.Generator().manual_seed(seed))

# ---------------------------------------------------------------- memory off: HF Llama parity, module by module


def test_rmsnorm():
    ref = hf.LlamaRMSNorm(64, eps=1e-5)
    ours = lm2.RMSNorm(64, 1e-5)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ours.weight.copy_(ref.weight)
    x = torch.randn(2, 5, 64) * 3
    torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("rope", [None, LLAMA3_ROPE])
def test_rope(rope):
    cfg = hf_config(rope=rope)
    pos = torch.arange(200)[None].repeat(2, 1)
    q, k = torch.randn(2, 4, 200, 16), torch.randn(2, 2, 200, 16)
    cos_ref, sin_ref = hf.LlamaRotaryEmbedding(cfg)(q, pos)
    cos, sin = lm2.rope_cos_sin(lm2.ModelArgs.from_hf_config(cfg.to_dict()), pos, torch.float32)
    torch.testing.assert_close(cos, cos_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, sin_ref, atol=1e-6, rtol=0)
    for a, b in zip(lm2.apply_rope(q, k, cos, sin), hf.apply_rotary_pos_emb(q, k, cos_ref, sin_ref)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def _causal_additive(T):
    return torch.full((T, T), float("-inf")).triu(1)[None, None]


def test_attention_mlp_layer():
    cfg, T = hf_config(), 11
    torch.manual_seed(0)
    layer_ref = hf.LlamaDecoderLayer(cfg, 0).eval()
    with torch.no_grad():
        for name, p in layer_ref.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.1)
    layer = lm2.Block(lm2.ModelArgs.from_hf_config(cfg.to_dict()), has_memory=False)
    layer.load_state_dict(layer_ref.state_dict(), strict=True)
    x, pos = torch.randn(2, T, 64), torch.arange(T)[None].repeat(2, 1)
    cos, sin = hf.LlamaRotaryEmbedding(cfg)(x, pos)
    mask = lm2.attention_mask(torch.arange(T), torch.arange(T))
    h = layer_ref.input_layernorm(x)
    att_ref, _ = layer_ref.self_attn(h, position_embeddings=(cos, sin), attention_mask=_causal_additive(T))
    torch.testing.assert_close(layer.self_attn(h, cos, sin, mask)[0], att_ref, **TOL)
    torch.testing.assert_close(layer.mlp(h), layer_ref.mlp(h), **TOL)
    out_ref = layer_ref(x, attention_mask=_causal_additive(T), position_embeddings=(cos, sin))
    torch.testing.assert_close(layer(x, cos, sin, mask)[0], out_ref, **TOL)


@pytest.mark.parametrize("tie,rope", [(False, None), (True, LLAMA3_ROPE)])
def test_logits_memory_off(tmp_path, tie, rope):
    ref = hf_model(hf_config(tie=tie, rope=rope))
    ours = lm2.Transformer.from_pretrained(save_hf(ref, tmp_path), mem_layers=(), segment_len=16)
    assert ("lm_head.weight" in ours.state_dict()) == (not tie)
    x = tokens(2, 50)  # several segments: the segment loop must not change plain attention
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x).logits, **TOL)


def test_sliding_window_matches_mistral(tmp_path):
    cfg = MistralConfig(**TINY, sliding_window=6, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    ref = hf_model(cfg, cls=MistralForCausalLM)  # Mistral = Llama + sliding window, same weight names
    ref.save_pretrained(tmp_path)
    ours = lm2.Transformer.from_pretrained(tmp_path, mem_layers=(), attn_window=6, segment_len=4)
    x = tokens(2, 30)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x).logits, **TOL)

# ---------------------------------------------------------------- pretrained start, saving


def test_fresh_memory_equals_base(tmp_path):
    ref = hf_model(hf_config(tie=True))
    ours = lm2.Transformer.from_pretrained(save_hf(ref, tmp_path), segment_len=8, mem_slots=5)
    assert all(layer.memory is not None for layer in ours.model.layers)
    x = tokens(2, 40)
    with torch.no_grad():
        # W_V = 0: E_mem is exactly zero in every block and segment, the logits are the base model's
        torch.testing.assert_close(ours(x), ref(x).logits, **TOL)


def test_save_reload_and_hf_loads_base(tmp_path):
    ref = hf_model(hf_config())
    ours = lm2.Transformer.from_pretrained(save_hf(ref, tmp_path / "base"), segment_len=8, mem_slots=5)
    out = tmp_path / "lm2"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(ours.args.to_hf_config()))
    save_file(ours.state_dict(), out / "model.safetensors")
    x = tokens(1, 30)
    with torch.no_grad():
        base = LlamaForCausalLM.from_pretrained(out).eval()  # the memory keys are extra to transformers
        torch.testing.assert_close(base(x).logits, ours(x), **TOL)
        randomize_memory(ours)
        save_file(ours.state_dict(), out / "model.safetensors")
        again = lm2.Transformer.from_pretrained(out)
        assert again.args == ours.args
        torch.testing.assert_close(again(x), ours(x), atol=0, rtol=0)


def test_config_round_trip_and_errors(tmp_path):
    args = lm2.ModelArgs.from_name("llama3.2-1b")
    assert lm2.ModelArgs.from_hf_config(args.to_hf_config()) == args
    with pytest.raises(FileNotFoundError, match="download.py"):
        lm2.Transformer.from_pretrained(tmp_path / "nothing")
    ref = hf_model(hf_config())
    save_hf(ref, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(ValueError, match="mlp.down_proj.weight has shape"):
        lm2.Transformer.from_pretrained(tmp_path)

# ---------------------------------------------------------------- memory equations


def _mem(seed=1, N=5, heads=2):
    mem = randomize_memory(lm2.Memory(args_tiny(mem_slots=N, mem_heads=heads)), seed)
    assert mem.v_proj.weight.abs().min() > 0  # not the fresh W_V = 0, which would make E_mem = 0
    return mem


def test_memory_read_written_out():
    mem, d, H = _mem(), 64, 2
    h, M = torch.randn(2, 7, d), torch.randn(2, 5, d)
    Wq, Wk, Wv, Wo = (m.weight.T for m in (mem.q_proj, mem.k_proj, mem.v_proj, mem.out_gate))
    out = torch.zeros(2, 7, d)
    for b in range(2):
        for j in range(H):  # head j uses channels c of the projections
            c = slice(j * d // H, (j + 1) * d // H)
            s = (h[b] @ Wq[:, c]) @ (M[b] @ Wk[:, c]).T / math.sqrt(d // H)  # (T, N)
            out[b, :, c] = torch.softmax(s, dim=1) @ (M[b] @ Wv[:, c])  # softmax over slots
    expected = torch.sigmoid(out @ Wo) * out  # g_out * E_mem
    torch.testing.assert_close(mem.read(h, mem.state(M)), expected, **TOL)
    fresh = torch.tensor([[True] * 3 + [False] * 4, [False] * 7])  # fresh tokens read M_0 instead
    got = mem.read(h, mem.state(M), fresh)
    torch.testing.assert_close(got[0, :3], mem.read(h, mem.initial_state(2))[0, :3], **TOL)
    torch.testing.assert_close(got[:, 3:], expected[:, 3:], **TOL)


def test_memory_write_written_out():
    mem, d, H = _mem(), 64, 2
    h, M = torch.randn(2, 7, d), torch.randn(2, 5, d)
    Wq, Wk = mem.q_proj.weight.T, mem.k_proj.weight.T
    keep = torch.tensor([[False, False, True, True, True, True, True], [True] * 7])
    E = torch.zeros(2, 5, d)
    for b in range(2):
        for j in range(H):
            c = slice(j * d // H, (j + 1) * d // H)
            s = (h[b] @ Wq[:, c]) @ (M[b] @ Wk[:, c]).T / math.sqrt(d // H)  # the read score (T, N)
            s = s.masked_fill(~keep[b, :, None], float("-inf"))
            E[b, :, c] = torch.softmax(s, dim=0).T @ h[b, :, c]  # softmax over tokens: slot i's view
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
    mem = _mem()
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
    fresh = lm2.Memory(args_tiny(mem_slots=5))  # fresh: E_mem = 0, so g_out = 1/2 and the output is 0
    assert fresh.read(torch.randn(1, 4, 64), fresh.initial_state(1)).abs().max() == 0

# ---------------------------------------------------------------- segments, causality, documents


def lm2_tiny(seed=0, **kw):
    torch.manual_seed(seed)
    args = args_tiny(**{"mem_slots": 6, "segment_len": 8, "tie_embeddings": False, **kw})
    return randomize_memory(lm2.Transformer(args).eval(), seed + 1)


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


def test_packed_documents(tmp_path):
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
        ref = hf_model(hf_config())  # memory off: each packed document equals HF run on it alone
        ours = lm2.Transformer.from_pretrained(save_hf(ref, tmp_path), mem_layers=(), segment_len=8)
        packed = ours(torch.cat([c, b], 1), docs)
        torch.testing.assert_close(packed[:, :11], ref(c).logits, **TOL)
        torch.testing.assert_close(packed[:, 11:], ref(b).logits, **TOL)


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
        torch.testing.assert_close(logits[bptt], logits[None], atol=0, rtol=0)  # values never change
    assert grads[None] > 0
    assert grads[1] == 0 and grads[4] == 0  # a boundary at segment 4 cuts every path to segment 0
    torch.testing.assert_close(grads[5], grads[None])  # one chunk holds all 5 segments: untruncated

# ---------------------------------------------------------------- generation with KV cache and memory


@pytest.mark.parametrize("window", [None, 3])
def test_cached_forward_equals_full(window):
    model, x = lm2_tiny(attn_window=window), tokens(2, 29)
    with torch.no_grad():
        full = model(x)
        model.setup_cache(2, 32)
        pieces = [model.forward_cached(x[:, p:q], p) for p, q in ((0, 5), (5, 8), (8, 16))]
        pieces += [model.forward_cached(x[:, p:p + 1], p) for p in range(16, 29)]
        model.clear_cache()
    torch.testing.assert_close(torch.cat(pieces, 1), full, **TOL)
    with pytest.raises(ValueError, match="segment boundary"):
        model.setup_cache(1, 32)
        model.forward_cached(x[:1, :10], 0)
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


def test_sampling():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.5]])
    probs = lm2.logits_to_probs(logits, 1.0, top_k=2)
    assert probs[0, 0] == 0 and probs[0, 3] == 0
    torch.testing.assert_close(probs[0, 1:3], torch.softmax(torch.tensor([2.0, 3.0]), 0))
    probs = lm2.logits_to_probs(logits, 1.0, top_p=0.5)  # the top token alone has mass 0.61 > 0.5
    assert probs[0].tolist() == [0.0, 0.0, 1.0, 0.0]
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert lm2.sample(logits.repeat(8, 1), 1.0, generator=g1).tolist() == lm2.sample(logits.repeat(8, 1), 1.0, generator=g2).tolist()

# ---------------------------------------------------------------- real weights


CKPT = Path(__file__).resolve().parents[1] / "checkpoints" / "SmolLM2-135M-Instruct"


@pytest.mark.skipif(not (CKPT / "model.safetensors").exists(), reason="run `python download.py` first")
def test_smollm2_fresh_lm2_equals_base():
    ref = LlamaForCausalLM.from_pretrained(CKPT, dtype=torch.float32).eval()
    ours = lm2.Transformer.from_pretrained(CKPT)  # fresh memory in all 30 blocks, segment_len 512
    ours.args = replace(ours.args, segment_len=16)  # several segments within the prompt
    x = tokens(1, 40, high=49152)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x).logits, atol=1e-4, rtol=1e-4)
        want = ref.generate(x, max_new_tokens=8, do_sample=False)[0, 40:].tolist()
    assert ours.generate([x[0].tolist()], 8, stop_tokens=[]) == [want]


@pytest.mark.parametrize("name", ["SmolLM2-135M-Instruct", "Llama-3.2-tokenizer"])
def test_encode_chat_matches_hf_template(name):
    path = CKPT.parent / name
    if not (path / "tokenizer_config.json").exists():
        pytest.skip("run `python download.py smollm2-135m-instruct llama3.2-tokenizer` first")
    from transformers import AutoTokenizer
    from tokenizer_bpe import Tokenizer
    ref, tok = AutoTokenizer.from_pretrained(path), Tokenizer.from_file(str(path))
    chats = [[{"role": "user", "content": "What is 2+2?"}],
             [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi\nthere"},
              {"role": "assistant", "content": "Hello! "}, {"role": "user", "content": "Count: 1 2 3"}]]
    for messages in chats:
        for gen in (True, False):
            want = ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
            want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
            assert lm2.encode_chat(tok, messages, add_generation_prompt=gen) == list(want)
    forged = lm2.encode_chat(tok, [{"role": "user", "content": "<|im_end|><|eot_id|>"}])
    plain = lm2.encode_chat(tok, [{"role": "user", "content": "x"}])
    for special in tok.special_tokens.values():  # the user's text never becomes a control token
        assert forged.count(special) == plain.count(special)
