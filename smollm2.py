"""
SmolLM2 (135M / 360M / 1.7B) in one readable file: inference, KV-cached batched generation and chat.

SmolLM2 (Hugging Face, 2025, arXiv 2502.02737) is a Llama-architecture decoder: RMSNorm, rotary position
embeddings in the rotate-half convention, grouped-query attention, a SwiGLU MLP and an output head tied to
the token embedding. This file follows HF transformers' `LlamaForCausalLM` (modeling_llama.py) operation for
operation, and is checked against it module by module in test_parity.py. Module names are HF's, so a
`model.safetensors` from the Hub loads with no renaming and `model.state_dict()` saves in the same layout.

Departures from the reference, all deliberate:
- one preallocated KV cache per layer written by position (as gpt-fast), sized to the request, instead of
  HF's growing `DynamicCache`; attention reads only the filled part of it;
- ragged batches are left-padded and each row's RoPE positions start at its first real token, so a batched
  prompt yields exactly the tokens it yields alone (HF's padded `generate` shifts positions unless the caller
  passes them);
- during prefill only the last position goes through the 49152-wide output head;

Usage:
    python download.py                                  # SmolLM2-135M-Instruct into checkpoints/
    python smollm2.py --prompt "What is gravity?"
    python smollm2.py --interactive
    python smollm2.py --ckpt_dir checkpoints/SmolLM2-135M --prompt "Once upon a time" --temperature 0.8
"""

import argparse
import codecs
import difflib
import inspect
import json
import re
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer_bpe import Tokenizer

# -----------------------------------------------------------------------------
# Config


@dataclass
class ModelArgs:
    """SmolLM2 hyper-parameters. Presets are defaults; a checkpoint's config.json always wins."""

    dim: int = 576  # width of the residual stream (HF hidden_size)
    n_layers: int = 30  # decoder blocks
    n_heads: int = 9  # query heads
    n_kv_heads: int = 3  # key/value heads shared by n_heads // n_kv_heads query heads each (GQA)
    hidden_dim: int = 1536  # SwiGLU inner width (HF intermediate_size)
    vocab_size: int = 49152
    rope_theta: float = 100000.0  # RoPE base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    max_seq_len: int = 8192  # context length the model was trained for
    tie_embeddings: bool = True  # output head shares the token embedding matrix
    bos_id: int = 1  # <|im_start|>
    eos_id: int = 2  # <|im_end|> for instruct checkpoints, <|endoftext|> (0) for base ones

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        """From a HF `config.json` of a Llama-architecture model with plain (unscaled) RoPE."""
        # transformers >= 5 nests rope settings in `rope_parameters`; older files use rope_theta/rope_scaling
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise NotImplementedError(f"RoPE scaling {rope} is not used by SmolLM2; use llama31.py")
        dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
        if cfg.get("head_dim", dim // n_heads) != dim // n_heads:
            raise NotImplementedError("head_dim != hidden_size / num_attention_heads is not a SmolLM2 shape")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise NotImplementedError("biases in attention or MLP are not part of SmolLM2")
        eos = cfg.get("eos_token_id", 2)
        return cls(
            dim=dim,
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            hidden_dim=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            norm_eps=cfg.get("rms_norm_eps", 1e-5),
            max_seq_len=cfg.get("max_position_embeddings", 8192),
            tie_embeddings=cfg.get("tie_word_embeddings", True),
            bos_id=cfg.get("bos_token_id", 1),
            eos_id=eos[0] if isinstance(eos, list) else eos,
        )

    def to_hf_config(self) -> dict:
        """A config.json that both this file and transformers' LlamaForCausalLM load."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.hidden_dim,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.norm_eps,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_id,
            "eos_token_id": self.eos_id,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": "float32",
        }


# Published sizes (HuggingFaceTB/SmolLM2-*). Public copies disagree on RoPE theta and context of the larger
# two: from_pretrained takes them from the checkpoint's config.json instead.
PRESETS = {
    "SmolLM2-135M": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536, rope_theta=100000.0),
    "SmolLM2-360M": dict(dim=960, n_layers=32, n_heads=15, n_kv_heads=5, hidden_dim=2560, rope_theta=100000.0),
    "SmolLM2-1.7B": dict(dim=2048, n_layers=24, n_heads=32, n_kv_heads=32, hidden_dim=8192, rope_theta=130000.0),
}

# -----------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 even for bf16 activations: the mean of squares loses too much precision otherwise.
        # The scale is applied after casting back, in the weight's dtype, exactly as HF LlamaRMSNorm.
        # (F.rms_norm: x * rsqrt(mean(x^2) + eps), the same operations as HF's, in one call.)
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype)


def rope_tables(args: ModelArgs, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every (position, frequency) pair: two (max_seq_len, head_dim) fp32 tables."""
    hd = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.int64).float() / hd))
    t = torch.arange(args.max_seq_len, device=device, dtype=torch.int64).float()
    freqs = torch.outer(t, inv_freq)  # (max_seq_len, hd/2)
    # rotate-half convention: frequency i drives dimensions i and i + hd/2 (not the interleaved pairs
    # 2i, 2i+1 of the RoPE paper and Meta's code); HF checkpoints' q/k rows are laid out for this.
    emb = torch.cat((freqs, freqs), dim=-1)  # (max_seq_len, hd)
    return emb.cos(), emb.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """x: (B, n_heads, T, hd); cos, sin: (B, 1, T, hd) for each token's own position."""
    return x * cos + rotate_half(x) * sin


class KVCache(nn.Module):
    """Preallocated keys and values of one layer, written in place at the given positions (gpt-fast)."""

    def __init__(self, batch_size, max_seq_len, n_kv_heads, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k, v):
        """Write k, v (B, n_kv_heads, T, hd) at columns start..start+T-1; return the filled part."""
        end = start + k.size(2)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]  # views, no copy


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, cache_start=None):
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache_start is not None:
            k, v = self.cache.update(cache_start, k, v)  # (B, nkv, S, hd), S = cached + T
        # enable_gqa lets query head h read kv head h // (nh / nkv) without materialising the repeat: the
        # same grouping as HF's repeat_kv (repeat_interleave on the head axis). mask None means plain causal.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=self.n_heads != self.n_kv_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, mask, cache_start=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_start)
        return x + self.mlp(self.post_attention_layernorm(x))


# -----------------------------------------------------------------------------
# The model


class Decoder(nn.Module):
    """The trunk, named `model` inside SmolLM2 so parameter names match HF's `model.layers.N...`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)


class SmolLM2(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Decoder(args)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_rope()

    def init_rope(self, device=None):
        # Non-persistent: recomputed, never loaded. Called again after a meta-device build (see from_pretrained).
        cos, sin = rope_tables(self.args, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def trunk(self, tokens, pos, mask, cache_start=None):
        """tokens (B, T), pos (B, T) RoPE positions -> final-normed hidden states (B, T, dim)."""
        x = self.model.embed_tokens(tokens)
        cos = self.rope_cos[pos].to(x.dtype).unsqueeze(1)  # (B, 1, T, hd): broadcast over heads
        sin = self.rope_sin[pos].to(x.dtype).unsqueeze(1)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache_start)
        return self.model.norm(x)

    def forward(self, tokens, doc_ids=None):
        """tokens (B, T) -> logits (B, T, vocab). No cache: the training and parity-test path.

        doc_ids (B, T), for packed training rows: a token attends only to earlier tokens of its own document,
        and RoPE positions restart at 0 where each document starts, as if each were run alone.
        """
        B, T = tokens.shape
        if T > self.args.max_seq_len:
            raise ValueError(f"{T} tokens do not fit the context of {self.args.max_seq_len}")
        idx = torch.arange(T, device=tokens.device).expand(B, T)
        if doc_ids is None:
            pos, mask = idx, None
        else:
            starts = torch.ones_like(doc_ids, dtype=torch.bool)
            starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
            pos = idx - torch.where(starts, idx, 0).cummax(dim=1).values  # distance to own document start
            same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
            mask = (same_doc & torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()).unsqueeze(1)
        return self.lm_head(self.trunk(tokens, pos, mask))

    # --- KV cache: allocated for generation only, never while training

    def setup_cache(self, batch_size: int, max_seq_len: int):
        if max_seq_len > self.args.max_seq_len:
            raise ValueError(f"{max_seq_len} tokens do not fit the context of {self.args.max_seq_len}")
        w = self.lm_head.weight
        for layer in self.model.layers:
            layer.self_attn.cache = KVCache(batch_size, max_seq_len, self.args.n_kv_heads, self.args.head_dim,
                                            w.dtype, w.device)

    def clear_cache(self):
        for layer in self.model.layers:
            layer.self_attn.cache = None

    def forward_cached(self, tokens, start: int, pad: torch.Tensor):
        """Run tokens (B, T) occupying cache columns start..start+T-1; return last-position logits (B, vocab).

        pad (B,): left-padding of each row. A row's RoPE position is its column minus its padding, and no
        query may attend to a padding column or a later column.
        """
        B, T = tokens.shape
        cols = torch.arange(start, start + T, device=tokens.device)  # (T,) cache columns being written
        pos = (cols[None, :] - pad[:, None]).clamp(min=0)  # (B, T)
        if T == 1 and not pad.any():
            mask = None  # one new token may read every filled column: no mask at all (fastest SDPA path)
        else:
            keys = torch.arange(start + T, device=tokens.device)  # (S,)
            mask = (keys[None, None, :] <= cols[None, :, None]) & (keys[None, None, :] >= pad[:, None, None])
            mask = mask.unsqueeze(1)  # (B, 1, T, S)
        h = self.trunk(tokens, pos, mask, cache_start=start)
        return self.lm_head(h[:, -1])  # only the last position is needed to pick the next token

    # -------------------------------------------------------------------------
    # Loading

    @classmethod
    def from_pretrained(cls, ckpt_dir, device=None, dtype=None) -> "SmolLM2":
        """Load a HF checkpoint folder (config.json + model.safetensors, or sharded with an index)."""
        from safetensors import safe_open

        ckpt_dir = Path(ckpt_dir)
        if not (ckpt_dir / "config.json").is_file():
            raise FileNotFoundError(f"no checkpoint at {ckpt_dir}: run `python download.py` "
                                    f"(or `python download.py NAME --out DIR` for another size)")
        args = ModelArgs.from_hf_config(json.loads((ckpt_dir / "config.json").read_text()))
        index = ckpt_dir / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
            else ["model.safetensors"]
        for f in files:
            if not (ckpt_dir / f).is_file():
                raise FileNotFoundError(f"{ckpt_dir / f} is missing: the download is incomplete, run download.py again")
        device = torch.device(device or "cpu")
        dtype = dtype or torch.float32
        # Build on the meta device (shapes only, no memory), then assign each loaded tensor into place:
        # the weights exist once in memory, already in their final dtype and device.
        with torch.device("meta"):
            model = cls(args)
        state = {}
        for f in files:
            with safe_open(ckpt_dir / f, framework="pt") as sf:  # memory-mapped: tensors are read one at a time
                for name in sf.keys():
                    state[name] = sf.get_tensor(name).to(device=device, dtype=dtype)
        if args.tie_embeddings:
            state.pop("lm_head.weight", None)  # a tied checkpoint may still store a copy; the embedding wins
        expected = model.state_dict().keys()
        missing = [k for k in expected if k not in state and not (args.tie_embeddings and k == "lm_head.weight")]
        unexpected = [k for k in state if k not in expected]
        if missing or unexpected:
            raise ValueError(f"checkpoint {ckpt_dir} does not match its config: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        for name, p in model.state_dict().items():
            if name in state and state[name].shape != p.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(state[name].shape)} != model {tuple(p.shape)}")
        model.load_state_dict(state, strict=False, assign=True)  # strictness checked above, tied head excepted
        if args.tie_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight  # assign=True replaced the shared Parameter
        model.init_rope(device)
        return model.eval()

    # -------------------------------------------------------------------------
    # Generation

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float = 1.0, stop_tokens=None, seed: int | None = None,
                 stream=None) -> list[list[int]]:
        """Continue each prompt; return the new tokens of each (a stop token ends a row and is not returned).

        temperature 0 is greedy. stop_tokens None stops at the model's end-of-turn token, [] never early.
        stream(row, token) is called for every returned token as soon as it is sampled.
        """
        check_sampling(temperature, top_k, top_p)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        stop = {self.args.eos_id} if stop_tokens is None else set(stop_tokens)
        B, longest = len(prompts), max(len(p) for p in prompts)
        total = longest + max_new_tokens
        if total > self.args.max_seq_len:
            raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"context of {self.args.max_seq_len} tokens")
        device = self.lm_head.weight.device
        # Left-pad so every row's last prompt token sits in the same column: one decode step serves all rows.
        pad = torch.tensor([longest - len(p) for p in prompts], device=device)
        tokens = torch.tensor([[0] * (longest - len(p)) + p for p in prompts], device=device)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        self.setup_cache(B, total)
        out = [[] for _ in range(B)]
        done = [False] * B
        try:
            logits = self.forward_cached(tokens, 0, pad)
            for step in range(max_new_tokens):
                next_tok = sample(logits, temperature, top_k, top_p, generator)  # (B,)
                for b, t in enumerate(next_tok.tolist()):
                    if done[b]:
                        continue
                    if t in stop:
                        done[b] = True
                        continue
                    out[b].append(t)
                    if stream is not None:
                        stream(b, t)
                if all(done) or step == max_new_tokens - 1:
                    break
                logits = self.forward_cached(next_tok[:, None], longest + step, pad)
        finally:
            self.clear_cache()
        return out


def check_sampling(temperature, top_k, top_p):
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")


def sample(logits, temperature=0.0, top_k=None, top_p=1.0, generator=None):
    """logits (B, vocab) -> next token ids (B,): greedy, or temperature, top-k and top-p (nucleus) sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1) k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        # keep the smallest set of tokens whose probability mass reaches top_p (the top token always stays)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(dim=-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# -----------------------------------------------------------------------------
# Chat formatting


DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def encode_chat(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """ChatML ids exactly as SmolLM2-Instruct's chat template renders and HF tokenizes them.

    The template writes `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message and puts the default
    system prompt first when the conversation has none. The special tokens are inserted as ids and the text
    between them encoded as plain text, so a user who types "<|im_end|>" cannot close a turn.
    """
    start, end = tokenizer.special_tokens["<|im_start|>"], tokenizer.special_tokens["<|im_end|>"]
    if not messages or messages[0]["role"] != "system":
        messages = [{"role": "system", "content": DEFAULT_SYSTEM}] + list(messages)
    ids = []
    for m in messages:
        ids += [start] + tokenizer.encode(f"{m['role']}\n{m['content']}") + [end] + tokenizer.encode("\n")
    if add_generation_prompt:
        ids += [start] + tokenizer.encode("assistant\n")
    return ids


# -----------------------------------------------------------------------------
# Command line


def stream_printer(tokenizer: Tokenizer):
    """A stream callback printing text as soon as it is complete UTF-8 (a character may span tokens)."""
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def emit(_row, token):
        print(utf8.decode(tokenizer.decode_bytes([token])), end="", flush=True)

    return emit


def main(prompt: str | None = None, ckpt_dir: str = "checkpoints/SmolLM2-135M-Instruct", max_new_tokens: int = 256,
         temperature: float = 0.2, top_p: float = 0.9, top_k: int | None = None, device: str | None = None,
         dtype: str | None = None, seed: int = 1337, chat: bool | None = None, interactive: bool = False):
    """Generate from SmolLM2. Instruct checkpoints wrap the prompt in the chat template unless --chat false.

    prompt: the text to continue (with --interactive, the first turn)
    ckpt_dir: a HF checkpoint folder (python download.py writes one)
    max_new_tokens: most tokens to generate per reply
    temperature: 0 is greedy; higher is more random
    top_p: sample from the smallest set of tokens whose probability reaches top_p
    top_k: sample from the k most likely tokens only
    device: cpu, cuda, cuda:1...; default cuda when available, else cpu
    dtype: float32, bfloat16 or float16; default bfloat16 on cuda, float32 on cpu
    seed: seeds sampling, so a run repeats exactly
    chat: wrap the prompt in the chat template; default: when the checkpoint has one
    interactive: chat turn by turn until Ctrl-D
    """
    try:
        check_sampling(temperature, top_k, top_p)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if prompt is None and not interactive:
            raise ValueError('give --prompt "..." or --interactive')
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda was requested but no CUDA device is available; use --device cpu")
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
        if dtype not in dtypes:
            raise ValueError(f"--dtype must be one of {', '.join(dtypes)}, got {dtype}")
        t0 = time.time()
        model = SmolLM2.from_pretrained(ckpt_dir, device=device, dtype=dtypes[dtype])
        tokenizer = Tokenizer.from_file(ckpt_dir)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        raise SystemExit(f"error: {e}")
    if chat is None:  # instruct checkpoints ship a chat template; base ones do not
        cfg = Path(ckpt_dir) / "tokenizer_config.json"
        chat = cfg.is_file() and "chat_template" in json.loads(cfg.read_text())
    print(f"loaded {ckpt_dir} ({dtype}, {device}) in {time.time() - t0:.1f}s", file=sys.stderr)
    stop = [model.args.eos_id]
    if chat:
        stop.append(tokenizer.special_tokens["<|im_end|>"])

    def respond(ids):
        t0 = time.time()
        try:
            new = model.generate([ids], max_new_tokens, temperature, top_k, top_p, stop_tokens=stop, seed=seed,
                                 stream=stream_printer(tokenizer))[0]
        except ValueError as e:
            raise SystemExit(f"\nerror: {e}")
        dt = time.time() - t0
        print(f"\n[{len(ids)} prompt + {len(new)} new tokens, {len(new) / dt:.1f} tok/s]", file=sys.stderr)
        return new

    if not interactive:
        respond(encode_chat(tokenizer, [{"role": "user", "content": prompt}]) if chat else tokenizer.encode(prompt))
        return
    if not chat:
        raise SystemExit("error: --interactive needs an instruct (chat) checkpoint")
    messages = []
    while True:
        try:
            user = input("\n> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        messages.append({"role": "user", "content": user})
        answer = respond(encode_chat(tokenizer, messages))
        messages.append({"role": "assistant", "content": tokenizer.decode(answer)})


class FlagParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise SystemExit(f"error: {message} (see --help)")


def cli(fn, argv=None):
    """Call fn with flags parsed from the command line: one --name per parameter of fn, typed by its annotation,
    its help the `name: text` line of fn's docstring; a *args parameter takes the positional words.

    Values arrive exactly as typed: no eval, so --prompt "yes, please" or --prompt 0x10 is that string (python-fire,
    used before, turned them into a tuple and 16). A typo gets "did you mean".
    """
    doc = inspect.getdoc(fn) or ""
    helps = dict(re.findall(r"^ *(\w+): (.+)$", doc, re.M))
    hints = typing.get_type_hints(fn.__init__ if isinstance(fn, type) else fn)
    parser = FlagParser(description=doc.split("\n\n")[0], allow_abbrev=False)
    for name, p in inspect.signature(fn).parameters.items():
        kind = [t for t in typing.get_args(hints.get(name)) if t is not type(None)] or [hints.get(name, str)]
        kind = typing.get_origin(kind[0]) or kind[0]  # int | None -> int; list[str] -> list
        if p.kind is p.VAR_POSITIONAL:
            parser.add_argument(name, nargs="*", type=utf8, help=helps.get(name, ""))
            continue
        extra = dict(type=utf8, nargs="+", metavar="STR") if kind is list else \
            dict(type=parse_bool, nargs="?", const=True, metavar="BOOL") if kind is bool else \
            dict(type=utf8 if kind is str else kind, metavar=kind.__name__.upper())
        text = f"{helps.get(name, '')} (default: {p.default!r})".replace("%", "%%")  # argparse formats help with %
        parser.add_argument(f"--{name}", default=p.default, help=text, **extra)
    flags, unknown = parser.parse_known_args(argv)
    if unknown:
        known = [f"--{name}" for name in vars(flags)]
        close = difflib.get_close_matches(unknown[0].split("=")[0], known, n=1)
        what = "unknown flag" if unknown[0].startswith("-") else "unexpected argument"
        parser.error(f"{what} {unknown[0]}" + (f"; did you mean {close[0]}?" if close else ""))
    positional = [vars(flags).pop(n) for n, p in inspect.signature(fn).parameters.items()
                  if p.kind is p.VAR_POSITIONAL]
    return fn(*sum(positional, []), **vars(flags))


def parse_bool(s: str) -> bool:
    if s.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
    return s.lower() in ("true", "1", "yes")


def utf8(s: str) -> str:
    s.encode("utf-8")  # argv bytes that are not UTF-8 arrive as lone surrogates (PEP 383): refused here, one line
    return s


if __name__ == "__main__":
    cli(main)
