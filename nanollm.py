"""nanollm.py: a small DeepSeek-V3-style language model in one file, after nano-llm (asoloveii/nano-llm, 327M).

Multi-head Latent Attention (MLA) in every block, a SwiGLU MLP in most blocks and a DeepSeekMoE layer (shared
experts plus top-k routed experts) in the others. Module names follow HF `DeepseekV3ForCausalLM`, so
`model.state_dict()` is that safetensors layout: our checkpoints (trained from scratch with finetune.py and the
tokenizer from tokenizer_bpe.py) load in transformers, and DeepseekV3-architecture checkpoints load here.

References
- DeepSeek-V2 (arXiv 2405.04434) §2.1: MLA: low-rank query and joint key-value compression, decoupled RoPE key
  shared by all heads, cache of the latent only, absorption of the up-projections for decoding.
- DeepSeek-V3 (arXiv 2412.19437) §2.1.2: sigmoid affinities, a per-expert bias used for selection only and nudged
  after each step (auxiliary-loss-free balancing), sequence-wise balance loss (eqs. 17-20), group-limited routing.
- deepseek-ai/DeepSeek-V3 `inference/model.py` (naive vs absorb MLA, Gate, MoE dispatch loop) and HF transformers
  5.23 `models/deepseek_v3` (names, config, RoPE layouts; the parity reference in test_parity.py).

Departures from nano-llm's `src/model.py`, each fixed here and tested:
- its MLA cache is written but never read: ours holds only the normalised KV latent and the shared RoPE key per
  token, is read when decoding, and decodes two ways (naive: up-project the cache; absorbed: fold W_UK into the
  query and W_UV into the output), both equal to recomputing the whole sequence.
- its MoE runs every routed expert on every token and masks the results: ours sorts tokens by chosen expert,
  runs each expert on its tokens only and adds the results back with index_add.
- it has no load balancing: ours adds DeepSeek-V3's bias balancing and optional sequence-wise balance loss.
- its per-head RoPE key (a 768x768 projection per block), Linear biases, missing latent norms and averaged shared
  experts become DeepSeek's single 64-wide RoPE key, no biases, RMSNorm on both latents and summed shared experts.
Departures from DeepSeek-V3: no multi-token-prediction module (its weights are skipped on load, as HF does), no FP8.

Run:  python nanollm.py --ckpt_dir checkpoints/nanollm --prompt "Once upon a time" --temperature 0
"""
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer_bpe import (Tokenizer, check_generate, check_generation_flags, check_state, cli,
                           converse, is_chat_checkpoint, load_safetensors, read_json)
# encode_chat(tokenizer, messages, add_generation_prompt=True): the chat format, ChatML with no default system prompt,
# since nanollm's chat models learn it from finetune.py's data, which has none
from tokenizer_bpe import apply_chat_template as encode_chat

# ----------------------------------------------------------------------------------------------------------------
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
    max_seq_len: int = 256  # longest sequence, prompt plus generation
    norm_eps: float = 1e-6  # RMSNorm epsilon of the block and final norms
    tie_embeddings: bool = False  # lm_head shares the embedding matrix
    eos_token_id: int | tuple[int, ...] | None = None  # token(s) that end generation by default

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        """From a DeepseekV3 config.json, with transformers 5's `rope_parameters` or the Hub's `rope_theta` +
        `rope_scaling`. Keys it lacks keep this class's defaults (transformers writes them all)."""
        if cfg.get("hidden_act", "silu") != "silu" or cfg.get("attention_bias", False):
            raise NotImplementedError("only silu MLPs and bias-free attention, as in every DeepSeek-V3 checkpoint")
        kw = {field: cfg[key] for field, key in HF_KEYS.items() if key in cfg}
        # HF writes null for "none": no query compression, no routed or shared experts, no expert groups
        kw.update({f: off for f, off in (("q_lora_rank", 0), ("n_routed_experts", 0), ("n_shared_experts", 0),
                                         ("n_expert_groups", 1), ("n_limited_groups", 1)) if f in kw and kw[f] is None})
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = tuple(kw["eos_token_id"])
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        kw["rope_theta"] = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        kw["rope_scaling"] = None if rope_type == "default" else {"rope_type": rope_type, **rope}
        # HF puts a MoE on every block from first_k_dense_replace on; DeepSeek's own modeling code also requires
        # i % moe_layer_freq == 0; `moe_layers` is our key for layouts neither can express (see to_hf_config)
        n, k, freq = cfg["num_hidden_layers"], cfg.get("first_k_dense_replace", 3), cfg.get("moe_layer_freq", 1)
        moe = [i for i in range(n) if cfg.get("n_routed_experts") and i >= k and i % freq == 0]
        return cls(**kw, moe_layers=tuple(cfg.get("moe_layers", moe)))

    def to_hf_config(self) -> dict:
        """A config.json that both this file and transformers' DeepseekV3Config load. HF can only say "the first
        k blocks are dense, all later ones MoE" (first_k_dense_replace); another pattern (nano-327m: blocks 3, 7,
        11, 15, 19) is also written as `moe_layers`, which this file reads but transformers ignores: its
        DeepseekV3ForCausalLM would put a MoE on every block from moe_layers[0] on, not matching the weights."""
        first_dense = self.moe_layers[0] if self.moe_layers else self.n_layers
        cfg = {key: getattr(self, field) for field, key in HF_KEYS.items()}
        cfg.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", hidden_act="silu",
                   attention_bias=False, num_key_value_heads=self.n_heads, first_k_dense_replace=first_dense,
                   q_lora_rank=self.q_lora_rank or None, num_nextn_predict_layers=0,  # no multi-token prediction
                   rope_parameters={"rope_theta": self.rope_theta, "rope_type": "default", **(self.rope_scaling or {})})
        if isinstance(self.eos_token_id, tuple):
            cfg["eos_token_id"] = list(self.eos_token_id)
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
    tie_embeddings="tie_word_embeddings", eos_token_id="eos_token_id")

PRESETS = {
    # nano-llm's config/nano_327m.yaml. Its rule `use_moe = i % 4 == 0` for blocks i = 1..20 puts MoE on 1-based
    # blocks 4, 8, 12, 16, 20, i.e. 0-based 3, 7, 11, 15, 19 (the last block is a MoE). Top-1 routing with
    # norm_topk_prob would give every token the weight exactly 1, so no gradient could reach the router: nano-llm
    # weights the expert by its (unnormalised) score, and so do we. 316.19M parameters (292.60M active per
    # token) vs nano-llm's 327.31M: its per-head RoPE key projection is 10.83M more, its Linear biases 0.30M,
    # and our latent RMSNorms add 5k (tests/test_nanollm.py checks the count against the formula)
    "nano-327m": dict(vocab_size=50304, dim=768, n_layers=20, n_heads=12, hidden_dim=3072,
                      moe_layers=(3, 7, 11, 15, 19), moe_hidden_dim=2048, n_shared_experts=2, n_routed_experts=2,
                      n_activated_experts=1, n_expert_groups=1, n_limited_groups=1, route_scale=1.0,
                      norm_topk_prob=False, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=64,
                      qk_rope_head_dim=64, v_head_dim=128, max_seq_len=2048, norm_eps=1e-5),
    # 8.6M parameters (5.6M active) for pretraining on a 2-core CPU; first block dense, then all MoE as in
    # DeepSeek-V3, so transformers loads the result too. Set vocab_size to the trained tokenizer's.
    "nano-small": dict(vocab_size=4096, dim=256, n_layers=6, n_heads=4, hidden_dim=768, moe_layers=(1, 2, 3, 4, 5),
                       moe_hidden_dim=256, n_shared_experts=1, n_routed_experts=4, n_activated_experts=1,
                       n_expert_groups=1, n_limited_groups=1, route_scale=1.0, norm_topk_prob=False, q_lora_rank=96,
                       kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=64, max_seq_len=512,
                       norm_eps=1e-5, aux_loss_alpha=1e-4),
    # for tests (245k parameters): group-limited top-2 routing, query compression, interleaved MoE blocks
    "nano-tiny": dict(),
}


# ----------------------------------------------------------------------------------------------------------------
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


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(args: ModelArgs) -> tuple[torch.Tensor, float, float]:
    """Inverse frequencies (qk_rope_head_dim / 2,), cos/sin scale, softmax-scale factor; as HF default | yarn RoPE."""
    d, base = args.qk_rope_head_dim, args.rope_theta
    # subtle: explicit CPU, so the model built on the meta device still gets real frequencies
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32, device="cpu") / d)
    s = args.rope_scaling
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
    ramp = ((torch.arange(d // 2, dtype=torch.float32, device="cpu") - low) / max(high - low, 1e-3)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    mscale, mscale_all = s.get("mscale"), s.get("mscale_all_dim")
    attn_factor = s.get("attention_factor") or (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
                                                if mscale and mscale_all else yarn_mscale(factor))
    # DeepSeek-V3 also raises the softmax temperature by mscale(factor, mscale_all_dim)^2 (HF `yarn_apply_mscale`)
    return inv_freq, attn_factor, yarn_mscale(factor, mscale_all) ** 2 if mscale_all else 1.0


# Differs from smollm2.py's apply_rope: DeepSeek checkpoints may pair dimensions (0,1), (2,3)... and MLA passes
# half-width tables of its own RoPE head part
def apply_rope(x, cos, sin, interleave: bool):
    """Rotate x (..., T, d) by angles whose cos/sin are (..., T, d/2)."""
    if interleave:
        # DeepSeek weights pair dims (0,1), (2,3)...; gathering evens then odds turns them into the rotate-half pairs
        # (i, i + d/2). q and k are permuted alike, so q.k is unchanged (HF `apply_rotary_pos_emb_interleave`)
        x = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class MLACache(nn.Module):
    """Preallocated buffers of what MLA rebuilds keys and values from, written by position (gpt-fast style): the
    normalised latent c_KV and the rotated shared RoPE key, kv_lora_rank + qk_rope_head_dim values per token. For
    nano-327m in bf16: 20 layers x (128 + 64) x 2 B = 7,680 B per token, where multi-head attention of the same
    width caches 20 x 2 x 768 x 2 B = 61,440 B (8x), and at MLA's own head sizes 122,880 B (16x)."""

    def __init__(self, batch_size, max_seq_len, kv_lora_rank, rope_dim, dtype, device):
        super().__init__()
        self.register_buffer("kv", torch.zeros(batch_size, max_seq_len, kv_lora_rank, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("pe", torch.zeros(batch_size, max_seq_len, rope_dim, dtype=dtype, device=device),
                             persistent=False)

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
        # one down-projection gives the KV latent and the RoPE key; only these two are cached
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
            # q_nope . (W_UK c) = (W_UK^T q_nope) . c: fold W_UK into the query and apply W_UV after the weighted
            # sum of latents, so per-head keys and values never exist (DeepSeek-V2 §2.1.2, DeepSeek's "absorb")
            w = self.kv_b_proj.weight.view(H, self.nope + self.v_dim, self.kv_lora_rank)
            q = torch.cat([torch.einsum("bhtd,hdc->bhtc", q_nope, w[:, :self.nope]), q_pe], dim=-1)
            # every head now reads the same key (c_KV ++ k_pe) and value (c_KV): multi-query attention, so fold
            # the heads into the query axis and attend once, without copying the latent per head
            q, k = q.reshape(B, 1, H * T, -1), torch.cat([kv, k_pe], dim=-1)[:, None]  # (B, 1, H*T | S, rank + rope)
            if mask is None:
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)[None, None]
            mask = mask[:, :, None].expand(-1, -1, H, -1, -1).flatten(2, 3)          # (B | 1, 1, H*T, S)
            y = F.scaled_dot_product_attention(q, k, kv[:, None], attn_mask=mask, scale=self.scale)
            y = torch.einsum("bhtc,hvc->bhtv", y.view(B, H, T, -1), w[:, self.nope:])  # (B, H, T, v_head_dim)
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
    """DeepSeek-V3 router (§2.1.2): sigmoid affinities; the balancing bias only decides which experts are chosen."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.k, self.n_groups, self.topk_groups = args.n_activated_experts, args.n_expert_groups, args.n_limited_groups
        self.route_scale, self.norm_topk_prob = args.route_scale, args.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim))  # init by NanoLLM
        # a buffer, not a parameter: update_router_biases moves it, gradients never do; it is saved in checkpoints
        self.register_buffer("e_score_correction_bias", torch.zeros(args.n_routed_experts))

    def forward(self, x):  # x (N, dim) -> weights, indices (N, k); scores (N, E)
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # routing in fp32, as HF and DeepSeek
        # the bias steers which experts win (towards underloaded ones) but never how much a chosen expert counts
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
                chosen = torch.zeros_like(s).scatter(-1, idx.view(B, T, -1), 1.0)
                f = chosen.sum(1) * self.n_experts / (self.k * T)
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

# ----------------------------------------------------------------------------------------------------------------
# The model


# Same as smollm2.py: doc_positions_and_mask
def doc_positions_and_mask(doc_ids):
    """Packed training rows of document ids (B, T) -> RoPE positions that restart at 0 where each document
    starts (B, T), and a causal mask that never crosses a document boundary (B, 1, T, T), as if each document
    were run alone. A document is a run of equal ids: an id that comes back later in the row starts a new one."""
    t = torch.arange(doc_ids.size(1), device=doc_ids.device)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    segment = starts.cumsum(1)  # (B, T) document number: runs, not raw ids
    pos = t - torch.where(starts, t, 0).cummax(1).values  # distance to the own document's first token
    mask = (segment[:, :, None] == segment[:, None, :]) & (t[:, None] >= t[None, :])
    return pos, mask[:, None]


class NanoLLM(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        # not buffers: model.to(bfloat16) must not round them, and meta-device construction must not erase them
        self.inv_freq, self.rope_factor, softmax_mscale = rope_frequencies(args)
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(args.vocab_size, args.dim),
            layers=nn.ModuleList(Block(args, i, softmax_mscale) for i in range(args.n_layers)),
            norm=RMSNorm(args.dim, args.norm_eps)))
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        for p in self.parameters():
            # N(0, 0.02) for Linear, Embedding and router matrices, norms at 1: HF's initializer_range; PyTorch's
            # N(0, 1) embedding would start the loss far above ln(vocab)
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)
        if args.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.aux_loss = 0.0

    def moe_layers(self) -> list[tuple[int, MoE]]:
        return [(i, layer.mlp) for i, layer in enumerate(self.model.layers) if isinstance(layer.mlp, MoE)]

    def rope_cos_sin(self, positions):  # (B, T) -> two (B, T, qk_rope_head_dim / 2), fp32 as HF
        angles = positions[..., None].float() * self.inv_freq.to(positions.device)
        return angles.cos() * self.rope_factor, angles.sin() * self.rope_factor

    def trunk(self, tokens, positions, mask, input_pos=None, absorb=False):
        """tokens (B, T), positions (B, T) -> final-normed hidden states (B, T, dim)."""
        x = self.model.embed_tokens(tokens)                                   # (B, T, dim)
        cos, sin = [t.to(x.dtype) for t in self.rope_cos_sin(positions)]
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
        w = self.lm_head.weight
        for layer in self.model.layers:
            layer.self_attn.cache = MLACache(batch_size, max_seq_len, self.args.kv_lora_rank,
                                             self.args.qk_rope_head_dim, w.dtype, w.device)

    def clear_cache(self):
        for layer in self.model.layers:
            layer.self_attn.cache = None

    def forward_cached(self, tokens, input_pos, pad=None, absorb=True):
        """Run tokens (B, T) in cache slots input_pos (T,); return the last position's logits (B, vocab).

        pad (B,), None for none: left padding of each row, whose positions count from its first real slot.
        absorb picks the MLA decode path (both are tested equal), the one argument the other model files lack.
        """
        pad = torch.zeros(len(tokens), dtype=torch.long, device=tokens.device) if pad is None else pad
        # attend over the filled prefix only: the naive path up-projects every attended slot, so the empty tail
        # of the buffer would cost real compute
        slots = torch.arange(int(input_pos[-1]) + 1, device=tokens.device)
        # causal over slots and blind to padding; a padding query still sees itself, so no softmax row is empty
        mask = (slots <= input_pos[:, None]) & ((slots >= pad[:, None, None]) | (slots == input_pos[:, None]))
        positions = (input_pos - pad[:, None]).clamp(min=0)                   # (B, T)
        h = self.trunk(tokens, positions, mask[:, None], input_pos, absorb)
        return self.lm_head(h[:, -1])  # only the last position is needed to pick the next token

    @torch.no_grad()
    def update_router_biases(self, rate: float = 1e-3, all_sum=None) -> dict[int, list[float]]:
        """Auxiliary-loss-free balancing (DeepSeek-V3 §2.1.2; gamma = 0.001 there): call after each optimizer step.
        Each router's bias falls by `rate` for the experts that got more than the mean load since the last call
        (tokens counted by training-mode forwards) and rises for the others. all_sum, given, first sums the loads
        over processes (in place), so every router bias moves alike. Returns that load (see expert_load)."""
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

    # finetune.py's hooks: the MoE balance loss of the last forward, which training adds (0.0 when off), and the
    # router bias update after each optimizer step, with the loads of all processes
    def extra_loss(self):
        return self.aux_loss

    def after_optimizer_step(self, all_sum, router_bias_rate: float) -> dict:
        return {"expert_load": self.update_router_biases(router_bias_rate, all_sum)}

    # ------------------------------------------------------------------------------------------------------------
    # Loading

    @classmethod
    def from_pretrained(cls, ckpt_dir, device=None, dtype=None) -> "NanoLLM":
        """An HF-layout DeepseekV3 checkpoint folder (config.json + model.safetensors, or shards with an index) on
        device (None: cpu), in dtype (None: float32)."""
        ckpt, device = Path(ckpt_dir), torch.device(device or "cpu")
        if not (ckpt / "config.json").is_file():
            raise FileNotFoundError(f"no checkpoint in {ckpt} (config.json missing); nanollm is trained from "
                                    "scratch, there is nothing to download: train one with finetune.py")
        args = read_json(ckpt / "config.json", ModelArgs.from_hf_config)
        if (ckpt / "generation_config.json").is_file():  # its eos_token_id wins, as in HF generate
            eos = read_json(ckpt / "generation_config.json").get("eos_token_id", args.eos_token_id)
            args.eos_token_id = tuple(eos) if isinstance(eos, list) else eos
        # the balancing bias stays fp32, as HF keeps it: bf16 cannot hold 1e-3 steps on top of ~1
        state = {k: v if k.endswith("e_score_correction_bias") else v.to(dtype or torch.float32)
                 for k, v in load_safetensors(ckpt, device, None).items()
                 # DeepSeek-V3 ships its multi-token-prediction module as extra layers n_layers...: unused, as in HF
                 if not (k.startswith("model.layers.") and int(k.split(".")[2]) >= args.n_layers)}
        # built on meta: no memory and no init for weights about to be replaced; assign=True below adopts the
        # loaded tensors as the parameters (one copy in memory, gpt-fast style)
        with torch.device("meta"):
            model = cls(args)
        if args.tie_embeddings and "model.embed_tokens.weight" in state:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        check_state(model, state, ckpt)
        model.load_state_dict(state, strict=True, assign=True)
        if args.tie_embeddings:  # assign=True gave each name its own Parameter: tie them again
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.eval()

    # ------------------------------------------------------------------------------------------------------------
    # Generation

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature=0.0, top_k=None, top_p=1.0,
                 stop_tokens=None, seed=None, stream=None, absorb=True) -> list[list[int]]:
        """New tokens per prompt, stop token excluded. Ragged prompts are left-padded; stream(row, token) is
        called for each kept token; absorb picks the MLA decode path (both are tested equal)."""
        length = check_generate(prompts, max_new_tokens, self.args.max_seq_len, temperature, top_k, top_p)
        eos = self.args.eos_token_id
        stop = set((eos if isinstance(eos, tuple) else (eos,)) if stop_tokens is None else stop_tokens) - {None}
        device = self.lm_head.weight.device
        generator = None if seed is None else torch.Generator(device).manual_seed(seed)
        # left padding puts every row's last prompt token in the same slot, so one step decodes all rows
        tokens = torch.tensor([[0] * (length - len(p)) + list(p) for p in prompts], device=device)
        pad = torch.tensor([length - len(p) for p in prompts], device=device)
        input_pos = torch.arange(length, device=device)
        out, done = [[] for _ in prompts], [False] * len(prompts)
        self.setup_cache(len(prompts), length + max_new_tokens)
        try:
            for _ in range(max_new_tokens):
                logits = self.forward_cached(tokens, input_pos, pad, absorb)
                tokens = sample(logits, temperature, top_k, top_p, generator)[:, None]  # (B, 1)
                for row, t in enumerate(tokens[:, 0].tolist()):
                    done[row] = done[row] or t in stop
                    if not done[row]:
                        out[row].append(t)
                        if stream is not None:
                            stream(row, t)
                if all(done):
                    break
                input_pos = input_pos[-1:] + 1
        finally:
            self.clear_cache()
        return out

# ----------------------------------------------------------------------------------------------------------------
# Sampling


# Same as smollm2.py: logits_to_probs
def logits_to_probs(logits, temperature: float, top_k: int | None = None, top_p: float = 1.0):
    """logits (B, vocab) -> sampling distribution (B, vocab): temperature, then top-k, then top-p, as HF's
    TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper apply them (tests compare every file's)."""
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1) k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))  # ties with the k-th stay, as in HF
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        # keep the smallest set of most likely tokens whose mass reaches top_p: drop a token only when the mass
        # before it already reaches top_p, so the token that crosses the boundary stays (HF's TopP, min 1 token)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(dim=-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p / sorted_p.sum(-1, keepdim=True))
    return probs


# Same as smollm2.py: sample
def sample(logits, temperature=0.0, top_k=None, top_p=1.0, generator=None):
    """logits (B, vocab) -> next token ids (B,): greedy at temperature 0, else one draw from the filtered
    distribution with `generator` (a seeded torch.Generator makes runs repeat)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(logits_to_probs(logits, temperature, top_k, top_p), 1, generator=generator).squeeze(-1)

# ----------------------------------------------------------------------------------------------------------------
# Command line

try:  # the speed module beside this file (fast_decode.py); a copy of this file alone runs plain, same tokens
    from fast_decode import fast
except ImportError:
    fast = None


def main(prompt: str | None = None, ckpt_dir: str = "checkpoints/nanollm", max_new_tokens: int = 200,
         temperature: float = 0.8, top_p: float = 0.95, top_k: int | None = None, device: str | None = None,
         dtype: str | None = None, seed: int | None = None, chat: bool | None = None, interactive: bool = False,
         int8: bool = False):
    """Generate from a nanollm checkpoint (trained with finetune.py); a chat model (one with a chat template)
    wraps the prompt in ChatML unless --chat false.

    prompt: the text to continue (with --interactive, the first turn)
    ckpt_dir: a checkpoint folder written by finetune.py (config.json, model.safetensors, tokenizer.json)
    max_new_tokens: most tokens to generate per reply
    temperature: 0 is greedy; higher is more random
    top_p: sample from the smallest set of tokens whose probability reaches top_p
    top_k: sample from the k most likely tokens only
    device: cpu, cuda, cuda:1...; default cuda when available, else cpu
    dtype: float32, bfloat16 or float16; default float32
    seed: seeds sampling, so a run repeats exactly; default a different draw each run
    chat: wrap the prompt in ChatML; default: when the checkpoint has a chat template
    interactive: chat turn by turn until Ctrl-D
    int8: int8 weights on the CPU (fast_decode.py's weights="int8": a quarter of fp32's bytes per token, about
        +0.6-0.9% perplexity on SmolLM2)
    """
    try:  # everything a user can get wrong is checked before the (slow) load, and reported in one line
        dev, dt = check_generation_flags(prompt, max_new_tokens, temperature, top_k, top_p, seed, device, dtype,
                                         interactive, int8=int8, fast=fast)
        t0 = time.time()
        model = NanoLLM.from_pretrained(ckpt_dir, dev, dt)
        tokenizer = Tokenizer.from_file(ckpt_dir)  # finetune.py saves the tokenizer_bpe.py one beside the weights
        chat = is_chat_checkpoint(ckpt_dir) if chat is None else chat
        if chat and "<|im_end|>" not in tokenizer.special_tokens:
            raise ValueError(f"{ckpt_dir}: its tokenizer has no ChatML tokens (<|im_end|>); use --chat false")
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        raise SystemExit(f"error: {e}")
    if fast:
        fast(model, threads=True, weights="int8" if int8 else None)  # threads: fast_decode.decode_threads
    a, size = model.args, model.lm_head.weight.element_size()
    print(f"loaded {ckpt_dir} ({model.lm_head.weight.dtype}, {dev}) in {time.time() - t0:.1f}s; KV cache per token: "
          f"{a.n_layers * (a.kv_lora_rank + a.qk_rope_head_dim) * size:,} B (MLA latent) vs "
          f"{a.n_layers * 2 * a.dim * size:,} B (MHA of the same width)", file=sys.stderr)
    eos = model.args.eos_token_id
    stop = list(eos) if isinstance(eos, tuple) else [] if eos is None else [eos]
    stop += [tokenizer.special_tokens["<|im_end|>"]] if chat else []
    converse(model, tokenizer, encode_chat if chat else None, prompt, interactive, stop, max_new_tokens, temperature,
             top_k, top_p, seed)


if __name__ == "__main__":
    cli(main)
