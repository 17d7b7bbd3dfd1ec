"""nanollm.py: a small DeepSeek-V3-style language model in one file, after nano-llm (asoloveii/nano-llm, 327M). What
it adds to smollm2.py: Multi-head Latent Attention (MLA) in every block, and a DeepSeekMoE layer (shared experts plus
top-k routed experts) in place of the MLP in some, trained from scratch here. Module names follow HF
`DeepseekV3ForCausalLM`, so our checkpoints load in transformers and DeepseekV3-architecture checkpoints load here.

References: DeepSeek-V2 (arXiv 2405.04434) §2.1 for MLA (low-rank query and key-value compression, a decoupled RoPE
key shared by all heads, a cache of the latent only, absorbed up-projections); DeepSeek-V3 (arXiv 2412.19437)
§2.1.2 for the router (sigmoid affinities, auxiliary-loss-free bias balancing, sequence-wise balance loss,
group-limited routing); deepseek-ai/DeepSeek-V3 `inference/model.py` and HF transformers `models/deepseek_v3`
(names, config, RoPE layouts; the parity reference in test_parity.py). As in DeepSeek-V3's code, the cache holds only
the latent and the shared RoPE key (MLACache), read naive or absorbed (`model.absorb`, tested equal), and each routed
expert runs on its own tokens only. Not here: multi-token prediction (its weights are skipped on load, as HF does)
and FP8. Blocks marked `# Same as smollm2.py: NAME` are that file's, word for word; the command line is cli.py's.

Run:  python benchmarks/pretrain_nanollm.py   (trains one in minutes on a CPU, then samples it with this file)
      python nanollm.py --ckpt_dir runs/pretrain_nanollm/model --prompt "def" --temperature 0
"""
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# ChatML with no default system prompt: nanollm's chat models learn the format from finetune.py's data, which has none
from tokenizer_bpe import apply_chat_template as encode_chat

# -----------------------------------------------------------------------------
# Config


@dataclass
class ModelArgs:
    """Hyper-parameters, one comment per field; HF_KEYS below gives the DeepseekV3Config name of each."""

    vocab_size: int = 256  # token vocabulary size
    dim: int = 64  # residual stream width
    n_layers: int = 4  # number of blocks
    n_heads: int = 4  # attention heads
    hidden_dim: int = 128  # SwiGLU inner width of the dense MLP (HF intermediate_size)
    moe_layers: tuple[int, ...] = (1, 3)  # 0-based indices of the MoE blocks (how HF says it: see to_hf_config)
    moe_hidden_dim: int = 32  # SwiGLU inner width of one expert (HF moe_intermediate_size)
    n_shared_experts: int = 1  # experts every token uses, stored as one MLP of width n_shared_experts * moe_hidden_dim
    n_routed_experts: int = 8  # experts the router chooses from
    n_activated_experts: int = 2  # routed experts per token, the k of top-k
    n_expert_groups: int = 2  # routed experts are split into this many groups
    n_limited_groups: int = 1  # each token picks its experts inside this many best groups
    route_scale: float = 2.5  # multiplies the routed experts' weights
    norm_topk_prob: bool = True  # normalise the chosen experts' sigmoid scores to sum to 1 before route_scale
    aux_loss_alpha: float = 0.0  # weight of the sequence-wise balance loss (DeepSeek-V3 eq. 17); 0 turns it off
    q_lora_rank: int = 32  # rank of the query latent; 0 = no query compression (a plain q_proj)
    kv_lora_rank: int = 24  # rank of the joint key-value latent, the part of each token that is cached
    qk_nope_head_dim: int = 8  # per-head query/key dims without position, rebuilt from the latent
    qk_rope_head_dim: int = 8  # query/key dims that carry RoPE; the key part is one vector shared by all heads
    v_head_dim: int = 16  # per-head value dims
    rope_theta: float = 10000.0  # RoPE base
    rope_interleave: bool = True  # RoPE rotates pairs (0,1), (2,3)... (DeepSeek checkpoints) instead of (i, i + d/2)
    rope_scaling: dict | None = None  # None, or HF's yarn `rope_parameters` without rope_theta (rope_type, factor, ...)
    max_seq_len: int = 256  # context the model was trained for (HF max_position_embeddings): prompt + generation
    norm_eps: float = 1e-6  # RMSNorm epsilon of the block and final norms
    tie_embeddings: bool = False  # lm_head shares the embedding matrix
    stop_tokens: tuple[int, ...] = ()  # generation ends at these (HF eos_token_id); (): only at max_new_tokens

    # Same as smollm2.py: ModelArgs.from_name
    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        """From a DeepseekV3 config.json (transformers 5's `rope_parameters`, or `rope_theta` + `rope_scaling`). A key
        it lacks keeps its default; a value of the wrong kind, or a MoE the router cannot run, is a ValueError."""
        # HF writes null for "none": no query compression, no routed or shared experts, one expert group
        null = dict(q_lora_rank=0, n_routed_experts=0, n_shared_experts=0, n_expert_groups=1, n_limited_groups=1)
        required = ("vocab_size", "dim", "n_layers", "n_heads")
        zero_ok = ("q_lora_rank", "n_routed_experts", "n_shared_experts", "aux_loss_alpha")  # the rest must be > 0
        kw = {}
        for f, key in HF_KEYS.items():  # each value checked as the kind of its field's default
            default = null[f] if f in null and key in cfg else ... if f in required else getattr(cls, f)
            kw[f] = config_get(cfg, key, type(getattr(cls, f)), default, 0 if f in zero_ok else None)
        if cfg.get("hidden_act", "silu") != "silu" or cfg.get("attention_bias", False):
            raise NotImplementedError("only silu MLPs and bias-free attention, as in every DeepSeek-V3 checkpoint")
        rope = dict(config_get(cfg, "rope_parameters", dict, None) or config_get(cfg, "rope_scaling", dict, {}))
        kw["rope_theta"] = config_get(rope, "rope_theta", float, config_get(cfg, "rope_theta", float, 10000.0))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        rope.pop("rope_theta", None)
        if rope_type not in ("default", "yarn"):
            raise NotImplementedError(f"rope_type {rope_type!r}: only default and yarn (DeepSeek-V3's) exist here")
        for key, kind in dict(original_max_position_embeddings=int, factor=float, beta_fast=float, beta_slow=float,
                              mscale=float, mscale_all_dim=float, attention_factor=float, truncate=bool).items():
            config_get(rope, key, kind, None, low=0 if kind is float else None)  # what rope_frequencies reads
        kw["rope_scaling"] = None if rope_type == "default" else {"rope_type": rope_type, **rope}
        # MoE blocks as HF and DeepSeek say it (from first_k_dense_replace on, every moe_layer_freq-th), or moe_layers
        n, first = kw["n_layers"], config_get(cfg, "first_k_dense_replace", int, 3, low=0)
        freq = config_get(cfg, "moe_layer_freq", int, 1)
        moe = config_get(cfg, "moe_layers", tuple, tuple(
            i for i in range(n) if cfg.get("n_routed_experts") and i >= first and i % freq == 0))
        E, G, top_g = kw["n_routed_experts"], kw["n_expert_groups"], kw["n_limited_groups"]
        top_k = kw["n_activated_experts"]
        if moe and (max(moe) >= n or not E or E % G or top_g > G or G > 1 and E // G < 2 or top_k > E // G * top_g):
            raise ValueError(f"the MoE does not fit: moe_layers {moe[:5]} of {n} layers, {E} routed experts in {G} "
                             f"groups, {top_k} chosen in {top_g} groups")
        if kw["qk_rope_head_dim"] % 2:
            raise ValueError(f"qk_rope_head_dim must be even (RoPE rotates pairs), got {kw['qk_rope_head_dim']}")
        return cls(**kw, moe_layers=moe)

    def to_hf_config(self) -> dict:
        """A config.json that this file and transformers' DeepseekV3Config load; a MoE layout other than HF's "the
        first k blocks dense, the rest MoE" (nano-327m's) is also written as `moe_layers`, our own key."""
        first_dense = self.moe_layers[0] if self.moe_layers else self.n_layers
        cfg = {key: getattr(self, field) for field, key in HF_KEYS.items()}
        cfg.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", hidden_act="silu",
                   attention_bias=False, num_key_value_heads=self.n_heads, first_k_dense_replace=first_dense,
                   q_lora_rank=self.q_lora_rank or None, num_nextn_predict_layers=0,  # no multi-token prediction
                   rope_parameters={"rope_theta": self.rope_theta, "rope_type": "default", **(self.rope_scaling or {})},
                   eos_token_id=list(self.stop_tokens) or None)
        if list(self.moe_layers) != list(range(first_dense, self.n_layers)):
            cfg["moe_layers"] = list(self.moe_layers)
        return cfg


# ModelArgs field -> DeepseekV3Config key, for the fields that map one to one
HF_KEYS = dict(
    vocab_size="vocab_size", dim="hidden_size", n_layers="num_hidden_layers", n_heads="num_attention_heads",
    hidden_dim="intermediate_size", moe_hidden_dim="moe_intermediate_size", n_shared_experts="n_shared_experts",
    n_routed_experts="n_routed_experts", n_activated_experts="num_experts_per_tok", n_expert_groups="n_group",
    n_limited_groups="topk_group", route_scale="routed_scaling_factor", norm_topk_prob="norm_topk_prob",
    aux_loss_alpha="aux_loss_alpha", q_lora_rank="q_lora_rank", kv_lora_rank="kv_lora_rank",
    qk_nope_head_dim="qk_nope_head_dim", qk_rope_head_dim="qk_rope_head_dim", v_head_dim="v_head_dim",
    rope_interleave="rope_interleave", max_seq_len="max_position_embeddings", norm_eps="rms_norm_eps",
    tie_embeddings="tie_word_embeddings", stop_tokens="eos_token_id")

PRESETS = {
    # nano-llm's config/nano_327m.yaml: MoE on 1-based blocks 4, 8, ..., 20. Top-1 routing with norm_topk_prob would
    # weigh every token's expert exactly 1, so no gradient would reach the router: nano-llm weighs by the raw score
    "nano-327m": dict(vocab_size=50304, dim=768, n_layers=20, n_heads=12, hidden_dim=3072,
                      moe_layers=(3, 7, 11, 15, 19), moe_hidden_dim=2048, n_shared_experts=2, n_routed_experts=2,
                      n_activated_experts=1, n_expert_groups=1, n_limited_groups=1, route_scale=1.0,
                      norm_topk_prob=False, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=64,
                      qk_rope_head_dim=64, v_head_dim=128, max_seq_len=2048, norm_eps=1e-5),
    # for pretraining on a CPU (set vocab_size to the trained tokenizer's); DeepSeek-V3's layout, which HF loads
    "nano-small": dict(vocab_size=4096, dim=256, n_layers=6, n_heads=4, hidden_dim=768, moe_layers=(1, 2, 3, 4, 5),
                       moe_hidden_dim=256, n_shared_experts=1, n_routed_experts=4, n_activated_experts=1,
                       n_expert_groups=1, n_limited_groups=1, route_scale=1.0, norm_topk_prob=False, q_lora_rank=96,
                       kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=64, max_seq_len=512,
                       norm_eps=1e-5, aux_loss_alpha=1e-4),
    # for tests (245k parameters): group-limited top-2 routing, query compression, interleaved MoE blocks
    "nano-tiny": dict(),
}


# Same as smollm2.py: config_get
def config_get(cfg: dict, key: str, kind=int, default=..., low=None):
    """config.json's cfg[key] if it fits a field of `kind`, else a ValueError naming the key; `default` where the key
    is absent or null (no default: required). A config that would build a wrong model stops here."""
    if not isinstance(cfg, dict):
        raise ValueError(f"a config is a JSON object, not a {type(cfg).__name__}")
    value = cfg.get(key)
    if value is None and default is ...:
        raise ValueError(f"no {key!r} entry: it is not a checkpoint this file reads")
    if value is None:
        return default
    if kind is tuple:  # token ids: one int >= 0 or a list of them
        value = tuple(value) if isinstance(value, list) else (value,)
        ok = all(type(i) is int and i >= 0 for i in value)
    elif kind is float:
        ok = type(value) in (int, float) and math.isfinite(value) and (value > 0 if low is None else value >= low)
    elif kind is int:  # true, "64" and 2.5 are not ints
        ok = type(value) is int and (value > 0 if low is None else value >= low) and value < 2**62
    else:
        ok = type(value) is kind  # bool, dict
    if not ok:
        lo = "> 0" if low is None else f">= {low}"
        want = {int: f"an integer {lo}, < 2^62", float: f"a finite number {lo}", bool: "true or false",
                dict: "an object", tuple: "an id >= 0 or a list of them"}[kind]
        raise ValueError(f"{key} must be {want}, got {value!r:.60}")
    return float(value) if kind is float else value

# -----------------------------------------------------------------------------
# Building blocks


# Same as smollm2.py: RMSNorm
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 even for bf16 activations: the mean of squares loses too much precision otherwise.
        # Then scale in the weight's dtype, after casting back, as HF LlamaRMSNorm (F.rms_norm is x * rsqrt(...)).
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype)


# Differs from smollm2.py's rope_inv_freq: RoPE on qk_rope_head_dim only, and DeepSeek-V3's YaRN scaling
def rope_frequencies(args: ModelArgs, device=None) -> tuple[torch.Tensor, float, float]:
    """Inverse frequencies (qk_rope_head_dim / 2,), cos/sin scale, softmax-scale factor; as HF default | yarn RoPE."""
    d, base, s = args.qk_rope_head_dim, args.rope_theta, args.rope_scaling
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)
    if not s:
        return inv_freq, 1.0, 1.0
    if s["rope_type"] != "yarn":
        raise NotImplementedError(f"rope_type {s['rope_type']!r}: only default and yarn (DeepSeek-V3's) exist here")
    orig = s["original_max_position_embeddings"]
    factor = s.get("factor") or args.max_seq_len / orig
    # YaRN (arXiv 2309.00071 §3.2): dims turning more than beta_fast times over the original context keep their
    # frequency, those turning fewer than beta_slow times are divided by `factor`, a linear ramp blends between
    def dim_of(turns):
        return d * math.log(orig / (turns * 2 * math.pi)) / (2 * math.log(base))
    low, high = dim_of(s.get("beta_fast") or 32), dim_of(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    ramp = ((torch.arange(d // 2, dtype=torch.float32, device=device) - low) / max(high - low, 1e-3)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    def get_mscale(m=1.0):  # as HF `get_mscale`
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0
    m, m_all = s.get("mscale"), s.get("mscale_all_dim")
    attn_factor = s.get("attention_factor") or (get_mscale(m) / get_mscale(m_all) if m and m_all else get_mscale())
    # DeepSeek-V3 also raises the softmax temperature by get_mscale(mscale_all_dim)^2 (HF `yarn_apply_mscale`)
    return inv_freq, attn_factor, get_mscale(m_all) ** 2 if m_all else 1.0


# Differs from smollm2.py's rope_cos_sin: half-width tables of MLA's RoPE part, scaled by YaRN's attention factor
def rope_cos_sin(inv_freq, pos, dtype, factor: float):
    """pos (B, T) -> cos, sin (B, T, qk_rope_head_dim / 2), angles in fp32 then cast, as HF."""
    angles = pos[..., None].float() * inv_freq
    return (angles.cos() * factor).to(dtype), (angles.sin() * factor).to(dtype)


# Differs from smollm2.py's apply_rope: half-width tables, and DeepSeek's interleaved pairs (0,1), (2,3)...
def apply_rope(x, cos, sin, interleave: bool):
    """Rotate x (..., T, d) by angles whose cos/sin are (..., T, d/2)."""
    if interleave:
        # gathering evens then odds turns the pairs (2i, 2i+1) into the rotate-half pairs (i, i + d/2); q and k are
        # permuted alike, so q.k is unchanged (HF `apply_rotary_pos_emb_interleave`)
        x = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class MLACache(nn.Module):
    """Preallocated latents c_KV and rotated shared RoPE keys, written by position: kv_lora_rank + qk_rope_head_dim
    values per token. nano-327m in bf16 caches 20 layers x (128 + 64) x 2 B = 7,680 B per token, where multi-head
    attention of the same width caches 20 x 2 x 768 x 2 B = 61,440 B (8x)."""

    def __init__(self, batch_size, max_seq_len, kv_lora_rank, rope_dim, dtype, device):
        super().__init__()
        self.batch_size, self.max_seq_len = batch_size, max_seq_len  # what generate() may reuse it for
        kw = dict(dtype=dtype, device=device)
        self.register_buffer("kv", torch.zeros(batch_size, max_seq_len, kv_lora_rank, **kw), persistent=False)
        self.register_buffer("pe", torch.zeros(batch_size, max_seq_len, rope_dim, **kw), persistent=False)

    def update(self, input_pos, kv, pe, length: int):
        self.kv[:, input_pos] = kv
        self.pe[:, input_pos] = pe
        return self.kv[:, :length], self.pe[:, :length]  # only the filled prefix, not the whole buffer


class MLA(nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2 §2.1), named as HF `DeepseekV3Attention`."""

    def __init__(self, args: ModelArgs, softmax_mscale: float = 1.0):
        super().__init__()
        self.n_heads, self.q_lora_rank, self.kv_lora_rank = args.n_heads, args.q_lora_rank, args.kv_lora_rank
        self.nope, self.rope, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.interleave = args.rope_interleave
        qk_dim = self.nope + self.rope
        if self.q_lora_rank:
            self.q_a_proj = nn.Linear(args.dim, self.q_lora_rank, bias=False)
            # subtle: both latent norms use eps 1e-6 whatever rms_norm_eps says (HF and DeepSeek's code alike)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, 1e-6)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.n_heads * qk_dim, bias=False)
        else:
            self.q_proj = nn.Linear(args.dim, self.n_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(args.dim, self.kv_lora_rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, 1e-6)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.n_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, args.dim, bias=False)
        self.scale = qk_dim ** -0.5 * softmax_mscale  # over the whole qk head, nope + rope (DeepSeek-V2 eq. 19)
        self.cache = None

    def forward(self, x, cos, sin, mask=None, input_pos=None, absorb=False):
        B, T, _ = x.shape
        H = self.n_heads
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora_rank else self.q_proj(x)
        q_nope, q_pe = q.view(B, T, H, -1).transpose(1, 2).split([self.nope, self.rope], dim=-1)  # (B, H, T, *)
        q_pe = apply_rope(q_pe, cos[:, None], sin[:, None], self.interleave)
        kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope], dim=-1)
        kv = self.kv_a_layernorm(kv)                          # (B, T, kv_lora_rank): the latent c_KV
        k_pe = apply_rope(k_pe, cos, sin, self.interleave)    # (B, T, rope): one key for all heads (decoupled RoPE)
        if self.cache is not None:
            kv, k_pe = self.cache.update(input_pos, kv, k_pe, mask.size(-1))  # (B, S, *): every cached token
        S = kv.size(1)
        if not absorb:  # naive: up-project the latent of every attended token into per-head keys and values
            k_nope, v = self.kv_b_proj(kv).view(B, S, H, -1).transpose(1, 2).split([self.nope, self.v_dim], dim=-1)
            k = torch.cat([k_nope, k_pe[:, None].expand(B, H, S, -1)], dim=-1)  # (B, H, S, nope + rope)
            q = torch.cat([q_nope, q_pe], dim=-1)
            # no mask = a plain causal forward; cached decoding and packed documents pass one (True = attend)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale)
        else:
            # absorbed (DeepSeek-V2 §2.1.2): q_nope . (W_UK c) = (W_UK^T q_nope) . c, so the scores read the cached
            # latents and RoPE keys as they are, and W_UV comes after the weighted sum: per-head keys and values never
            # exist. Scores and sum in fp32, as the softmax (bf16: less exact, slower on CPUs; docs/house_models.md)
            w = self.kv_b_proj.weight.view(H, self.nope + self.v_dim, self.kv_lora_rank)
            q_nope = torch.einsum("bhtd,hdc->bhtc", q_nope, w[:, :self.nope])  # (B, H, T, kv_lora_rank)
            kv, k_pe = kv[:, None].float(), k_pe[:, None].float()  # (B, 1, S, *)
            scores = q_nope.float() @ kv.transpose(-1, -2) + q_pe.float() @ k_pe.transpose(-1, -2)  # (B, H, T, S)
            if mask is None:
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
            p = (scores * self.scale).masked_fill(~mask, float("-inf")).softmax(dim=-1)
            y = (p @ kv).to(x.dtype)  # (B, H, T, kv_lora_rank): the weighted sum of latents
            y = torch.einsum("bhtc,hvc->bhtv", y, w[:, self.nope:])  # (B, H, T, v_head_dim)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * self.v_dim))


# Differs from smollm2.py's MLP: it takes its widths, since the experts of a MoE are narrower MLPs
class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """DeepSeek-V3 router (§2.1.2): sigmoid affinities; the balancing bias picks the experts but never weighs them."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.k, self.n_groups, self.topk_groups = args.n_activated_experts, args.n_expert_groups, args.n_limited_groups
        self.route_scale, self.norm_topk_prob = args.route_scale, args.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim))  # init by NanoLLM
        # a buffer, not a parameter: update_router_biases moves it, gradients never do; it is saved in checkpoints
        self.register_buffer("e_score_correction_bias", torch.zeros(args.n_routed_experts))

    def forward(self, x):  # x (N, dim) -> weights, indices (N, k); scores (N, E)
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # routing in fp32, as HF and DeepSeek
        biased = scores + self.e_score_correction_bias
        if self.n_groups > 1:
            # group-limited routing: rank groups by the sum of their two best biased scores, keep topk_groups
            groups = biased.view(len(x), self.n_groups, -1)
            best = groups.topk(2, dim=-1).values.sum(-1).topk(self.topk_groups, dim=-1).indices  # (N, topk_groups)
            keep = torch.zeros_like(groups[..., 0], dtype=torch.bool).scatter(1, best, True)
            biased = groups.masked_fill(~keep[..., None], float("-inf")).flatten(1)
        idx = biased.topk(self.k, dim=-1).indices
        weights = scores.gather(1, idx)  # unbiased scores weight the experts
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.route_scale, idx, scores


class MoE(nn.Module):
    """DeepSeekMoE: shared experts on every token plus top-k routed experts, each run only on its tokens."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_experts, self.k = args.n_routed_experts, args.n_activated_experts
        self.aux_loss_alpha = args.aux_loss_alpha
        self.gate = Gate(args)
        self.experts = nn.ModuleList(MLP(args.dim, args.moe_hidden_dim) for _ in range(self.n_experts))
        # n shared experts of width h are one MLP of width n*h (sum of their outputs), HF's layout
        n_shared = args.n_shared_experts
        self.shared_experts = MLP(args.dim, args.moe_hidden_dim * n_shared) if n_shared else None
        self.load = None       # (E,) tokens routed per expert in training forwards since the last bias update
        self.aux_loss = None   # this forward's sequence-wise balance loss, when training with aux_loss_alpha > 0

    def forward(self, x):  # (B, T, dim)
        B, T, D = x.shape
        xf = x.reshape(-1, D)                                     # (N, dim)
        weights, idx, scores = self.gate(xf)                      # (N, k), (N, k), (N, E)
        flat = idx.flatten()                                      # (N * k,) expert of each (token, slot) pair
        order = flat.argsort(stable=True)                         # pairs grouped by expert, token order kept
        counts = torch.bincount(flat, minlength=self.n_experts)
        token = order // self.k                                   # source token of each sorted pair
        # one host sync per layer to cut the chunks (DeepSeek's loop over experts does the same); no capacity
        # limit, so no token is dropped, and an expert nobody chose runs on an empty chunk
        chunks = xf[token].split(counts.tolist())                 # per expert: only the tokens that chose it
        ys = torch.cat([expert(c) for expert, c in zip(self.experts, chunks)])  # (N * k, dim)
        ys = (ys * weights.flatten()[order, None]).to(x.dtype)
        y = torch.zeros_like(xf).index_add(0, token, ys)          # out of place: stays differentiable
        if self.shared_experts is not None:
            y = y + self.shared_experts(xf)
        self.aux_loss = None
        if self.training:  # evaluation and generation must not move the biases
            self.load = counts if self.load is None else self.load + counts
            if self.aux_loss_alpha > 0:
                # DeepSeek-V3 eqs. 17-20 per sequence: f_i = E / (k T) * #tokens choosing i, P_i = mean over t of
                # the scores normalised per token; alpha * sum_i f_i P_i, averaged over the batch
                s = scores.view(B, T, -1)
                f = F.one_hot(idx.view(B, -1), self.n_experts).sum(1) * self.n_experts / (self.k * T)  # (B, E)
                p = (s / s.sum(-1, keepdim=True)).mean(1)
                self.aux_loss = self.aux_loss_alpha * (f * p).sum(-1).mean()
        return y.view(B, T, D)


# Differs from smollm2.py's Block: MLA attention, and a MoE in place of the MLP in the moe_layers
class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int, softmax_mscale: float):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = MLA(args, softmax_mscale)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MoE(args) if layer_idx in args.moe_layers else MLP(args.dim, args.hidden_dim)

    def forward(self, x, cos, sin, mask=None, input_pos=None, absorb=False):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos, absorb)
        return x + self.mlp(self.post_attention_layernorm(x))


# Same as smollm2.py: doc_positions_and_mask
def doc_positions_and_mask(doc_ids):
    """Packed training rows of document ids (B, T) -> RoPE positions restarting at each document (B, T) and a causal
    mask that never crosses a document boundary (B, 1, T, T); a document is a run of equal ids."""
    t = torch.arange(doc_ids.size(1), device=doc_ids.device)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    segment = starts.cumsum(1)  # (B, T) document number: runs, not raw ids
    pos = t - torch.where(starts, t, 0).cummax(1).values  # distance to the own document's first token
    mask = (segment[:, :, None] == segment[:, None, :]) & (t[:, None] >= t[None, :])
    return pos, mask[:, None]

# -----------------------------------------------------------------------------
# The model


class NanoLLM(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.init_rope()
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(args.vocab_size, args.dim),
            layers=nn.ModuleList(Block(args, i, self.softmax_mscale) for i in range(args.n_layers)),
            norm=RMSNorm(args.dim, args.norm_eps)))
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        for p in self.parameters():  # HF's N(0, 0.02) matrices (a N(0, 1) embedding starts far above ln(vocab))
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)
        if args.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.aux_loss = 0.0
        self.absorb = True  # how decoding reads the MLA cache, DeepSeek-V3's attn_impl: "absorb", else "naive"

    def init_rope(self, device=None):
        # as smollm2.py's inv_freq (fp32, not a buffer), and YaRN's two scales
        self.inv_freq, self.rope_factor, self.softmax_mscale = rope_frequencies(self.args, device)

    def moe_layers(self) -> list[tuple[int, MoE]]:
        return [(i, layer.mlp) for i, layer in enumerate(self.model.layers) if isinstance(layer.mlp, MoE)]

    def trunk(self, tokens, positions, mask, input_pos=None, absorb=False):
        """tokens (B, T), positions (B, T) -> final-normed hidden states (B, T, dim)."""
        x = self.model.embed_tokens(tokens)                                   # (B, T, dim)
        cos, sin = rope_cos_sin(self.inv_freq.to(x.device), positions, x.dtype, self.rope_factor)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, input_pos, absorb)
        # the balance loss of this forward for the training loop to add: a tensor, or 0.0 when off
        self.aux_loss = sum((m.aux_loss for _, m in self.moe_layers() if m.aux_loss is not None), 0.0)
        return self.model.norm(x)

    def forward(self, tokens, doc_ids=None):
        """Logits (B, T, vocab) without a cache; doc_ids (B, T) marks packed documents, which never see each other."""
        if doc_ids is None:
            positions = torch.arange(tokens.size(1), device=tokens.device).expand_as(tokens)
            return self.lm_head(self.trunk(tokens, positions, None))
        return self.lm_head(self.trunk(tokens, *doc_positions_and_mask(doc_ids)))

    def setup_cache(self, batch_size: int, max_seq_len: int):
        w = self.model.norm.weight  # the model's dtype and device, whatever form its linear layers take
        for layer in self.model.layers:
            layer.self_attn.cache = MLACache(batch_size, max_seq_len, self.args.kv_lora_rank,
                                             self.args.qk_rope_head_dim, w.dtype, w.device)

    # Same as smollm2.py: SmolLM2.clear_cache
    def clear_cache(self):
        for layer in self.model.layers:
            layer.self_attn.cache = None

    def forward_cached(self, tokens, input_pos, pad=None):
        """As smollm2.py's, with a mask always (MLA's cache reads its length from it); self.absorb picks the path."""
        pad = torch.zeros(len(tokens), dtype=torch.long, device=tokens.device) if pad is None else pad
        slots = torch.arange(int(input_pos[-1]) + 1, device=tokens.device)  # the filled prefix only
        # causal over slots and blind to padding; a padding query still sees itself, so no softmax row is empty
        mask = (slots <= input_pos[:, None]) & ((slots >= pad[:, None, None]) | (slots == input_pos[:, None]))
        positions = (input_pos - pad[:, None]).clamp(min=0)                   # (B, T)
        h = self.trunk(tokens, positions, mask[:, None], input_pos, self.absorb)
        return self.lm_head(h[:, -1])  # only the last position is needed to pick the next token

    @torch.no_grad()  # an update between training steps, as an optimizer's; inference_mode is generation's
    def update_router_biases(self, rate: float = 1e-3, all_sum=None) -> dict[int, list[float]]:
        """Auxiliary-loss-free balancing (DeepSeek-V3 §2.1.2, gamma = 0.001), after each optimizer step: each router's
        bias falls by `rate` for the experts above the mean load since the last call (training forwards), rises for the
        others. all_sum first sums the loads over processes (in place), so all move alike. Returns the load."""
        counted = [moe for _, moe in self.moe_layers() if moe.load is not None]
        if all_sum is not None:
            for moe in counted:
                all_sum(moe.load)
        load = self.expert_load()
        for moe in counted:
            moe.gate.e_score_correction_bias += rate * torch.sign(moe.load.float().mean() - moe.load)
            moe.load = None
        return load

    def expert_load(self) -> dict[int, list[float]]:
        """{layer: fraction of routed tokens per expert} since the last update_router_biases (training mode only)."""
        return {i: (m.load / m.load.sum()).tolist() for i, m in self.moe_layers() if m.load is not None}

    # finetune.py's hooks: the balance loss of the last forward, and the bias update after each optimizer step
    def extra_loss(self):
        return self.aux_loss

    def after_optimizer_step(self, all_sum, router_bias_rate: float) -> dict:
        return {"expert_load": self.update_router_biases(router_bias_rate, all_sum)}

    @classmethod
    def from_pretrained(cls, ckpt_dir, device=None, dtype=None) -> "NanoLLM":
        """An HF-layout DeepseekV3 checkpoint folder on device (None: cpu), in dtype (None: as stored), each file
        checked before it is used (see Loading)."""
        ckpt_dir = Path(ckpt_dir)
        args = read_config(ckpt_dir)
        # DeepSeek-V3 ships its multi-token-prediction module as extra layers n_layers...: unused, as in HF
        header = {k: v for k, v in read_header(ckpt_dir).items()
                  if not ((m := re.match(r"model\.layers\.(\d+)\.", k)) and int(m[1]) >= args.n_layers)}
        model, state = build(cls, args, header, ckpt_dir, device or "cpu", None, layers=args.n_layers,
                             experts=args.n_routed_experts if args.moe_layers else 0)
        # the balancing bias stays fp32, as HF keeps it: bf16 cannot hold 1e-3 steps on top of ~1
        model.load_state_dict({k: v.float() if k.endswith("e_score_correction_bias") else v.to(dtype or v.dtype)
                               for k, v in state.items()}, strict=True, assign=True)
        if args.tie_embeddings:  # assign=True gave each name its own Parameter: tie them again
            model.lm_head.weight = model.model.embed_tokens.weight
        model.init_rope(device)
        return model.eval()

    # Same as smollm2.py: SmolLM2.generate (with SmolLM2->NanoLLM)
    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float = 1.0, stop_tokens=None, seed: int | None = None,
                 stream=None) -> list[list[int]]:
        """The new tokens of each prompt (a stop token ends a row, unreturned); temperature 0 is greedy; stop_tokens
        None: args.stop_tokens, []: none; stream(row, token) sees each token as it comes. The KV cache lives for this
        call, unless the caller set up one that fits (benchmarks do, so a compiled step sees the same buffers)."""
        longest = check_generate(prompts, max_new_tokens, self.args, temperature, top_k, top_p)
        stop = set(self.args.stop_tokens if stop_tokens is None else stop_tokens)
        B, total, device = len(prompts), longest + max_new_tokens, self.model.norm.weight.device
        # Left-pad so every row's last prompt token sits in the same slot: one decode step serves all rows.
        pad = torch.tensor([longest - len(p) for p in prompts], device=device)
        tokens = torch.tensor([[0] * (longest - len(p)) + list(p) for p in prompts], device=device)
        generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        cache = self.model.layers[0].self_attn.cache
        own_cache = cache is None or cache.batch_size != B or cache.max_seq_len < total
        if own_cache:
            self.setup_cache(B, total)
        out, done = [[] for _ in range(B)], [False] * B
        try:
            logits = self.forward_cached(tokens, torch.arange(longest, device=device), pad)  # prefill
            for step in range(max_new_tokens):
                next_tok = sample(logits, temperature, top_k, top_p, generator)  # (B,)
                for b, t in enumerate(next_tok.tolist()):
                    done[b] = done[b] or t in stop  # a finished row keeps decoding (batch shape) but is ignored
                    if not done[b]:
                        out[b].append(t)
                        if stream is not None:
                            stream(b, t)
                if all(done) or step == max_new_tokens - 1:
                    break
                logits = self.forward_cached(next_tok[:, None], torch.tensor([longest + step], device=device), pad)
        finally:
            if own_cache:
                self.clear_cache()
        return out

# -----------------------------------------------------------------------------
# Loading (the block every model file holds; see smollm2.py)

FETCH = ("nanollm is trained from scratch: `python benchmarks/pretrain_nanollm.py` trains one in about 2 minutes on a "
         "CPU (then --ckpt_dir runs/pretrain_nanollm/model); finetune.py --preset trains others")


# Same as smollm2.py: read_json
def read_json(path) -> dict:
    """A JSON object from a file, else a ValueError naming the file (json's own errors do not)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, or brackets nested 10^5 deep
        raise ValueError(f"{path} is not valid JSON ({e}); download it again") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object but a {type(data).__name__}")
    return data


# Same as smollm2.py: read_config
def read_config(ckpt_dir: Path) -> ModelArgs:
    """ModelArgs from config.json, stopping where generation_config.json's eos ids say (as HF generate does)."""
    path, gen = ckpt_dir / "config.json", ckpt_dir / "generation_config.json"
    if ckpt_dir.is_file():
        raise FileNotFoundError(f"{ckpt_dir} is a file: give the checkpoint's folder")
    if not path.is_file():
        meta = f"Meta's original format: convert it once with `python download.py --meta_dir {ckpt_dir}`"
        raise FileNotFoundError(f"no checkpoint at {ckpt_dir} (no config.json): "
                                + (meta if (ckpt_dir / "params.json").is_file() else FETCH))
    cfg, gen_cfg = read_json(path), read_json(gen) if gen.is_file() else {}
    try:
        args = ModelArgs.from_hf_config(cfg)
        args.stop_tokens = config_get(gen_cfg, "eos_token_id", tuple, args.stop_tokens)
    except ValueError as e:  # config_get's message names the key
        raise ValueError(f"{ckpt_dir}: {e}") from None
    return args


# Same as smollm2.py: read_header
def read_header(ckpt_dir: Path) -> dict:
    """{name: (file, dtype, shape)} of the tensors in model.safetensors or its shards, from the headers alone."""
    from safetensors import SafetensorError, safe_open

    index = ckpt_dir / "model.safetensors.index.json"
    files = read_json(index).get("weight_map") if index.is_file() else {"": "model.safetensors"}
    if not isinstance(files, dict) or not all(isinstance(f, str) and Path(f).name == f for f in files.values()):
        raise ValueError(f"{index}: weight_map must map tensor names to file names in the folder")
    header = {}
    for f in sorted({ckpt_dir / f for f in files.values()}):
        try:
            with safe_open(f, "pt") as st:
                header |= {k: (f, st.get_slice(k).get_dtype(), st.get_slice(k).get_shape()) for k in st.keys()}
        except FileNotFoundError:
            raise FileNotFoundError(f"{f} is missing: the download is incomplete; fetch the checkpoint again") from None
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{f} is truncated or corrupt ({e}); download it again") from None
    return header


# Same as smollm2.py: build
def build(cls, args, header: dict, ckpt_dir: Path, device, dtype, absent="", **counts: int):
    """(cls(args) on the meta device, its state dict memory-mapped onto device in dtype (None: as stored)), once the
    header holds the modules config.json asks for (counts, e.g. layers=30: 10^6 layers take minutes to build), then
    the model's names (but a tied head and those containing `absent`, which the caller adds), shapes, float dtypes."""
    from safetensors import safe_open

    for name, n in counts.items():
        held = {m[1] for k in header if (m := re.search(rf"\.{name}\.(\d+)\.", k))}  # the N of each ".layers.N."
        if n > len(held):
            raise ValueError(f"{ckpt_dir}/config.json asks for {n} {name} but the weights hold {len(held)}")
    try:
        with torch.device("meta"):  # shapes only: the checkpoint's tensors become the weights, one copy in memory
            model = cls(args)
    except (RuntimeError, TypeError, OverflowError) as e:  # an element count beyond int64
        raise ValueError(f"{ckpt_dir}/config.json gives shapes torch cannot build ({type(e).__name__})") from None
    tied = {"lm_head.weight"} if args.tie_embeddings else set()  # the embedding is the head
    want = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied and not (absent and absent in k)}
    have = {k: v for k, v in header.items() if k not in tied}
    wrong = [f"{k} is missing" for k in want.keys() - have.keys()] + [f"{k} is extra" for k in have.keys() - want]
    for k, (_, kind, shape) in have.items():
        if k in want and tuple(shape) != want[k]:
            wrong.append(f"{k} has shape {tuple(shape)} but the config gives {want[k]}")
        elif k in want and kind not in ("F16", "BF16", "F32", "F64"):
            wrong.append(f"{k} is stored as {kind}, where weights are floats")
    if wrong:
        raise ValueError(f"{ckpt_dir} does not match its config: {'; '.join(sorted(wrong)[:3])}")
    state = {}
    for f in sorted({file for file, _, _ in have.values()}):
        with safe_open(f, "pt") as st:  # .to() returns the mapped tensor itself where device and dtype are its own
            state |= {k: st.get_tensor(k).to(device=device, dtype=dtype) for k in st.keys() if k in want}
    return model, state | ({"lm_head.weight": state["model.embed_tokens.weight"]} if tied else {})

# -----------------------------------------------------------------------------
# Sampling


# Same as smollm2.py: check_generate
def check_generate(prompts, max_new_tokens, args: ModelArgs, temperature, top_k, top_p) -> int:
    """generate()'s arguments checked before any work -> the longest prompt's length, else a ValueError. Every setting
    accepted here samples (a temperature too small for float32 is greedy)."""
    if not (math.isfinite(temperature) and temperature >= 0 and 0 < top_p <= 1 and (top_k is None or top_k >= 1)):
        raise ValueError(f"need temperature >= 0 (0 is greedy), top_p in (0, 1] and top_k >= 1; got temperature "
                         f"{temperature}, top_p {top_p}, top_k {top_k}")
    if max_new_tokens < 1 or not prompts or not all(prompts):
        raise ValueError("need max_new_tokens >= 1 and at least one token in every prompt")
    if not all(0 <= t < args.vocab_size for p in prompts for t in p):
        raise ValueError(f"a prompt holds a token id outside the vocabulary (0..{args.vocab_size - 1})")
    if (longest := max(map(len, prompts))) + max_new_tokens > args.max_seq_len:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len "
                         f"{args.max_seq_len} (the context)")
    return longest


# Same as smollm2.py: logits_to_probs
def logits_to_probs(logits, temperature: float, top_k: int | None = None, top_p: float = 1.0):
    """logits (B, vocab) -> sampling distribution (B, vocab): temperature, top-k, then top-p, as HF's warpers."""
    scaled = logits.float() / temperature
    if not scaled.isfinite().all():
        # subtle: a temperature too small for float32 (1e-40) overflows the division, and softmax(inf - inf) is NaN;
        # the distribution it tends to is greedy's, all mass on the largest logit
        return F.one_hot(logits.argmax(dim=-1), logits.size(-1)).float()
    if top_k is not None:
        kth = torch.topk(scaled, min(top_k, scaled.size(-1))).values[:, -1:]  # (B, 1) k-th largest logit
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))  # ties with the k-th stay, as in HF
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        # keep the most likely tokens until their mass reaches top_p, the token that crosses it included (HF's TopP);
        # the first always stays, also where top_p is below float32's range and the comparison sees 0
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(dim=-1) - sorted_p >= top_p
        outside[:, 0] = False
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p / sorted_p.sum(-1, keepdim=True))
    return probs


# Same as smollm2.py: sample
def sample(logits, temperature=0.0, top_k=None, top_p=1.0, generator=None):
    """logits (B, vocab) -> next ids (B,): greedy at temperature 0, else a draw with `generator` (seeded: repeats)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(logits_to_probs(logits, temperature, top_k, top_p), 1, generator=generator).squeeze(-1)

# -----------------------------------------------------------------------------
# Command line: cli.py's flags and chat loop


def main(prompt: str | None = None, ckpt_dir: str = "checkpoints/nanollm", max_new_tokens: int = 200,
         temperature: float = 0.8, top_p: float = 0.95, top_k: int | None = None, device: str | None = None,
         dtype: str | None = None, seed: int | None = None, chat: bool | None = None, interactive: bool = False,
         int8: bool = False, int4: bool = False, compile: bool = False):
    """Generate from a nanollm checkpoint (benchmarks/pretrain_nanollm.py or finetune.py trains one); a chat model
    (one with a chat template) wraps the prompt in ChatML unless --chat false.

    ckpt_dir: a checkpoint folder written by finetune.py (config.json, model.safetensors, tokenizer.json)
    seed: seeds sampling, so a run repeats exactly; default a different draw each run
    """
    from cli import chat_main  # the flags checked before the slow load, the load, then one reply or a conversation

    chat_main(NanoLLM, encode_chat, prompt, ckpt_dir, max_new_tokens, temperature, top_p, top_k, device, dtype, seed,
              chat, interactive, int8, int4, compile)


if __name__ == "__main__":
    try:
        from cli import cli
    except ModuleNotFoundError:
        raise SystemExit("error: nanollm.py's command line needs cli.py beside it (the model: tokenizer_bpe.py only)")
    cli(main)
