"""Parity of nanollm.py against HF transformers' DeepseekV3 (the lead merges this into test_parity.py).

Module by module on tiny random configs (every code path: q compression on/off, interleaved and rotate-half RoPE,
yarn, group-limited top-k, normalised and raw expert weights, tied embeddings), then the whole model saved by HF
`save_pretrained` and loaded by `Transformer.from_pretrained`, then our fast paths against their plain paths:
cached decoding (naive and absorbed MLA) vs recomputation, dispatched MoE vs a dense reference, bias balancing,
packed documents vs separate runs. fp32 throughout; tolerances are stated where used.
Run: python -m pytest -q tests/parity_nanollm.py
"""
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nanollm as N  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-4)  # fp32, different summation orders (einsum/SDPA vs eager matmuls)

TINY = dict(vocab_size=96, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2, n_routed_experts=8,
            num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
            kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10,
            max_position_embeddings=64, rope_interleave=True, eos_token_id=1, bos_token_id=0)
VARIANTS = {
    "grouped_top2_interleaved": {},
    "no_q_lora_rotate_half_tied": dict(q_lora_rank=None, rope_interleave=False, tie_word_embeddings=True),
    # mscale != mscale_all_dim so that both the cos/sin scale and the softmax scale differ from 1
    "yarn_top1_unnormalised": dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                        original_max_position_embeddings=16, beta_fast=32,
                                                        beta_slow=1, mscale=1.0, mscale_all_dim=0.7),
                                   norm_topk_prob=False, num_experts_per_tok=1, n_group=1, topk_group=1,
                                   routed_scaling_factor=1.0),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices gain nothing from threads, and on a shared 2-core machine OpenMP's spinning threads make them
    ~10x slower (measured: 0.84 s vs 0.05 s per tiny forward under load); restored after this module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def hf_config(variant):
    cfg = DeepseekV3Config(**{**TINY, **VARIANTS[variant]})
    cfg._attn_implementation = "eager"  # the plainest reference: explicit matmul + additive mask + fp32 softmax
    return cfg


def randomize(model, seed=0):
    """Weights of O(1/sqrt(fan_in)), norms near 1 and a random balancing bias, so every term matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("e_score_correction_bias"):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            elif t.dim() == 1:
                t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(torch.randn(t.shape, generator=g) / t.shape[-1] ** 0.5)
    return model


def ours(variant, seed=0):
    cfg = hf_config(variant)
    return randomize(N.Transformer(N.ModelArgs.from_hf_config(cfg.to_dict())), seed).eval(), cfg


def hf_moe_state(moe: N.MoE) -> dict:
    """Our per-expert layout (the safetensors one) -> HF's in-memory stacked experts."""
    sd = {k: v for k, v in moe.state_dict().items() if not k.startswith("experts.")}
    sd["experts.gate_up_proj"] = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in moe.experts])
    sd["experts.down_proj"] = torch.stack([e.down_proj.weight for e in moe.experts])
    return sd


def causal_additive_mask(T):
    return torch.full((T, T), float("-inf")).triu(1)[None, None]


@pytest.mark.parametrize("variant", VARIANTS)
def test_rope_tables_match_hf(variant):
    model, cfg = ours(variant)
    pos = torch.arange(40)[None]
    cos, sin = hf.DeepseekV3RotaryEmbedding(cfg)(torch.zeros(1), pos)
    half = cfg.qk_rope_head_dim // 2  # HF stores cat(freqs, freqs): both halves equal ours
    ours_cos, ours_sin = model.rope_cos_sin(pos)
    torch.testing.assert_close(ours_cos, cos[..., :half], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours_sin, sin[..., half:], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("absorb", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_attention_matches_hf(variant, absorb):
    model, cfg = ours(variant)
    attn = model.model.layers[0].self_attn
    ref = hf.DeepseekV3Attention(cfg, layer_idx=0).eval()
    ref.load_state_dict(attn.state_dict())
    x, pos = torch.randn(2, 11, cfg.hidden_size), torch.arange(11).expand(2, 11)
    expected, _ = ref(x, hf.DeepseekV3RotaryEmbedding(cfg)(x, pos), causal_additive_mask(11))
    torch.testing.assert_close(attn(x, *model.rope_cos_sin(pos), absorb=absorb), expected, **TOL)


@pytest.mark.parametrize("variant", VARIANTS)
def test_moe_matches_hf(variant):
    model, cfg = ours(variant)
    moe = model.model.layers[1].mlp
    ref = hf.DeepseekV3MoE(cfg).eval()
    ref.load_state_dict(hf_moe_state(moe))
    x = torch.randn(3, 9, cfg.hidden_size)
    _, ref_w, ref_idx = ref.gate(x)
    w, idx, _ = moe.gate(x.flatten(0, 1))
    assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)  # the same experts, bias and groups included
    torch.testing.assert_close(w.gather(1, idx.argsort(-1)), ref_w.gather(1, ref_idx.argsort(-1)), **TOL)
    torch.testing.assert_close(moe(x), ref(x), **TOL)


@pytest.mark.parametrize("layer_idx", [0, 1])  # dense MLP, MoE
def test_decoder_layer_matches_hf(layer_idx):
    model, cfg = ours("grouped_top2_interleaved")
    layer = model.model.layers[layer_idx]
    ref = hf.DeepseekV3DecoderLayer(cfg, layer_idx).eval()
    ref.load_state_dict(hf_moe_state_for_layer(layer))
    x, pos = torch.randn(2, 7, cfg.hidden_size), torch.arange(7).expand(2, 7)
    expected = ref(x, attention_mask=causal_additive_mask(7), position_ids=pos,
                   position_embeddings=hf.DeepseekV3RotaryEmbedding(cfg)(x, pos))
    torch.testing.assert_close(layer(x, *model.rope_cos_sin(pos)), expected, **TOL)


def hf_moe_state_for_layer(layer):
    sd = layer.state_dict()
    if isinstance(layer.mlp, N.MoE):
        sd = {k: v for k, v in sd.items() if not k.startswith("mlp.")}
        sd.update({f"mlp.{k}": v for k, v in hf_moe_state(layer.mlp).items()})
    return sd


@pytest.fixture(scope="module", params=list(VARIANTS))
def saved_hf(request, tmp_path_factory):
    """An HF DeepseekV3ForCausalLM with random weights, written by save_pretrained (per-expert safetensors keys)."""
    torch.manual_seed(0)
    ref = DeepseekV3ForCausalLM(hf_config(request.param)).eval()
    with torch.no_grad():  # HF's own init leaves the bias at 0; a random one exercises selection-only biasing
        for layer in ref.model.layers[ref.config.first_k_dense_replace:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    return ref, path


def test_full_logits_match_hf(saved_hf):
    ref, path = saved_hf
    model = N.Transformer.from_pretrained(path)
    tokens = torch.randint(0, ref.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(tokens), ref(tokens).logits, **TOL)
    if ref.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("absorb", [False, True])
def test_greedy_generation_matches_hf(saved_hf, absorb):
    ref, path = saved_hf
    model = N.Transformer.from_pretrained(path)
    prompt = [5, 17, 42, 8, 77]
    expected = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                            pad_token_id=0, use_cache=True)[0, len(prompt):].tolist()
    assert model.generate([prompt], 12, stop_tokens=[], absorb=absorb)[0] == expected


@pytest.mark.parametrize("absorb", [False, True])
def test_cached_decoding_equals_full_recompute(absorb):
    model, _ = ours("grouped_top2_interleaved", seed=3)
    tokens = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(2))
    full = model(tokens)
    model.setup_cache(2, 24)
    with torch.no_grad():
        # prefill 8 tokens, a chunk of 4, then one token at a time: every step reads what the earlier ones wrote
        steps = [torch.arange(8), torch.arange(8, 12)] + [torch.tensor([t]) for t in range(12, 20)]
        for pos in steps:
            torch.testing.assert_close(model.forward_cached(tokens[:, pos], pos, absorb=absorb), full[:, pos], **TOL)
    model.clear_cache()


def test_dispatched_moe_equals_dense_reference():
    """Values and gradients of the sort/gather/index_add dispatch against running every expert on every token."""
    model, _ = ours("grouped_top2_interleaved")
    moe = model.model.layers[1].mlp
    x = torch.randn(4, 6, moe.gate.weight.shape[1], requires_grad=True)
    y = moe(x)
    grads = torch.autograd.grad(y.square().sum(), [x, *moe.parameters()])

    def dense(x):
        xf = x.flatten(0, 1)
        w, idx, _ = moe.gate(xf)
        combine = torch.zeros(len(xf), len(moe.experts)).scatter(1, idx, w)  # (N, E), zero for unchosen experts
        routed = sum(combine[:, e, None] * expert(xf) for e, expert in enumerate(moe.experts))
        return (routed + moe.shared_experts(xf)).view_as(x)

    y_ref = dense(x)
    torch.testing.assert_close(y, y_ref, **TOL)
    for g, g_ref in zip(grads, torch.autograd.grad(y_ref.square().sum(), [x, *moe.parameters()])):
        torch.testing.assert_close(g, g_ref, **TOL)


def test_bias_update_moves_load_towards_balance():
    model, _ = ours("grouped_top2_interleaved")
    model.train()
    for _, moe in model.moe_layers():  # start badly skewed: expert 0 wins every token
        moe.gate.e_score_correction_bias.zero_()[0] = 1.0
    tokens = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(4))
    imbalance = []
    with torch.no_grad():
        for _ in range(40):
            model(tokens)
            load = torch.tensor(list(model.update_router_biases(rate=0.02).values()))  # (layers, experts)
            assert torch.allclose(load.sum(-1), torch.ones(len(load)))
            imbalance.append((load.max(-1).values * load.shape[-1]).mean().item())  # 1.0 = perfectly balanced
    assert model.expert_load() == {}  # counts were consumed by the update
    assert imbalance[0] > 3.5 and imbalance[-1] < 0.6 * imbalance[0], imbalance


def test_doc_ids_equal_separate_documents():
    model, _ = ours("grouped_top2_interleaved", seed=5)
    docs = [torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 9, 4)]
    packed = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    # RoPE scores depend on relative positions only, so restarting them cannot show in the logits: check them here
    positions, _ = N.doc_positions_and_mask(doc_ids)
    assert torch.equal(positions[0], torch.cat([torch.arange(len(d)) for d in docs]))
    logits = model(packed, doc_ids=doc_ids)[0]
    torch.testing.assert_close(logits, torch.cat([model(d[None])[0] for d in docs]), **TOL)


def test_our_checkpoint_loads_in_transformers(tmp_path):
    """The other direction: state_dict + to_hf_config, as finetune.py saves them, read by DeepseekV3ForCausalLM."""
    from safetensors.torch import save_file

    model = randomize(N.Transformer(N.ModelArgs(moe_layers=(1, 2, 3), rope_interleave=False)), seed=7).eval()
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(model.args.to_hf_config()))
    ref = DeepseekV3ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    tokens = torch.randint(0, model.args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(model(tokens), ref(tokens).logits, **TOL)
