"""
Training throughput and peak memory: finetune.py's step (a model file + its loss, AdamW, clipping) against a
plain HF transformers step (`LlamaForCausalLM(input_ids, labels=...).loss`, the same AdamW and clipping), on
the same checkpoint, batch, dtype and trainable set. Each side runs in its own process, so its peak memory is
its own: peak RSS above the process's RSS after imports (CPU) or CUDA max allocated.

    python download.py                                   # checkpoints/SmolLM2-135M-Instruct
    python benchmarks/bench_train.py                     # 135M, full fine-tuning, 4 x 256 tokens, 6 steps
    python benchmarks/bench_train.py --mode norm --seq_len 512 --steps 10

Tokens/s counts input tokens per second over the steps after the first (warm-up), over all rounds: the median,
and the best step (on a shared machine the least disturbed step is the closest to the code's own speed). The
sides alternate, ours / HF / ours / HF ..., so a machine that slows down or speeds up weighs on both alike.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_mib() -> float:
    """Current resident set size in MiB (Linux /proc)."""
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_side(a):
    """One side's training steps in this process; prints one JSON line."""
    import torch
    sys.path.insert(0, str(ROOT))
    import finetune as ft
    if a.side == "hf":
        from transformers import LlamaForCausalLM
    else:
        import smollm2
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    base = rss_mib()  # after every import: only what the training itself allocates counts
    if a.side == "ours":
        model = smollm2.SmolLM2.from_pretrained(a.ckpt_dir, device=device, dtype=torch.float32).train()
    else:
        model = LlamaForCausalLM.from_pretrained(a.ckpt_dir, dtype=torch.float32).to(device).train()
    # Both loaders memory-map the safetensors file; such pages count in RSS only while the kernel keeps them
    # resident, which depends on what else runs. Copies in anonymous memory make the peak reproducible.
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    # the same trainable set on both sides (HF parameter names are the same as ours)
    ft.set_trainable(model, ft.TrainConfig(mode=a.mode))
    opt = ft.build_optimizer(model, lr=1e-5, weight_decay=0.01)
    vocab = model.config.vocab_size if a.side == "hf" else model.args.vocab_size
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (a.steps, a.batch_size, a.seq_len + 1), generator=gen).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.dtype == "bfloat16")
    rates, losses = [], []
    for step in range(a.steps):
        x, y = tokens[step, :, :-1].contiguous(), tokens[step, :, 1:].contiguous()
        t0 = time.perf_counter()
        with autocast:
            if a.side == "ours":
                loss = ft.loss_sum(model, x, y, None) / y.numel()
            else:  # HF's own loss; shift_labels gives it our targets (it would otherwise shift x and drop one)
                loss = model(input_ids=x, labels=x, shift_labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # also synchronises CUDA before the clock stops
        rates.append(a.batch_size * a.seq_len / (time.perf_counter() - t0))
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" \
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    print(json.dumps({"side": a.side, "rates": rates[1:], "peak_mib": peak,
                      "losses": losses, "device": str(device)}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_dir", default=str(ROOT / "checkpoints/SmolLM2-135M-Instruct"))
    p.add_argument("--mode", default="full", choices=["full", "norm", "frozen_embed"])
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--steps", type=int, default=6, help="steps per round, the first one not timed")
    p.add_argument("--rounds", type=int, default=2, help="processes per side, alternating")
    p.add_argument("--dtype", default="", help="float32 (CPU default) or bfloat16 autocast (CUDA default)")
    p.add_argument("--device", default="")
    p.add_argument("--side", choices=["ours", "hf"], help=argparse.SUPPRESS)  # internal: run one side
    a = p.parse_args()
    if not os.path.isfile(os.path.join(a.ckpt_dir, "config.json")):
        raise SystemExit(f"error: no checkpoint at {a.ckpt_dir}: run `python download.py`")
    if a.side:
        a.dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
        return run_side(a)
    results = {"ours": [], "hf": []}
    for _ in range(a.rounds):
        for side in results:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--side", side]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"error: the {side} side failed:\n{out.stderr[-2000:]}")
            results[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
    ours, hf = ({"tok_per_s": statistics.median([r for run in runs for r in run["rates"]]),
                 "best": max(r for run in runs for r in run["rates"]),
                 "peak_mib": max(run["peak_mib"] for run in runs), "losses": runs[0]["losses"],
                 "device": runs[0]["device"]} for runs in results.values())
    print(f"{Path(a.ckpt_dir).name}, mode {a.mode}, batch {a.batch_size} x {a.seq_len}, {a.rounds} x {a.steps} steps, "
          f"{ours['device']}")
    print(f"{'':12}{'tokens/s':>10}{'best':>10}{'peak MiB':>10}  first-step loss")
    for name, r in (("finetune.py", ours), ("HF", hf)):
        print(f"{name:12}{r['tok_per_s']:10.1f}{r['best']:10.1f}{r['peak_mib']:10.0f}  {r['losses'][0]:.4f}")
    print(f"throughput ratio {ours['tok_per_s'] / hf['tok_per_s']:.2f}x (best step {ours['best'] / hf['best']:.2f}x), "
          f"memory ratio {ours['peak_mib'] / hf['peak_mib']:.3f}x")


if __name__ == "__main__":
    main()
