"""
A decode step's attention: aten's CPU flash attention kernel (what F.scaled_dot_product_attention runs on a CPU,
and what a compiled step would call) against fast_decode.cpp's decode_attention (what compile_decode swaps in), one
query row a head against a cache of S slots, in float32 (the cache of fp32, int8 and int4 models) and bf16.

    python benchmarks/bench_decode_attention.py
    python benchmarks/bench_decode_attention.py --threads 2 --lengths 128,1024

For SmolLM2-135M's heads (9 query heads, 3 kv heads of 64) and Llama-3.2-1B's (32, 8, 64), random keys, values and
query, the mask all zeros (0 where a slot may be read, as the model files' cache mask is), both kernels on the
same tensors, one after the other, best of `repeats` runs of `calls` calls; "max diff" is the largest difference
between the two outputs.
"""
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fast_decode  # noqa: E402
from cli import cli  # noqa: E402

HEADS = {"smollm2-135m": (9, 3, 64), "llama3.2-1b": (32, 8, 64)}


def per_call_us(fn, calls: int, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def main(lengths: str = "128,512,2048", threads: int | None = None, calls: int = 200, repeats: int = 5):
    """Time the two attention kernels of a decode step.

    lengths: comma-separated cache lengths S
    threads: torch threads (default: torch's own choice)
    calls: calls per timed run
    repeats: timed runs per kernel (the best counts)
    """
    if not fast_decode.kernels():
        raise SystemExit("error: fast_decode.cpp could not be built here (its line above says why)")
    if threads:
        torch.set_num_threads(threads)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    ours = torch.ops.fast_decode.decode_attention
    cmd = " ".join(["python benchmarks/bench_decode_attention.py"] + sys.argv[1:])
    print(f"`{cmd}`: torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, load average {os.getloadavg()[0]:.1f}\n")
    print("| dtype | heads | S | flash kernel us/call | decode_attention us/call | speed-up | max diff |")
    print("|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for name, (H, Hkv, D) in HEADS.items():
            for S in (int(s) for s in lengths.split(",")):
                q = torch.randn(1, H, 1, D, dtype=dtype)
                k, v = torch.randn(2, 1, Hkv, S, D, dtype=dtype)
                mask = torch.zeros(1, 1, 1, S, dtype=dtype)
                theirs_us = per_call_us(lambda: flash(q, k, v, attn_mask=mask), calls, repeats)
                ours_us = per_call_us(lambda: ours(q, k, v, mask, D ** -0.5), calls, repeats)
                diff = (flash(q, k, v, attn_mask=mask)[0].float() - ours(q, k, v, mask, D ** -0.5).float()).abs()
                print(f"| {str(dtype)[6:]} | {name} ({H}, {Hkv} kv) | {S} | {theirs_us:.1f} | {ours_us:.1f} "
                      f"| {theirs_us / ours_us:.1f}x | {diff.max():.1e} |")
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    cli(main)
