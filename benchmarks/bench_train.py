"""
Training throughput and peak memory: finetune.py's step (a model file + its loss, AdamW, clipping) against a
plain HF transformers step (`LlamaForCausalLM(input_ids, labels=...).loss`, the same AdamW and clipping), on
the same checkpoint, batch, dtype and trainable set.

- Throughput: both models in one process, their steps alternating (ours, HF, ours, HF, ...), so a shared machine
  that slows down or speeds up weighs on both alike. Tokens/s counts input tokens over the steps after the first
  (warm-up): the median step, and the best step (the least disturbed one, closest to the code's own speed).
- Memory: each side alone in its own process: peak RSS above the RSS after imports (CPU), or CUDA max allocated.

    python download.py                                   # checkpoints/SmolLM2-135M-Instruct
    python benchmarks/bench_train.py                     # 135M, full fine-tuning, 4 x 256 tokens, 6 steps
    python benchmarks/bench_train.py --mode norm --seq_len 512 --steps 10
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


def run(a):
    """Train `a.side` (ours, hf, or both alternating) for a.steps steps in this process; print one JSON line."""
    import torch
    sys.path.insert(0, str(ROOT))
    import finetune as ft
    import smollm2
    from transformers import LlamaForCausalLM
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    base = rss_mib()  # after every import: only what the training itself allocates counts

    def setup(side):
        if side == "ours":
            model = smollm2.SmolLM2.from_pretrained(a.ckpt_dir, device=device, dtype=torch.float32).train()
        else:
            model = LlamaForCausalLM.from_pretrained(a.ckpt_dir, dtype=torch.float32).to(device).train()
        # Both loaders memory-map the safetensors file; such pages count in RSS only while the kernel keeps
        # them resident, which depends on what else runs. Copies in anonymous memory make the peak reproducible.
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data.clone()
        ft.set_trainable(model, ft.TrainConfig(mode=a.mode))  # HF's parameter names are ours
        return model, ft.build_optimizer(model, lr=1e-5, weight_decay=0.01)

    sides = ["ours", "hf"] if a.side == "both" else [a.side]
    models = {side: setup(side) for side in sides}
    vocab = models[sides[0]][0].lm_head.weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (a.steps, a.batch_size, a.seq_len + 1), generator=gen).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.dtype == "bfloat16")
    rates, losses = {s: [] for s in sides}, {s: [] for s in sides}
    for step in range(a.steps):
        x, y = tokens[step, :, :-1].contiguous(), tokens[step, :, 1:].contiguous()
        for side, (model, opt) in models.items():
            t0 = time.perf_counter()
            with autocast:
                if side == "ours":
                    loss = ft.loss_sum(model, x, y, None) / y.numel()
                else:  # HF's own loss; shift_labels gives it our targets (it would otherwise shift x and drop one)
                    loss = model(input_ids=x, labels=x, shift_labels=y).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[side].append(loss.item())  # also synchronises CUDA before the clock stops
            rates[side].append(a.batch_size * a.seq_len / (time.perf_counter() - t0))
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" \
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    print(json.dumps({"rates": {s: r[1:] for s, r in rates.items()}, "losses": losses, "peak_mib": peak,
                      "device": str(device)}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_dir", default=str(ROOT / "checkpoints/SmolLM2-135M-Instruct"))
    p.add_argument("--mode", default="full", choices=["full", "norm", "frozen_embed"])
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--steps", type=int, default=6, help="timed steps + 1 warm-up")
    p.add_argument("--dtype", default="", help="float32 (CPU default) or bfloat16 autocast (CUDA default)")
    p.add_argument("--device", default="")
    p.add_argument("--side", choices=["ours", "hf", "both"], help=argparse.SUPPRESS)  # internal: one process
    a = p.parse_args()
    if not os.path.isfile(os.path.join(a.ckpt_dir, "config.json")):
        raise SystemExit(f"error: no checkpoint at {a.ckpt_dir}: run `python download.py`")
    if a.side:
        a.dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
        return run(a)
    results = {}
    for side, steps in (("both", a.steps), ("ours", 2), ("hf", 2)):  # memory: 2 steps reach the steady peak
        args = [f"--{k}={v}" for k, v in vars(a).items() if k not in ("steps", "side")]
        out = subprocess.run([sys.executable, __file__, *args, f"--steps={steps}", f"--side={side}"],
                             capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"error: the {side} run failed:\n{out.stderr[-2000:]}")
        results[side] = json.loads(out.stdout.strip().splitlines()[-1])
    both = results["both"]
    print(f"{Path(a.ckpt_dir).name}, mode {a.mode}, batch {a.batch_size} x {a.seq_len}, {a.steps} alternating "
          f"steps, {both['device']}")
    print(f"{'':12}{'tokens/s':>10}{'best':>10}{'peak MiB':>10}  first-step loss")
    for side, name in (("ours", "finetune.py"), ("hf", "HF")):
        r = both["rates"][side]
        print(f"{name:12}{statistics.median(r):10.1f}{max(r):10.1f}{results[side]['peak_mib']:10.0f}  "
              f"{both['losses'][side][0]:.4f}")
    med, best = ({s: f(both["rates"][s]) for s in ("ours", "hf")} for f in (statistics.median, max))
    print(f"throughput ratio {med['ours'] / med['hf']:.2f}x (best step {best['ours'] / best['hf']:.2f}x), "
          f"memory ratio {results['ours']['peak_mib'] / results['hf']['peak_mib']:.3f}x")


if __name__ == "__main__":
    main()
