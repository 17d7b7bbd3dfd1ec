"""
Llama 3.1 (8B / 70B / 405B) and Llama 3.2 (1B / 3B) in one readable file: loading HF checkpoints, KV-cached
batched generation, chat, and a command line.

Llama 3 ("The Llama 3 Herd of Models", arXiv 2407.21783) is a pre-norm decoder: RMSNorm, grouped-query
attention, a SwiGLU MLP, and rotary position embeddings with base 500000 whose low frequencies are stretched
("llama3" scaling) so that a model pretrained on 8k tokens reads 128k. The code follows Meta's reference
(llama-models `reference_impl/model.py`) and Karpathy's nano-llama31, and is checked module by module against
HF transformers' `LlamaForCausalLM` in test_parity.py.

Departures from nano-llama31 and Meta's reference, all deliberate:
- modules carry HF checkpoint names, so HF safetensors load with no renaming; Meta's `consolidated.*.pth` is
  converted once by download.py (meta_convert.py: a rename table, a merge of its model-parallel shards and one
  q/k row permutation, since RoPE here rotates HF's half-split pairs instead of Meta's interleaved ones);
- the llama3 scale factor comes from the checkpoint (32 for 3.2 1B/3B; Meta's code hard-codes 8, which
  llama-models#241 reports breaks those models past ~80k tokens);
- chat models: Llama 3.1's chat template (system header with the knowledge-cutoff date), and generation stops
  at <|eot_id|> or <|eom_id|>; base models stop at <|end_of_text|> and get their prompt verbatim;
- the KV cache is sized to what a generate call needs (at most `max_seq_len`, 8192 unless asked), never 128k,
  and ragged batches are left-padded with per-row positions, so a batch yields the tokens of one-by-one runs;
- the model is built on the meta device and takes the memory-mapped checkpoint tensors as its weights: one
  copy in memory; during prefill only the last position goes through the output head;
- one device, no model parallelism.

Usage:
    python download.py llama3.1-8b-instruct
    python llama31.py --prompt "Why is the sky blue?"
    python llama31.py --interactive --ckpt_dir checkpoints/Llama-3.2-1B-Instruct
    python llama31.py --ckpt_dir checkpoints/Llama-3.2-1B --prompt "The capital of France is" --temperature 0
    python download.py --meta_dir ~/.llama/checkpoints/Llama3.1-8B-Instruct   # Meta's own download, converted
    python llama31.py --ckpt_dir checkpoints/Llama3.1-8B-Instruct --prompt "Why is the sky blue?"
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
                           converse, load_safetensors, read_json)
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
    context_len: int = 131072  # longest context the model was trained for (HF max_position_embeddings)
    max_seq_len: int = 8192  # longest prompt + generation this instance serves: bounds the KV cache
    tie_embeddings: bool = False  # the output head reuses the embedding matrix (3.2 1B and 3B)
    stop_tokens: tuple[int, ...] = (END_OF_TEXT,)  # instruct models also stop at <|eom_id|> and <|eot_id|>

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
        """From a HF config.json of LlamaForCausalLM (plain or llama3-scaled RoPE)."""
        # transformers >= 5 nests rope settings in `rope_parameters`; older files use rope_theta + rope_scaling
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise NotImplementedError(f"RoPE type {rope_type!r} is not Llama 3's (default or llama3)")
        dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
        if cfg.get("head_dim", dim // n_heads) != dim // n_heads:
            raise NotImplementedError("head_dim != hidden_size / num_attention_heads is not a Llama 3 shape")
        if cfg.get("attention_bias") or cfg.get("mlp_bias") or cfg.get("hidden_act", "silu") != "silu":
            raise NotImplementedError("biases or a non-SiLU activation are not part of Llama 3")
        llama3 = rope_type == "llama3"
        return cls(dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
                   n_kv_heads=cfg.get("num_key_value_heads") or n_heads, hidden_dim=cfg["intermediate_size"],
                   vocab_size=cfg["vocab_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6),  # LlamaConfig defaults
                   rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
                   rope_factor=float(rope["factor"]) if llama3 else None,
                   rope_low_freq_factor=float(rope["low_freq_factor"]) if llama3 else 1.0,
                   rope_high_freq_factor=float(rope["high_freq_factor"]) if llama3 else 4.0,
                   rope_original_context=rope["original_max_position_embeddings"] if llama3 else 8192,
                   context_len=cfg.get("max_position_embeddings", 2048),
                   tie_embeddings=cfg.get("tie_word_embeddings", False),
                   stop_tokens=token_ids(cfg.get("eos_token_id", END_OF_TEXT)))

    def to_hf_config(self) -> dict:
        """A config.json that both this file and transformers' LlamaForCausalLM load."""
        rope_scaling = None if self.rope_factor is None else {
            "rope_type": "llama3", "factor": self.rope_factor, "low_freq_factor": self.rope_low_freq_factor,
            "high_freq_factor": self.rope_high_freq_factor,
            "original_max_position_embeddings": self.rope_original_context}
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.dim,
                "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
                "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
                "intermediate_size": self.hidden_dim, "vocab_size": self.vocab_size, "rms_norm_eps": self.norm_eps,
                "rope_theta": self.rope_theta, "rope_scaling": rope_scaling,
                "max_position_embeddings": self.context_len, "tie_word_embeddings": self.tie_embeddings,
                "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "bos_token_id": BOS,
                "eos_token_id": list(self.stop_tokens), "torch_dtype": "bfloat16"}


def token_ids(x) -> tuple[int, ...]:
    return tuple(x) if isinstance(x, list) else (x,)  # HF configs give one eos id or a list


# The published sizes, as their HF config.json files give them; the other fields are the defaults above (8 KV
# heads, vocabulary, theta, norm eps and llama3 scaling are shared; 3.2's small models scale by 32 and tie).
PRESETS = {
    "llama3.1-8b": dict(dim=4096, n_layers=32, n_heads=32, hidden_dim=14336),
    "llama3.1-70b": dict(dim=8192, n_layers=80, n_heads=64, hidden_dim=28672),
    "llama3.1-405b": dict(dim=16384, n_layers=126, n_heads=128, hidden_dim=53248),
    "llama3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, hidden_dim=8192, rope_factor=32.0, tie_embeddings=True),
    "llama3.2-3b": dict(dim=3072, n_layers=28, n_heads=24, hidden_dim=8192, rope_factor=32.0, tie_embeddings=True),
}

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


def rope_inv_freq(args: ModelArgs, device=None) -> torch.Tensor:
    """Angular frequency of each rotated pair of dimensions: (head_dim / 2,) fp32, llama3-scaled."""
    hd = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.int64).float() / hd))
    if args.rope_factor is None:
        return inv_freq
    # Why llama3 scaling works, in wavelengths: pair i turns a full circle every 2*pi/inv_freq_i positions.
    # Pairs whose wavelength is short next to the 8192 pretraining tokens (below 8192 / high_freq_factor =
    # 2048) went round many times in pretraining and encode local order: they are kept. Pairs whose wavelength
    # exceeds the whole pretraining context (8192 / low_freq_factor) never saw most of their angles, so their
    # frequency is divided by `factor`: 128k positions then sweep the angles 8k positions swept before. In
    # between, the two are blended linearly in context / wavelength. As HF `_compute_llama3_parameters`.
    ctx, low, high = args.rope_original_context, args.rope_low_freq_factor, args.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (ctx / wavelen - low) / (high - low)  # 0 at wavelength ctx / low, 1 at ctx / high
    blended = (1 - smooth) * inv_freq / args.rope_factor + smooth * inv_freq
    return torch.where(wavelen < ctx / high, inv_freq,
                       torch.where(wavelen > ctx / low, inv_freq / args.rope_factor, blended))


def rope_cos_sin(inv_freq, pos, dtype):
    """pos (B, T) -> cos, sin (B, 1, T, head_dim), angles in fp32 then cast, as HF LlamaRotaryEmbedding."""
    freqs = pos[..., None].float() * inv_freq  # (B, T, hd/2)
    # rotate-half layout: frequency i drives dimensions i and i + hd/2 (HF's convention, not the interleaved
    # pairs 2i, 2i+1 of the RoPE paper and Meta's code; meta_convert.py reorders Meta's q/k rows to match)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd): broadcast over heads
    return emb.cos().to(dtype), emb.sin().to(dtype)


# Same as smollm2.py: apply_rope
def apply_rope(x, cos, sin):
    """x (B, n_heads, T, hd), cos and sin (B, 1, T, hd): rotate each pair (x_i, x_{i+hd/2}) by its angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin  # HF's rotate_half: (x1, x2) -> (-x2, x1)


# Differs from smollm2.py's KVCache: update returns the whole buffers, so every decode step has the same shapes
class KVCache(nn.Module):
    """Preallocated keys and values of one layer, written in place at the given slots (gpt-fast)."""

    def __init__(self, batch_size, max_seq_len, n_kv_heads, head_dim, dtype, device):
        super().__init__()
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


# -----------------------------------------------------------------------------
# The model


class Llama(nn.Module):
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

    def init_rope(self, device=None):
        # Non-persistent: computed, never loaded. Called again after a meta-device build (see from_pretrained).
        self.register_buffer("inv_freq", rope_inv_freq(self.args, device), persistent=False)

    def trunk(self, tokens, pos, mask, input_pos=None):
        """tokens (B, T), pos (B, T) RoPE positions -> final-normed hidden states (B, T, dim)."""
        x = self.model.embed_tokens(tokens)
        cos, sin = rope_cos_sin(self.inv_freq, pos, x.dtype)  # computed once, shared by every layer
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, input_pos)
        return self.model.norm(x)

    def forward(self, tokens, doc_ids=None):
        """tokens (B, T) -> logits (B, T, vocab). No cache: the training and parity-test path. doc_ids (B, T)
        marks packed documents, which never see each other (doc_positions_and_mask)."""
        B, T = tokens.shape
        if T > self.args.max_seq_len:
            raise ValueError(f"{T} tokens exceed max_seq_len {self.args.max_seq_len}")
        if doc_ids is None:
            pos, mask = torch.arange(T, device=tokens.device).expand(B, T), None  # None: SDPA's causal kernel
        else:
            pos, mask = doc_positions_and_mask(doc_ids)
        return self.lm_head(self.trunk(tokens, pos, mask))

    # --- KV cache: allocated for generation only, never while training

    def setup_cache(self, batch_size: int, max_seq_len: int):
        # 2 (k, v) * n_layers * n_kv_heads * head_dim values per token: 128 KiB for 8B in bf16, so a full
        # 131072-token context would take 16 GiB per row; hence a cache sized to the request, not the model
        if max_seq_len > self.args.max_seq_len:
            raise ValueError(f"{max_seq_len} tokens exceed max_seq_len {self.args.max_seq_len}")
        w = self.lm_head.weight
        for layer in self.model.layers:
            layer.self_attn.cache = KVCache(batch_size, max_seq_len, self.args.n_kv_heads, self.args.head_dim,
                                            w.dtype, w.device)

    def clear_cache(self):
        for layer in self.model.layers:
            layer.self_attn.cache = None

    def forward_cached(self, tokens, input_pos, pad=None):
        """Run tokens (B, T) in cache slots input_pos (T,); return the last position's logits (B, vocab).

        pad (B,), None for none: left padding of each row. A row's RoPE position is its slot minus its padding.
        Unlike smollm2.py, attention reads the whole preallocated cache, as gpt-fast: shapes never change, so a
        compiled decode step is reused every step; the mask hides padding and slots not yet written.
        """
        pad = torch.zeros(len(tokens), dtype=torch.long, device=tokens.device) if pad is None else pad
        slots = torch.arange(self.model.layers[0].self_attn.cache.k.size(2), device=tokens.device)  # (S,)
        pos = (input_pos[None, :] - pad[:, None]).clamp(min=0)  # (B, T)
        mask = (slots <= input_pos[:, None]) & (slots >= pad[:, None, None])  # (B, T, S)
        # subtle: a padding slot's query sees no key of its row. Let it see itself: an all-False mask row makes
        # SDPA return NaN, which the next layer would write into the cache, and 0 weight * NaN is still NaN.
        mask |= slots == input_pos[:, None]
        h = self.trunk(tokens, pos, mask.unsqueeze(1), input_pos)
        return self.lm_head(h[:, -1])  # only the last position goes through the 128256-wide head

    # -------------------------------------------------------------------------
    # Loading

    @classmethod
    def from_pretrained(cls, ckpt_dir, device=None, dtype=None, max_seq_len: int | None = None) -> "Llama":
        """An HF checkpoint folder (config.json + safetensors, sharded or not). dtype None keeps the checkpoint's
        (bf16 in Meta's releases); max_seq_len None is 8192, or the model's context if shorter."""
        ckpt_dir, device = Path(ckpt_dir), torch.device(device or "cpu")
        if (ckpt_dir / "params.json").is_file() and not (ckpt_dir / "config.json").is_file():
            raise FileNotFoundError(f"{ckpt_dir} is Meta's original format (params.json, consolidated.*.pth): "
                                    f"convert it once with `python download.py --meta_dir {ckpt_dir}`")
        if not (ckpt_dir / "config.json").is_file():
            name = ckpt_dir.name.lower().replace("llama-3", "llama3")  # download.py names folders after HF repos
            fix = name.removesuffix("-meta") + (" --meta" if name.endswith("-meta") else "")
            raise FileNotFoundError(f"no checkpoint at {ckpt_dir} (no config.json): run `python download.py {fix}`")
        args = read_json(ckpt_dir / "config.json", ModelArgs.from_hf_config)
        gen = ckpt_dir / "generation_config.json"  # HF generate stops at its eos ids: so do we
        if gen.is_file() and "eos_token_id" in (gen_cfg := read_json(gen)):
            args.stop_tokens = token_ids(gen_cfg["eos_token_id"])
        args.max_seq_len = max_seq_len or min(8192, args.context_len)
        if not 0 < args.max_seq_len <= args.context_len:
            raise ValueError(f"max_seq_len must be in 1..{args.context_len}, got {max_seq_len}")
        # Build on the meta device (shapes only, no memory), then assign the loaded tensors into place: the
        # memory-mapped checkpoint tensors become the weights when device and dtype already match.
        with torch.device("meta"):
            model = cls(args)
        state = load_safetensors(ckpt_dir, device, dtype)
        if args.tie_embeddings and "model.embed_tokens.weight" in state:  # the embedding wins over a stored copy
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        check_state(model, state, ckpt_dir)
        model.load_state_dict(state, strict=True, assign=True)
        if args.tie_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight  # assign=True made two Parameters: re-tie
        model.init_rope(device)
        return model.eval()

    # -------------------------------------------------------------------------
    # Generation

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float = 1.0, stop_tokens=None, seed: int | None = None,
                 stream=None) -> list[list[int]]:
        """Continue each prompt; return the new tokens of each (a stop token ends a row and is not returned).

        temperature 0 is greedy. stop_tokens None stops at the model's own (args.stop_tokens), [] never early.
        stream(row, token) is called for every returned token as soon as it is sampled. The KV cache is
        allocated here, as long as this call needs, and freed after, unless the caller set up one large
        enough (benchmarks do, so that a compiled decode step always sees the same buffers).
        """
        longest = check_generate(prompts, max_new_tokens, self.args.max_seq_len, temperature, top_k, top_p)
        stop = set(self.args.stop_tokens if stop_tokens is None else stop_tokens)
        B, total = len(prompts), longest + max_new_tokens
        device = self.lm_head.weight.device
        # Left-pad so every row's last prompt token sits in the same slot: one decode step serves all rows.
        pad = torch.tensor([longest - len(p) for p in prompts], device=device)
        tokens = torch.tensor([[0] * (longest - len(p)) + list(p) for p in prompts], device=device)
        generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        cache = self.model.layers[0].self_attn.cache
        own_cache = cache is None or cache.k.size(0) != B or cache.k.size(2) < total
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
# Command line

try:  # the speed module beside this file (fast_decode.py); a copy of this file alone runs plain, same tokens
    from fast_decode import fast
except ImportError:
    fast = None


def main(prompt: str | None = None, ckpt_dir: str = "checkpoints/Llama-3.1-8B-Instruct", max_new_tokens: int = 256,
         temperature: float = 0.6, top_p: float = 0.9, top_k: int | None = None, device: str | None = None,
         dtype: str | None = None, seed: int | None = None, chat: bool | None = None, interactive: bool = False,
         max_seq_len: int | None = None, int8: bool = False):
    """Generate from Llama 3.1 / 3.2. Instruct checkpoints wrap the prompt in the chat template (--chat false
    sends it raw); base checkpoints get <|begin_of_text|> + the prompt, verbatim. The sampling defaults are
    those of Meta's generation_config.json.

    prompt: the text to continue (with --interactive, the first turn)
    ckpt_dir: a HF checkpoint folder (download.py writes one, also from Meta's consolidated.NN.pth files)
    max_new_tokens: most tokens to generate per reply
    temperature: 0 is greedy; higher is more random
    top_p: sample from the smallest set of tokens whose probability reaches top_p
    top_k: sample from the k most likely tokens only
    device: cpu, cuda, cuda:1...; default cuda when available, else cpu
    dtype: float32, bfloat16 or float16; default the checkpoint's (bfloat16 in Meta's releases: 16 GB for 8B)
    seed: seeds sampling, so a run repeats exactly; default a different draw each run
    chat: wrap the prompt in the chat template; default: for instruct checkpoints
    interactive: chat turn by turn until Ctrl-D
    max_seq_len: prompt + reply budget, which sizes the KV cache; default 8192, up to the model's context
    int8: int8 weights on the CPU (fast_decode.py's weights="int8": a quarter of fp32's bytes per token, about
        +0.6-0.9% perplexity on SmolLM2)
    """
    try:  # everything a user can get wrong is checked before the (slow) load, and reported in one line
        dev, dt = check_generation_flags(prompt, max_new_tokens, temperature, top_k, top_p, seed, device, dtype,
                                         interactive, int8=int8, fast=fast)
        t0 = time.time()
        model = Llama.from_pretrained(ckpt_dir, dev, dt, max_seq_len=max_seq_len)
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
    if fast:
        fast(model, threads=True, weights="int8" if int8 else None)  # threads: fast_decode.decode_threads
    print(f"loaded {ckpt_dir} ({model.lm_head.weight.dtype}, {dev}) in {time.time() - t0:.1f}s", file=sys.stderr)
    stop = [END_OF_TEXT, EOM, EOT] if chat else list(model.args.stop_tokens)

    def encode(tokenizer, messages):  # the conversation in the chat template, or <|begin_of_text|> + the latest text
        return encode_chat(tokenizer, messages) if chat else encode_prompt(tokenizer, messages[-1]["content"], False)

    converse(model, tokenizer, encode, prompt, interactive, stop, max_new_tokens, temperature, top_k, top_p, seed)


if __name__ == "__main__":
    cli(main)
