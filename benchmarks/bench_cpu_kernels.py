"""
The CPU kernels behind batch-1 decoding, alone: what the model files' fast paths buy, and why.

    python benchmarks/bench_cpu_kernels.py                # SmolLM2-135M and Llama 3.2 1B layer shapes
    python benchmarks/bench_cpu_kernels.py --layers 8     # fewer layers (less memory, more cache effects)

1. One-row products (a decode step's matmuls) through every layer's weights, random, as many distinct weights
   as the model has so that they stream from memory and not from cache: PyTorch's F.linear against smollm2.py's
   `Linear` / `project` (fp32: the product split across threads; bf16: weights kept in oneDNN's layout, q/k/v
   and gate/up stacked). GB/s is weight bytes over time.
2. Attention of one query over S cached keys (SmolLM2-135M heads: 9 query, 3 key/value, head_dim 64): bf16
   F.scaled_dot_product_attention against the model files' CPU path (fp32, on an fp32 cache).
"""

import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import smollm2  # noqa: E402

# (dim, hidden_dim, n_heads, n_kv_heads, n_layers) of each model; head_dim 64 for both
SHAPES = {"SmolLM2-135M": (576, 1536, 9, 3, 30), "Llama-3.2-1B": (2048, 8192, 32, 8, 16)}


def best_time(fn, repeats=5) -> float:
    fn()  # warm-up (and, for the fast path, the one-time reorder)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def layer_modules(dim, hidden, nh, nkv, dtype):
    """One layer's projections as smollm2.py builds them (Attention and MLP own q/k/v and gate/up)."""
    attn, mlp = nn.Module(), nn.Module()
    attn.q_proj, attn.k_proj = smollm2.Linear(dim, nh * 64, bias=False), smollm2.Linear(dim, nkv * 64, bias=False)
    attn.v_proj, attn.o_proj = smollm2.Linear(dim, nkv * 64, bias=False), smollm2.Linear(nh * 64, dim, bias=False)
    mlp.gate_proj, mlp.up_proj = smollm2.Linear(dim, hidden, bias=False), smollm2.Linear(dim, hidden, bias=False)
    mlp.down_proj = smollm2.Linear(hidden, dim, bias=False)
    return attn.to(dtype), mlp.to(dtype)


def products(name, dtype, n_layers):
    dim, hidden, nh, nkv, depth = SHAPES[name]
    layers = [layer_modules(dim, hidden, nh, nkv, dtype) for _ in range(n_layers or depth)]
    x, h = torch.randn(1, dim, dtype=dtype), torch.randn(1, hidden, dtype=dtype)
    nbytes = sum(p.nbytes for attn, mlp in layers for p in [*attn.parameters(), *mlp.parameters()])

    def plain():
        for attn, mlp in layers:
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj):
                F.linear(x, lin.weight)
            F.linear(h, mlp.down_proj.weight)

    def ours():
        for attn, mlp in layers:
            smollm2.project(attn, x, (attn.q_proj, attn.k_proj, attn.v_proj))
            attn.o_proj(x)
            smollm2.project(mlp, x, (mlp.gate_proj, mlp.up_proj))
            mlp.down_proj(h)

    with torch.inference_mode():
        t_plain, t_ours = best_time(plain), best_time(ours)
    dt = str(dtype).removeprefix("torch.")
    print(f"| {name} | {dt} | {len(layers)} | {nbytes / 1e6:.0f} | {nbytes / t_plain / 1e9:.1f} "
          f"| {nbytes / t_ours / 1e9:.1f} | {t_plain / t_ours:.2f}x |")


def attention(S):
    q = torch.randn(1, 9, 1, 64, dtype=torch.bfloat16)  # a bf16 model's query, keys and values
    k, v = torch.randn(1, 3, S, 64, dtype=torch.bfloat16), torch.randn(1, 3, S, 64, dtype=torch.bfloat16)
    kf, vf = k.float(), v.float()  # the model files' fp32 cache on a CPU: the same values
    sdpa = F.scaled_dot_product_attention
    run = {torch.bfloat16: lambda: [sdpa(q, k, v, enable_gqa=True) for _ in range(100)],
           torch.float32: lambda: [sdpa(q.float(), kf, vf, enable_gqa=True).bfloat16() for _ in range(100)]}
    with torch.inference_mode():
        t = {dt: best_time(fn) / 100 for dt, fn in run.items()}
    print(f"| {S} | {t[torch.bfloat16] * 1e6:.1f} | {t[torch.float32] * 1e6:.1f} "
          f"| {t[torch.bfloat16] / t[torch.float32]:.2f}x |")


def main(layers: int | None = None):
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, oneDNN bf16 path: {smollm2.BF16_ONEDNN}\n")
    print("One-row products through every layer's projections (best of 5):\n")
    print("| shapes | dtype | layers | MB | F.linear GB/s | smollm2.py GB/s | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for name in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            products(name, dtype, layers)
    print("\nAttention of one query (9 query heads, 3 key/value heads, head_dim 64), us per call (best of 5 x 100;"
          " fp32: the bf16 query converted, keys and values from an fp32 cache, the result rounded back, as the"
          " model files do):\n")
    print("| keys | bf16 us | fp32 us | bf16 / fp32 |")
    print("|---|---|---|---|")
    for S in (40, 120, 1000):
        attention(S)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
