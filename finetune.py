"""
Fine-tune, or train from scratch, any model file of this collection (smollm2, llama31, nanollm, lm2) on text,
chat conversations or pre-tokenized shards; resume exactly after a crash; scale out with torchrun.

It reads like nanoGPT's train.py and nanochat's chat_sft.py: a config block, set-up, then one visible loop with
gradient accumulation, clipping, logging and checkpointing. LoRA follows the paper (Hu et al. 2021) and
torchtune's recipes (adapters on the attention and MLP projections, merged into the weights on save); restarts
follow the NanoLlama codebase (model, optimizer, scheduler, data position and RNG saved together, so a resumed
run repeats or skips no batch). Departures from nano-llama31's fine-tuning, whose README calls it broken:
- packed documents never see each other: `doc_ids` go to the model (attention stays inside a document and RoPE
  positions restart at its start) and a target that begins a new document is ignored;
- no KV cache is allocated while training (the model files allocate one only in `setup_cache`);
- the loss is a sum over the kept targets divided by their count in the whole global batch, so gradient
  accumulation and any number of processes give the same update as one big batch.

A model file is a module with `ModelArgs`, `encode_chat` and a model class: the one with `from_pretrained`, whose
blocks are `.model.layers` (HF's layout). What a model family needs beyond a plain Llama, its model class says
through these optional methods, found by `model_hooks` (finetune.py looks nothing else up about a family):
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
    # resume after a crash: the same command plus --resume; several processes: DDP, or FSDP2 with --fsdp
    python finetune.py ... --resume      |      torchrun --nproc_per_node 2 finetune.py ... [--fsdp]

--out_dir receives model.safetensors + config.json + tokenizer files (loaded by the model file and by
transformers), ckpt.pt (the resume state), metrics.jsonl and loss.png (if matplotlib is installed). A new run needs
an empty or new --out_dir, or --overwrite (the old run's files stay until the new run saves its first checkpoint);
only weights that are finite and give a finite validation loss are ever saved or exported.
"""

import contextlib
import functools
import importlib
import json
import math
import os
import re
import resource
import shutil
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

from tokenizer_bpe import cli

# what other files (grpo.py, benchmarks, tests) use; the rest may change
__all__ = ["TrainConfig", "main", "cli", "prepare", "read_shard", "write_shard", "PackedRows", "IGNORE", "load_data",
           "render_chat", "tokenize_files", "LoRALinear", "apply_lora", "merge_lora_state_dict", "set_trainable",
           "model_hooks", "init_weights", "build_optimizer", "build_scheduler", "loss_sum", "evaluate",
           "checkpoint_keys", "save_checkpoint", "load_checkpoint", "export_hf", "load_model", "open_model",
           "MetricsLog", "nonfinite_count", "at_least", "one_of", "check_values", "check_device", "check_out_dir"]
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
    overwrite: let a new run replace the run already in --out_dir (its files stay until this run saves)
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
# transformers 5 writes the chat template to chat_template.jinja instead of inside tokenizer_config.json
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "tokenizer.model",
                   "special_tokens_map.json", "vocab.json", "merges.txt")

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
    if not os.path.isfile(path):
        raise SystemExit(f"error: data file not found: {path}")
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

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype(dtype).tobytes())
    save_atomic(path, write)


def save_atomic(path: str, write):
    """write(temporary path), then rename it over path: a kill leaves the old file whole, and a failed write (a
    full disk) removes the temporary file and ends the run in one line, the old file untouched."""
    tmp = path + ".tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError ("unexpected pos")
        with contextlib.suppress(OSError):
            os.remove(tmp)
        reason = " ".join(str(e).split())  # one line
        raise SystemExit(f"error: could not write {path} ({reason}); the previous file, if any, is unchanged. "
                         f"Free disk space and run again (--resume continues from the last checkpoint)") from None


def read_shard(path: str) -> np.ndarray:
    """Memory-map a shard's tokens: nothing is read until rows are taken from it."""
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if len(header) < 3 or header[0] != SHARD_MAGIC or header[1] not in (1, 2):
        raise SystemExit(f"error: {path} is not a token shard (magic {SHARD_MAGIC}, version 1 or 2)")
    dtype = np.uint16 if header[1] == 1 else np.uint32
    if os.path.getsize(path) < HEADER_INTS * 4 + int(header[2]) * np.dtype(dtype).itemsize:
        raise SystemExit(f"error: {path} is truncated: its header counts {header[2]} tokens; prepare it again")
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_INTS * 4, shape=(int(header[2]),))


def prepare(tokenizer: str, out_dir: str, files: list[str], val_frac: float = 0.01, shard_tokens: int = 10**8):
    """Tokenize text files into out_dir/{train,val}_NNNNNN.bin; each document is preceded by end-of-text (llm.c)."""
    tok = load_tokenizer(tokenizer)
    eot, _ = special_ids(tok)
    docs = [doc for path in files for kind, doc in read_documents(path) if kind == "text"]
    stream = np.array([t for doc in tqdm(docs, desc="tokenizing", unit="doc", leave=False)
                       for t in [eot] + tok.encode(doc)], dtype=np.uint32)
    if len(stream) == len(docs):
        raise SystemExit("error: empty dataset: no text documents to prepare")
    cut = val_start(np.flatnonzero(stream == eot)[1:], len(stream), val_frac)  # a document starts at its eot
    os.makedirs(out_dir, exist_ok=True)
    for split, part in (("train", stream[:cut]), ("val", stream[cut:])):
        for i, start in enumerate(range(0, len(part), shard_tokens)):
            write_shard(os.path.join(out_dir, f"{split}_{i:06d}.bin"), part[start:start + shard_tokens],
                        tok.vocab_size)
    print(f"{len(docs)} documents, {cut} train + {len(stream) - cut} val tokens -> {out_dir}")


def prepare_main(*files: str, tokenizer: str = "", out_dir: str = "", val_frac: float = 0.01,
                 shard_tokens: int = 10**8):
    """Tokenize text files (.txt: one document each; .jsonl: one {"text": ...} per line) into llm.c-style shards
    OUT_DIR/{train,val}_NNNNNN.bin for `finetune.py --data OUT_DIR`.

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
    prepare(tokenizer, out_dir, list(files), val_frac, shard_tokens)


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
# LoRA: W x + (alpha / r) B A dropout(x), with A (r, in), B (out, r) trained and W frozen


class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank adapter. Subclassing keeps the name `...q_proj.weight`, so the checkpoint
    layout is unchanged and the adapter adds only `lora_A` and `lora_B` beside it."""

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


def merge_lora_state_dict(state: dict, scale: float) -> dict:
    """Fold adapters into their weights: W + scale * B @ A, and drop lora_A/lora_B (the HF layout again)."""
    for key in [k for k in state if k.endswith(".lora_A")]:
        prefix = key[:-len("lora_A")]
        a, b = state.pop(key), state.pop(prefix + "lora_B")  # fp32 sum: a bf16 weight would round the update away
        state[prefix + "weight"] = state[prefix + "weight"].float() + scale * (b.float() @ a.float())
    return state


def set_trainable(model: nn.Module, cfg: TrainConfig):
    """Choose what trains. For tied embeddings the one shared matrix appears once, as embed_tokens."""
    if cfg.mode == "lora":  # a family's parameters that no pretrained checkpoint holds (LM2's memory) train whole
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets.split(","),
                   model_hooks(model).lora_train_whole())
        return
    for n, p in model.named_parameters():
        p.requires_grad = {"full": True, "norm": "norm" in n,
                           "frozen_embed": "embed_tokens" not in n and "lm_head" not in n}[cfg.mode]


# -----------------------------------------------------------------------------
# Model-family hooks: what a family needs that differs is asked of the model (the module docstring lists them)


class Hooks(typing.NamedTuple):
    init_weights: typing.Callable[[], None]
    lora_train_whole: typing.Callable[[], str | None]
    extra_loss: typing.Callable[[], torch.Tensor | float]
    after_optimizer_step: typing.Callable[[typing.Callable, float], dict]


def model_hooks(model: nn.Module) -> Hooks:
    """The model's hooks: each method of those names its model file defines, else the plain Llama's default."""
    defaults = Hooks(init_weights=functools.partial(llama_init, model), lora_train_whole=lambda: None,
                     extra_loss=lambda: 0.0, after_optimizer_step=lambda all_sum, router_bias_rate: {})
    return Hooks(*(getattr(model, name, None) or default for name, default in zip(Hooks._fields, defaults)))


def llama_init(model: nn.Module, std: float = 0.02):
    """The default `init_weights`, HF Llama's: normal(0, 0.02) for matrices, zero biases, norms left at one.
    PyTorch's default N(0, 1) embedding would start the loss far above ln(vocab)."""
    for n, p in model.named_parameters():
        if p.dim() >= 2:
            nn.init.normal_(p, std=std)
        elif n.endswith(".bias"):
            nn.init.zeros_(p)


def init_weights(model: nn.Module):
    """From scratch: the model's `init_weights` hook."""
    model_hooks(model).init_weights()


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


# -----------------------------------------------------------------------------
# Checkpoints: written to a temporary file, then renamed, so a kill never leaves a half-written one


def checkpoint_keys(model: nn.Module, everything: bool) -> set[str]:
    """Model entries a checkpoint needs: trainable parameters and persistent buffers (e.g. MoE router biases),
    or everything (from scratch: no pretrained checkpoint to rebuild the frozen rest from)."""
    param_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return {n for n, p in model.named_parameters() if p.requires_grad or everything} \
        | {n for n in model.state_dict() if n not in param_names}


def save_checkpoint(path: str, model, optimizer, scheduler, keys: set[str], **meta):
    """Every process must call this (FSDP gathers shards); rank 0 writes model[keys], optimizer, scheduler,
    every process's RNG state and `meta` (step, data position, config...)."""
    import torch.distributed.checkpoint.state_dict as dcp  # here, not at the top: 0.8 s that --help need not wait
    # Full (unsharded) state dicts keyed by parameter name: a plain, DDP or FSDP run writes the same file, so a
    # run can resume on another number of processes (DCP's state_dict helpers hide the wrappers).
    opts = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = {k: v for k, v in dcp.get_model_state_dict(model, options=opts).items() if k in keys}
    optim_state = dcp.get_optimizer_state_dict(model, optimizer, options=opts)
    # torch's generators drive LoRA dropout (and any dropout of a model file); the data order needs none
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    rngs = [None] * dist.get_world_size() if dist.is_initialized() else [rng]
    if dist.is_initialized():
        dist.all_gather_object(rngs, rng)  # each process has its own dropout stream
    if not dist.is_initialized() or dist.get_rank() == 0:
        def write(tmp):
            with open(tmp, "wb") as f:
                torch.save({"model": model_state, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                            "rng": rngs, "meta": meta}, f)
                f.flush()
                os.fsync(f.fileno())
        save_atomic(path, write)
    if dist.is_initialized():
        dist.barrier()


def read_checkpoint(path: str) -> dict:
    """A ckpt.pt as save_checkpoint wrote it. weights_only: tensors, numbers, strings and containers only, so a
    crafted file cannot run code (a full unpickler would call whatever the file names, e.g. os.system)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: --resume but no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a refused pickle, a truncated zip, ...: torch raises several kinds
        reason = " ".join(str(e).split())[:300]
        raise SystemExit(f"error: {path} is not a checkpoint this script wrote ({type(e).__name__}: {reason})") \
            from None
    if not isinstance(state, dict) or not {"model", "optimizer", "scheduler", "rng", "meta"} <= set(state):
        raise SystemExit(f"error: {path} is not a checkpoint this script wrote (missing entries)")
    return state


def check_resume(meta: dict, config: dict, may_change: set[str], path: str):
    """A resume continues the same run: refuse one whose data, model or schedule flags differ from the checkpoint's
    (its data position would index other rows, and the saved optimizer and schedule would ignore a new --lr)."""
    saved = meta.get("config", {})
    changed = [k for k in config if k not in may_change and k in saved and saved[k] != config[k]]
    if changed:
        k = changed[0]
        raise SystemExit(f"error: --resume with --{k} {config[k]!r}, but {path} was saved with {saved[k]!r}; resume "
                         f"with the same flags, or start a new run in another --out_dir")


def load_checkpoint(path: str, model, optimizer, scheduler, keys: set[str], config: dict,
                    may_change: set[str]) -> dict:
    """Restore what save_checkpoint wrote, RNG included, after check_resume(config, may_change); -> its meta dict."""
    import torch.distributed.checkpoint.state_dict as dcp
    state = read_checkpoint(path)
    check_resume(state["meta"], config, may_change, path)
    if set(state["model"]) != keys:  # e.g. a LoRA checkpoint given to a full run
        raise SystemExit(f"error: {path} was saved with another model or --mode; resume with the same flags")
    opts = dcp.StateDictOptions(full_state_dict=True, strict=False)  # strictness: the key check above
    try:
        dcp.set_model_state_dict(model, state["model"], options=opts)
        dcp.set_optimizer_state_dict(model, optimizer, state["optimizer"], options=opts)
    except (RuntimeError, KeyError, ValueError) as e:  # e.g. another model size under the same names
        reason = " ".join(str(e).split())[:300]
        raise SystemExit(f"error: {path} does not fit this model ({reason}); resume with the same flags") from None
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"][(dist.get_rank() if dist.is_initialized() else 0) % len(state["rng"])]
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state["meta"]


def export_hf(model, out_dir: str, hf_config: dict, tokenizer_path: str, lora_scale: float, save_dtype: str,
              ckpt_dir: str = ""):
    """model.safetensors (adapters merged, tied head dropped) + config.json + tokenizer files, HF layout; and the
    generation_config.json (end-of-turn ids, sampling defaults) of ckpt_dir, the checkpoint fine-tuned, if any."""
    import torch.distributed.checkpoint.state_dict as dcp
    from safetensors.torch import save_file
    state = dcp.get_model_state_dict(model, options=dcp.StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    state = merge_lora_state_dict(dict(state), lora_scale)
    if hf_config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # the same tensor as model.embed_tokens.weight
    dtype = getattr(torch, save_dtype)
    save_atomic(os.path.join(out_dir, "model.safetensors"),  # transformers requires the "format" metadata
                lambda tmp: save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, tmp,
                                      metadata={"format": "pt"}))
    config = json.dumps({**hf_config, "torch_dtype": save_dtype}, indent=2)
    save_atomic(os.path.join(out_dir, "config.json"), lambda tmp: Path(tmp).write_text(config))
    # the tokenizer the run loaded (Tokenizer.from_file): a folder's files, or those beside a standard-named file;
    # a renamed file alone (its folder may hold another), as tokenizer.json if .json, else as a tiktoken tokenizer.model
    src = Path(tokenizer_path)
    folder, hf_layout = (src, True) if src.is_dir() else (src.parent, src.name in TOKENIZER_FILES)
    files = {n: folder / n for n in TOKENIZER_FILES if hf_layout and (folder / n).is_file()}
    if not hf_layout:
        files["tokenizer.json" if src.suffix == ".json" else "tokenizer.model"] = src
    if ckpt_dir and Path(ckpt_dir, "generation_config.json").is_file():
        files["generation_config.json"] = Path(ckpt_dir, "generation_config.json")
    for name, path in files.items():
        save_atomic(os.path.join(out_dir, name), functools.partial(shutil.copyfile, path))


# -----------------------------------------------------------------------------
# Loading a model file and its tokenizer


def read_json(path) -> dict:
    """A JSON object from a file; unreadable or invalid JSON ends the run in one line naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise SystemExit(f"error: {path} holds no JSON object")
    return data


def load_tokenizer(path: str):
    """Tokenizer.from_file with one line for a file it cannot read (invalid JSON, missing keys, unsupported)."""
    from tokenizer_bpe import Tokenizer
    try:
        return Tokenizer.from_file(path)
    except (OSError, ValueError, KeyError, TypeError, NotImplementedError) as e:  # JSONDecodeError is a ValueError
        raise SystemExit(f"error: cannot read the tokenizer {path}: {type(e).__name__}: {e}") from None


def model_args(mod, config_path):
    """The model file's ModelArgs from a config.json; a file that parses but lacks a key gets one line."""
    try:
        return mod.ModelArgs.from_hf_config(read_json(config_path))
    except (KeyError, TypeError, ValueError) as e:
        raise SystemExit(f"error: {config_path} is not a {mod.__name__} config.json ({type(e).__name__}: {e})") \
            from None


def load_model(cfg: TrainConfig, device, dtype=torch.float32):
    """-> (model module, model, hf config dict, tokenizer, tokenizer path) as --model, --ckpt_dir or --preset and
    --tokenizer say."""
    return open_model(cfg.model, device, dtype, ckpt_dir=cfg.ckpt_dir, preset=cfg.preset, tokenizer=cfg.tokenizer)


def open_model(name: str, device, dtype=torch.float32, ckpt_dir: str = "", preset: str = "", tokenizer: str = ""):
    """Import the model file `name`; load the checkpoint ckpt_dir, or build `preset` (a ModelArgs preset name or a
    config.json) from scratch; read the tokenizer (default: ckpt_dir's).
    -> (model module, model in training mode, hf config dict, tokenizer, tokenizer path)."""
    if name not in MODELS:
        raise SystemExit(f"error: unknown --model {name!r}; choose one of {', '.join(MODELS)}")
    mod = importlib.import_module(name)
    # the model class is the one with from_pretrained (SmolLM2, Llama, ...: each file names its own)
    Model = next(v for v in vars(mod).values()
                 if isinstance(v, type) and issubclass(v, nn.Module) and "from_pretrained" in vars(v))
    if ckpt_dir:
        if not os.path.isfile(os.path.join(ckpt_dir, "config.json")):
            raise SystemExit(f"error: no checkpoint at {ckpt_dir}: run `python download.py`")
        args = model_args(mod, os.path.join(ckpt_dir, "config.json"))
        try:
            model = Model.from_pretrained(ckpt_dir, device=device, dtype=dtype)
        except Exception as e:  # a truncated or foreign model.safetensors: safetensors and torch raise many kinds
            reason = " ".join(str(e).split())[:300]
            raise SystemExit(f"error: cannot load {ckpt_dir}: {type(e).__name__}: {reason}; download it again "
                             f"(python download.py)") from None
    elif preset:
        if preset.endswith(".json"):
            args = model_args(mod, preset)
        else:
            try:
                args = mod.ModelArgs.from_name(preset)
            except (KeyError, ValueError) as e:
                raise SystemExit(f"error: --preset: {e}") from None
        with torch.device(device):
            model = Model(args)
        init_weights(model)
    else:
        raise SystemExit("error: give --ckpt_dir (fine-tune) or --preset with --tokenizer (from scratch)")
    tok_path = tokenizer or ckpt_dir
    if not tok_path or not os.path.exists(tok_path):
        raise SystemExit(f"error: tokenizer not found: {tok_path or '(none)'}; pass --tokenizer PATH")
    tok, hf_config = load_tokenizer(tok_path), args.to_hf_config()
    if tok.vocab_size > hf_config["vocab_size"]:
        raise SystemExit(f"error: tokenizer has {tok.vocab_size} tokens, the model only {hf_config['vocab_size']}")
    if hf_config.get("eos_token_id") is None:  # nanollm's presets: the id belongs to the tokenizer trained with it
        hf_config["eos_token_id"] = special_ids(tok)[0]  # documents end with it, so generation stops there
    return mod, model.train(), hf_config, tok, tok_path


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


def plot_losses(metrics_path: str, png_path: str):
    """loss.png from metrics.jsonl, when matplotlib is installed (it is optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return
    records = [json.loads(line) for line in open(metrics_path)]
    plt.figure(figsize=(7, 4))
    for key, style in (("loss", "-"), ("val_loss", "o-")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            plt.plot(*zip(*points), style, label=key)
    plt.xlabel("step"), plt.ylabel("loss"), plt.legend(), plt.grid(alpha=0.3)
    try:
        plt.savefig(png_path, dpi=120, bbox_inches="tight")
    except OSError as e:  # the model is saved by now: the plot is optional, the run still succeeded
        print(f"warning: could not write {png_path} ({e}); the curves are in {metrics_path}", file=sys.stderr)
    plt.close()


def at_least(low):
    return lambda v: v >= low, f">= {low}"


def one_of(*allowed):
    return lambda v: v in allowed, "one of " + ", ".join(repr(a) for a in allowed)


def check_values(cfg, rules: dict):
    """rules: field -> (test, what it must be). The first field that fails its test ends the run in one line; a
    float must also be finite (float() takes 'nan' and 'inf')."""
    for name, (ok, what) in rules.items():
        value = getattr(cfg, name)
        if (isinstance(value, float) and not math.isfinite(value)) or not ok(value):
            raise SystemExit(f"error: --{name} must be {what}, got {value!r}")


def check_device(device: str):
    """'' (auto), cpu, cuda or cuda:N, with a GPU present for cuda."""
    if not re.fullmatch(r"(cpu|cuda(:\d+)?)?", device):
        raise SystemExit(f"error: --device must be cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available; use --device cpu")


def check_out_dir(out_dir: str, inputs: list[str], resume: bool, overwrite: bool):
    """The run writes only into out_dir. Refuse a folder that holds (or is) one of the run's inputs, since the
    export would overwrite them, and a non-empty folder the run neither resumes nor was told to replace."""
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out_dir {out_dir} is a file; give a folder")
    for path in filter(None, inputs):
        p = Path(path).resolve()
        if p == out or out in p.parents:
            raise SystemExit(f"error: --out_dir {out_dir} holds the input {path}, which this run's files would "
                             f"overwrite; choose another --out_dir")
    if resume:
        if not (out / "ckpt.pt").is_file():
            raise SystemExit(f"error: --resume but no checkpoint at {out / 'ckpt.pt'}")
    elif out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SystemExit(f"error: --out_dir {out_dir} already holds files (another run?); pass --resume to "
                         f"continue that run, --overwrite to replace it, or choose another --out_dir")


def check_config(cfg: TrainConfig):
    """User errors end in one line naming the fix, before anything heavy is loaded."""
    if cfg.model not in MODELS:
        raise SystemExit(f"error: unknown --model {cfg.model!r}; choose one of {', '.join(MODELS)}")
    check_values(cfg, {
        "mode": one_of("full", "lora", "norm", "frozen_embed"),
        "lora_rank": at_least(1), "lora_alpha": (lambda v: v > 0, "> 0"),
        "lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
        "lora_targets": (lambda v: all(re.fullmatch(r"\w+", t) for t in v.split(",")), "comma-separated names"),
        "seq_len": at_least(1), "batch_size": at_least(1), "grad_accum": at_least(1), "max_steps": at_least(0),
        "lr": (lambda v: v > 0, "> 0"), "min_lr_frac": (lambda v: 0 <= v <= 1, "in [0, 1]"),
        "warmup_steps": at_least(0), "weight_decay": at_least(0), "grad_clip": at_least(0),
        "val_frac": (lambda v: 0 < v < 1, "in (0, 1)"), "eval_every": at_least(1), "eval_rows": at_least(1),
        "ckpt_every": at_least(1), "dtype": one_of("", "float32", "bfloat16", "float16"),
        "save_dtype": one_of("float32", "bfloat16", "float16"), "router_bias_rate": at_least(0),
        "seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32)")})
    check_device(cfg.device)
    if cfg.ckpt_dir and cfg.preset:
        raise SystemExit("error: give --ckpt_dir (fine-tune) or --preset (from scratch), not both")
    if cfg.fsdp and int(os.environ.get("WORLD_SIZE", 1)) < 2:
        raise SystemExit("error: --fsdp shards the model over processes: launch with torchrun --nproc_per_node N")
    if not cfg.data:
        raise SystemExit("error: --data is required (text/chat files or a folder of shards)")
    data = [p for p in cfg.data.split(",") if p]
    for path, flag in [(p, "--data") for p in data] + [(cfg.tokenizer, "--tokenizer"), (cfg.ckpt_dir, "--ckpt_dir")]:
        if path and not os.path.exists(path):
            raise SystemExit(f"error: {flag} {path} not found" if flag != "--data" else
                             f"error: data file not found: {path}")
    if cfg.preset.endswith(".json") and not os.path.isfile(cfg.preset):
        raise SystemExit(f"error: --preset {cfg.preset} not found")
    check_out_dir(cfg.out_dir, [cfg.ckpt_dir, cfg.tokenizer, cfg.preset, *data], cfg.resume, cfg.overwrite)


class MetricsLog:
    """metrics.jsonl, one JSON record per line. A resumed run keeps the records up to its checkpoint's step (the
    later ones are redone); a run that replaces another (--overwrite) starts empty. Either way the file already
    there stays whole until this run saves a checkpoint (`commit`): until then records go to metrics.jsonl.tmp."""

    def __init__(self, path: str, keep_until: int | None = None, enabled: bool = True):
        self.path, self.enabled = path, enabled
        self.staged = os.path.exists(path)
        self.file = path + ".tmp" if self.staged else path
        if not enabled:
            return
        old = []
        if keep_until is not None and self.staged:  # a killed run can leave a half-written last line: skipped
            with open(path) as f:
                for n, line in enumerate(f, 1):
                    try:
                        old += [json.loads(line)] if line.endswith("\n") else []
                    except json.JSONDecodeError:
                        raise SystemExit(f"error: {path}:{n} is not valid JSON; repair or delete that line") from None
        self.append([r for r in old if r["step"] <= keep_until], mode="w")

    def append(self, records: list[dict], mode: str = "a"):
        try:
            with open(self.file, mode) as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
        except OSError as e:
            raise SystemExit(f"error: could not write {self.file} ({e}); free disk space and run again with "
                             f"--resume") from None

    def write(self, record: dict):
        if self.enabled:
            self.append([record])

    def commit(self):
        if self.enabled and self.staged:
            os.replace(self.file, self.path)
            self.file, self.staged = self.path, False


def nonfinite_count(raw) -> int:
    """Non-finite values in the trainable weights, summed over processes (FSDP shards are DTensors)."""
    bad = sum(int((~torch.isfinite(p.to_local() if hasattr(p, "to_local") else p)).sum())
              for p in raw.parameters() if p.requires_grad)
    return int(all_sum(torch.tensor(bad, device=next(raw.parameters()).device)).item())


# -----------------------------------------------------------------------------
# Training: the phases (set-up, model, resume, one step's gradients, evaluation, saving, export), then the loop


@dataclass
class Run:
    """This process's place in the run. torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; `python finetune.py` is rank
    0 of 1. dtype is the autocast dtype (float32: autocast off)."""
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)


def start(cfg: TrainConfig) -> Run:
    """One device per process, the process group under torchrun, the seed."""
    rank, world, local = (int(os.environ.get(k, 0)) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(f"cuda:{local}" if device.startswith("cuda") else device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(cfg.seed)  # the same initial weights and adapters on every process
    dtype = getattr(torch, cfg.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    return Run(rank, max(world, 1), device, dtype)


def count_steps(cfg: TrainConfig, run: Run, hf_config: dict, train_rows: PackedRows) -> int:
    """-> the number of optimizer steps, after checking that a row and a batch fit."""
    if cfg.seq_len > hf_config["max_position_embeddings"]:
        raise SystemExit(f"error: --seq_len {cfg.seq_len} exceeds the model's context of "
                         f"{hf_config['max_position_embeddings']} tokens")
    if len(train_rows) < cfg.batch_size * run.world:
        raise SystemExit(f"error: a batch of {cfg.batch_size} x {run.world} rows does not fit in the "
                         f"{len(train_rows)} training rows of {cfg.seq_len} tokens; lower --batch_size or --seq_len")
    return cfg.max_steps or max(1, len(train_rows) // (cfg.batch_size * run.world * cfg.grad_accum))


def wrap_model(raw: nn.Module, cfg: TrainConfig, run: Run) -> tuple[nn.Module, set[str]]:
    """What trains (in fp32), gradient checkpointing, and DDP or FSDP2 over processes; -> (the model to call, the
    names a checkpoint holds)."""
    set_trainable(raw, cfg)
    for p in raw.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    ckpt_keys = checkpoint_keys(raw, everything=not cfg.ckpt_dir)
    if cfg.grad_checkpointing:  # keep only each block's input; recompute its activations during backward
        for block in raw.model.layers:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    if run.world > 1 and cfg.fsdp:
        from torch.distributed.fsdp import fully_shard
        for block in raw.model.layers:  # one all-gather per block: only one block's full weights at a time
            fully_shard(block)
        fully_shard(raw)
    elif run.world > 1:  # broadcast_buffers off: buffers (RoPE tables) are identical everywhere, no sync per forward
        device_ids = [run.device.index] if run.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(raw, device_ids=device_ids, broadcast_buffers=False), ckpt_keys
    return raw, ckpt_keys


def resume(cfg: TrainConfig, run: Run, ckpt_path: str, model, optimizer, scheduler, ckpt_keys: set[str],
           n_train_rows: int) -> tuple[int, int]:
    """--resume: restore ckpt_path, refused if the data gives other rows now; -> (step, rows seen)."""
    meta = load_checkpoint(ckpt_path, model, optimizer, scheduler, ckpt_keys, asdict(cfg), RESUMABLE_CHANGES)
    if meta.get("train_rows", n_train_rows) != n_train_rows:
        raise SystemExit(f"error: --resume, but --data now gives {n_train_rows} training rows where "
                         f"{ckpt_path} was saved with {meta['train_rows']}; the data changed")
    before = meta.get("config", {}).get("max_steps", cfg.max_steps)
    if run.master and before != cfg.max_steps:  # the schedule's length is max_steps
        print(f"note: --max_steps {cfg.max_steps} (the checkpoint's run had {before}): the learning-rate "
              f"schedule continues as one of the new length")
    return meta["step"], meta["rows_seen"]


def micro_batches(rows: PackedRows, cfg: TrainConfig, run: Run, rows_seen: int) -> list[tuple]:
    """This process's grad_accum micro-batches of the next optimizer step, which reads batch_size x world x
    grad_accum rows at the data position rows_seen."""
    indices = rows_at(len(rows), cfg.seed, rows_seen, cfg.batch_size * run.world * cfg.grad_accum)
    return [rows.batch(indices[(m * run.world + run.rank) * cfg.batch_size:][:cfg.batch_size])
            for m in range(cfg.grad_accum)]


def accumulate_gradients(model, hooks: "Hooks", micro: list[tuple], run: Run) -> float:
    """Forward and backward over one step's micro-batches; -> the step's loss, summed over processes. Each micro
    loss is divided by the count of kept targets in the whole global batch, counted first: the sum of the micro
    losses is then the loss of one big batch, whatever grad_accum and the number of processes."""
    n_targets = all_sum(torch.tensor(sum(int((y != IGNORE).sum()) for _, y, _ in micro), device=run.device))
    step_loss = torch.zeros((), device=run.device)
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    for m, (x, y, d) in enumerate(micro):
        x, y, d = x.to(run.device), y.to(run.device), d.to(run.device) if d is not None else None
        # DDP all-reduces gradients only after the last micro-batch
        sync = model.no_sync() if ddp and m < len(micro) - 1 else contextlib.nullcontext()
        with sync, run.autocast:
            loss = loss_sum(model, x, y, d) / n_targets.clamp(min=1)
            # DDP and FSDP average gradients over processes: hence the `* world`. The family's extra loss of this
            # forward (nanollm's MoE balance loss) comes once per micro-batch: hence the `/ len(micro)`
            total = loss * run.world + hooks.extra_loss() / len(micro)
        total.backward()
        step_loss += loss.detach()
    return all_sum(step_loss).item()


def validate(model, rows: PackedRows, cfg: TrainConfig, run: Run, metrics: "MetricsLog", step: int,
             label: str) -> float:
    """The validation loss, logged to metrics.jsonl and the console."""
    val_loss = evaluate(model, rows, cfg.eval_rows, cfg.batch_size, run.device, run.autocast, run.rank, run.world)
    metrics.write({"step": step, "val_loss": val_loss})
    if run.master:
        tqdm.write(f"{label}: val loss {val_loss:.4f}")
    return val_loss


def check_usable(raw, step: int, val_loss: float, good_ckpt: str | None):
    """Only weights that are finite and give a finite loss are saved (and exported): an update can overflow into
    huge but finite weights, whose loss is only seen at the next forward pass."""
    bad = nonfinite_count(raw)
    if bad or not math.isfinite(val_loss):
        raise SystemExit(f"error: weights became unusable at step {step} ({bad} non-finite values, validation "
                         f"loss {val_loss}); stopped without saving. Last good checkpoint: {good_ckpt or 'none yet'} "
                         f"(lower --lr)")


@contextlib.contextmanager
def out_of_memory_hint(cfg: TrainConfig):
    """A batch too large for the memory ends the run in one line naming the flags that shrink it."""
    try:
        yield
    except RuntimeError as e:  # CUDA's OutOfMemoryError is one; the CPU allocator raises a plain one
        if "out of memory" not in str(e) and "can't allocate memory" not in str(e):
            raise
        raise SystemExit(f"error: a batch of {cfg.batch_size} x {cfg.seq_len} tokens does not fit in memory; "
                         f"lower --batch_size and raise --grad_accum, or use --grad_checkpointing / --mode lora") \
            from None


def finish(model, raw, optimizer, cfg: TrainConfig, run: Run, hf_config: dict, tok_path: str, metrics: "MetricsLog"):
    """Export the model in HF layout, plot the losses, leave the process group."""
    export_hf(model, cfg.out_dir, hf_config, tok_path, cfg.lora_alpha / cfg.lora_rank, cfg.save_dtype, cfg.ckpt_dir)
    metrics.commit()  # (a resumed run that had nothing left to do)
    if run.master:
        plot_losses(metrics.path, os.path.join(cfg.out_dir, "loss.png"))
        tqdm.write(f"{memory_report(raw, optimizer, run.device)}\nsaved {cfg.out_dir}/model.safetensors "
                   f"(+ config.json, tokenizer files, ckpt.pt, metrics.jsonl)")
    if dist.is_initialized():
        dist.destroy_process_group()


def train(cfg: TrainConfig):
    check_config(cfg)
    run = start(cfg)
    # lora / norm runs keep frozen weights in the autocast dtype (half the memory, as torchtune); what trains is fp32
    mod, raw, hf_config, tok, tok_path = load_model(cfg, run.device,
                                                    run.dtype if cfg.mode in ("lora", "norm") else torch.float32)
    hooks = model_hooks(raw)
    train_rows, val_rows = load_data(cfg, tok, mod.encode_chat)
    max_steps = count_steps(cfg, run, hf_config, train_rows)
    rows_per_step = cfg.batch_size * run.world * cfg.grad_accum
    model, ckpt_keys = wrap_model(raw, cfg, run)
    optimizer = build_optimizer(raw, cfg.lr, cfg.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.warmup_steps, max_steps, cfg.min_lr_frac)
    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    step, rows_seen, good_ckpt = 0, 0, None
    if cfg.resume:
        step, rows_seen = resume(cfg, run, ckpt_path, model, optimizer, scheduler, ckpt_keys, len(train_rows))
        good_ckpt = ckpt_path
    metrics = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), keep_until=step if cfg.resume else None,
                         enabled=run.master)
    if run.master:
        print(f"{cfg.model}: {len(train_rows)} train / {len(val_rows)} val rows of {cfg.seq_len} tokens, "
              f"{rows_per_step} rows per step, {max_steps} steps, mode {cfg.mode}, {run.world} process(es), "
              f"{run.device}")
    if step == 0:
        validate(model, val_rows, cfg, run, metrics, step, "before training")
    bar = tqdm(total=max_steps, initial=step, disable=not run.master, dynamic_ncols=True)  # shows the ETA
    t0 = time.time()
    with out_of_memory_hint(cfg):
        while step < max_steps:
            loss = accumulate_gradients(model, hooks, micro_batches(train_rows, cfg, run, rows_seen), run)
            if not math.isfinite(loss):  # checked before the update: the weights are still the last good ones
                raise SystemExit(f"error: loss is {loss} at step {step + 1}; stopped without updating. "
                                 f"Last good checkpoint: {good_ckpt or 'none yet'} (lower --lr or --grad_clip)")
            grad_norm = nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            family_record = hooks.after_optimizer_step(all_sum, cfg.router_bias_rate)  # e.g. MoE router biases
            step, rows_seen = step + 1, rows_seen + rows_per_step
            record = {"step": step, "loss": loss, "lr": lr, "tokens": rows_seen * cfg.seq_len,
                      "tok_per_s": rows_per_step * cfg.seq_len / (time.time() - t0)}
            if grad_norm is not None:  # under FSDP a DTensor
                record["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            metrics.write(record | family_record)
            if step == 1 and run.master:
                tqdm.write(memory_report(raw, optimizer, run.device))
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tok_per_s']:.0f}")
            bar.update(1)

            saving = step % cfg.ckpt_every == 0 or step == max_steps
            if step % cfg.eval_every == 0 or saving:
                val_loss = validate(model, val_rows, cfg, run, metrics, step, f"step {step}")
            if saving:
                check_usable(raw, step, val_loss, good_ckpt)
                save_checkpoint(ckpt_path, model, optimizer, scheduler, ckpt_keys, step=step, rows_seen=rows_seen,
                                train_rows=len(train_rows), config=asdict(cfg))
                metrics.commit()
                good_ckpt = ckpt_path
            t0 = time.time()  # after evaluating and saving: tok/s measures training only
    bar.close()
    finish(model, raw, optimizer, cfg, run, hf_config, tok_path, metrics)


# -----------------------------------------------------------------------------
# Command line: `finetune.py [--flag value ...]` trains; `finetune.py prepare FILES ...` writes shards


def main(argv: list[str] | None = None):
    """`finetune.py [--flag value ...]` trains; `finetune.py prepare FILES... --tokenizer T --out_dir D` tokenizes
    text into shards."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["prepare"]:
        return cli(prepare_main, argv[1:], prog="finetune.py prepare")
    train(cli(TrainConfig, argv))


if __name__ == "__main__":
    main()
