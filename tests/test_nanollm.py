"""Non-parity tests of nanollm.py: sizes, training hooks (router bias, aux loss, expert load), generation (stop
tokens, sampling), saving/loading and one-line CLI errors. Its parity with HF DeepseekV3 (modules, configs both ways,
ragged batches and every decode path) is in test_parity.py.
Run: python -m pytest -q -s tests/test_nanollm.py   (-s shows the parameter and cache figures)
"""
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nanollm as N  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return N.NanoLLM(N.ModelArgs(**overrides)).eval()


def params_by_formula(a: N.ModelArgs) -> int:
    """DeepSeek-V3 parameter count from the config alone, independent of the module code."""
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    r = a.q_lora_rank
    q = a.dim * r + r + r * a.n_heads * qk if r else a.dim * a.n_heads * qk
    attn = q + a.dim * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank \
        + a.kv_lora_rank * a.n_heads * (a.qk_nope_head_dim + a.v_head_dim) + a.n_heads * a.v_head_dim * a.dim
    moe = 3 * a.dim * a.moe_hidden_dim * (a.n_shared_experts + a.n_routed_experts) + a.n_routed_experts * a.dim
    mlps = len(a.moe_layers) * moe + (a.n_layers - len(a.moe_layers)) * 3 * a.dim * a.hidden_dim
    embeddings = a.vocab_size * a.dim * (1 if a.tie_embeddings else 2)
    return embeddings + a.n_layers * (attn + 2 * a.dim) + mlps + a.dim


def cache_bytes_per_token(a: N.ModelArgs, bytes_per_value: int = 2) -> dict[str, int]:
    """Decoding cache per token, all layers, from the config alone: mla, the latent and shared RoPE key; mha, K and
    V of n_heads x (dim / n_heads); mha_mla_heads, K and V at MLA's decompressed head sizes (qk_nope + qk_rope,
    v_head), what MLA would cache without its latent."""
    per_layer = dict(mla=a.kv_lora_rank + a.qk_rope_head_dim, mha=2 * a.dim,
                     mha_mla_heads=a.n_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim))
    return {k: a.n_layers * v * bytes_per_value for k, v in per_layer.items()}


@pytest.mark.parametrize("preset", N.PRESETS)
def test_parameter_count(preset):
    args = N.ModelArgs.from_name(preset)
    with torch.device("meta"):
        model = N.NanoLLM(args)
    total = sum(p.numel() for p in model.parameters())
    one_expert = 3 * args.dim * args.moe_hidden_dim
    active = total - len(args.moe_layers) * (args.n_routed_experts - args.n_activated_experts) * one_expert
    print(f"\n{preset}: {total:,} parameters, {active:,} active per token")
    assert total == params_by_formula(args)


def test_cache_bytes_match_the_allocated_cache():
    model = tiny().to(torch.bfloat16)
    model.setup_cache(batch_size=3, max_seq_len=10)
    allocated = sum(b.numel() * b.element_size() for b in model.buffers() if b.dim() == 3)  # the cache buffers
    assert allocated / (3 * 10) == cache_bytes_per_token(model.args)["mla"]
    model.clear_cache()
    assert not any(b.dim() == 3 for b in model.buffers())
    c = cache_bytes_per_token(N.ModelArgs.from_name("nano-327m"))
    assert (c["mla"], c["mha"], c["mha_mla_heads"]) == (7680, 61440, 122880)  # the figures MLACache's docstring gives
    print(f"\nnano-327m bf16 cache per token: MLA {c['mla']:,} B, MHA same width {c['mha']:,} B "
          f"({c['mha'] / c['mla']:.0f}x), MHA at MLA's head sizes {c['mha_mla_heads']:,} B "
          f"({c['mha_mla_heads'] / c['mla']:.0f}x)")


def test_training_hooks_and_gradients():
    """A few AdamW steps on a fixed batch: loss falls, gradients reach routers and experts, the aux loss is the
    DeepSeek-V3 eq. 17 value, router biases move and the load counts reset."""
    model = tiny(seed=1, aux_loss_alpha=0.01).train()
    tokens = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(8):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        (loss + model.aux_loss).backward()
        if step == 0:
            for i, moe in model.moe_layers():
                assert moe.gate.weight.grad.abs().sum() > 0
                assert sum(int(e.gate_proj.weight.grad is not None and e.gate_proj.weight.grad.abs().sum() > 0)
                           for e in moe.experts) == int((moe.load > 0).sum())  # exactly the experts that got tokens
            bias_before = [m.gate.e_score_correction_bias.clone() for _, m in model.moe_layers()]
        opt.step()
        opt.zero_grad()
        load = model.update_router_biases(rate=1e-3)
        assert sorted(load) == [i for i, _ in model.moe_layers()] and model.expert_load() == {}
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    for before, (_, m) in zip(bias_before, model.moe_layers()):
        assert not torch.equal(before, m.gate.e_score_correction_bias)
    model.eval()
    model(tokens)
    assert model.aux_loss == 0.0 and model.expert_load() == {}  # evaluation neither counts nor adds a loss


def test_aux_loss_is_the_sequence_wise_balance_loss():
    model = tiny(seed=2, aux_loss_alpha=0.1).train()
    moe = model.moe_layers()[0][1]
    x = torch.randn(3, 7, model.args.dim)
    moe(x)
    _, idx, scores = moe.gate(x.flatten(0, 1))
    E, k, T = moe.n_experts, moe.k, 7
    expected = 0.0
    for b in range(3):  # DeepSeek-V3 eqs. 17-20, one sequence at a time
        s, chosen = scores.view(3, T, E)[b], idx.view(3, T, k)[b]
        f = torch.tensor([(chosen == i).sum().item() * E / (k * T) for i in range(E)])
        p = (s / s.sum(-1, keepdim=True)).mean(0)
        expected += 0.1 * (f * p).sum() / 3
    torch.testing.assert_close(moe.aux_loss, expected)


def test_top1_with_normalised_weights_gives_the_router_no_gradient():
    """Why the nano presets turn norm_topk_prob off: one chosen weight normalised over itself is always 1."""
    grads = {}
    for norm in (True, False):
        model = tiny(seed=3, n_activated_experts=1, n_expert_groups=1, norm_topk_prob=norm).train()
        model(torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))).square().mean().backward()
        grads[norm] = model.moe_layers()[0][1].gate.weight.grad.abs().max().item()
    assert 0 < grads[False] and grads[True] < 1e-5 * grads[False], grads  # w / (w + 1e-20): 0 up to rounding


def test_stop_tokens_and_sampling():
    model = tiny(seed=5, stop_tokens=())
    greedy = model.generate([[1, 2, 3]], 8, stop_tokens=[])[0]
    assert model.generate([[1, 2, 3]], 8, stop_tokens=[greedy[3]])[0] == greedy[:greedy.index(greedy[3])]
    assert model.generate([[1, 2, 3]], 8, temperature=1.0, top_k=1, stop_tokens=[], seed=0)[0] == greedy
    assert model.generate([[1, 2, 3]], 8, temperature=1.0, top_p=1e-6, stop_tokens=[], seed=0)[0] == greedy
    a, b, c = (model.generate([[1, 2, 3]], 12, temperature=1.5, stop_tokens=[], seed=s)[0] for s in (7, 7, 8))
    assert a == b and a != c
    # softmax = 0.609, 0.224, 0.136, 0.030: the first two reach 0.8, so nucleus 0.8 keeps them, renormalised
    probs = N.logits_to_probs(torch.tensor([[2.0, 1.0, 0.5, -1.0]]), 1.0, top_p=0.8)
    torch.testing.assert_close(probs[0], torch.cat([F.softmax(torch.tensor([2.0, 1.0]), -1), torch.zeros(2)]))
    with pytest.raises(ValueError):
        model.generate([[1]], 4, top_p=0.0)
    with pytest.raises(ValueError):
        model.generate([[1] * 250], 10)  # past max_seq_len 256


def save(model, path: Path, **config_overrides):
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items() if not (model.args.tie_embeddings and k == "lm_head.weight")}
    save_file(state, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({**model.args.to_hf_config(), **config_overrides}))


@pytest.mark.parametrize("tied", [False, True])
def test_save_and_load_round_trip(tmp_path, tied):
    model = tiny(seed=6, tie_embeddings=tied)
    with torch.no_grad():
        model.moe_layers()[0][1].gate.e_score_correction_bias.normal_()  # the trained bias travels in the checkpoint
    save(model, tmp_path)
    loaded = N.NanoLLM.from_pretrained(tmp_path)
    tokens = torch.randint(0, 256, (2, 9))
    torch.testing.assert_close(loaded(tokens), model(tokens), atol=0, rtol=0)
    bf16 = N.NanoLLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    assert bf16.moe_layers()[0][1].gate.e_score_correction_bias.dtype == torch.float32
    assert bf16.generate([[5, 6, 7]], 4, stop_tokens=[]) is not None


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="benchmarks/pretrain_nanollm.py"):
        N.NanoLLM.from_pretrained(tmp_path / "missing")
    save(tiny(), tmp_path / "bad", intermediate_size=100)
    with pytest.raises(ValueError, match=r"gate_proj.weight has shape \(128, 64\) but the config gives \(100, 64\)"):
        N.NanoLLM.from_pretrained(tmp_path / "bad")


@pytest.mark.parametrize("kwargs, message", [
    (dict(ckpt_dir="/nonexistent/nanollm"), "error: no checkpoint at /nonexistent/nanollm"),
    (dict(temperature=-1.0), "error: --temperature must be"),
    (dict(top_p=1.5), "error: --top_p must be"),
    (dict(dtype="float8"), "error: --dtype must be"),
    (dict(prompt=None), "error: give --prompt"),
    (dict(max_new_tokens=0), "error: --max_new_tokens must be"),
])
def test_cli_user_errors(kwargs, message):
    with pytest.raises(SystemExit) as e:
        N.main(**{"prompt": "hi", "ckpt_dir": "/nonexistent/nanollm", **kwargs})
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
