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
transformers), ckpt.pt (the resume state), metrics.jsonl and loss.png (if matplotlib is installed).
"""

import argparse
import contextlib
import functools
import importlib
import inspect
import json
import math
import os
import re
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint.state_dict as dcp
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

# -----------------------------------------------------------------------------
# Config: every field is a command-line flag (--name value, --flag / --no-flag for booleans)


@dataclass
class TrainConfig:
    model: str = "smollm2"  # model file to import: smollm2 | llama31 | nanollm | lm2
    ckpt_dir: str = ""  # pretrained HF-layout checkpoint; empty = from scratch with --preset
    preset: str = ""  # from scratch: a ModelArgs preset name, or a config.json path
    tokenizer: str = ""  # tokenizer file or folder; empty = the one in --ckpt_dir
    data: str = ""  # .txt / .jsonl files (comma separated), or a folder of *train*.bin / *val*.bin shards
    out_dir: str = "out/finetune"
    mode: str = "lora"  # full | lora | norm (RMSNorm weights only) | frozen_embed (all but embeddings)
    lora_rank: int = 16
    lora_alpha: float = 32.0  # adapter output is scaled by alpha / rank
    lora_dropout: float = 0.05
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    seq_len: int = 512  # tokens per packed row
    batch_size: int = 4  # rows per micro-batch, per process
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 0  # optimizer steps; 0 = one pass over the training rows
    lr: float = 2e-4
    min_lr_frac: float = 0.1  # cosine decays to lr * min_lr_frac
    warmup_steps: int = 10
    weight_decay: float = 0.01  # on matrices only: norms and biases are not decayed
    grad_clip: float = 1.0  # 0 = off
    val_frac: float = 0.05  # share of text/chat tokens held out, as whole last documents (shards: own val files)
    eval_every: int = 50  # steps between validation losses (also before the first and after the last)
    eval_rows: int = 32  # validation rows used
    ckpt_every: int = 100  # steps between checkpoints (and one at the end)
    resume: bool = False  # continue from out_dir/ckpt.pt
    device: str = ""  # empty = cuda if available, else cpu
    dtype: str = ""  # bfloat16 (default on CUDA: autocast, frozen weights of lora/norm runs stored so) or float32
    grad_checkpointing: bool = False  # recompute each block in backward: less activation memory
    fsdp: bool = False  # under torchrun: shard with FSDP2 instead of replicating with DDP
    save_dtype: str = "bfloat16"  # dtype of the exported model.safetensors
    router_bias_rate: float = 0.001  # nanollm MoE: router bias step per optimizer step (DeepSeek-V3's gamma)
    seed: int = 1337


MODELS = ("smollm2", "llama31", "nanollm", "lm2")
IGNORE = -100  # target id that F.cross_entropy skips
SHARD_MAGIC, HEADER_INTS = 20240520, 256  # llm.c's .bin layout: 256 int32 header, then the tokens
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt")

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
    if not path.endswith(".jsonl"):
        yield "text", Path(path).read_text(encoding="utf-8")
        return
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "messages" in row:
                yield "chat", row["messages"]
            elif "text" in row:
                yield "text", row["text"]
            else:
                raise SystemExit(f"error: {path}:{n} has neither 'messages' nor 'text'")


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
    for path in paths:
        for kind, doc in read_documents(path):
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
    with open(path + ".tmp", "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(dtype).tobytes())
    os.replace(path + ".tmp", path)


def read_shard(path: str) -> np.ndarray:
    """Memory-map a shard's tokens: nothing is read until rows are taken from it."""
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if len(header) < 3 or header[0] != SHARD_MAGIC or header[1] not in (1, 2):
        raise SystemExit(f"error: {path} is not a token shard (magic {SHARD_MAGIC}, version 1 or 2)")
    dtype = np.uint16 if header[1] == 1 else np.uint32
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_INTS * 4, shape=(int(header[2]),))


def prepare(tokenizer: str, out_dir: str, files: list[str], val_frac: float = 0.01, shard_tokens: int = 10**8):
    """Tokenize text files into out_dir/{train,val}_NNNNNN.bin; each document is preceded by end-of-text (llm.c)."""
    from tokenizer_bpe import Tokenizer
    tok = Tokenizer.from_file(tokenizer)
    eot, _ = special_ids(tok)
    docs = [doc for path in files for kind, doc in read_documents(path) if kind == "text"]
    stream = np.array([t for doc in docs for t in [eot] + tok.encode(doc)], dtype=np.uint32)
    if len(stream) == len(docs):
        raise SystemExit("error: empty dataset: no text documents to prepare")
    cut = val_start(np.flatnonzero(stream == eot)[1:], len(stream), val_frac)  # a document starts at its eot
    os.makedirs(out_dir, exist_ok=True)
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
    # any nn.Linear (the model files subclass it for fast decoding) but a LoRALinear: never wrapped twice
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
    if cfg.mode == "lora":  # LM2's memory (lm2.py `Memory`) is new, randomly initialised on a Llama: it trains whole
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets.split(","), ".memory.")
        return
    for n, p in model.named_parameters():
        p.requires_grad = {"full": True, "norm": "norm" in n,
                           "frozen_embed": "embed_tokens" not in n and "lm_head" not in n}[cfg.mode]


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
    for i in range(0, len(mine), batch_size):
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
        with open(path + ".tmp", "wb") as f:
            torch.save({"model": model_state, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                        "rng": rngs, "meta": meta}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    if dist.is_initialized():
        dist.barrier()


def load_checkpoint(path: str, model, optimizer, scheduler, keys: set[str]) -> dict:
    """Restore what save_checkpoint wrote, RNG included; -> its meta dict."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: --resume but no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if set(state["model"]) != keys:  # e.g. a LoRA checkpoint given to a full run
        raise SystemExit(f"error: {path} was saved with another model or --mode; resume with the same flags")
    opts = dcp.StateDictOptions(full_state_dict=True, strict=False)  # strictness: the key check above
    dcp.set_model_state_dict(model, state["model"], options=opts)
    dcp.set_optimizer_state_dict(model, optimizer, state["optimizer"], options=opts)
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
    from safetensors.torch import save_file
    state = dcp.get_model_state_dict(model, options=dcp.StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    state = merge_lora_state_dict(dict(state), lora_scale)
    if hf_config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # the same tensor as model.embed_tokens.weight
    dtype = getattr(torch, save_dtype)
    path = os.path.join(out_dir, "model.safetensors")
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, path + ".tmp", metadata={"format": "pt"})
    os.replace(path + ".tmp", path)  # transformers requires the "format" metadata
    Path(out_dir, "config.json").write_text(json.dumps({**hf_config, "torch_dtype": save_dtype}, indent=2))
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
        shutil.copy(path, Path(out_dir, name))


# -----------------------------------------------------------------------------
# Training: set-up helpers, then the loop


def init_weights(model: nn.Module, std: float = 0.02):
    """From scratch: the model file's own init if it has one, else HF Llama's (normal(0, 0.02) for matrices,
    zero biases, norms left at one). PyTorch's default N(0, 1) embedding would start the loss far above ln(vocab)."""
    if hasattr(model, "init_weights"):
        return model.init_weights()
    for n, p in model.named_parameters():
        if p.dim() >= 2:
            nn.init.normal_(p, std=std)
        elif n.endswith(".bias"):
            nn.init.zeros_(p)


def load_model(cfg: TrainConfig, device, dtype=torch.float32):
    """-> (model module, model, hf config dict, tokenizer, tokenizer path). Imports the model file by name."""
    if cfg.model not in MODELS:
        raise SystemExit(f"error: unknown --model {cfg.model!r}; choose one of {', '.join(MODELS)}")
    mod = importlib.import_module(cfg.model)
    from tokenizer_bpe import Tokenizer
    # the model class is the one with from_pretrained (SmolLM2, Llama, ...: each file names its own)
    Model = next(v for v in vars(mod).values()
                 if isinstance(v, type) and issubclass(v, nn.Module) and "from_pretrained" in vars(v))
    if cfg.ckpt_dir:
        if not os.path.isfile(os.path.join(cfg.ckpt_dir, "config.json")):
            raise SystemExit(f"error: no checkpoint at {cfg.ckpt_dir}: run `python download.py`")
        args = mod.ModelArgs.from_hf_config(json.loads(Path(cfg.ckpt_dir, "config.json").read_text()))
        model = Model.from_pretrained(cfg.ckpt_dir, device=device, dtype=dtype)
    elif cfg.preset:
        args = mod.ModelArgs.from_hf_config(json.loads(Path(cfg.preset).read_text())) \
            if cfg.preset.endswith(".json") else mod.ModelArgs.from_name(cfg.preset)
        with torch.device(device):
            model = Model(args)
        init_weights(model)
    else:
        raise SystemExit("error: give --ckpt_dir (fine-tune) or --preset with --tokenizer (from scratch)")
    tok_path = cfg.tokenizer or cfg.ckpt_dir
    if not tok_path or not os.path.exists(tok_path):
        raise SystemExit(f"error: tokenizer not found: {tok_path or '(none)'}; pass --tokenizer PATH")
    tok, hf_config = Tokenizer.from_file(tok_path), args.to_hf_config()
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
    plt.savefig(png_path, dpi=120, bbox_inches="tight")
    plt.close()


def train(cfg: TrainConfig):
    # torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain `python finetune.py` is rank 0 of 1
    rank, world, local = (int(os.environ.get(k, 0)) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    world, master = max(world, 1), rank == 0
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available")
    device = torch.device(f"cuda:{local}" if device.startswith("cuda") else device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(cfg.seed)  # the same initial weights and adapters on every process
    dtype = getattr(torch, cfg.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    # lora / norm runs keep frozen weights in the autocast dtype (half the memory, as torchtune); what trains is fp32
    weights_dtype = dtype if cfg.mode in ("lora", "norm") else torch.float32
    mod, raw, hf_config, tok, tok_path = load_model(cfg, device, weights_dtype)
    if cfg.seq_len > hf_config["max_position_embeddings"]:
        raise SystemExit(f"error: --seq_len {cfg.seq_len} exceeds the model's context of "
                         f"{hf_config['max_position_embeddings']} tokens")
    train_rows, val_rows = load_data(cfg, tok, getattr(mod, "encode_chat", None))
    rows_per_step = cfg.batch_size * world * cfg.grad_accum
    if len(train_rows) < cfg.batch_size * world:
        raise SystemExit(f"error: a batch of {cfg.batch_size} x {world} rows does not fit in the {len(train_rows)} "
                         f"training rows of {cfg.seq_len} tokens; lower --batch_size or --seq_len")
    max_steps = cfg.max_steps or max(1, len(train_rows) // rows_per_step)

    set_trainable(raw, cfg)
    for p in raw.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    ckpt_keys = checkpoint_keys(raw, everything=not cfg.ckpt_dir)
    if cfg.grad_checkpointing:  # keep only each block's input; recompute its activations during backward
        for block in raw.model.layers:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    model = raw
    if world > 1 and cfg.fsdp:
        from torch.distributed.fsdp import fully_shard
        for block in raw.model.layers:  # one all-gather per block: only one block's full weights at a time
            fully_shard(block)
        fully_shard(raw)
    elif world > 1:  # broadcast_buffers off: buffers (RoPE tables) are identical everywhere, no sync per forward
        model = nn.parallel.DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda" else None,
                                                    broadcast_buffers=False)
    optimizer = build_optimizer(raw, cfg.lr, cfg.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.warmup_steps, max_steps, cfg.min_lr_frac)

    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt_path, metrics_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "metrics.jsonl")
    step, rows_seen, good_ckpt = 0, 0, None
    if cfg.resume:
        meta = load_checkpoint(ckpt_path, model, optimizer, scheduler, ckpt_keys)
        step, rows_seen, good_ckpt = meta["step"], meta["rows_seen"], ckpt_path
    if master:  # keep the log of the steps the checkpoint holds; later ones will be redone
        old = [json.loads(line) for line in open(metrics_path)] if cfg.resume and os.path.exists(metrics_path) else []
        with open(metrics_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in old if r["step"] <= step)
        print(f"{cfg.model}: {len(train_rows)} train / {len(val_rows)} val rows of {cfg.seq_len} tokens, "
              f"{rows_per_step} rows per step, {max_steps} steps, mode {cfg.mode}, {world} process(es), {device}")

    def log(record: dict, message: str = ""):
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if message:
                tqdm.write(message)

    def validate(label: str):
        val_loss = evaluate(model, val_rows, cfg.eval_rows, cfg.batch_size, device, autocast, rank, world)
        log({"step": step, "val_loss": val_loss}, f"{label}: val loss {val_loss:.4f}")

    if step == 0:
        validate("before training")
    bar = tqdm(total=max_steps, initial=step, disable=not master, dynamic_ncols=True)  # shows the ETA
    t0 = time.time()
    try:
        while step < max_steps:
            # One optimizer step = grad_accum micro-batches on each of `world` processes, read at the data position.
            # Count the kept targets of the whole global batch first: every micro loss is divided by that count.
            indices = rows_at(len(train_rows), cfg.seed, rows_seen, rows_per_step)
            micro = [train_rows.batch(indices[(m * world + rank) * cfg.batch_size:][:cfg.batch_size])
                     for m in range(cfg.grad_accum)]
            n_targets = all_sum(torch.tensor(sum(int((y != IGNORE).sum()) for _, y, _ in micro), device=device))
            step_loss = torch.zeros((), device=device)
            for m, (x, y, d) in enumerate(micro):
                x, y, d = x.to(device), y.to(device), d.to(device) if d is not None else None
                # DDP all-reduces gradients only after the last micro-batch
                sync = model.no_sync() if world > 1 and not cfg.fsdp and m < cfg.grad_accum - 1 \
                    else contextlib.nullcontext()
                with sync, autocast:
                    loss = loss_sum(model, x, y, d) / n_targets.clamp(min=1)
                    aux = getattr(raw, "aux_loss", None)  # e.g. nanollm's MoE balance loss of this forward
                    total = loss * world + (aux / cfg.grad_accum if torch.is_tensor(aux) else 0)
                total.backward()  # DDP and FSDP average gradients over processes: hence the `* world`
                step_loss += loss.detach()
            step_loss = all_sum(step_loss).item()
            if not math.isfinite(step_loss):  # checked before the update: the weights are still the last good ones
                raise SystemExit(f"error: loss is {step_loss} at step {step + 1}; stopped without updating. "
                                 f"Last good checkpoint: {good_ckpt or 'none yet'} (lower --lr or --grad_clip)")
            grad_norm = nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step, rows_seen = step + 1, rows_seen + rows_per_step
            record = {"step": step, "loss": step_loss, "lr": lr, "tokens": rows_seen * cfg.seq_len,
                      "tok_per_s": rows_per_step * cfg.seq_len / (time.time() - t0)}
            if grad_norm is not None:  # under FSDP a DTensor
                record["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            if hasattr(raw, "update_router_biases"):  # nanollm's aux-loss-free MoE balancing (DeepSeek-V3)
                for m in raw.modules():  # sum the expert loads of all processes, so every router bias moves alike
                    if torch.is_tensor(getattr(m, "load", None)):
                        all_sum(m.load)
                record["expert_load"] = raw.update_router_biases(cfg.router_bias_rate)  # {layer: token shares}
            log(record, memory_report(raw, optimizer, device) if step == 1 else "")
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{record['tok_per_s']:.0f}")
            bar.update(1)

            if step % cfg.eval_every == 0 or step == max_steps:
                validate(f"step {step}")
            if step % cfg.ckpt_every == 0 or step == max_steps:
                # a finite loss can still come with an update that overflowed: never save such weights
                bad = sum(int((~torch.isfinite(p.to_local() if hasattr(p, "to_local") else p)).sum())
                          for p in raw.parameters() if p.requires_grad)
                if all_sum(torch.tensor(bad, device=device)).item():
                    raise SystemExit(f"error: weights became non-finite at step {step}; stopped without saving. "
                                     f"Last good checkpoint: {good_ckpt or 'none yet'} (lower --lr)")
                save_checkpoint(ckpt_path, model, optimizer, scheduler, ckpt_keys, step=step, rows_seen=rows_seen,
                                config=asdict(cfg))
                good_ckpt = ckpt_path
            t0 = time.time()  # after evaluating and saving: tok/s measures training only
    except RuntimeError as e:  # CUDA's OutOfMemoryError is one; the CPU allocator raises a plain one
        if "out of memory" not in str(e) and "can't allocate memory" not in str(e):
            raise
        raise SystemExit(f"error: a batch of {cfg.batch_size} x {cfg.seq_len} tokens does not fit in memory; "
                         f"lower --batch_size and raise --grad_accum, or use --grad_checkpointing / --mode lora") \
            from None
    bar.close()

    export_hf(model, cfg.out_dir, hf_config, tok_path, cfg.lora_alpha / cfg.lora_rank, cfg.save_dtype, cfg.ckpt_dir)
    if master:
        plot_losses(metrics_path, os.path.join(cfg.out_dir, "loss.png"))
        tqdm.write(f"{memory_report(raw, optimizer, device)}\nsaved {cfg.out_dir}/model.safetensors "
                   f"(+ config.json, tokenizer files, ckpt.pt, metrics.jsonl)")
    if dist.is_initialized():
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# Command line: `finetune.py [--flag value ...]` trains; `finetune.py prepare FILES ...` writes shards


def main(argv: list[str]):
    p = argparse.ArgumentParser(description="Fine-tune or train a model file (see the module docstring).")
    if argv[:1] == ["prepare"]:
        p.add_argument("files", nargs="+")
        p.add_argument("--tokenizer", required=True)
        p.add_argument("--out_dir", required=True)
        p.add_argument("--val_frac", type=float, default=0.01)
        return prepare(**vars(p.parse_args(argv[1:])))
    # one flag per config field, its --help the comment beside the field: the config block stays the one place to read
    helps = dict(re.findall(r"^\s+(\w+): .*?#\s*(.*)$", inspect.getsource(TrainConfig), re.M))
    for f in fields(TrainConfig):
        kind = dict(action=argparse.BooleanOptionalAction) if f.type is bool else dict(type=f.type)
        p.add_argument(f"--{f.name}", default=f.default, help=f"{helps.get(f.name, '')} (default: {f.default!r})",
                       **kind)
    cfg = TrainConfig(**vars(p.parse_args(argv)))
    if cfg.mode not in ("full", "lora", "norm", "frozen_embed"):
        raise SystemExit(f"error: unknown --mode {cfg.mode!r}; choose full, lora, norm or frozen_embed")
    if not cfg.data:
        raise SystemExit("error: --data is required (text/chat files or a folder of shards)")
    train(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
