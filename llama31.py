"""
Llama 3.1 (8B / 70B / 405B) and Llama 3.2 (1B / 3B) in one readable file: loading HF checkpoints, KV-cached
batched generation and chat. What it adds to smollm2.py: Llama 3's RoPE scaling and its chat format, Meta's
checkpoints, and a KV cache of static shapes.

Llama 3 ("The Llama 3 Herd of Models", arXiv 2407.21783) is a pre-norm decoder: RMSNorm, grouped-query
attention, a SwiGLU MLP, and rotary position embeddings with base 500000 whose low frequencies are stretched
("llama3" scaling) so that a model pretrained on 8k tokens reads 128k. The code follows Meta's reference
(llama-models `reference_impl/model.py`) and Karpathy's nano-llama31, and is checked module by module against
HF transformers' `LlamaForCausalLM` in test_parity.py.

Departures from nano-llama31 and Meta's reference, all deliberate:
- HF checkpoint names, so HF safetensors load with no renaming; download.py converts Meta's `consolidated.*.pth`
  once (meta_convert.py: renames, a merge of model-parallel shards, and a q/k row permutation, since RoPE here
  rotates HF's half-split pairs instead of Meta's interleaved ones);
- the llama3 scale factor comes from the checkpoint (32 for 3.2 1B/3B; Meta's code hard-codes 8);
- chat models: Llama 3.1's chat template (system header with the knowledge-cutoff date), and generation stops
  at <|eot_id|> or <|eom_id|>; base models stop at <|end_of_text|> and get their prompt verbatim;
- the KV cache is sized to what a generate call needs, never the 128k context, and attention reads all of it
  (the same shapes every decode step, as gpt-fast, so a compiled step is reused); ragged batches are left-padded
  with per-row positions, so a batch yields the tokens of one-by-one runs;
- one copy of the weights in memory (built on the meta device, memory-mapped tensors assigned); one device.

Blocks marked `# Same as smollm2.py: NAME` are that file's, word for word (tests/test_copies.py); the command line
is cli.py's; as a library this file needs only tokenizer_bpe.py.

Usage:
    python download.py llama3.2-1b-instruct                # or, offline: --gguf FILE.gguf, --meta_dir DIR
    python llama31.py --ckpt_dir checkpoints/Llama-3.2-1B-Instruct --prompt "Why is the sky blue?"
    python llama31.py --interactive --ckpt_dir checkpoints/Llama-3.2-1B-Instruct
    python llama31.py --ckpt_dir checkpoints/Llama-3.2-1B --prompt "The capital of France is" --temperature 0
    python download.py llama3.1-8b-instruct                # gated on the Hub: accept the licence, set HF_TOKEN
    python llama31.py --prompt "Why is the sky blue?"      # checkpoints/Llama-3.1-8B-Instruct, bf16: 16 GB
"""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer_bpe import Tokenizer
from tokenizer_bpe import apply_chat_template as encode_chat

# -----------------------------------------------------------------------------
# Config

BOS, END_OF_TEXT, EOM, EOT = 128000, 128001, 128008, 128009  # <|begin_of_text|> <|end_of_text|> <|eom_id|> <|eot_id|>


@dataclass
class ModelArgs:
    """Llama 3 hyper-parameters (defaults: Llama 3.1 8B). A checkpoint's own config always wins."""

    dim: int = 4096  # width of the residual stream (HF hidden_size)
    n_layers: int = 32  # decoder blocks
    n_heads: int = 32  # query heads
    n_kv_heads: int = 8  # key/value heads, each shared by n_heads // n_kv_heads query heads (GQA)
    hidden_dim: int = 14336  # SwiGLU inner width (HF intermediate_size)
    vocab_size: int = 128256  # 128000 BPE tokens + 256 special tokens
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 500000.0  # RoPE base
    rope_factor: float | None = 8.0  # llama3 scaling: long wavelengths are stretched by this (None: plain RoPE)
    rope_low_freq_factor: float = 1.0  # wavelengths above original_context / low are fully stretched
    rope_high_freq_factor: float = 4.0  # wavelengths below original_context / high are left alone
    rope_original_context: int = 8192  # context of pretraining, before long-context training
    max_seq_len: int = 131072  # context the model was trained for (HF max_position_embeddings): prompt + generation
    tie_embeddings: bool = False  # the output head reuses the embedding matrix (3.2 1B and 3B)
    stop_tokens: tuple[int, ...] = (END_OF_TEXT,)  # instruct models also stop at <|eom_id|> and <|eot_id|>

    # Same as smollm2.py: ModelArgs.head_dim
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        """A published size, e.g. "llama3.1-8b" or "llama3.2-1b-instruct" (base and instruct share shapes)."""
        base = name.lower().removesuffix("-instruct")
        if base not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)} (+ -instruct)")
        instruct = base != name.lower()
        return cls(**PRESETS[base], stop_tokens=(END_OF_TEXT, EOM, EOT) if instruct else (END_OF_TEXT,))

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        """From a HF config.json of LlamaForCausalLM, with plain or llama3-scaled RoPE (see llama_fields)."""
        fields, rope = llama_fields(cfg)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise NotImplementedError(f"RoPE type {rope_type!r} is not Llama 3's (default or llama3)")
        if cfg.get("head_dim", fields["dim"] // fields["n_heads"]) != fields["dim"] // fields["n_heads"]:
            raise NotImplementedError("head_dim != hidden_size / num_attention_heads is not a Llama 3 shape")
        if cfg.get("attention_bias") or cfg.get("mlp_bias") or cfg.get("hidden_act", "silu") != "silu":
            raise NotImplementedError("biases or a non-SiLU activation are not part of Llama 3")
        if rope_type == "default":
            return cls(**fields, rope_factor=None)
        low, high = config_get(rope, "low_freq_factor", float), config_get(rope, "high_freq_factor", float)
        if low >= high:
            raise ValueError(f"RoPE low_freq_factor {low} must be below high_freq_factor {high}")
        return cls(**fields, rope_factor=config_get(rope, "factor", float), rope_low_freq_factor=low,
                   rope_high_freq_factor=high,
                   rope_original_context=config_get(rope, "original_max_position_embeddings"))

    def to_hf_config(self) -> dict:
        """A config.json that both this file and transformers' LlamaForCausalLM load."""
        rope_scaling = None if self.rope_factor is None else {
            "rope_type": "llama3", "factor": self.rope_factor, "low_freq_factor": self.rope_low_freq_factor,
            "high_freq_factor": self.rope_high_freq_factor,
            "original_max_position_embeddings": self.rope_original_context}
        return {**llama_config(self), "rope_scaling": rope_scaling, "bos_token_id": BOS, "torch_dtype": "bfloat16"}


# The published sizes, as their HF config.json files give them; the other fields are the defaults above (8 KV
# heads, vocabulary, theta, norm eps and llama3 scaling are shared; 3.2's small models scale by 32 and tie).
PRESETS = {
    "llama3.1-8b": dict(dim=4096, n_layers=32, n_heads=32, hidden_dim=14336),
    "llama3.1-70b": dict(dim=8192, n_layers=80, n_heads=64, hidden_dim=28672),
    "llama3.1-405b": dict(dim=16384, n_layers=126, n_heads=128, hidden_dim=53248),
    "llama3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, hidden_dim=8192, rope_factor=32.0, tie_embeddings=True),
    "llama3.2-3b": dict(dim=3072, n_layers=28, n_heads=24, hidden_dim=8192, rope_factor=32.0, tie_embeddings=True),
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


# Same as smollm2.py: llama_fields
def llama_fields(cfg: dict) -> tuple[dict, dict]:
    """The ModelArgs fields every Llama-architecture config.json gives, each checked by config_get (a key it lacks
    takes transformers' LlamaConfig default), and the RoPE settings -> (fields, rope)."""
    dim, n_heads = config_get(cfg, "hidden_size"), config_get(cfg, "num_attention_heads")
    n_kv_heads = config_get(cfg, "num_key_value_heads", int, n_heads)
    if dim % n_heads or dim // n_heads % 2 or n_heads % n_kv_heads:
        raise ValueError(f"hidden_size {dim}, num_attention_heads {n_heads} and num_key_value_heads {n_kv_heads} do "
                         "not fit: heads of an even size must split hidden_size, KV heads the heads")
    # transformers >= 5 nests rope settings in `rope_parameters`; older files use rope_theta + rope_scaling
    rope = config_get(cfg, "rope_parameters", dict, None) or config_get(cfg, "rope_scaling", dict, {})
    return dict(dim=dim, n_layers=config_get(cfg, "num_hidden_layers"), n_heads=n_heads, n_kv_heads=n_kv_heads,
                hidden_dim=config_get(cfg, "intermediate_size"), vocab_size=config_get(cfg, "vocab_size"),
                rope_theta=config_get(rope, "rope_theta", float, config_get(cfg, "rope_theta", float, 10000.0)),
                norm_eps=config_get(cfg, "rms_norm_eps", float, 1e-6),
                max_seq_len=config_get(cfg, "max_position_embeddings", int, 2048),
                tie_embeddings=config_get(cfg, "tie_word_embeddings", bool, False),
                stop_tokens=config_get(cfg, "eos_token_id", tuple, (2,))), rope


# Same as smollm2.py: llama_config
def llama_config(args) -> dict:
    """The config.json of llama_fields' fields (each file's to_hf_config adds its own)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "hidden_size": args.dim,
            "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
            "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim, "intermediate_size": args.hidden_dim,
            "vocab_size": args.vocab_size, "rope_theta": args.rope_theta, "rms_norm_eps": args.norm_eps,
            "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": args.tie_embeddings,
            "eos_token_id": list(args.stop_tokens) or None, "attention_bias": False, "mlp_bias": False}

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


# Differs from smollm2.py's rope_inv_freq: llama3 scaling stretches the low frequencies (128k from 8k tokens)
def rope_inv_freq(args: ModelArgs, device=None) -> torch.Tensor:
    """Angular frequency of each rotated pair of dimensions: (head_dim / 2,) fp32, llama3-scaled as HF
    `_compute_llama3_parameters`."""
    hd = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.int64).float() / hd))
    if args.rope_factor is None:
        return inv_freq
    # Pair i turns a full circle every 2*pi/inv_freq_i positions. Pairs of short wavelength (below ctx / high, 2048
    # of the 8192 pretraining tokens) went round many times and encode local order: kept. Pairs longer than the whole
    # context (ctx / low) never saw most of their angles: divided by `factor`, so 128k positions sweep the angles 8k
    # swept before. In between, the two blend linearly in ctx / wavelength.
    ctx, low, high = args.rope_original_context, args.rope_low_freq_factor, args.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (ctx / wavelen - low) / (high - low)  # 0 at wavelength ctx / low, 1 at ctx / high
    blended = (1 - smooth) * inv_freq / args.rope_factor + smooth * inv_freq
    return torch.where(wavelen < ctx / high, inv_freq,
                       torch.where(wavelen > ctx / low, inv_freq / args.rope_factor, blended))


# Same as smollm2.py: rope_cos_sin
def rope_cos_sin(inv_freq, pos, dtype):
    """pos (B, T) -> cos, sin (B, 1, T, head_dim), fp32 angles then cast, as HF, for the positions in use only."""
    freqs = pos[..., None].float() * inv_freq  # (B, T, hd/2)
    # rotate-half layout: frequency i drives dimensions i and i + hd/2 (HF's convention, not the interleaved
    # pairs 2i, 2i+1 of the RoPE paper and Meta's code); HF checkpoints' q/k rows are laid out for this
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd): broadcast over heads
    return emb.cos().to(dtype), emb.sin().to(dtype)


# Same as smollm2.py: apply_rope
def apply_rope(x, cos, sin):
    """x (B, n_heads, T, hd), cos and sin (B, 1, T, hd): rotate each pair (x_i, x_{i+hd/2}) by its angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin  # HF's rotate_half: (x1, x2) -> (-x2, x1)


# Same as smollm2.py: KVCache
class KVCache(nn.Module):
    """Preallocated keys and values of one layer, written in place at the given slots (gpt-fast)."""

    def __init__(self, batch_size, max_seq_len, n_kv_heads, head_dim, dtype, device):
        super().__init__()
        self.batch_size, self.max_seq_len = batch_size, max_seq_len  # what generate() may reuse it for
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):
        """Write k, v (B, n_kv_heads, T, hd) into slots input_pos (T,); return the whole cache (B, nkv, S, hd)."""
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))  # in place: no growth, the same shapes every step
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k, self.v


# Same as smollm2.py: Attention
class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, input_pos=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is not None:
            k, v = self.cache.update(input_pos, k, v)  # (B, nkv, S, hd): what the cache lets the queries see
        # enable_gqa lets query head h read kv head h // (nh / nkv) without materialising the repeat: the
        # same grouping as HF's repeat_kv (repeat_interleave on the head axis). mask None means plain causal.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=self.n_heads != self.n_kv_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


# Same as smollm2.py: MLP
class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# Same as smollm2.py: Block
class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, mask, input_pos=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos)
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


class Llama(nn.Module):
    # Same as smollm2.py: SmolLM2.__init__ (with SmolLM2->Llama)
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = nn.ModuleDict(dict(  # the trunk, named as HF's, so parameters are `model.layers.N...`
            embed_tokens=nn.Embedding(args.vocab_size, args.dim),
            layers=nn.ModuleList(Block(args) for _ in range(args.n_layers)),
            norm=RMSNorm(args.dim, args.norm_eps)))
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_rope()

    # Same as smollm2.py: SmolLM2.init_rope (with SmolLM2->Llama)
    def init_rope(self, device=None):
        # A plain fp32 tensor, not a buffer: model.to(torch.bfloat16) must not round the frequencies. Made again on
        # the weights' device after a meta-device build (from_pretrained); trunk follows the model if it moves.
        self.inv_freq = rope_inv_freq(self.args, device)

    # Same as smollm2.py: SmolLM2.trunk (with SmolLM2->Llama)
    def trunk(self, tokens, pos, mask, input_pos=None):
        """tokens (B, T), pos (B, T) RoPE positions -> final-normed hidden states (B, T, dim)."""
        x = self.model.embed_tokens(tokens)
        cos, sin = rope_cos_sin(self.inv_freq.to(x.device), pos, x.dtype)  # once, shared by every layer
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, input_pos)
        return self.model.norm(x)

    # Same as smollm2.py: SmolLM2.forward (with SmolLM2->Llama)
    def forward(self, tokens, doc_ids=None):
        """tokens (B, T) -> logits (B, T, vocab), without a cache; doc_ids (B, T): packed documents, kept apart."""
        B, T = tokens.shape
        if T > self.args.max_seq_len:
            raise ValueError(f"{T} tokens do not fit the context of {self.args.max_seq_len}")
        if doc_ids is None:
            pos, mask = torch.arange(T, device=tokens.device).expand(B, T), None  # None: SDPA's causal kernel
        else:
            pos, mask = doc_positions_and_mask(doc_ids)
        return self.lm_head(self.trunk(tokens, pos, mask))

    # Same as smollm2.py: SmolLM2.setup_cache (with SmolLM2->Llama)
    def setup_cache(self, batch_size: int, max_seq_len: int):
        # for generation only, sized to the request, never to the context (Llama 3.1 8B's 131072 tokens: 16 GiB a row)
        if max_seq_len > self.args.max_seq_len:
            raise ValueError(f"{max_seq_len} tokens do not fit the context of {self.args.max_seq_len}")
        w = self.model.norm.weight  # the model's dtype and device, whatever form its linear layers take
        for layer in self.model.layers:
            layer.self_attn.cache = KVCache(batch_size, max_seq_len, self.args.n_kv_heads, self.args.head_dim,
                                            w.dtype, w.device)

    # Same as smollm2.py: SmolLM2.clear_cache (with SmolLM2->Llama)
    def clear_cache(self):
        for layer in self.model.layers:
            layer.self_attn.cache = None

    # Same as smollm2.py: SmolLM2.forward_cached (with SmolLM2->Llama)
    def forward_cached(self, tokens, input_pos, pad=None):
        """Run tokens (B, T) in cache slots input_pos (T,); return the last position's logits (B, vocab).

        pad (B,), None for none: left padding of each row. A row's RoPE position is its slot minus its padding.
        Attention reads the whole preallocated cache, as gpt-fast: shapes never change, so a compiled decode step is
        reused every step; the mask hides padding and slots not yet written.
        """
        pad = torch.zeros(len(tokens), dtype=torch.long, device=tokens.device) if pad is None else pad
        slots = torch.arange(self.model.layers[0].self_attn.cache.k.size(2), device=tokens.device)  # (S,)
        pos = (input_pos[None, :] - pad[:, None]).clamp(min=0)  # (B, T)
        mask = (slots <= input_pos[:, None]) & (slots >= pad[:, None, None])  # (B, T, S)
        # subtle: a padding slot's query sees no key of its row. Let it see itself: an all-False mask row makes
        # SDPA return NaN, which the next layer would write into the cache, and 0 weight * NaN is still NaN.
        mask |= slots == input_pos[:, None]
        h = self.trunk(tokens, pos, mask.unsqueeze(1), input_pos)
        return self.lm_head(h[:, -1])  # only the last position is needed to pick the next token

    # -------------------------------------------------------------------------
    # Loading

    # Same as smollm2.py: SmolLM2.from_pretrained (with SmolLM2->Llama)
    @classmethod
    def from_pretrained(cls, ckpt_dir, device=None, dtype=None) -> "Llama":
        """A HF checkpoint folder (config.json + model.safetensors, or shards with an index) on device (None: cpu),
        in dtype (None: as stored). Each file is checked before it is used, and before any tensor is read (Loading)."""
        ckpt_dir = Path(ckpt_dir)
        args = read_config(ckpt_dir)
        model, state = build(cls, args, read_header(ckpt_dir), ckpt_dir, device or "cpu", dtype, layers=args.n_layers)
        model.load_state_dict(state, strict=True, assign=True)
        if args.tie_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight  # assign=True made two Parameters: re-tie
        model.init_rope(device)
        return model.eval()

    # -------------------------------------------------------------------------
    # Generation

    # Same as smollm2.py: SmolLM2.generate (with SmolLM2->Llama)
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
# Loading (the block every model file repeats; see smollm2.py)

FETCH = ("fetch Llama 3.2 1B with `python download.py llama3.2-1b-instruct` and pass --ckpt_dir "
         "checkpoints/Llama-3.2-1B-Instruct; without the Hub, convert a local copy: `python download.py --gguf FILE` "
         "or `--meta_dir DIR` (Meta's own download); the 8B: `python download.py llama3.1-8b-instruct` (gated on the "
         "Hub: accept the licence, set HF_TOKEN)")


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
# Chat formatting


# encode_chat(tokenizer, messages, add_generation_prompt=True, date_string="26 Jul 2024") is
# tokenizer_bpe.apply_chat_template (imported above), which writes Llama 3.1's headers for a Llama 3 tokenizer


def encode_prompt(tokenizer: Tokenizer, prompt: str, chat: bool) -> list[int]:
    """A one-turn chat for instruct models; <|begin_of_text|> + the text, unchanged, for base models (no
    trailing space added: "is" and "is " are different tokens, and a space leaves the model mid-word)."""
    if chat:
        return encode_chat(tokenizer, [{"role": "user", "content": prompt}])
    return [BOS] + tokenizer.encode(prompt)


# -----------------------------------------------------------------------------
# Command line: cli.py's flags and chat loop


def main(prompt: str | None = None, ckpt_dir: str = "checkpoints/Llama-3.1-8B-Instruct", max_new_tokens: int = 256,
         temperature: float = 0.6, top_p: float = 0.9, top_k: int | None = None, device: str | None = None,
         dtype: str | None = None, seed: int | None = None, chat: bool | None = None, interactive: bool = False,
         int8: bool = False, int4: bool = False, compile: bool = False):
    """Generate from Llama 3.1 / 3.2. Instruct checkpoints wrap the prompt in the chat template (--chat false
    sends it raw); base checkpoints get <|begin_of_text|> + the prompt, verbatim. The sampling defaults are
    those of Meta's generation_config.json.

    ckpt_dir: a HF checkpoint folder (download.py writes one, also from a GGUF file or Meta's consolidated.NN.pth)
    dtype: float32, bfloat16 or float16; default the checkpoint's (bfloat16 in Meta's releases: 16 GB for 8B)
    seed: seeds sampling, so a run repeats exactly; default a different draw each run
    chat: wrap the prompt in the chat template; default: for instruct checkpoints
    """
    from cli import check_generation_flags, converse, load_model

    try:
        dev, dt = check_generation_flags(prompt, max_new_tokens, temperature, top_k, top_p, seed, device, dtype,
                                         interactive, int8, int4, compile)
        model = load_model(Llama, ckpt_dir, dev, dt, int8, int4, compile)
        tokenizer = Tokenizer.from_file(ckpt_dir)
        if tokenizer.special_tokens.get("<|begin_of_text|>") != BOS:  # Llama 3's special ids are assumed below
            chatml = "<|im_start|>" in tokenizer.special_tokens  # SmolLM2's
            raise ValueError(f"{ckpt_dir} is not a Llama 3 checkpoint: its tokenizer lacks Llama 3's special tokens"
                             + ("; it is ChatML's, so run it with smollm2.py" if chatml else ""))
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        raise SystemExit(f"error: {e}")
    chat = EOT in model.args.stop_tokens if chat is None else chat  # only instruct models end turns with eot
    if interactive and not chat:
        raise SystemExit("error: --interactive needs an instruct (chat) checkpoint")
    stop = [END_OF_TEXT, EOM, EOT] if chat else list(model.args.stop_tokens)

    def encode(tokenizer, messages):  # the conversation in the chat template, or <|begin_of_text|> + the latest text
        return encode_chat(tokenizer, messages) if chat else encode_prompt(tokenizer, messages[-1]["content"], False)

    converse(model, tokenizer, encode, prompt, interactive, stop, max_new_tokens, temperature, top_k, top_p, seed)


if __name__ == "__main__":
    try:
        from cli import cli
    except ModuleNotFoundError:
        raise SystemExit("error: llama31.py's command line needs cli.py beside it (the model itself needs only "
                         "tokenizer_bpe.py)")
    cli(main)
