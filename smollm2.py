"""
SmolLM2 (135M / 360M / 1.7B) in one readable file: inference, KV-cached batched generation and chat.

SmolLM2 (Hugging Face, 2025, arXiv 2502.02737) is a Llama-architecture decoder: RMSNorm, rotary position
embeddings in the rotate-half convention, grouped-query attention, a SwiGLU MLP and an output head tied to
the token embedding. This file follows HF transformers' `LlamaForCausalLM` (modeling_llama.py) operation for
operation, and test_parity.py checks it module by module. Module names are HF's, so a Hub `model.safetensors`
loads with no renaming and `model.state_dict()` saves in the same layout.

Departures from the reference, all deliberate:
- one preallocated KV cache per layer written by position (as gpt-fast), sized to the request, instead of
  HF's growing `DynamicCache`; attention reads all of it through a mask, so every decode step has the same shapes
  and a compiled step (`fast_decode.compile_decode`) serves them all;
- ragged batches are left-padded and each row's RoPE positions start at its first real token, so a batched
  prompt yields exactly the tokens it yields alone;
- during prefill only the last position goes through the 49152-wide output head;
- a checkpoint is user input: config.json is checked value by value, and against the weights' safetensors
  headers, before anything is built; nothing is sized by the config alone (RoPE angles are computed for the
  positions in use, the KV cache for the request).

The other model files repeat parts of this one, each copy marked `# Same as smollm2.py: NAME` and kept identical by
tests/test_copies.py. The command line is cli.py's; as a library this file needs only tokenizer_bpe.py.

Usage:
    python download.py                                  # SmolLM2-135M-Instruct into checkpoints/
    python smollm2.py --prompt "What is gravity?"
    python smollm2.py --interactive
    python smollm2.py --ckpt_dir checkpoints/SmolLM2-135M --prompt "Once upon a time" --temperature 0.8
"""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer_bpe import Tokenizer, apply_chat_template

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
    max_seq_len: int = 8192  # context the model was trained for (HF max_position_embeddings): prompt + generation
    tie_embeddings: bool = True  # output head shares the token embedding matrix
    bos_token_id: int = 1  # <|im_start|>
    stop_tokens: tuple[int, ...] = (2,)  # generation ends at these: <|im_end|> (instruct), <|endoftext|> 0 (base)

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
        """From a HF `config.json` of a Llama-architecture model with plain (unscaled) RoPE (see llama_fields)."""
        fields, rope = llama_fields(cfg)
        head_dim = fields["dim"] // fields["n_heads"]
        if rope.get("rope_type", rope.get("type", "default")) != "default" or cfg.get("attention_bias") \
                or cfg.get("mlp_bias") or cfg.get("head_dim", head_dim) != head_dim:
            raise NotImplementedError("RoPE scaling, biases and head_dim != hidden_size / num_attention_heads are "
                                      "not part of SmolLM2 (llama31.py reads Llama 3's scaled RoPE)")
        return cls(**fields, bos_token_id=config_get(cfg, "bos_token_id", int, 1, low=0))

    def to_hf_config(self) -> dict:
        """A config.json that both this file and transformers' LlamaForCausalLM load."""
        return {**llama_config(self), "bos_token_id": self.bos_token_id, "torch_dtype": "float32"}


# Published sizes (HuggingFaceTB/SmolLM2-*). Public copies disagree on RoPE theta and context of the larger
# two: from_pretrained takes them from the checkpoint's config.json instead.
PRESETS = {
    "SmolLM2-135M": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536, rope_theta=100000.0),
    "SmolLM2-360M": dict(dim=960, n_layers=32, n_heads=15, n_kv_heads=5, hidden_dim=2560, rope_theta=100000.0),
    "SmolLM2-1.7B": dict(dim=2048, n_layers=24, n_heads=32, n_kv_heads=32, hidden_dim=8192, rope_theta=130000.0),
}


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
    """Angular frequency of each rotated pair of dimensions: (head_dim / 2,) fp32, as HF LlamaRotaryEmbedding."""
    hd = args.head_dim
    return 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.int64).float() / hd))


def rope_cos_sin(inv_freq, pos, dtype):
    """pos (B, T) -> cos, sin (B, 1, T, head_dim), fp32 angles then cast, as HF, for the positions in use only."""
    freqs = pos[..., None].float() * inv_freq  # (B, T, hd/2)
    # rotate-half layout: frequency i drives dimensions i and i + hd/2 (HF's convention, not the interleaved
    # pairs 2i, 2i+1 of the RoPE paper and Meta's code); HF checkpoints' q/k rows are laid out for this
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd): broadcast over heads
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x (B, n_heads, T, hd), cos and sin (B, 1, T, hd): rotate each pair (x_i, x_{i+hd/2}) by its angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin  # HF's rotate_half: (x1, x2) -> (-x2, x1)


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
        # A plain fp32 tensor, not a buffer: model.to(torch.bfloat16) must not round the frequencies. Made again on
        # the weights' device after a meta-device build (from_pretrained); trunk follows the model if it moves.
        self.inv_freq = rope_inv_freq(self.args, device)

    def trunk(self, tokens, pos, mask, input_pos=None):
        """tokens (B, T), pos (B, T) RoPE positions -> final-normed hidden states (B, T, dim)."""
        x = self.model.embed_tokens(tokens)
        cos, sin = rope_cos_sin(self.inv_freq.to(x.device), pos, x.dtype)  # once, shared by every layer
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, input_pos)
        return self.model.norm(x)

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

    def setup_cache(self, batch_size: int, max_seq_len: int):
        # for generation only, sized to the request, never to the context (Llama 3.1 8B's 131072 tokens: 16 GiB a row)
        if max_seq_len > self.args.max_seq_len:
            raise ValueError(f"{max_seq_len} tokens do not fit the context of {self.args.max_seq_len}")
        w = self.model.norm.weight  # the model's dtype and device, whatever form its linear layers take
        for layer in self.model.layers:
            layer.self_attn.cache = KVCache(batch_size, max_seq_len, self.args.n_kv_heads, self.args.head_dim,
                                            w.dtype, w.device)

    def clear_cache(self):
        for layer in self.model.layers:
            layer.self_attn.cache = None

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

    @classmethod
    def from_pretrained(cls, ckpt_dir, device=None, dtype=None) -> "SmolLM2":
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
# Loading: a checkpoint's files are user input, each checked before it is used; what does not fit is one line naming
# the file. Every model file holds this block (a library user copies one model file and tokenizer_bpe.py); FETCH is
# each file's own.

FETCH = "run `python download.py` (SmolLM2-135M-Instruct; `python download.py NAME` for another size)"


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


def sample(logits, temperature=0.0, top_k=None, top_p=1.0, generator=None):
    """logits (B, vocab) -> next ids (B,): greedy at temperature 0, else a draw with `generator` (seeded: repeats)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(logits_to_probs(logits, temperature, top_k, top_p), 1, generator=generator).squeeze(-1)

# -----------------------------------------------------------------------------
# Chat formatting and the command line (cli.py's flags and chat loop)


def encode_chat(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                default_system: str = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"):
    """The conversation's ids as the checkpoint's HF chat template gives them (ChatML or Llama 3, by the tokenizer's
    special tokens), with SmolLM2-Instruct's default system prompt first where a ChatML conversation has none."""
    return apply_chat_template(tokenizer, messages, add_generation_prompt, default_system=default_system)


CKPT_DIR = "checkpoints/SmolLM2-135M-Instruct"  # python download.py writes it


def main(prompt: str | None = None, ckpt_dir: str = CKPT_DIR, max_new_tokens: int = 256, temperature: float = 0.2,
         top_p: float = 0.9, top_k: int | None = None, device: str | None = None, dtype: str | None = None,
         seed: int = 1337, chat: bool | None = None, interactive: bool = False, int8: bool = False,
         int4: bool = False, compile: bool = False):
    """Generate from SmolLM2. Instruct checkpoints wrap the prompt in the chat template unless --chat false.

    ckpt_dir: a HF checkpoint folder (python download.py writes one)
    """
    from cli import chat_main  # the flags checked before the slow load, the load, then one reply or a conversation

    chat_main(SmolLM2, encode_chat, prompt, ckpt_dir, max_new_tokens, temperature, top_p, top_k, device, dtype, seed,
              chat, interactive, int8, int4, compile)


if __name__ == "__main__":
    try:
        from cli import cli
    except ModuleNotFoundError:
        raise SystemExit("error: smollm2.py's command line needs cli.py beside it (the model: tokenizer_bpe.py only)")
    cli(main)
