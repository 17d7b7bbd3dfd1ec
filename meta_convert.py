"""
Meta's original Llama 3 checkpoint -> Hugging Face checkpoint folder: the conversion behind `download.py --meta`
(the Hub's original/ files) and `download.py --meta_dir PATH` (a folder downloaded from llama.com).

What: reads params.json and the model-parallel shards consolidated.NN.pth, merges the shards, renames the tensors
to HF `LlamaForCausalLM` names, reorders the q/k rows from Meta's interleaved RoPE pairs to HF's rotate-half, and
writes config.json, generation_config.json and model.safetensors (sharded past 5 GB, with an index) beside a copy
of tokenizer.model: a folder that llama31.py and transformers load. Done once, so llama31.py reads one format.

References: HF transformers `convert_llama_weights_to_hf.py` (names, q/k permutation); llama-models
`reference_impl/model.py` (the SwiGLU sizing rule, which dimension each fairscale layer splits across shards).

Departures, on purpose:
- the llama3 RoPE scale factor is 32 for Llama 3.2 1B/3B, as their HF config.json says; Meta's code hard-codes 8,
  which llama-models#241 reports breaks those models past ~80k tokens;
- params.json does not say whether a model is instruct-tuned; Meta's folder names do ("...-Instruct"), and an
  instruct model also stops at <|eom_id|> and <|eot_id|>;
- every .pth is read with weights_only=True: a crafted pickle is refused, never run; params.json is checked (type,
  range, finite) and every tensor of every shard against it before anything is merged or written.

Usage:
    python download.py llama3.1-8b-instruct --meta                  # -> checkpoints/Llama-3.1-8B-Instruct-meta/
    python download.py --meta_dir ~/.llama/checkpoints/Llama3.2-1B-Instruct   # -> checkpoints/Llama3.2-1B-Instruct/
    from meta_convert import meta_to_hf; meta_to_hf("Llama3.2-1B", "out/Llama3.2-1B")   # returns the tensor count
"""

import json
import math
import pickle
import re
import shutil
from pathlib import Path

SHARD_BYTES = 5 * 2**30  # HF save_pretrained's default max_shard_size

# Meta name -> (HF name, dim along which model-parallel shards split it; None: replicated in every shard).
# Column-parallel layers (wq wk wv w1 w3 output, and Llama 3's vocab-parallel embedding) split their output
# rows, row-parallel ones (wo w2) their input columns (fairscale layers of Meta's reference_impl).
META_NAMES = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", 0),
    "norm.weight": ("model.norm.weight", None),
    "output.weight": ("lm_head.weight", 0),
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}

GLOBAL_NAMES = {"tok_embeddings.weight", "norm.weight", "output.weight"}  # the others are per layer: layers.N.<name>


def meta_to_hf_rope_rows(w, head_dim: int):
    """Reorder the rows of a Meta wq or wk (whole heads) from interleaved RoPE pairs to HF's rotate-half.

    Meta rotates dimensions (2i, 2i+1) of each head together (a complex number per pair); HF and llama31.py
    rotate (i, i + hd/2). Moving row 2i+j of every head to row j*hd/2 + i makes the projection emit its
    dimensions in HF's order. q and k are reordered alike, so q.k and the attention are unchanged, and v/o
    are untouched. This is the permutation of HF's convert_llama_weights_to_hf.py; tests invert it.
    """
    rows, cols = w.shape
    return w.view(rows // head_dim, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's SwiGLU width rule (llama-models FeedForward)."""
    # 2/3 of 4*dim keeps SwiGLU's three matrices at the cost of a plain MLP's two; the multiplier then tunes
    # the size, and rounding up to `multiple_of` keeps the matrices kernel- and shard-friendly.
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def read_params(path: Path) -> dict:
    """params.json, with every number the conversion uses checked (type, range, finite) before anything is built
    from it; each fault is one ValueError naming the file."""
    try:
        params = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path} is not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(params, dict):
        raise ValueError(f"{path} is not a Llama 3 params.json (a JSON object is expected, not {params!r:.40})")

    def check(key, ok, expected):
        if not ok(params.get(key)):
            raise ValueError(f"{path}: {key} is {params.get(key)!r:.40}, expected {expected}")

    def count(hi):  # type(): a bool or a float such as 1e9 is not a count
        return lambda v: type(v) is int and 1 <= v <= hi

    def number(hi):  # also refuses nan and inf
        return lambda v: type(v) in (int, float) and 0 < v < hi

    for key, hi in [("dim", 2**20), ("n_layers", 2**12), ("n_heads", 2**12), ("vocab_size", 2**22),
                    ("multiple_of", 2**20)]:
        check(key, count(hi), f"an integer from 1 to {hi}")
    check("n_kv_heads", lambda v: v is None or count(params["n_heads"])(v), "an integer from 1 to n_heads")
    check("norm_eps", number(1.0), "a number between 0 and 1")
    check("rope_theta", number(math.inf), "a finite number above 0")
    check("ffn_dim_multiplier", lambda v: v is None or number(64.0)(v), "a number between 0 and 64")
    check("use_scaled_rope", lambda v: v is None or type(v) is bool, "true or false")
    n_heads, n_kv = params["n_heads"], params.get("n_kv_heads") or params["n_heads"]
    if params["dim"] % n_heads or (params["dim"] // n_heads) % 2 or n_heads % n_kv:
        raise ValueError(f"{path}: dim {params['dim']}, {n_heads} heads, {n_kv} KV heads is not a Llama attention "
                         "(dim must split into heads of even size, the heads evenly into KV groups)")
    return params


def shard_shapes(args, n: int) -> dict:
    """The shape of every tensor in each of n model-parallel shards, by Meta's short name, from params.json."""
    d, q, kv, h, v = args.dim, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.hidden_dim, \
        args.vocab_size
    full = {"tok_embeddings.weight": (v, d), "norm.weight": (d,), "output.weight": (v, d),
            "attention.wq.weight": (q, d), "attention.wk.weight": (kv, d), "attention.wv.weight": (kv, d),
            "attention.wo.weight": (d, q), "feed_forward.w1.weight": (h, d), "feed_forward.w3.weight": (h, d),
            "feed_forward.w2.weight": (d, h), "attention_norm.weight": (d,), "ffn_norm.weight": (d,)}
    shapes = {}
    for short, shape in full.items():
        split = META_NAMES[short][1]
        if split is not None and shape[split] % n:
            return {}  # params.json cannot describe these shards: every tensor then names the mismatch
        shapes[short] = tuple(s // n if i == split else s for i, s in enumerate(shape))
    return shapes


def model_args(params: dict, instruct: bool):
    """llama31.ModelArgs from Meta's params.json (dim, n_layers, ..., multiple_of, ffn_dim_multiplier, ...)."""
    from llama31 import END_OF_TEXT, EOM, EOT, ModelArgs
    # Llama 3.2 1B and 3B are the only Llama 3 models 2048 or 3072 wide, and the only ones with a tied head
    small = params["dim"] in (2048, 3072)
    return ModelArgs(dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
                     n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
                     hidden_dim=ffn_hidden_dim(params["dim"], params["multiple_of"], params.get("ffn_dim_multiplier")),
                     vocab_size=params["vocab_size"], norm_eps=params["norm_eps"], rope_theta=params["rope_theta"],
                     rope_factor=(32.0 if small else 8.0) if params.get("use_scaled_rope") else None,
                     tie_embeddings=small, stop_tokens=(END_OF_TEXT, EOM, EOT) if instruct else (END_OF_TEXT,))


def load_meta(files: list[Path], args, hint: str) -> dict:
    """Meta consolidated.NN.pth model-parallel shards -> one state dict with HF names and rotate-half q/k."""
    import torch
    state, n = {}, len(files)
    if n > args.n_kv_heads:  # then Meta's layers replicate each KV head over several shards (405B MP16)
        raise ValueError(f"{n} shards for {args.n_kv_heads} KV heads: not supported; use the HF checkpoint instead")
    shapes = shard_shapes(args, n)  # every tensor is checked against params.json before it is merged
    for i, f in enumerate(files):
        try:  # weights_only: tensors and plain containers only, so a crafted pickle cannot run code
            shard = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
        except pickle.UnpicklingError:
            raise ValueError(f"{f} holds objects other than tensors: refused, since unpickling it could run code; "
                             f"use a checkpoint from Meta or download.py") from None
        except (RuntimeError, EOFError, ValueError) as e:
            raise ValueError(f"{f} is truncated or corrupt ({(str(e).splitlines() or [type(e).__name__])[0]}); "
                             f"{hint}") from None
        if not isinstance(shard, dict) or not all(isinstance(k, str) and isinstance(w, torch.Tensor)
                                                  for k, w in shard.items()):
            raise ValueError(f"{f} is not a Meta checkpoint shard (a dict of named tensors); {hint}")
        embedding = shard.get("tok_embeddings.weight")
        rows = embedding.size(0) if embedding is not None and embedding.dim() == 2 else 0  # vocab_size / n rows
        if i == 0 and 0 < rows and rows * n < args.vocab_size and args.vocab_size % rows == 0:
            raise ValueError(f"{f.parent} has {n} of {args.vocab_size // rows} shards: "
                             f"consolidated.{n:02d}.pth is missing; {hint}")
        for key, w in shard.items():
            layer, short = re.fullmatch(r"(?:layers\.(\d+)\.)?(.+)", key).groups()  # "layers.3.ffn_norm.weight"
            if short not in META_NAMES or (layer is None) != (short in GLOBAL_NAMES) or \
                    (layer is not None and int(layer) >= args.n_layers):
                raise ValueError(f"{f}: unexpected tensor {key} for a model of {args.n_layers} layers (params.json)")
            if tuple(w.shape) != shapes.get(short) or not w.is_floating_point():
                raise ValueError(f"{f}: {key} is {w.dtype} {tuple(w.shape)}, but params.json and {n} shard(s) make "
                                 f"it floating-point {shapes.get(short, '(none: no shard split fits)')}; {hint}")
            name, split = META_NAMES[short]
            name = name if layer is None else f"model.layers.{layer}.{name}"
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                w = meta_to_hf_rope_rows(w, args.head_dim)  # each shard holds whole heads
            if split is None or n == 1:
                if i == 0:  # replicated tensors are equal in every shard; copy so no shard mapping stays alive
                    state[name] = w.clone() if n > 1 else w
                continue
            if name not in state:  # merged tensor: allocated once, filled shard by shard
                shape = list(w.shape)
                shape[split] *= n
                state[name] = torch.empty(shape, dtype=w.dtype)
            state[name].narrow(split, i * w.size(split), w.size(split)).copy_(w)
        # Drop this shard (unmapping its file) before reading the next: with n shards the CPU holds the merged
        # weights plus one shard, (1 + 1/n) x the weights at most; a single shard is used in place.
        del shard
    layer_names = [hf for short, (hf, _) in META_NAMES.items() if short not in GLOBAL_NAMES]
    needed = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if args.tie_embeddings else ["lm_head.weight"]) \
        + [f"model.layers.{i}.{name}" for i in range(args.n_layers) for name in layer_names]
    if missing := [name for name in needed if name not in state]:
        raise ValueError(f"{files[0].parent}: tensors missing ({len(missing)}), the first {missing[0]}; {hint}")
    return state


def save_sharded(state: dict, out: Path):
    """model.safetensors, or files of at most SHARD_BYTES each plus model.safetensors.index.json (HF's layout)."""
    from gguf_convert import write_json
    from safetensors.torch import save_file
    groups, size = [[]], 0
    for name, t in state.items():
        if groups[-1] and size + t.nbytes > SHARD_BYTES:
            groups, size = groups + [[]], 0
        groups[-1].append(name)
        size += t.nbytes
    files = ["model.safetensors"] if len(groups) == 1 else \
        [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for file, names in zip(files, groups):
        print(f"writing {out / file}")
        # popped as written: the tensors of a written file are freed before the next one is serialised
        save_file({k: state.pop(k).contiguous() for k in names}, out / file, metadata={"format": "pt"})
    if len(files) > 1:
        write_json(out / "model.safetensors.index.json",
                   {"weight_map": {k: file for file, names in zip(files, groups) for k in names}})


def meta_to_hf(meta_dir, out_dir, instruct: bool | None = None) -> int:
    """Convert the Meta checkpoint in meta_dir into the HF layout in out_dir; returns the tensor count written.
    instruct None: an instruct model when the folder's name says so. Every user error is one ValueError line."""
    src, out = Path(meta_dir), Path(out_dir)
    hint = "download it again (python download.py --meta, or from llama.com)"
    if not (src / "params.json").is_file():
        raise ValueError(f"{src} has no params.json: not a checkpoint of Meta's original format")
    shards = {}
    for p in src.glob("consolidated.*.pth"):
        number = re.fullmatch(r"consolidated\.(\d{1,4})\.pth", p.name)
        if number is None:
            raise ValueError(f"{p}: not a shard name of Meta's (consolidated.00.pth, consolidated.01.pth, ...): "
                             "rename or remove it")
        if int(number[1]) in shards:
            raise ValueError(f"{src}: {shards[int(number[1])].name} and {p.name} are both shard {int(number[1])}")
        shards[int(number[1])] = p
    # the shard count is the number of files, never a number read from a name
    gap = next((i for i in range(len(shards) + 1) if i not in shards), len(shards))
    files = [shards[i] for i in range(gap)]
    missing = [f"consolidated.{gap:02d}.pth"] if gap < len(shards) or not shards else []
    tokenizer = src / "tokenizer.model"
    if not tokenizer.is_file():
        missing.append(tokenizer.name)
    if missing:
        raise ValueError(f"{src} is incomplete: {missing[0]} is missing; {hint}")
    if tokenizer.is_symlink() and not tokenizer.resolve().is_relative_to(src.resolve()):
        raise ValueError(f"{tokenizer} is a link to {tokenizer.resolve()}, outside {src}: refused, since it would be "
                         "copied into the checkpoint; put the file itself there")
    params = read_params(src / "params.json")
    args = model_args(params, "instruct" in src.name.lower() if instruct is None else instruct)
    from gguf_convert import write_json
    state = load_meta(files, args, hint)
    if args.tie_embeddings:
        state.pop("lm_head.weight", None)  # HF's tied checkpoints store the embedding only
    out.mkdir(parents=True, exist_ok=True)
    count = len(state)
    save_sharded(state, out)
    cfg = args.to_hf_config()
    write_json(out / "config.json", cfg)
    write_json(out / "generation_config.json", {k: cfg[k] for k in ("bos_token_id", "eos_token_id")})
    shutil.copy(src / "tokenizer.model", out / "tokenizer.model")
    return count
