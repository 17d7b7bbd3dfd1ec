"""
LM2 (Large Memory Models) on a Llama decoder, in one file. What it adds to smollm2.py: every chosen block owns a bank
of N memory slots x d that tokens read by cross-attention behind an output gate, rewritten through input and forget
gates at the end of every segment of `segment_len` tokens and carried to the next one, so the forward runs segment by
segment. With the memory off the model is exactly HF `LlamaForCausalLM` (SmolLM2, Llama 3.x checkpoints load as is).

References: J. Kang et al., "LM2: Large Memory Models", arXiv 2502.06049, Sec. 2 (Memory's docstring has the
equations); the official code, github.com/convergence-ai/lm2; HF `modeling_llama.py` for the decoder.

Departures from the official code, and choices where the paper is silent:
1. Any sequence length and batch size: slots are written from a finished segment's tokens (official code: T == N).
2. The output gate is the paper's; the official code adds the memory output ungated.
3. Each sequence starts from the learned bank M_0 (identity-initialised, as in the paper); optional truncated BPTT.
4. A fresh LM2 computes exactly its base checkpoint (W_V starts at zero); the forget bias starts at 3, not 1.
5. Optional `attn_window` (sliding window, as HF Mistral), so that only the memory reaches further back.
Blocks marked `# Same as smollm2.py: NAME` (or llama31.py) are that file's, word for word; cli.py runs the CLI.

Run: python lm2.py --prompt "The capital of France is"   (add --chat for instruct models, --interactive)
"""
import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer_bpe import Tokenizer, apply_chat_template

# -----------------------------------------------------------------------------
# Config


@dataclass
class ModelArgs:
    """Llama decoder plus LM2 memory. Llama fields default to SmolLM2-135M."""
    dim: int = 576                      # hidden size d
    n_layers: int = 30                  # decoder blocks
    n_heads: int = 9                    # query heads
    n_kv_heads: int = 3                 # key/value heads (GQA)
    head_dim: int = 64                  # per-head size
    hidden_dim: int = 1536              # SwiGLU inner width (HF intermediate_size)
    vocab_size: int = 49152
    norm_eps: float = 1e-5              # RMSNorm epsilon
    rope_theta: float = 100000.0        # RoPE base
    rope_factor: float | None = None    # llama3 scaling (Llama 3.1/3.2, as llama31.py): long wavelengths / factor
    rope_low_freq_factor: float = 1.0   # wavelengths above original_context / low are fully stretched
    rope_high_freq_factor: float = 4.0  # wavelengths below original_context / high are left alone
    rope_original_context: int = 8192   # context of pretraining, before long-context training
    max_seq_len: int = 8192             # context the model was trained for (HF max_position_embeddings)
    tie_embeddings: bool = True         # lm_head shares the embedding matrix
    bos_token_id: int = 1
    stop_tokens: tuple[int, ...] = (2,)  # generation ends at these (HF eos_token_id)
    mem_slots: int = 64                 # N memory slots per block (the paper uses 2048)
    mem_heads: int = 4                  # heads of the memory cross-attention (official default 4)
    mem_layers: tuple | None = None     # blocks with memory: None = all (paper's best), () = none (vanilla)
    segment_len: int = 512              # memory is written at the end of every segment of this many tokens
    bptt_segments: int | None = None    # no gradient crosses every this-many-th segment boundary (None: any)
    attn_window: int | None = None      # sliding attention window (keys p-W+1..p); None = full causal

    # Same as smollm2.py: ModelArgs.from_name
    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        """From a HF Llama config.json (see llama_fields) and its "lm2" entry of memory settings (to_hf_config's)."""
        fields, rope = llama_fields(cfg)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise NotImplementedError(f"rope type {rope_type!r} is not implemented (only default and llama3)")
        llama3 = {} if rope_type == "default" else dict(
            rope_factor=config_get(rope, "factor", float),
            rope_low_freq_factor=config_get(rope, "low_freq_factor", float),
            rope_high_freq_factor=config_get(rope, "high_freq_factor", float),
            rope_original_context=config_get(rope, "original_max_position_embeddings"))
        memory = dict(config_get(cfg, "lm2", dict, {}))
        if unknown := memory.keys() - set(MEMORY_FIELDS):
            raise ValueError(f"lm2 has unknown entries {sorted(unknown)}")
        for k, v in memory.items():  # None means all blocks, no truncation, no window where a field allows it
            if v is not None or k not in ("mem_layers", "bptt_segments", "attn_window"):
                memory[k] = config_get(memory, k, tuple if k == "mem_layers" else int)
        return cls(**fields, **llama3, head_dim=config_get(cfg, "head_dim", int, fields["dim"] // fields["n_heads"]),
                   bos_token_id=config_get(cfg, "bos_token_id", int, 1, low=0), **memory)

    def to_hf_config(self) -> dict:
        """config.json for HF `LlamaForCausalLM` (the base model) with the memory settings under "lm2"."""
        rope_scaling = None if self.rope_factor is None else {  # the llama3 entry of HF's config, as llama31.py
            "rope_type": "llama3", "factor": self.rope_factor, "low_freq_factor": self.rope_low_freq_factor,
            "high_freq_factor": self.rope_high_freq_factor,
            "original_max_position_embeddings": self.rope_original_context}
        lm2 = {f: list(v) if isinstance(v := getattr(self, f), tuple) else v for f in MEMORY_FIELDS}
        return {**llama_config(self), "rope_scaling": rope_scaling, "bos_token_id": self.bos_token_id, "lm2": lm2}

    def __post_init__(self):  # JSON gives lists; keep tuples so configs compare equal after a round trip
        self.stop_tokens = tuple(self.stop_tokens)
        self.mem_layers = None if self.mem_layers is None else tuple(self.mem_layers)

    def memory_layers(self) -> list[int]:
        return list(range(self.n_layers)) if self.mem_layers is None else sorted(self.mem_layers)


MEMORY_FIELDS = ("mem_slots", "mem_heads", "mem_layers", "segment_len", "bptt_segments", "attn_window")  # "lm2"
LLAMA32 = dict(vocab_size=128256, rope_theta=500000.0, max_seq_len=131072, bos_token_id=128000,
               stop_tokens=(128001, 128008, 128009), rope_factor=32.0)  # llama3 RoPE scaling of Llama 3.2
PRESETS = {  # defaults only: from_pretrained always reads the checkpoint's own config.json
    "smollm2-135m": dict(),
    "smollm2-360m": dict(dim=960, n_layers=32, n_heads=15, n_kv_heads=5, hidden_dim=2560),
    "smollm2-1.7b": dict(dim=2048, n_layers=24, n_heads=32, n_kv_heads=32, hidden_dim=8192, rope_theta=130000.0),
    "llama3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192, **LLAMA32),
    "llama3.2-3b": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, head_dim=128, hidden_dim=8192, **LLAMA32),
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


# Same as llama31.py: rope_inv_freq
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


def attention_mask(q_idx, k_idx, window=None, docs=None):
    """Boolean (B|1, 1, Tq, Tk) mask: causal, within the sliding window, same document. Indices are row positions (not
    RoPE positions, which restart per document); docs (B, Tk): the keys' documents, the queries the last Tq keys'."""
    m = k_idx[None, :] <= q_idx[:, None]
    if window is not None:
        m = m & (k_idx[None, :] > q_idx[:, None] - window)
    m = m[None, None]
    if docs is not None:
        m = m & (docs[:, None, -len(q_idx):, None] == docs[:, None, None, :])
    return m


# Differs from smollm2.py's KVCache: update returns the filled slots alone, which the attention window's mask covers
class KVCache(nn.Module):
    """Preallocated keys and values of one layer, written in place by position (gpt-fast)."""

    # Same as smollm2.py: KVCache.__init__
    def __init__(self, batch_size, max_seq_len, n_kv_heads, head_dim, dtype, device):
        super().__init__()
        self.batch_size, self.max_seq_len = batch_size, max_seq_len  # what generate() may reuse it for
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):
        """Write k, v (B, n_kv_heads, T, hd) into slots input_pos (T,); return the filled slots 0..input_pos[-1]."""
        self.k[:, :, input_pos] = k
        self.v[:, :, input_pos] = v
        end = int(input_pos[-1]) + 1
        return self.k[:, :, :end], self.v[:, :, :end]


# Differs from smollm2.py's Attention: it also attends to the keys/values kept from earlier segments and returns its own
class Attention(nn.Module):
    # Same as smollm2.py: Attention.__init__
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, past=None, input_pos=None):
        """past: (k, v) kept from earlier segments; input_pos: decoding with the cache. -> (output, keys/values)"""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is not None:
            k, v = self.cache.update(input_pos, k, v)  # (B, Hkv, input_pos[-1] + 1, hd)
        elif past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_heads != self.n_kv_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1)), (k, v)


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

# -----------------------------------------------------------------------------
# LM2 memory


class Memory(nn.Module):
    """The memory bank of one block: read by every token, written once per completed segment.

    Read (paper Sec. 2.1, as written), h = the block's normed token stream (B, T, d), M = the bank (B, N, d):
        s[t, i] = (h_t W_Q) . (M_i W_K) / sqrt(d_head)       per memory head
        E_mem_t = sum_i softmax_i(s[t, :]) M_i W_V,   out_t = sigmoid(E_mem_t W_out) * E_mem_t
    The paper's write (Sec. 2.2), M_t <- sigmoid(h_t W_in) * tanh(E_mem_t) + sigmoid(E_mem_t W_forget) * M_t, is
    token-indexed (row t updates slot t), so only defined when T = N. Here it is slot-indexed (departure 1), over
    the T tokens of a finished segment:
        E~_i = sum_t softmax_t(s[:, i]) h_t                   slot i's view of the segment (same score s)
        M_i <- sigmoid(E~_i W_in + b_in) * tanh(E~_i) + sigmoid(E~_i W_forget + b_forget) * M_i
    Gates are per slot and per channel. Sharing s makes the bank content-addressed: a slot is written by the tokens
    that would read it. The bank stays in h's space, so the paper's identity start is N orthogonal one-hot states.
    """
    def __init__(self, args: ModelArgs):
        super().__init__()
        d, self.n_heads = args.dim, args.mem_heads
        if d % args.mem_heads:
            raise ValueError(f"mem_heads={args.mem_heads} must divide dim={d}")
        self.q_proj = nn.Linear(d, d, bias=False)       # W_Q, on tokens
        self.k_proj = nn.Linear(d, d, bias=False)       # W_K, on slots
        self.v_proj = nn.Linear(d, d, bias=False)       # W_V, on slots
        self.out_gate = nn.Linear(d, d, bias=False)     # W_out
        self.in_gate = nn.Linear(d, d)                  # W_in, b_in
        self.forget_gate = nn.Linear(d, d)              # W_forget, b_forget
        self.bank = nn.Parameter(torch.empty(args.mem_slots, d))  # M_0, the bank every sequence starts from
        self.reset_parameters()

    def reset_parameters(self):
        for lin in (self.q_proj, self.k_proj, self.out_gate, self.in_gate, self.forget_gate):
            nn.init.normal_(lin.weight, std=0.02)  # HF Llama initializer_range
        # subtle: W_V = 0 makes E_mem = 0 exactly, so a fresh LM2 on a pretrained checkpoint *is* that checkpoint,
        # while the output gate, sigmoid(0) = 1/2, keeps the gradient into W_V alive (as LoRA's zero B); a closed
        # gate (a large negative bias) would be only about zero, and starve its own gradient
        nn.init.zeros_(self.v_proj.weight)
        nn.init.zeros_(self.in_gate.bias)
        # chrono-style forget bias (Tallec & Ollivier 2018): sigmoid(3) = 0.95 keeps a fact ~20 segments at the start,
        # where the official 1.0 (0.73) halves it every two segments
        nn.init.constant_(self.forget_gate.bias, 3.0)
        nn.init.eye_(self.bank)  # paper: identity initialisation (rows beyond d, if N > d, start at zero)

    def _heads(self, x):  # (B, L, d) -> (B, heads, L, d / heads)
        return x.view(x.shape[0], x.shape[1], self.n_heads, -1).transpose(1, 2)

    def _merge(self, x):  # (B, heads, L, d / heads) -> (B, L, d)
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)

    def state(self, bank):
        """The state a segment reads: the bank (B, N, d) and its keys and values (B, heads, N, d / heads)."""
        return bank, self._heads(self.k_proj(bank)), self._heads(self.v_proj(bank))

    def initial_state(self, batch_size):
        return self.state(self.bank.expand(batch_size, -1, -1))

    def read(self, h, state, fresh=None):
        """Gated memory output (B, T, d); fresh (B, T): tokens of a document begun after the bank was written (packed
        rows) read the initial bank."""
        q = self._heads(self.q_proj(h))
        e = self._merge(F.scaled_dot_product_attention(q, *state[1:]))  # softmax over slots: E_mem (B, T, d)
        if fresh is not None:
            e0 = self._merge(F.scaled_dot_product_attention(q, *self.initial_state(h.shape[0])[1:]))
            e = torch.where(fresh[..., None], e0, e)
        return torch.sigmoid(self.out_gate(e)) * e  # E_gated = g_out * E_mem

    def write(self, h, state, token_mask=None, fresh=None):
        """State after a segment whose normed inputs are h (B, T, d); token_mask (B, T): the tokens that may be
        written (the document that continues); fresh (B,): that document began in this segment."""
        if fresh is not None:
            state = [torch.where(fresh.view(-1, *[1] * (t.dim() - 1)), t0, t)
                     for t0, t in zip(self.initial_state(h.shape[0]), state)]
        mem, k = state[0], state[1]
        mask = None if token_mask is None else token_mask[:, None, None, :]  # (B, 1, 1, T)
        # the read's score with the roles swapped: slots are the queries, softmax runs over tokens; e (B, N, d) is E~
        e = self._merge(F.scaled_dot_product_attention(k, self._heads(self.q_proj(h)), self._heads(h), attn_mask=mask))
        return self.state(torch.sigmoid(self.in_gate(e)) * torch.tanh(e) + torch.sigmoid(self.forget_gate(e)) * mem)


# Differs from smollm2.py's Block: the memory read joins beside attention; the normed input goes to the memory write
class Block(nn.Module):
    def __init__(self, args: ModelArgs, has_memory: bool):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.memory = Memory(args) if has_memory else None
        self.mem_state = self.seg_h = None  # decoding only: see LM2.setup_cache

    def forward(self, x, cos, sin, mask, past=None, mem=None, fresh=None, input_pos=None):
        h = self.input_layernorm(x)
        a, past = self.self_attn(h, cos, sin, mask, past, input_pos)
        x = x + a
        if self.memory is not None:  # paper Fig. 1: the memory flow joins beside the attention output
            x = x + self.memory.read(h, mem, fresh)  # mem: the state of Memory.state
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, h, past

# -----------------------------------------------------------------------------
# The model


class LM2(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        mem_layers = set(args.memory_layers())
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(args.vocab_size, args.dim),
            layers=nn.ModuleList(Block(args, i in mem_layers) for i in range(args.n_layers)),
            norm=RMSNorm(args.dim, args.norm_eps)))
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_rope()
        self.init_weights()

    # Same as smollm2.py: SmolLM2.init_rope
    def init_rope(self, device=None):
        # A plain fp32 tensor, not a buffer: model.to(torch.bfloat16) must not round the frequencies. Made again on
        # the weights' device after a meta-device build (from_pretrained); trunk follows the model if it moves.
        self.inv_freq = rope_inv_freq(self.args, device)

    def init_weights(self):
        """From scratch: HF Llama's normal(0, 0.02) matrices, norms at one; memory as Memory.reset_parameters."""
        for name, p in self.named_parameters():
            if p.dim() == 2 and ".memory." not in name:
                nn.init.normal_(p, std=0.02)
        for memory in (layer.memory for layer in self.model.layers if layer.memory is not None):
            memory.reset_parameters()

    def lora_train_whole(self) -> str:
        """finetune.py's hook for --mode lora: the memory trains in full (it has no pretrained weight to adapt)."""
        return ".memory."

    def forward(self, tokens, doc_ids=None):
        """tokens (B, T) -> logits (B, T, vocab), segment by segment: within a segment, blocks read the banks left by
        earlier segments; after it, each bank is written from it. doc_ids (B, T): packed documents, which attention,
        RoPE positions and memory never cross (one starting mid-segment starts from M_0, on a shifted grid)."""
        B, T = tokens.shape
        a, layers, S = self.args, self.model.layers, self.args.segment_len
        idx = torch.arange(T, device=tokens.device)
        pos = idx.expand(B, T)
        if doc_ids is not None:  # RoPE positions restart at each document start
            start = torch.ones_like(doc_ids, dtype=torch.bool)
            start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
            pos = idx - torch.where(start, idx, 0).cummax(dim=1).values
            doc_ids = start.cumsum(1)  # subtle: runs, not raw ids, so a reused id in one row is still a new document
        x = self.model.embed_tokens(tokens)  # (B, T, d)
        cos, sin = rope_cos_sin(self.inv_freq.to(x.device), pos, x.dtype)  # (B, 1, T, hd)
        # per block, carried from segment to segment: `past`, the keys/values later queries may still attend to (all
        # of them without a window: segmenting then changes no value), and `mems`, the memory state (bank, K, V)
        past = [None] * len(layers)
        mems = [l.memory.initial_state(B) if l.memory is not None else None for l in layers]
        k0, outs = 0, []  # k0: row index of the oldest key kept in `past`
        for s0 in range(0, T, S):
            s1 = min(s0 + S, T)
            if a.bptt_segments and s0 and (s0 // S) % a.bptt_segments == 0:  # truncated BPTT: no gradient crosses
                mems = [m if m is None else tuple(t.detach() for t in m) for m in mems]
                past = [(k.detach(), v.detach()) for k, v in past]
            # explicit mask, not is_causal: the queries are the last s1 - s0 rows of s1 - k0 keys
            mask = attention_mask(idx[s0:s1], idx[k0:s1], a.attn_window, None if doc_ids is None else doc_ids[:, k0:s1])
            read_fresh = write_mask = write_fresh = None
            if doc_ids is not None:
                seg, last = doc_ids[:, s0:s1], doc_ids[:, s1 - 1]
                write_mask = seg == last[:, None]  # only the document that continues is written
                if s0 > 0:  # the carried bank belongs to the document running at the end of the last segment
                    read_fresh, write_fresh = seg != doc_ids[:, s0 - 1, None], last != doc_ids[:, s0 - 1]
            xs = x[:, s0:s1]  # (B, S, d): all blocks run on this segment before the next one starts
            for i, layer in enumerate(layers):
                xs, h, past[i] = layer(xs, cos[:, :, s0:s1], sin[:, :, s0:s1], mask, past[i], mems[i], read_fresh)
                if layer.memory is not None and s1 < T:  # the last segment's write would never be read
                    mems[i] = layer.memory.write(h, mems[i], write_mask, write_fresh)
            if a.attn_window is not None:  # keep only the keys a later query can still see
                k0 = max(k0, s1 - (a.attn_window - 1))
                past = [(k[:, :, k0 - s1 + k.shape[2]:], v[:, :, k0 - s1 + v.shape[2]:]) for k, v in past]
            outs.append(xs)
        return self.lm_head(self.model.norm(torch.cat(outs, dim=1)))

    def setup_cache(self, batch_size: int, max_seq_len: int):
        """Generation only: KV buffers; per memory block its state at M_0 (bank, keys and values, projected once per
        segment, not per token: most of a read's cost) and the normed inputs of the segment in progress."""
        a, p = self.args, self.model.norm.weight  # p: the model's dtype and device, whatever form its linears take
        for layer in self.model.layers:
            layer.self_attn.cache = KVCache(batch_size, max_seq_len, a.n_kv_heads, a.head_dim, p.dtype, p.device)
            if layer.memory is not None:
                layer.mem_state = layer.memory.initial_state(batch_size)
                layer.seg_h = layer.mem_state[0].new_zeros(batch_size, min(a.segment_len, max_seq_len), a.dim)

    def clear_cache(self):
        for layer in self.model.layers:
            layer.self_attn.cache = layer.mem_state = layer.seg_h = None

    def forward_cached(self, tokens, input_pos, pad=None):
        """Run tokens (B, T) in cache slots input_pos (T,) -> the last position's logits (B, vocab). Rows are not padded
        (see generate); a chunk stays inside one segment, and the one that completes it writes every bank."""
        if pad is not None and bool(pad.any()):
            raise ValueError("LM2 rows are not left-padded: the memory's segments start at each row's first token")
        S, T, end = self.args.segment_len, tokens.size(1), int(input_pos[-1]) + 1
        if (end - T) % S + T > S:
            raise ValueError("a cached chunk must not cross a segment boundary (the memory is written there)")
        x = self.model.embed_tokens(tokens)
        cos, sin = rope_cos_sin(self.inv_freq.to(x.device), input_pos[None], x.dtype)
        mask = attention_mask(input_pos, torch.arange(end, device=x.device), self.args.attn_window)
        for layer in self.model.layers:
            x, h, _ = layer(x, cos, sin, mask, mem=layer.mem_state, input_pos=input_pos)
            if layer.memory is not None:  # keep the block's normed inputs until the segment completes
                layer.seg_h[:, input_pos % S] = h
                if end % S == 0:  # tokens from the next one on read the new bank
                    layer.mem_state = layer.memory.write(layer.seg_h, layer.mem_state)
        return self.lm_head(self.model.norm(x[:, -1]))  # only the last position is needed to pick the next token

    @classmethod
    def from_pretrained(cls, ckpt_dir, device=None, dtype=None, **memory_args) -> "LM2":
        """A HF Llama-family checkpoint folder on device (None: cpu), in dtype (None: as stored), each file checked
        before it is used (see Loading). Memory weights come from the checkpoint if an LM2 saved it (config.json has
        "lm2"), else they start fresh; memory_args (mem_slots=..., segment_len=...) override its settings."""
        ckpt_dir = Path(ckpt_dir)
        args = replace(read_config(ckpt_dir), **memory_args)
        fresh = "lm2" not in read_json(ckpt_dir / "config.json")  # a base Llama checkpoint: no memory yet
        header = read_header(ckpt_dir)
        header.pop("model.rotary_emb.inv_freq", None)  # old HF checkpoints saved this derived buffer
        model, state = build(cls, args, header, ckpt_dir, device or "cpu", dtype, ".memory." if fresh else "",
                             layers=args.n_layers)
        w = state["model.embed_tokens.weight"]
        for i, layer in enumerate(model.model.layers):
            if fresh and layer.memory is not None:  # new memory weights, on w's device and dtype: the load stays strict
                with torch.device(w.device):
                    memory = Memory(args).to(w.dtype).state_dict()
                state |= {f"model.layers.{i}.memory.{k}": v for k, v in memory.items()}
        model.load_state_dict(state, strict=True, assign=True)
        if args.tie_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight  # assign=True made two Parameters: re-tie
        model.init_rope(device)
        return model.eval()

    # Differs from smollm2.py's SmolLM2.generate: no left padding, since a row's segment grid starts at its first token
    @torch.inference_mode()
    def generate(self, prompts, max_new_tokens, temperature=0.0, top_k=None, top_p=1.0, stop_tokens=None,
                 seed=None, stream=None):
        """As smollm2.py's, but all rows share one position counter: a longer prompt's row is still fed its prompt (its
        samples ignored) while shorter ones generate (Llama 1's scheme), so each row runs exactly as alone."""
        longest = check_generate(prompts, max_new_tokens, self.args, temperature, top_k, top_p)
        stop = set(self.args.stop_tokens if stop_tokens is None else stop_tokens)
        B, lens, total = len(prompts), [len(p) for p in prompts], longest + max_new_tokens
        S, common, device = self.args.segment_len, min(lens), self.model.norm.weight.device
        tokens = torch.tensor([list(p) + [0] * (total - len(p)) for p in prompts], device=device)
        rng = torch.Generator(device).manual_seed(seed) if seed is not None else None
        out, done, pos = [[] for _ in range(B)], [False] * B, 0
        self.setup_cache(B, total)
        try:
            while not all(done):  # the common prefix in segment-aligned chunks, then one position at a time
                n = min(common - pos, S - pos % S) if pos < common else 1
                logits = self.forward_cached(tokens[:, pos:pos + n], torch.arange(pos, pos + n, device=device))
                pos += n
                if pos < common:
                    continue
                nxt = sample(logits, temperature, top_k, top_p, rng)  # position pos of every row
                for b in range(B):
                    if lens[b] <= pos and not done[b]:  # past its own prompt, not finished
                        tokens[b, pos] = tok = int(nxt[b])
                        done[b] = tok in stop or len(out[b]) + 1 == max_new_tokens
                        if tok not in stop:
                            out[b].append(tok)
                            if stream is not None:
                                stream(b, tok)
        finally:
            self.clear_cache()
        return out

# -----------------------------------------------------------------------------
# Loading (the block every model file repeats; see smollm2.py)

FETCH = "LM2 runs on a Llama-family checkpoint: `python download.py` fetches SmolLM2-135M-Instruct"


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


# Same as smollm2.py: encode_chat
def encode_chat(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                default_system: str = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"):
    """The conversation's ids as the checkpoint's HF chat template gives them (ChatML or Llama 3, by the tokenizer's
    special tokens), with SmolLM2-Instruct's default system prompt first where a ChatML conversation has none."""
    return apply_chat_template(tokenizer, messages, add_generation_prompt, default_system=default_system)

# -----------------------------------------------------------------------------
# Command line: smollm2.py's, on LM2

CKPT_DIR = "checkpoints/SmolLM2-135M-Instruct"  # python download.py writes it; LM2 starts with fresh memory


# Same as smollm2.py: main (with SmolLM2->LM2,smollm2.py->lm2.py)
def main(prompt: str | None = None, ckpt_dir: str = CKPT_DIR, max_new_tokens: int = 256, temperature: float = 0.2,
         top_p: float = 0.9, top_k: int | None = None, device: str | None = None, dtype: str | None = None,
         seed: int = 1337, chat: bool | None = None, interactive: bool = False, int8: bool = False,
         int4: bool = False, compile: bool = False):
    """Generate from LM2. Instruct checkpoints wrap the prompt in the chat template unless --chat false.

    ckpt_dir: a HF checkpoint folder (python download.py writes one)
    """
    from cli import chat_main  # the flags checked before the slow load, the load, then one reply or a conversation

    chat_main(LM2, encode_chat, prompt, ckpt_dir, max_new_tokens, temperature, top_p, top_k, device, dtype, seed,
              chat, interactive, int8, int4, compile)


if __name__ == "__main__":
    try:
        from cli import cli
    except ModuleNotFoundError:
        raise SystemExit("error: lm2.py's command line needs cli.py beside it (the model: tokenizer_bpe.py only)")
    cli(main)
