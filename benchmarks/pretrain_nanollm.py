"""
Pretraining demonstration: a BPE tokenizer and a few-million-parameter nanollm (MLA + MoE) trained from scratch
on the Python standard library's own source, on a CPU, in minutes, entirely through the project's code:

1. tokenizer_bpe.train learns a 4,096-id byte-level BPE (Llama 3 pre-tokenization, <|endoftext|> the last id)
   on the stdlib's top-level modules and saves tokenizer.json;
2. `finetune.py prepare` tokenizes the same files into llm.c-style train/val shards (one document per file;
   validation is the whole files nearest the last 3% of the token stream, in a seeded shuffle);
3. `finetune.py --model nanollm --mode full` trains the `nano-small` preset (8.6M parameters, 5.6M active per
   token: one dense block, then five MoE blocks of 1 shared + 4 routed experts, top-1) from scratch;
4. `nanollm.py` samples a continuation of "def" from the exported checkpoint.
At the end it prints a markdown summary: validation loss before -> after and its curve (from metrics.jsonl),
tokens seen, wall time per phase, the routed-expert load of every MoE block, and the sample.

The corpus is the interpreter's own `Lib/*.py` (sorted, then shuffled with --seed), so it needs no download;
it differs between Python versions, and the summary names the one used. The tokenizer sees the validation
files too (they only shape the vocabulary, never the weights). The config is `nano-small` with its vocab_size
set to the tokenizer's and stop_tokens to <|endoftext|>, so the sample stops where a file would end.
The prompt is "def", not "def ": Llama 3's pre-tokenizer attaches a space to the word after it, so training text
holds "def", " name", and a prompt ending in a lone " " token starts the model somewhere it has never been.
Rows of 256 tokens, 4 per step: more updates in the same minutes (100 steps, about 100k tokens, fit the budget).
Expert balance: finetune.py nudges each router bias by DeepSeek-V3's 0.001 per step (--router_bias_rate), so
in 100 steps a bias moves at most 0.1; blocks whose router prefers one expert by more than that stay unbalanced.

Threads: torch's default on a 2-core machine is 2 OpenMP threads. While other jobs keep both cores busy, each
parallel region waits for its slowest thread, and we measured a nano-small step 6x slower with 2 threads than
with 1 (41 s vs 7 s for 8 x 256 tokens at load average 10). So every step runs with OMP_NUM_THREADS=--threads,
1 by default; give --threads 2 on an idle machine.

Run (1.3 minutes on an idle 2-core CPU, 10.4 minutes when other jobs kept it at load average 10-13: the step
count, not the clock, ends training):
    python benchmarks/pretrain_nanollm.py                  # -> runs/pretrain_nanollm/{summary.md,model/,...}
    python benchmarks/pretrain_nanollm.py --threads 2 --steps 300 --out_dir runs/longer
"""
import glob
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import nanollm  # noqa: E402
from finetune import read_shard  # noqa: E402
from cli import cli  # noqa: E402
from tokenizer_bpe import Tokenizer, train as train_tokenizer  # noqa: E402

EOT = "<|endoftext|>"  # finetune.py separates documents with it

# -----------------------------------------------------------------------------
# Corpus, tokenizer, model config


def corpus_files(seed: int) -> list[str]:
    """The stdlib's top-level modules: a fixed list (sorted), in a seeded order, so the validation split (the
    stream's tail) is a random handful of files rather than the alphabet's end (zipfile, zoneinfo...)."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    random.Random(seed).shuffle(files)
    return files


def model_config(tok: Tokenizer, path: Path) -> nanollm.ModelArgs:
    """nano-small with this tokenizer's vocabulary and end-of-text id, written as the config.json finetune.py reads."""
    args = nanollm.ModelArgs.from_name("nano-small")
    args.vocab_size, args.stop_tokens = tok.vocab_size, (tok.special_tokens[EOT],)
    path.write_text(json.dumps(args.to_hf_config(), indent=2))
    return args


def param_counts(args: nanollm.ModelArgs) -> tuple[int, int]:
    """(total, active per token): a token runs n_activated of the n_routed experts of each MoE block."""
    with torch.device("meta"):  # shapes only: no memory, no init cost
        total = sum(p.numel() for p in nanollm.NanoLLM(args).parameters())
    one_expert = 3 * args.dim * args.moe_hidden_dim  # gate, up, down projections
    return total, total - len(args.moe_layers) * (args.n_routed_experts - args.n_activated_experts) * one_expert


def run(script: str, cmd: list[str], threads: int, capture: bool = False, files=()) -> tuple[float, str]:
    """Run one step of the pipeline as its command line (files last, shown as a count); -> (wall seconds,
    stdout if captured)."""
    cmd = [os.path.relpath(ROOT / script), *cmd]  # relative paths stay relative to the caller's directory
    print("$ python " + " ".join(cmd) + (f" <{len(files)} files>" if files else ""), flush=True)
    t0 = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, *cmd, *files], check=True, text=True, env=env,
                         stdout=subprocess.PIPE if capture else None)
    if capture:
        print(out.stdout, end="")
    return time.time() - t0, out.stdout or ""

# -----------------------------------------------------------------------------
# Summary, from metrics.jsonl


def expert_stats(records: list[dict], n: int) -> dict[str, tuple[list[float], float, float]]:
    """{MoE block: (share of routed tokens per expert, max/min share, coefficient of variation)}, the shares
    averaged over n steps (each step routes the same number of tokens). Uniform: all 1/E, ratio 1, CV 0."""
    loads = [r["expert_load"] for r in records[:n]]
    out = {}
    for layer in loads[0]:
        share = [statistics.mean(step[layer][e] for step in loads) for e in range(len(loads[0][layer]))]
        cv = statistics.pstdev(share) / statistics.mean(share)
        out[layer] = share, max(share) / max(min(share), 1e-9), cv
    return out


def summary(cmd: str, files: list[str], tokens: dict[str, int], tok: Tokenizer, args: nanollm.ModelArgs,
            cfg: dict, metrics: list[dict], times: dict[str, float], loads: list[float], sample: str,
            window: int = 10) -> str:
    """The markdown that docs/training.md quotes."""
    total, active = param_counts(args)
    steps = [r for r in metrics if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in metrics if "val_loss" in r]
    mb = sum(os.path.getsize(f) for f in files) / 1e6
    text_tokens = tokens["train"] + tokens["val"] - len(files)  # minus one <|endoftext|> per file
    first, last = expert_stats(steps, window), expert_stats(steps[::-1], window)
    lines = [
        f"### nanollm pretraining on the Python {platform.python_version()} standard library", "",
        f"`{cmd}`", "",
        f"- corpus: {len(files)} top-level stdlib modules, {mb:.2f} MB of Python source -> {tokens['train']:,} "
        f"train + {tokens['val']:,} validation tokens",
        f"- tokenizer: tokenizer_bpe.train, {tok.vocab_size:,} ids, {mb * 1e6 / text_tokens:.2f} bytes per token",
        f"- model: nanollm `nano-small`, {total / 1e6:.2f}M parameters ({active / 1e6:.2f}M active per token), "
        f"{len(args.moe_layers)} MoE blocks of {args.n_shared_experts} shared + {args.n_routed_experts} routed "
        f"experts (top-{args.n_activated_experts})",
        f"- training: {len(steps)} steps x {cfg['batch_size']} rows x {cfg['seq_len']} tokens = "
        f"{steps[-1]['tokens']:,} tokens seen ({steps[-1]['tokens'] / tokens['train']:.2f} epochs), AdamW lr "
        f"{cfg['lr']:g} (warmup {cfg['warmup_steps']}, cosine), median "
        f"{statistics.median(r['tok_per_s'] for r in steps):.0f} tok/s",
        f"- **validation loss {val[0][1]:.3f} -> {val[-1][1]:.3f}** (a uniform guess: ln {tok.vocab_size} = "
        f"{math.log(tok.vocab_size):.3f}); last training loss {steps[-1]['loss']:.3f}",
        f"- wall time {sum(times.values()) / 60:.1f} min (" + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
        + f"), {cfg['threads']} thread(s), load average {loads[0]:.1f} at the start and {loads[1]:.1f} at the end",
        "", f"Validation loss ({cfg['eval_rows']} rows of {cfg['seq_len']} tokens from the held-out files):", "",
        "| step | " + " | ".join(str(s) for s, _ in val) + " |",
        "|---" * (len(val) + 1) + "|",
        "| val loss | " + " | ".join(f"{v:.3f}" for _, v in val) + " |",
        "", f"Routed-expert load per MoE block: each expert's share of the block's routed tokens, mean over the "
            f"first and the last {window} steps (uniform: {1 / args.n_routed_experts:.0%} each, max/min 1, CV 0):", "",
        "| block | first steps | max/min | CV | last steps | max/min | CV |",
        "|---|---|---|---|---|---|---|",
    ]
    for layer in first:
        cells = [" ".join(f"{x:.0%}" for x in share) + f" | {ratio:.2f} | {cv:.2f}"
                 for share, ratio, cv in (first[layer], last[layer])]
        lines.append(f"| {layer} | {cells[0]} | {cells[1]} |")
    lines += ["", f"Sample (`nanollm.py --prompt {json.dumps(cfg['prompt'])}`, temperature 0.8, top-p 0.95, seed 0):",
              "", "```python", cfg["prompt"] + sample.rstrip("\n"), "```"]
    return "\n".join(lines)

# -----------------------------------------------------------------------------


def main(out_dir: str = "runs/pretrain_nanollm", steps: int = 100, batch_size: int = 4, seq_len: int = 256,
         lr: float = 3e-3, warmup_steps: int = 10, vocab_size: int = 4096, val_frac: float = 0.03,
         eval_every: int = 20, threads: int = 1, seed: int = 1337, prompt: str = "def", max_new_tokens: int = 120):
    """Tokenizer, shards, training, sample, summary; everything lands in out_dir (summary.md last)."""
    out, loads, times = Path(out_dir), [os.getloadavg()[0]], {}
    out.mkdir(parents=True, exist_ok=True)

    # 1. tokenizer, on every file (the vocabulary only; the weights never see the validation files)
    files = corpus_files(seed)
    t0 = time.time()
    tok = train_tokenizer([Path(f).read_text(encoding="utf-8") for f in files], vocab_size, special_tokens=[EOT])
    tok.save(str(out / "tokenizer.json"))
    times["tokenizer"] = time.time() - t0
    print(f"tokenizer: {tok.vocab_size} ids from {len(files)} files in {times['tokenizer']:.0f} s")

    # 2. shards: one document per file, each preceded by <|endoftext|>; the stream's last val_frac is validation
    times["prepare"], _ = run("finetune.py", ["prepare", "--tokenizer", str(out / "tokenizer.json"),
                                              "--out_dir", str(out / "data"), "--val_frac", str(val_frac)],
                              threads, capture=True, files=files)
    tokens = {split: sum(len(read_shard(p)) for p in glob.glob(str(out / "data" / f"{split}_*.bin")))
              for split in ("train", "val")}

    # 3. pretraining from scratch; one checkpoint, at the end
    args = model_config(tok, out / "nano-small.json")
    cfg = dict(model="nanollm", preset=str(out / "nano-small.json"), tokenizer=str(out / "tokenizer.json"),
               data=str(out / "data"), out_dir=str(out / "model"), mode="full", seq_len=seq_len,
               batch_size=batch_size, max_steps=steps, lr=lr, warmup_steps=warmup_steps, weight_decay=0.1,
               eval_every=eval_every, eval_rows=32, ckpt_every=steps, save_dtype="float32", seed=seed,
               overwrite=True)  # out_dir is this benchmark's own: a rerun replaces its model
    times["train"], _ = run("finetune.py", [f"--{k}={v}" for k, v in cfg.items()], threads)

    # 4. a sampled continuation, from the exported checkpoint by the model file's own CLI
    times["sample"], sample = run("nanollm.py", ["--ckpt_dir", str(out / "model"), "--prompt", prompt,
                                                 "--max_new_tokens", str(max_new_tokens), "--temperature", "0.8",
                                                 "--top_p", "0.95", "--seed", "0"], threads, capture=True)
    loads.append(os.getloadavg()[0])

    metrics = [json.loads(line) for line in open(out / "model" / "metrics.jsonl")]
    report = summary("python " + " ".join(sys.argv), files, tokens, tok, args,
                     {**cfg, "threads": threads, "prompt": prompt}, metrics, times, loads, sample)
    (out / "summary.md").write_text(report + "\n")
    print("\n" + report)


if __name__ == "__main__":
    cli(main)
