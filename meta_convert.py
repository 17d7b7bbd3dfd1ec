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
- every .pth is read with weights_only=True: a crafted pickle is refused, never run.

Usage:
    python download.py llama3.1-8b-instruct --meta                  # -> checkpoints/Llama-3.1-8B-Instruct-meta/
    python download.py --meta_dir ~/.llama/checkpoints/Llama3.2-1B-Instruct   # -> checkpoints/Llama3.2-1B-Instruct/
    from meta_convert import meta_to_hf; meta_to_hf("Llama3.2-1B", "out/Llama3.2-1B")   # returns the tensor count
"""

import json
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
    for i, f in enumerate(files):
        try:  # weights_only: tensors and plain containers only, so a crafted pickle cannot run code
            shard = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
        except pickle.UnpicklingError:
            raise ValueError(f"{f} holds objects other than tensors: refused, since unpickling it could run code; "
                             f"use a checkpoint from Meta or download.py") from None
        except RuntimeError as e:
            raise ValueError(f"{f} is truncated or corrupt ({str(e).splitlines()[0]}); {hint}") from None
        rows = shard["tok_embeddings.weight"].size(0)  # each shard holds vocab_size / n embedding rows
        if i == 0 and rows * n < args.vocab_size and args.vocab_size % rows == 0:
            raise ValueError(f"{f.parent} has {n} of {args.vocab_size // rows} shards: "
                             f"consolidated.{n:02d}.pth is missing; {hint}")
        for key, w in shard.items():
            layer, short = re.fullmatch(r"(?:layers\.(\d+)\.)?(.+)", key).groups()  # "layers.3.ffn_norm.weight"
            if short not in META_NAMES:
                raise ValueError(f"{f}: unexpected tensor {key}")
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
        del shard, w
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
    found = {int(p.name.split(".")[1]) for p in src.glob("consolidated.*.pth")}
    files = [src / f"consolidated.{i:02d}.pth" for i in range(max(found, default=0) + 1)]
    missing = [f.name for f in files + [src / "tokenizer.model"] if not f.is_file()]
    if missing:
        raise ValueError(f"{src} is incomplete: {missing[0]} is missing; {hint}")
    try:
        params = json.loads((src / "params.json").read_text(encoding="utf-8"))
        args = model_args(params, "instruct" in src.name.lower() if instruct is None else instruct)
    except (ValueError, KeyError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{src / 'params.json'} is not a Llama 3 params.json ({type(e).__name__}: {e})") from None
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
