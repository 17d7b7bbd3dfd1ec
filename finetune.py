"""
Fine-tune, or train from scratch, any model file of this collection (smollm2, llama31, nanollm, lm2) on text,
chat conversations or pre-tokenized shards; resume exactly after a crash; scale out with torchrun.

It reads like nanoGPT's train.py and nanochat's chat_sft.py: a config block, data, model, then one visible loop
with gradient accumulation, clipping, logging and checkpointing (`train`). LoRA follows the paper (Hu et al. 2021)
and torchtune's recipes (adapters on the attention and MLP projections, merged into the weights on save); restarts
follow the NanoLlama codebase (model, optimizer, scheduler, data position and RNG saved together, so a resumed
run repeats or skips no batch). Departures from nano-llama31's fine-tuning, whose README calls it broken:
- packed documents never see each other: `doc_ids` go to the model (attention stays inside a document and RoPE
  positions restart at its start) and a target that begins a new document is ignored;
- no KV cache is allocated while training (the model files allocate one only in `setup_cache`);
- the loss is a sum over the kept targets divided by their count in the whole global batch, so gradient
  accumulation and any number of processes give the same update as one big batch.

A model file is a module with `ModelArgs`, `encode_chat` and a model class: the one with `from_pretrained`, whose
blocks are `.model.layers` (HF's layout). What a family needs beyond a plain Llama, its model class says through
these optional methods (finetune.py looks nothing else up about a family):
    init_weights()                   from scratch: the family's init (default: HF Llama's normal(0, 0.02))
    lora_train_whole() -> str        --mode lora: parameters whose name contains it train in full, without adapters
                                     (lm2: ".memory.", new and random on a pretrained Llama)
    extra_loss() -> tensor or 0.0    after each training forward: a term added to its loss (nanollm: MoE balance)
    after_optimizer_step(all_sum, router_bias_rate) -> dict
                                     after each update; all_sum(t) sums t over processes in place; the dict goes
                                     to metrics.jsonl (nanollm: moves the router biases, logs the expert load)

Usage:
    python download.py                                          # checkpoints/SmolLM2-135M-Instruct
    # LoRA on chat data, JSONL lines {"messages": [{"role": "user", "content": ...}, ...]}; loss on replies only
    python finetune.py --model smollm2 --ckpt_dir checkpoints/SmolLM2-135M-Instruct --data chat.jsonl \\
        --mode lora --lora_rank 16 --seq_len 512 --max_steps 200 --out_dir out/smol-lora
    python smollm2.py --ckpt_dir out/smol-lora --prompt "..."    # the result loads like any checkpoint
    # text (a .txt file is one document, a JSONL line {"text": ...} one): full, RMSNorm only, all but embeddings
    python finetune.py --ckpt_dir checkpoints/SmolLM2-135M-Instruct --data book.txt --mode full --lr 3e-5
    python finetune.py ... --mode norm --lr 1e-3      |      python finetune.py ... --mode frozen_embed
    # from scratch: tokenize into llm.c-style shards, then train a preset (or a config.json) on them
    python finetune.py prepare --tokenizer checkpoints/SmolLM2-135M-Instruct --out_dir data/books a.txt b.txt
    python finetune.py --model nanollm --preset nano-small --tokenizer TOKENIZER --data data/books --mode full
    # resume after a crash or Ctrl-C: the same command plus --resume; several processes: DDP, or FSDP2 with --fsdp
    python finetune.py ... --resume      |      torchrun --nproc_per_node 2 finetune.py ... [--fsdp]

--out_dir receives model.safetensors + config.json + tokenizer files (loaded by the model file and by
transformers), ckpt.pt (the resume state), metrics.jsonl and loss.png (if matplotlib is installed): run_folder.py
says how a run holds, marks and writes its folder. Only finite weights with a finite validation loss are saved.
"""

import contextlib
import functools
import importlib
import json
import math
import os
import re
import resource
import sys
import time
import typing
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from run_folder import (TOKENIZER_FILES, MetricsLog, RunFolder, checkpoint_keys, export_hf, export_sources,
                        load_checkpoint, nonfinite_count, one_line, plot, save_atomic, save_checkpoint)
from cli import cli

# -----------------------------------------------------------------------------
# Config: every field is a command-line flag (--name value; --flag alone means --flag true)


@dataclass
class TrainConfig:
    """Fine-tune or train a model file on text, chat or token shards (the module docstring has examples).
    First tokenize large text into shards with the prepare sub-command:
    `finetune.py prepare FILES... --tokenizer T --out_dir D` (see `finetune.py prepare --help`).

    model: model file to import: smollm2 | llama31 | nanollm | lm2
    ckpt_dir: pretrained HF-layout checkpoint; empty = from scratch with --preset
    preset: from scratch: a ModelArgs preset name, or a config.json path
    tokenizer: tokenizer file or folder; empty = the one in --ckpt_dir
    data: .txt / .jsonl files (comma separated), or a folder of *train*.bin / *val*.bin shards
    out_dir: this run's folder: model.safetensors, config.json, tokenizer files, ckpt.pt, metrics.jsonl
    overwrite: let a new run replace an earlier finetune.py run in --out_dir (its files stay until this run saves)
    mode: full | lora | norm (RMSNorm weights only) | frozen_embed (all but embeddings)
    lora_rank: rank r of the adapters
    lora_alpha: adapter output is scaled by alpha / rank
    lora_dropout: dropout on the adapter input
    lora_targets: comma-separated names of the linear layers that get adapters
    seq_len: tokens per packed row
    batch_size: rows per micro-batch, per process
    grad_accum: micro-batches per optimizer step
    max_steps: optimizer steps; 0 = one pass over the training rows
    lr: peak learning rate
    min_lr_frac: cosine decays to lr * min_lr_frac
    warmup_steps: linear warmup steps
    weight_decay: AdamW decay, on matrices only: norms and biases are not decayed
    grad_clip: gradient norm clip; 0 = off
    val_frac: share of text/chat tokens held out, as whole last documents (shards: own val files)
    eval_every: steps between validation losses (also before the first step, at every checkpoint and at the end)
    eval_rows: validation rows used
    ckpt_every: steps between checkpoints (and one at the end)
    resume: continue the run in --out_dir from its ckpt.pt, with the same data and schedule flags
    device: cpu, cuda, cuda:N; empty = cuda if available, else cpu
    dtype: bfloat16 (autocast; frozen weights of lora/norm runs stored so) or float32; empty = bfloat16 on cuda
    grad_checkpointing: recompute each block in backward: less activation memory
    fsdp: under torchrun: shard with FSDP2 instead of replicating with DDP
    save_dtype: dtype of the exported model.safetensors: bfloat16, float16 or float32
    router_bias_rate: nanollm MoE: router bias step per optimizer step (DeepSeek-V3's gamma)
    seed: seeds the initial weights, adapters and the data order
    """
    model: str = "smollm2"
    ckpt_dir: str = ""
    preset: str = ""
    tokenizer: str = ""
    data: str = ""
    out_dir: str = "out/finetune"
    overwrite: bool = False
    mode: str = "lora"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    seq_len: int = 512
    batch_size: int = 4
    grad_accum: int = 1
    max_steps: int = 0
    lr: float = 2e-4
    min_lr_frac: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    val_frac: float = 0.05
    eval_every: int = 50
    eval_rows: int = 32
    ckpt_every: int = 100
    resume: bool = False
    device: str = ""
    dtype: str = ""
    grad_checkpointing: bool = False
    fsdp: bool = False
    save_dtype: str = "bfloat16"
    router_bias_rate: float = 0.001
    seed: int = 1337


MODELS = ("smollm2", "llama31", "nanollm", "lm2")
# flags a resume may change: how often to evaluate and save, where to run, and how long (the schedule is recomputed);
# the others fix the data order, the model and the optimisation, which the checkpoint continues
RESUMABLE_CHANGES = {"out_dir", "resume", "overwrite", "max_steps", "eval_every", "eval_rows", "ckpt_every", "device",
                     "dtype", "grad_checkpointing", "fsdp", "save_dtype"}
IGNORE = -100  # target id that F.cross_entropy skips
SHARD_MAGIC, HEADER_INTS = 20240520, 256  # llm.c's .bin layout: 256 int32 header, then the tokens


def check_flags(cfg, rules: dict[str, tuple[bool, str]]):
    """rules: flag -> (valid, what it must be); the first invalid flag (or non-finite float) ends the run."""
    for name, (ok, need) in rules.items():
        value = getattr(cfg, name)
        if not ok or (isinstance(value, float) and not math.isfinite(value)):
            raise SystemExit(f"error: --{name} must be {need}, got {value!r}")


def check_train_flags(c: TrainConfig):
    """Every flag's range, the flags that exclude each other, and that the inputs exist: before anything loads."""
    if c.model not in MODELS:
        raise SystemExit(f"error: unknown --model {c.model!r}; choose one of {', '.join(MODELS)}")
    check_flags(c, {
        "mode": (c.mode in ("full", "lora", "norm", "frozen_embed"), "one of 'full', 'lora', 'norm', 'frozen_embed'"),
        "lora_rank": (c.lora_rank >= 1, ">= 1"), "lora_alpha": (c.lora_alpha > 0, "> 0"),
        "lora_dropout": (0 <= c.lora_dropout < 1, "in [0, 1)"),
        "lora_targets": (all(re.fullmatch(r"\w+", t) for t in c.lora_targets.split(",")), "comma-separated names"),
        "seq_len": (c.seq_len >= 1, ">= 1"), "batch_size": (c.batch_size >= 1, ">= 1"),
        "grad_accum": (c.grad_accum >= 1, ">= 1"), "max_steps": (c.max_steps >= 0, ">= 0"), "lr": (c.lr > 0, "> 0"),
        "min_lr_frac": (0 <= c.min_lr_frac <= 1, "in [0, 1]"), "warmup_steps": (c.warmup_steps >= 0, ">= 0"),
        "weight_decay": (c.weight_decay >= 0, ">= 0"), "grad_clip": (c.grad_clip >= 0, ">= 0"),
        "val_frac": (0 < c.val_frac < 1, "in (0, 1)"), "eval_every": (c.eval_every >= 1, ">= 1"),
        "eval_rows": (c.eval_rows >= 1, ">= 1"), "ckpt_every": (c.ckpt_every >= 1, ">= 1"),
        "dtype": (c.dtype in ("", "float32", "bfloat16", "float16"), "one of '', 'float32', 'bfloat16', 'float16'"),
        "save_dtype": (c.save_dtype in ("float32", "bfloat16", "float16"), "one of 'float32', 'bfloat16', 'float16'"),
        "router_bias_rate": (c.router_bias_rate >= 0, ">= 0"), "seed": (0 <= c.seed < 2**32, "in [0, 2**32)")})
    check_device(c.device)
    if c.ckpt_dir and c.preset:
        raise SystemExit("error: give --ckpt_dir (fine-tune) or --preset (from scratch), not both")
    if c.fsdp and int(os.environ.get("WORLD_SIZE", 1)) < 2:
        raise SystemExit("error: --fsdp shards the model over processes: launch with torchrun --nproc_per_node N")
    if not c.data:
        raise SystemExit("error: --data is required (text/chat files or a folder of shards)")
    for path in [p for p in c.data.split(",") if p]:
        if not os.path.exists(path):
            raise SystemExit(f"error: data file not found: {path}")
    for path, flag in ((c.tokenizer, "--tokenizer"), (c.ckpt_dir, "--ckpt_dir")):
        if path and not os.path.exists(path):
            raise SystemExit(f"error: {flag} {path} not found")
    if c.preset.endswith(".json") and not os.path.isfile(c.preset):
        raise SystemExit(f"error: --preset {c.preset} not found")
    if c.tokenizer or c.ckpt_dir:
        export_sources(c.tokenizer or c.ckpt_dir, c.ckpt_dir)  # refused now, not at the end


def check_device(device: str):
    """'' (auto), cpu, cuda or cuda:N, with a GPU present for cuda."""
    if not re.fullmatch(r"(cpu|cuda(:\d+)?)?", device):
        raise SystemExit(f"error: --device must be cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available; use --device cpu")


# -----------------------------------------------------------------------------
# Data: every source becomes a token stream with a loss mask; a document ends after each end-of-text token


def special_ids(tok) -> tuple[int, int | None]:
    """(end-of-text id, begin-of-text id or None): GPT-2/SmolLM2 and Llama 3 spellings."""
    sp = tok.special_tokens
    eot = sp.get("<|endoftext|>", sp.get("<|end_of_text|>"))
    if eot is None:
        raise SystemExit("error: the tokenizer has no <|endoftext|> or <|end_of_text|> token to end documents")
    return eot, sp.get("<|begin_of_text|>")


def read_documents(path: str):
    """Yield ("text", str) or ("chat", messages) for each document in a .txt or .jsonl file."""
    try:
        if not path.endswith(".jsonl"):
            yield "text", Path(path).read_text(encoding="utf-8")
            return
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield jsonl_document(line, f"{path}:{n}")
    except UnicodeDecodeError as e:
        raise SystemExit(f"error: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def jsonl_document(line: str, where: str):
    """One JSONL line -> ("chat", messages) or ("text", str); a malformed one ends the run naming file:line."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {where}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise SystemExit(f"error: {where}: not valid JSON (nested too deep)") from None
    if isinstance(row, dict) and isinstance(row.get("text"), str) and "messages" not in row:
        return "text", row["text"]
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise SystemExit(f'error: {where} needs {{"text": "..."}} or {{"messages": [{{"role": "user", '
                         f'"content": "..."}}, ...]}} (every message a role and a content string)')
    return "chat", messages


def render_chat(tok, encode_chat, messages) -> tuple[list[int], list[int]]:
    """One conversation -> (ids, loss_mask): 1 on what the assistant says, its end-of-turn tokens included. Each
    reply is the span between the render of the conversation before it (with the generation prompt) and the render
    that includes it: the model file's `encode_chat` decides the format, we only diff."""
    ids = encode_chat(tok, messages, add_generation_prompt=False)
    mask = [0] * len(ids)
    for i in [i for i, m in enumerate(messages) if m["role"] == "assistant"]:
        before = encode_chat(tok, messages[:i], add_generation_prompt=True)
        end = len(encode_chat(tok, messages[:i + 1], add_generation_prompt=False))
        if ids[:len(before)] != before:  # subtle: templates that rewrite earlier turns cannot be masked this way
            raise SystemExit("error: the chat template does not render conversations prefix by prefix")
        mask[len(before):end] = [1] * (end - len(before))
    return ids, mask


def tokenize_files(paths: list[str], tok, encode_chat) -> tuple[np.ndarray, np.ndarray]:
    """Text and chat files -> one token stream and its loss mask (1 = this token is a training target)."""
    eot, bos = special_ids(tok)
    ids, mask = [], []
    for path in paths:  # (a progress bar per file: a book-sized text takes a while to tokenize)
        for kind, doc in tqdm(read_documents(path), desc=f"tokenizing {path}", unit="doc", leave=False,
                              disable=int(os.environ.get("RANK", 0)) > 0):
            if kind == "chat":
                d_ids, d_mask = render_chat(tok, encode_chat, doc)
            else:
                d_ids = ([bos] if bos is not None else []) + tok.encode(doc)
                d_mask = [1] * len(d_ids)
            ids += d_ids + [eot]
            mask += d_mask + [kind == "text"]  # learn to end documents; the separator after a reply is not a target
    if not ids:
        raise SystemExit(f"error: empty dataset: no documents in {', '.join(paths)}")
    return np.array(ids, dtype=np.uint32), np.array(mask, dtype=np.bool_)


def val_start(boundaries: np.ndarray, n: int, val_frac: float) -> int:
    """Start of the held-out tail of an n-token stream: the document boundary nearest to its last val_frac, so no
    document is split; a single document (e.g. one .txt file) has none, and the end of it is held out."""
    cut = n - max(2, int(n * val_frac))
    return int(boundaries[np.abs(boundaries - cut).argmin()]) if len(boundaries) else cut


def write_shard(path: str, tokens: np.ndarray, vocab_size: int):
    """llm.c layout: int32 header [magic, version, n_tokens, 0...], then uint16 (v1) or uint32 (v2) tokens."""
    version, dtype = (1, np.uint16) if vocab_size <= 2**16 else (2, np.uint32)
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = SHARD_MAGIC, version, len(tokens)
    save_atomic(path, lambda tmp: Path(tmp).write_bytes(header.tobytes() + tokens.astype(dtype).tobytes()))


def read_shard(path: str) -> np.ndarray:
    """Memory-map a shard's tokens: nothing is read until rows are taken from it."""
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if len(header) < 3 or header[0] != SHARD_MAGIC or header[1] not in (1, 2):
        raise SystemExit(f"error: {path} is not a token shard (magic {SHARD_MAGIC}, version 1 or 2)")
    dtype = np.uint16 if header[1] == 1 else np.uint32
    if os.path.getsize(path) < HEADER_INTS * 4 + int(header[2]) * np.dtype(dtype).itemsize:
        raise SystemExit(f"error: {path} is truncated: its header counts {header[2]} tokens; prepare it again")
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_INTS * 4, shape=(int(header[2]),))


def prepare(*files: str, tokenizer: str = "", out_dir: str = "", val_frac: float = 0.01, shard_tokens: int = 10**8):
    """Tokenize text files (.txt: one document each; .jsonl: one {"text": ...} per line) into llm.c-style shards
    OUT_DIR/{train,val}_NNNNNN.bin for `finetune.py --data OUT_DIR`; each document is preceded by end-of-text.

    files: the .txt / .jsonl files to tokenize
    tokenizer: tokenizer file or folder (required)
    out_dir: folder for the shards (required); existing shards of the same names are replaced
    val_frac: share of the tokens held out for validation, as whole last documents
    shard_tokens: most tokens per shard file
    """
    if not files or not tokenizer or not out_dir:
        raise SystemExit("error: usage: finetune.py prepare FILES... --tokenizer T --out_dir D (see --help)")
    if not (0 < val_frac < 1 and shard_tokens >= 1):
        raise SystemExit(f"error: need 0 < --val_frac < 1 and --shard_tokens >= 1, got {val_frac}, {shard_tokens}")
    missing = [p for p in (tokenizer, *files) if not os.path.exists(p)]
    if missing:
        raise SystemExit(f"error: not found: {missing[0]}")
    if os.path.isfile(out_dir):
        raise SystemExit(f"error: --out_dir {out_dir} is a file; give a folder")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:  # a read-only mount, no permission: said before tokenizing, not after
        raise SystemExit(f"error: cannot write in --out_dir {out_dir} ({e.strerror})") from None
    tok = load_tokenizer(tokenizer)
    eot, _ = special_ids(tok)
    docs = [doc for path in files for kind, doc in read_documents(path) if kind == "text"]
    stream = np.array([t for doc in tqdm(docs, desc="tokenizing", unit="doc", leave=False)
                       for t in [eot] + tok.encode(doc)], dtype=np.uint32)
    if len(stream) == len(docs):
        raise SystemExit("error: empty dataset: no text documents to prepare")
    cut = val_start(np.flatnonzero(stream == eot)[1:], len(stream), val_frac)  # a document starts at its eot
    for split, part in (("train", stream[:cut]), ("val", stream[cut:])):
        for i, start in enumerate(range(0, len(part), shard_tokens)):
            write_shard(os.path.join(out_dir, f"{split}_{i:06d}.bin"), part[start:start + shard_tokens],
                        tok.vocab_size)
    print(f"{len(docs)} documents, {cut} train + {len(stream) - cut} val tokens -> {out_dir}")


class PackedRows:
    """Row i holds tokens [i*T, i*T+T] of its stream (the last one only as a target); no row spans two streams."""

    def __init__(self, streams, masks, seq_len: int, eot: int):
        self.streams, self.masks, self.T, self.eot = streams, masks, seq_len, eot
        self.offsets = np.cumsum([0] + [(len(s) - 1) // seq_len for s in streams])  # first row of each stream

    def __len__(self):
        return int(self.offsets[-1])

    def row(self, i: int):
        s = int(np.searchsorted(self.offsets, i, side="right")) - 1
        start = (i - int(self.offsets[s])) * self.T
        tokens = torch.from_numpy(self.streams[s][start:start + self.T + 1].astype(np.int64))
        keep = torch.ones(self.T + 1, dtype=torch.bool) if self.masks[s] is None \
            else torch.from_numpy(self.masks[s][start:start + self.T + 1])
        starts = torch.cat([torch.zeros(1, dtype=torch.bool), tokens[:-1] == self.eot])  # a new document after each eot
        doc_ids = starts[:-1].cumsum(0)  # (T,) document index of each input, 0 = the one the row starts in
        # dropped targets: masked ones, and the first token of the next document (nothing in this one predicts it)
        targets = tokens[1:].masked_fill(~keep[1:] | starts[1:], IGNORE)
        return tokens[:-1], targets, doc_ids

    def batch(self, indices):
        """-> x (B, T), y (B, T), doc_ids (B, T) or None when every row is one document (plain causal path)."""
        x, y, d = (torch.stack(t) for t in zip(*(self.row(int(i)) for i in indices)))
        return x, y, (d if d.max() > 0 else None)


def load_data(cfg: TrainConfig, tok, encode_chat) -> tuple[PackedRows, PackedRows]:
    """Train and validation rows, from shards (folder) or text/chat files (held-out last documents)."""
    eot, _ = special_ids(tok)
    if os.path.isdir(cfg.data):
        splits = [sorted(str(p) for p in Path(cfg.data).glob(f"*{s}*.bin")) for s in ("train", "val")]
        if not all(splits):
            raise SystemExit(f"error: {cfg.data} needs *train*.bin and *val*.bin shards (see `finetune.py prepare`)")
        rows = tuple(PackedRows([read_shard(p) for p in paths], [None] * len(paths), cfg.seq_len, eot)
                     for paths in splits)  # train, val
        if not all(rows):
            raise SystemExit(f"error: empty dataset: a split in {cfg.data} holds less than one row of "
                             f"{cfg.seq_len + 1} tokens")
        return rows
    ids, mask = tokenize_files([p for p in cfg.data.split(",") if p], tok, encode_chat)
    if not mask.any():
        raise SystemExit("error: empty dataset: no token is a training target (chat data without assistant turns?)")
    cut = val_start(np.flatnonzero(ids[:-1] == eot) + 1, len(ids), cfg.val_frac)  # a document ends with its eot
    rows = []
    for a, b in ((0, cut), (cut, len(ids))):  # pad with masked eot to whole rows: no tail (or small split) is lost
        pad = -(b - a - 1) % cfg.seq_len
        rows.append(PackedRows([np.concatenate([ids[a:b], np.full(pad, eot, ids.dtype)])],
                               [np.concatenate([mask[a:b], np.zeros(pad, np.bool_)])], cfg.seq_len, eot))
    return tuple(rows)


@functools.lru_cache(maxsize=2)  # the current epoch's order (and the next one's, at a boundary)
def epoch_order(n_rows: int, seed: int, epoch: int) -> torch.Tensor:
    """The row order of one epoch: a fixed function of (seed, epoch), so a data position is just a count."""
    return torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1000 + epoch))


def rows_at(n_rows: int, seed: int, position: int, count: int) -> list[int]:
    """Row indices number position..position+count-1 of the endless sequence of shuffled epochs."""
    return [int(epoch_order(n_rows, seed, p // n_rows)[p % n_rows]) for p in range(position, position + count)]


# -----------------------------------------------------------------------------
# Model: loading a model file and its tokenizer, LoRA, what trains, the family's hooks


def read_json(path) -> dict:
    """A JSON object from a file; unreadable, invalid or absurdly nested JSON ends the run in one line."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise SystemExit(f"error: cannot read {path}: {one_line(e) or 'nested too deep'}") from None
    if not isinstance(data, dict):
        raise SystemExit(f"error: {path} holds no JSON object")
    return data


def load_tokenizer(path: str):
    """Tokenizer.from_file, with one line for a file it cannot read (whatever the reason: it is the user's file)."""
    from tokenizer_bpe import Tokenizer
    try:
        return Tokenizer.from_file(path)
    except Exception as e:
        raise SystemExit(f"error: cannot read the tokenizer {path}: {type(e).__name__}: {one_line(e)}") from None


def open_model(name: str, device, dtype=torch.float32, ckpt_dir: str = "", preset: str = "", tokenizer: str = ""):
    """Import the model file `name`; load the checkpoint ckpt_dir, or build `preset` (a ModelArgs preset name or a
    config.json) from scratch; read the tokenizer (default: ckpt_dir's). A config whose values no model of the
    family has gets one line naming the file. -> (model module, model in training mode, hf config dict, tokenizer,
    tokenizer path)."""
    if name not in MODELS:
        raise SystemExit(f"error: unknown --model {name!r}; choose one of {', '.join(MODELS)}")
    mod = importlib.import_module(name)
    # the model class is the one with from_pretrained (SmolLM2, Llama, ...: each file names its own)
    Model = next(v for v in vars(mod).values()
                 if isinstance(v, type) and issubclass(v, nn.Module) and "from_pretrained" in vars(v))
    config = os.path.join(ckpt_dir, "config.json") if ckpt_dir else preset if preset.endswith(".json") else ""
    if ckpt_dir and not os.path.isfile(config):
        raise SystemExit(f"error: no checkpoint at {ckpt_dir}: run `python download.py`")
    if not ckpt_dir and not preset:
        raise SystemExit("error: give --ckpt_dir (fine-tune) or --preset with --tokenizer (from scratch)")
    try:
        args = mod.ModelArgs.from_hf_config(read_json(config)) if config else mod.ModelArgs.from_name(preset)
        for key, kind in typing.get_type_hints(type(args)).items():  # "64" heads, 2.5 layers, an "x" or nan eps
            value = getattr(args, key)
            number = type(value) in ((int, float) if kind is float else (int,)) and math.isfinite(value) and value >= 0
            if kind is bool and type(value) is not bool or kind in (int, float) and not number:
                need = {bool: "true or false", int: "a whole number >= 0", float: "a finite number >= 0"}[kind]
                raise ValueError(f"{key} is {value!r}, where {need} is needed")
        with torch.device("meta" if ckpt_dir else device):  # (meta: shapes only, a bad value fails here already)
            model = Model(args)
    except Exception as e:  # a wrong type, a zero, a missing key ...: the model file raises what it meets
        raise SystemExit(f"error: {config or '--preset ' + preset} is not a usable {name} config "
                         f"({type(e).__name__}: {one_line(e)})") from None
    if ckpt_dir:
        try:
            model = Model.from_pretrained(ckpt_dir, device=device, dtype=dtype)
        except Exception as e:  # a truncated or foreign model.safetensors: safetensors and torch raise many kinds
            raise SystemExit(f"error: cannot load {ckpt_dir}: {type(e).__name__}: {one_line(e)}; download it "
                             f"again (python download.py)") from None
    else:
        init_weights(model)
    tok_path = tokenizer or ckpt_dir
    if not tok_path or not os.path.exists(tok_path):
        raise SystemExit(f"error: tokenizer not found: {tok_path or '(none)'}; pass --tokenizer PATH")
    tok, hf_config = load_tokenizer(tok_path), args.to_hf_config()
    if tok.vocab_size > hf_config["vocab_size"]:
        raise SystemExit(f"error: tokenizer has {tok.vocab_size} tokens, the model only {hf_config['vocab_size']}")
    if hf_config.get("eos_token_id") is None:  # nanollm's presets: the id belongs to the tokenizer trained with it
        hf_config["eos_token_id"] = special_ids(tok)[0]  # documents end with it, so generation stops there
    return mod, model.train(), hf_config, tok, tok_path


class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank adapter: W x + (alpha / r) B A dropout(x), A (r, in) and B (out, r) trained, W frozen.
    A subclass keeps the name `...q_proj.weight`: the checkpoint layout gains only `lora_A` and `lora_B`."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        with torch.device("meta"):  # no new weight memory: the base parameters are reused below
            super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.weight, self.bias = base.weight, base.bias
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT; B = 0 makes the adapter start as a no-op

    def forward(self, x):
        # two thin matmuls, (x A^T) B^T: r * (in + out) multiply-adds per token instead of forming B A (in * out)
        return super().forward(x) + self.scale * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str],
               train_whole: str | None = None) -> list[str]:
    """Swap every nn.Linear whose last name part is in targets for a LoRALinear; freeze all but the adapters and
    the parameters whose name contains train_whole (if given): those train in full, without adapters."""
    whole = lambda name: train_whole is not None and train_whole in name  # noqa: E731
    # any nn.Linear (fast_decode.FastLinear subclasses it) but a LoRALinear: never wrapped twice
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)
             and n.rsplit(".", 1)[-1] in targets and not whole(n)]
    if not names:
        raise SystemExit(f"error: no linear layer named {targets} in the model for LoRA")
    for n in names:
        parent, child = n.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, LoRALinear(model.get_submodule(n), rank, alpha, dropout))
    for n, p in model.named_parameters():
        p.requires_grad = ".lora_" in n or whole(n)
    return names


def set_trainable(model: nn.Module, cfg: TrainConfig):
    """Choose what trains. For tied embeddings the one shared matrix appears once, as embed_tokens."""
    if cfg.mode == "lora":  # a family's parameters that no pretrained checkpoint holds (LM2's memory) train whole
        train_whole = getattr(model, "lora_train_whole", lambda: None)()
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets.split(","), train_whole)
        return
    for n, p in model.named_parameters():
        p.requires_grad = {"full": True, "norm": "norm" in n,
                           "frozen_embed": "embed_tokens" not in n and "lm_head" not in n}[cfg.mode]


def init_weights(model: nn.Module, std: float = 0.02):
    """From scratch: the model's own `init_weights` if its file defines one, else HF Llama's: normal(0, 0.02) for
    matrices, zero biases, norms left at one (PyTorch's N(0, 1) embedding would start the loss far above ln(vocab))."""
    if hasattr(model, "init_weights"):
        return model.init_weights()
    for n, p in model.named_parameters():
        if p.dim() >= 2:
            nn.init.normal_(p, std=std)
        elif n.endswith(".bias"):
            nn.init.zeros_(p)


# -----------------------------------------------------------------------------
# Optimizer, schedule, loss


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, nanoGPT's betas; weight decay on matrices only: decaying a norm's
    gain (or a bias) pulls it towards 0 rather than towards its neutral value."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=params[0].is_cuda)


def build_scheduler(optimizer, warmup_steps: int, max_steps: int, min_lr_frac: float):
    """Linear warmup to the peak lr, then cosine down to min_lr_frac of it; stepped once per optimizer step."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)  # its state is the step count: checkpointed


def loss_sum(model, x, y, doc_ids) -> torch.Tensor:
    """Summed cross-entropy over the kept targets: the caller divides by the global count of kept targets."""
    logits = model(x, doc_ids=doc_ids)  # (B, T, vocab)
    # softmax in fp32 whatever the autocast dtype, as HF's loss does; the sum keeps micro-batches additive
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE, reduction="sum")


def all_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


@torch.no_grad()
def evaluate(model, rows: PackedRows, n_rows: int, batch_size: int, device, autocast, rank: int, world: int):
    """Mean loss per target over the first n_rows validation rows, split across processes."""
    model.eval()
    total = torch.zeros(2, device=device)  # (loss sum, target count)
    # the same number of rows on every process: FSDP forwards are collective and must stay in lockstep
    n = max(world, min(n_rows, len(rows)) // world * world)
    mine = [i % len(rows) for i in range(n)][rank::world]
    for i in tqdm(range(0, len(mine), batch_size), desc="validating", leave=False, disable=rank > 0):
        x, y, d = (t.to(device) if t is not None else None for t in rows.batch(mine[i:i + batch_size]))
        with autocast:
            total += torch.stack([loss_sum(model, x, y, d), (y != IGNORE).sum()])
    model.train()
    total = all_sum(total)
    return (total[0] / total[1].clamp(min=1)).item()


def memory_report(model, optimizer, device) -> str:
    """What each mode costs: bytes of weights, gradients and AdamW state, and the peak so far."""
    mib = lambda ts: sum(t.numel() * t.element_size() for t in ts) / 2**20  # noqa: E731
    trainable = [p for p in model.parameters() if p.requires_grad]
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    peak = f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"  # ru_maxrss is KiB
    if device.type == "cuda":
        peak += f", CUDA max allocated {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return (f"trainable {sum(p.numel() for p in trainable):,} of {sum(p.numel() for p in model.parameters()):,} "
            f"params | weights {mib(model.parameters()):.0f} MiB, grads {mib(trainable):.0f} MiB, "
            f"optimizer {mib(state):.0f} MiB | {peak}")


# -----------------------------------------------------------------------------
# Training: set-up, then one loop

OUTPUTS = ("ckpt.pt", "metrics.jsonl", "model.safetensors", "config.json", "generation_config.json", "loss.png",
           *TOKENIZER_FILES)  # what a run writes into --out_dir (and the lock and the marker: run_folder.py)


def train(cfg: TrainConfig):
    check_train_flags(cfg)
    # torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; `python finetune.py` is rank 0 of 1
    rank, world, local = (int(os.environ.get(k, 0)) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    world, master = max(world, 1), rank == 0
    inputs = [cfg.ckpt_dir, cfg.tokenizer, cfg.preset, *cfg.data.split(",")]
    memory_fix = "lower --batch_size and raise --grad_accum, or use --grad_checkpointing / --mode lora"
    with RunFolder(cfg, "finetune.py", inputs, OUTPUTS, memory_fix, master) as folder:
        device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(f"cuda:{local}" if device.startswith("cuda") else device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if world > 1:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        torch.manual_seed(cfg.seed)  # the same initial weights and adapters on every process
        dtype = getattr(torch, cfg.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
        autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

        # model and data; lora / norm runs keep frozen weights in the autocast dtype (half the memory, as torchtune)
        mod, raw, hf_config, tok, tok_path = open_model(cfg.model, device, dtype if cfg.mode in ("lora", "norm")
                                                        else torch.float32, cfg.ckpt_dir, cfg.preset, cfg.tokenizer)
        train_rows, val_rows = load_data(cfg, tok, mod.encode_chat)
        if cfg.seq_len > hf_config["max_position_embeddings"]:
            raise SystemExit(f"error: --seq_len {cfg.seq_len} exceeds the model's context of "
                             f"{hf_config['max_position_embeddings']} tokens")
        if len(train_rows) < cfg.batch_size * world:
            raise SystemExit(f"error: a batch of {cfg.batch_size} x {world} rows does not fit in the {len(train_rows)} "
                             f"training rows of {cfg.seq_len} tokens; lower --batch_size or --seq_len")
        rows_per_step = cfg.batch_size * world * cfg.grad_accum
        max_steps = cfg.max_steps or max(1, len(train_rows) // rows_per_step)
        set_trainable(raw, cfg)
        for p in raw.parameters():  # what trains is fp32
            if p.requires_grad:
                p.data = p.data.float()
        ckpt_keys = checkpoint_keys(raw, everything=not cfg.ckpt_dir)
        if cfg.grad_checkpointing:  # keep only each block's input; recompute its activations during backward
            for block in raw.model.layers:
                block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        if world > 1 and cfg.fsdp:
            from torch.distributed.fsdp import fully_shard
            for block in raw.model.layers:  # one all-gather per block: only one block's full weights at a time
                fully_shard(block)
            fully_shard(raw)
        # DDP without broadcast_buffers: buffers (RoPE tables) are identical everywhere, no sync per forward needed
        model = nn.parallel.DistributedDataParallel(raw, device_ids=[local] if device.type == "cuda" else None,
                                                    broadcast_buffers=False) if world > 1 and not cfg.fsdp else raw
        optimizer = build_optimizer(raw, cfg.lr, cfg.weight_decay)
        scheduler = build_scheduler(optimizer, cfg.warmup_steps, max_steps, cfg.min_lr_frac)
        extra_loss = getattr(raw, "extra_loss", lambda: 0.0)  # the family's hooks (see the module docstring)
        after_optimizer_step = getattr(raw, "after_optimizer_step", lambda all_sum, router_bias_rate: {})

        ckpt_path, step, rows_seen = os.path.join(cfg.out_dir, "ckpt.pt"), 0, 0
        if cfg.resume:  # refused if the data gives other rows now, or a flag that fixes the run changed
            meta = load_checkpoint(ckpt_path, model, optimizer, scheduler, ckpt_keys, asdict(cfg), RESUMABLE_CHANGES)
            if meta.get("train_rows", len(train_rows)) != len(train_rows):
                raise SystemExit(f"error: --resume, but --data now gives {len(train_rows)} training rows where "
                                 f"{ckpt_path} was saved with {meta['train_rows']}; the data changed")
            before = meta.get("config", {}).get("max_steps", cfg.max_steps)
            if master and before != cfg.max_steps:  # the schedule's length is max_steps
                print(f"note: --max_steps {cfg.max_steps} (the checkpoint's run had {before}): the learning-rate "
                      f"schedule continues as one of the new length")
            step, rows_seen = meta["step"], meta["rows_seen"]
            folder.saved(ckpt_path, step)
        metrics = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), keep_until=step if cfg.resume else None,
                             enabled=master)
        if master:
            print(f"{cfg.model}: {len(train_rows)} train / {len(val_rows)} val rows of {cfg.seq_len} tokens, "
                  f"{rows_per_step} rows per step, {max_steps} steps, mode {cfg.mode}, {world} process(es), {device}")

        def validate(label: str) -> float:
            val_loss = evaluate(model, val_rows, cfg.eval_rows, cfg.batch_size, device, autocast, rank, world)
            metrics.write({"step": step, "val_loss": val_loss})
            if master:
                tqdm.write(f"{label}: val loss {val_loss:.4f}")
            return val_loss

        if step == 0:
            validate("before training")
        bar = folder.progress(total=max_steps, initial=step, disable=not master, dynamic_ncols=True)  # the ETA
        t0 = time.time()
        while step < max_steps:
            # this process's grad_accum micro-batches, of the batch_size x world x grad_accum rows the step reads
            indices = rows_at(len(train_rows), cfg.seed, rows_seen, rows_per_step)
            micro = [train_rows.batch(indices[(m * world + rank) * cfg.batch_size:][:cfg.batch_size])
                     for m in range(cfg.grad_accum)]
            # Each micro loss is divided by the count of kept targets in the whole global batch, counted first: the
            # sum of the micro losses is then the loss of one big batch, whatever grad_accum and the processes
            n_targets = all_sum(torch.tensor(sum(int((y != IGNORE).sum()) for _, y, _ in micro), device=device))
            loss = torch.zeros((), device=device)
            for m, (x, y, d) in enumerate(micro):
                x, y, d = x.to(device), y.to(device), d.to(device) if d is not None else None
                # DDP all-reduces gradients only after the last micro-batch
                last = m == len(micro) - 1 or not isinstance(model, nn.parallel.DistributedDataParallel)
                with contextlib.nullcontext() if last else model.no_sync(), autocast:
                    micro_loss = loss_sum(model, x, y, d) / n_targets.clamp(min=1)
                    # DDP and FSDP average gradients over processes: hence the `* world`. The family's extra loss
                    # of this forward (nanollm's MoE balance loss) comes once per micro-batch: hence `/ len(micro)`
                    total = micro_loss * world + extra_loss() / len(micro)
                total.backward()
                loss += micro_loss.detach()
            loss = all_sum(loss).item()
            if not math.isfinite(loss):  # checked before the update: the weights are still the last good ones
                raise SystemExit(f"error: loss is {loss} at step {step + 1}; stopped without updating. Last good "
                                 f"checkpoint: {folder.checkpoint or 'none yet'} (lower --lr or --grad_clip)")
            grad_norm = nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            family_record = after_optimizer_step(all_sum, cfg.router_bias_rate)  # e.g. MoE router biases
            step, rows_seen = step + 1, rows_seen + rows_per_step
            record = {"step": step, "loss": loss, "lr": lr, "tokens": rows_seen * cfg.seq_len,
                      "tok_per_s": rows_per_step * cfg.seq_len / (time.time() - t0)}
            if grad_norm is not None:  # under FSDP a DTensor
                record["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            metrics.write(record | family_record)
            if step == 1 and master:
                tqdm.write(memory_report(raw, optimizer, device))
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tok_per_s']:.0f}")
            bar.update(1)

            saving = step % cfg.ckpt_every == 0 or step == max_steps
            if step % cfg.eval_every == 0 or saving:
                val_loss = validate(f"step {step}")
            if saving:
                # only finite weights with a finite loss are saved: an update can overflow into huge but finite
                # weights, whose loss is only seen at the next forward pass
                bad = nonfinite_count(raw)
                if bad or not math.isfinite(val_loss):
                    raise SystemExit(f"error: weights became unusable at step {step} ({bad} non-finite values, "
                                     f"validation loss {val_loss}); stopped without saving. Last good checkpoint: "
                                     f"{folder.checkpoint or 'none yet'} (lower --lr)")
                save_checkpoint(ckpt_path, model, optimizer, scheduler, ckpt_keys, step=step, rows_seen=rows_seen,
                                train_rows=len(train_rows), config=asdict(cfg))
                metrics.commit()
                folder.saved(ckpt_path, step)
            t0 = time.time()  # after evaluating and saving: tok/s measures training only

        written = export_hf(model, cfg.out_dir, hf_config, tok_path, cfg.lora_alpha / cfg.lora_rank, cfg.save_dtype,
                            cfg.ckpt_dir)
        metrics.commit()  # (a resumed run that had nothing left to do)
        if master:
            png = plot(metrics.path, os.path.join(cfg.out_dir, "loss.png"), {"loss": "-", "val_loss": "o-"})
            folder.mark_written(written + (["loss.png"] if png else []))
            tqdm.write(f"{memory_report(raw, optimizer, device)}\nsaved {cfg.out_dir}/model.safetensors "
                       f"(+ config.json, tokenizer files, ckpt.pt, metrics.jsonl)")
    if dist.is_initialized():
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# Command line: `finetune.py [--flag value ...]` trains; `finetune.py prepare FILES ...` writes shards


def main(argv: list[str] | None = None):
    """`finetune.py [--flag value ...]` trains; `finetune.py prepare FILES... --tokenizer T --out_dir D` tokenizes
    text into shards."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["prepare"]:
            return cli(prepare, argv[1:], prog="finetune.py prepare")
        train(cli(TrainConfig, argv))
    except KeyboardInterrupt:  # (during training the run's folder answers it, naming the checkpoint to resume)
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
