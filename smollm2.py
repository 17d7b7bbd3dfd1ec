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

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer_bpe import (Tokenizer, apply_chat_template, check_generate, check_generation_flags,
                           check_state, cli, converse, is_chat_checkpoint, load_safetensors, read_json)

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
        dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
        if rope.get("rope_type", rope.get("type", "default")) != "default" or cfg.get("attention_bias") \
                or cfg.get("mlp_bias") or cfg.get("head_dim", dim // n_heads) != dim // n_heads:
            raise NotImplementedError("RoPE scaling, biases and head_dim != hidden_size / num_attention_heads are "
                                      "not part of SmolLM2 (llama31.py reads Llama 3's scaled RoPE)")
        eos = cfg.get("eos_token_id", 2)
        return cls(dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
                   n_kv_heads=cfg.get("num_key_value_heads") or n_heads, hidden_dim=cfg["intermediate_size"],
                   vocab_size=cfg["vocab_size"], rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 1e4))),
                   norm_eps=cfg.get("rms_norm_eps", 1e-5), max_seq_len=cfg.get("max_position_embeddings", 8192),
                   tie_embeddings=cfg.get("tie_word_embeddings", True), bos_id=cfg.get("bos_token_id", 1),
                   eos_id=eos[0] if isinstance(eos, list) else eos)

    def to_hf_config(self) -> dict:
        """A config.json that both this file and transformers' LlamaForCausalLM load."""
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.dim,
                "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
                "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
                "intermediate_size": self.hidden_dim, "vocab_size": self.vocab_size, "rope_theta": self.rope_theta,
                "rms_norm_eps": self.norm_eps, "max_position_embeddings": self.max_seq_len,
                "tie_word_embeddings": self.tie_embeddings, "bos_token_id": self.bos_id, "eos_token_id": self.eos_id,
                "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32"}


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
        # Then scale in the weight's dtype, after casting back, as HF LlamaRMSNorm (F.rms_norm is x * rsqrt(...)).
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


def apply_rope(x, cos, sin):
    """x (B, n_heads, T, hd), cos and sin (B, 1, T, hd): rotate each pair (x_i, x_{i+hd/2}) by its angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin  # HF's rotate_half: (x1, x2) -> (-x2, x1)


class KVCache(nn.Module):
    """Preallocated keys and values of one layer, written in place by position (gpt-fast)."""

    def __init__(self, batch_size, max_seq_len, n_kv_heads, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):
        """Write k, v (B, n_kv_heads, T, hd) into slots input_pos (T,); return slots 0..input_pos[-1], the
        filled part (views, no copy): attention then costs what the sequence so far costs."""
        self.k[:, :, input_pos] = k
        self.v[:, :, input_pos] = v
        end = int(input_pos[-1]) + 1
        return self.k[:, :, :end], self.v[:, :, :end]


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

    def forward(self, x, cos, sin, mask, input_pos=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


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


class SmolLM2(nn.Module):
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
        # Non-persistent: recomputed, never loaded. Called again after a meta-device build (see from_pretrained).
        cos, sin = rope_tables(self.args, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def trunk(self, tokens, pos, mask, input_pos=None):
        """tokens (B, T), pos (B, T) RoPE positions -> final-normed hidden states (B, T, dim)."""
        x = self.model.embed_tokens(tokens)
        cos = self.rope_cos[pos].to(x.dtype).unsqueeze(1)  # (B, 1, T, hd): broadcast over heads
        sin = self.rope_sin[pos].to(x.dtype).unsqueeze(1)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, input_pos)
        return self.model.norm(x)

    def forward(self, tokens, doc_ids=None):
        """tokens (B, T) -> logits (B, T, vocab). No cache: the training and parity-test path. doc_ids (B, T)
        marks packed documents, which never see each other (doc_positions_and_mask)."""
        B, T = tokens.shape
        if T > self.args.max_seq_len:
            raise ValueError(f"{T} tokens do not fit the context of {self.args.max_seq_len}")
        if doc_ids is None:
            pos, mask = torch.arange(T, device=tokens.device).expand(B, T), None  # None: SDPA's causal kernel
        else:
            pos, mask = doc_positions_and_mask(doc_ids)
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

    def forward_cached(self, tokens, input_pos, pad=None):
        """Run tokens (B, T) in cache slots input_pos (T,); return the last position's logits (B, vocab). pad (B,),
        None for none: left padding of each row. A row's RoPE position is its slot minus its padding, and no query
        attends to a padding slot or a later slot."""
        B, T = tokens.shape
        pad = torch.zeros(B, dtype=torch.long, device=tokens.device) if pad is None else pad
        pos = (input_pos[None, :] - pad[:, None]).clamp(min=0)  # (B, T)
        if T == 1 and not pad.any():
            mask = None  # one new token may read every filled slot: no mask at all (fastest SDPA path)
        else:
            slots = torch.arange(int(input_pos[-1]) + 1, device=tokens.device)  # (S,) the filled part
            # subtle: a padding query sees no key of its row; let it see itself, since a softmax over nothing is
            # NaN on some kernels, and a NaN written into the cache would poison the sums of the real rows too
            mask = (slots <= input_pos[:, None]) & ((slots >= pad[:, None, None]) | (slots == input_pos[:, None]))
            mask = mask.unsqueeze(1)  # (B, 1, T, S)
        h = self.trunk(tokens, pos, mask, input_pos)
        return self.lm_head(h[:, -1])  # only the last position is needed to pick the next token

    # -------------------------------------------------------------------------
    # Loading

    @classmethod
    def from_pretrained(cls, ckpt_dir, device=None, dtype=None) -> "SmolLM2":
        """A HF checkpoint folder (config.json + model.safetensors, or shards with an index) on device (None:
        cpu), in dtype (None: float32)."""
        ckpt_dir = Path(ckpt_dir)
        if not (ckpt_dir / "config.json").is_file():
            raise FileNotFoundError(f"no checkpoint at {ckpt_dir}: run `python download.py` "
                                    f"(or `python download.py NAME --out DIR` for another size)")
        args = read_json(ckpt_dir / "config.json", ModelArgs.from_hf_config)
        # Build on the meta device (shapes only, no memory), then assign each loaded tensor into place:
        # the weights exist once in memory, already in their final dtype and device.
        with torch.device("meta"):
            model = cls(args)
        state = load_safetensors(ckpt_dir, device or "cpu", dtype or torch.float32)
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
        temperature 0 is greedy; stop_tokens None stops at the model's end-of-turn token, [] never early;
        stream(row, token) is called for every returned token as soon as it is sampled."""
        longest = check_generate(prompts, max_new_tokens, self.args.max_seq_len, temperature, top_k, top_p)
        stop = {self.args.eos_id} if stop_tokens is None else set(stop_tokens)
        B = len(prompts)
        device = self.lm_head.weight.device
        # Left-pad so every row's last prompt token sits in the same slot: one decode step serves all rows.
        pad = torch.tensor([longest - len(p) for p in prompts], device=device)
        tokens = torch.tensor([[0] * (longest - len(p)) + list(p) for p in prompts], device=device)
        generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        self.setup_cache(B, longest + max_new_tokens)
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
            self.clear_cache()
        return out


# -----------------------------------------------------------------------------
# Sampling


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


def sample(logits, temperature=0.0, top_k=None, top_p=1.0, generator=None):
    """logits (B, vocab) -> next token ids (B,): greedy at temperature 0, else one draw from the filtered
    distribution with `generator` (a seeded torch.Generator makes runs repeat)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(logits_to_probs(logits, temperature, top_k, top_p), 1, generator=generator).squeeze(-1)


# -----------------------------------------------------------------------------
# Chat formatting


DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def encode_chat(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """The conversation's ids as the checkpoint's HF chat template gives them (tokenizer_bpe.apply_chat_template picks
    ChatML or Llama 3 by the tokenizer's special tokens), with SmolLM2-Instruct's default system prompt first when a
    ChatML conversation has none."""
    return apply_chat_template(tokenizer, messages, add_generation_prompt, default_system=DEFAULT_SYSTEM)


# -----------------------------------------------------------------------------
# Command line

try:  # the speed module beside this file (fast_decode.py); a copy of this file alone runs plain, same tokens
    from fast_decode import fast
except ImportError:
    fast = None


def main(prompt: str | None = None, ckpt_dir: str = "checkpoints/SmolLM2-135M-Instruct", max_new_tokens: int = 256,
         temperature: float = 0.2, top_p: float = 0.9, top_k: int | None = None, device: str | None = None,
         dtype: str | None = None, seed: int = 1337, chat: bool | None = None, interactive: bool = False,
         int8: bool = False):
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
    int8: int8 weights on the CPU (fast_decode.py's weights="int8": a quarter of fp32's bytes per token, about
        +0.6-0.9% perplexity on SmolLM2)
    """
    try:  # everything a user can get wrong is checked before the (slow) load, and reported in one line
        dev, dt = check_generation_flags(prompt, max_new_tokens, temperature, top_k, top_p, seed, device, dtype,
                                         interactive, int8=int8, fast=fast)
        t0 = time.time()
        model = SmolLM2.from_pretrained(ckpt_dir, dev, dt or (torch.bfloat16 if dev.type == "cuda" else None))
        tokenizer = Tokenizer.from_file(ckpt_dir)
        chat = is_chat_checkpoint(ckpt_dir) if chat is None else chat
        if chat and "<|im_end|>" not in tokenizer.special_tokens:
            raise ValueError(f"{ckpt_dir}: its tokenizer has no ChatML tokens (<|im_end|>); use --chat false")
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        raise SystemExit(f"error: {e}")
    if fast:
        fast(model, threads=True, weights="int8" if int8 else None)  # threads: fast_decode.decode_threads
    print(f"loaded {ckpt_dir} ({model.lm_head.weight.dtype}, {dev}) in {time.time() - t0:.1f}s", file=sys.stderr)
    stop = [model.args.eos_id] + ([tokenizer.special_tokens["<|im_end|>"]] if chat else [])
    converse(model, tokenizer, encode_chat if chat else None, prompt, interactive, stop, max_new_tokens, temperature,
             top_k, top_p, seed)


if __name__ == "__main__":
    cli(main)
