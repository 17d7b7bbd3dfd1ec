"""
The CPU kernels behind batch-1 decoding, alone: what fast_decode.py's paths buy, what it leaves out, and why.

    python benchmarks/bench_cpu_kernels.py                # SmolLM2-135M and Llama 3.2 1B layer shapes
    python benchmarks/bench_cpu_kernels.py --layers 8     # fewer layers (less memory, more cache effects)

1. One-row products (a decode step's matmuls) through every layer's weights, random, as many distinct weights
   as the model has so that they stream from memory and not from cache: PyTorch's F.linear against
   fast_decode's `FastLinear` (fp32: the product split across threads, and FastLinear's choice between the two,
   made by fast() timing both; bf16: the weight kept in oneDNN's layout), and the same products with q/k/v and
   gate/up stacked into one weight each (bf16: one reordered copy each; fp32: F.linear on stacked copies), which
   fast(model) does not make for float weights: they would be a second copy of the parameters (fast_decode
   stacks its quantized layers, which hold no float copy). GB/s is weight bytes over time.
2. Attention of one query over S cached keys (SmolLM2-135M heads: 9 query, 3 key/value, head_dim 64): bf16
   F.scaled_dot_product_attention against fp32 attention on an fp32 cache with the result rounded back (what
   the model files did for bf16 models on a CPU before fast_decode; left out of it unless this shows a gain).
"""

import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fast_decode  # noqa: E402
from cli import cli  # noqa: E402

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


def layer_linears(dim, hidden, nh, nkv, dtype) -> list[nn.Linear]:
    """One layer's projections, in the order a decode step runs them: q, k, v, o, gate, up, down."""
    shapes = [(dim, nh * 64), (dim, nkv * 64), (dim, nkv * 64), (nh * 64, dim), (dim, hidden), (dim, hidden),
              (hidden, dim)]
    return [nn.Linear(i, o, bias=False).to(dtype) for i, o in shapes]


def products(name, dtype, n_layers):
    dim, hidden, nh, nkv, depth = SHAPES[name]
    layers = [layer_linears(dim, hidden, nh, nkv, dtype) for _ in range(n_layers or depth)]
    x, h = torch.randn(1, dim, dtype=dtype), torch.randn(1, hidden, dtype=dtype)
    inputs = [x, x, x, x, x, x, h]  # (o_proj's input has width dim too: n_heads * 64 = dim in both shapes)
    nbytes = sum(lin.weight.nbytes for lins in layers for lin in lins)
    fast = [fast_decode.fast(nn.ModuleList(lins)) for lins in layers]  # the same weights, as FastLinear

    def plain():
        for lins in layers:
            for lin, inp in zip(lins, inputs):
                F.linear(inp, lin.weight)

    def ours():
        for lins in fast:
            for lin, inp in zip(lins, inputs):
                lin(inp)

    run = {"plain": plain, "fast": ours}
    if dtype == torch.float32:
        n = torch.get_num_threads()

        def split():
            for lins in fast:
                for lin, inp in zip(lins, inputs):
                    lin.split_product(inp, n)

        stacked = [[torch.cat([lin.weight for lin in lins[:3]]), lins[3].weight,
                    torch.cat([lin.weight for lin in lins[4:6]]), lins[6].weight] for lins in layers]

        def plain_stacked():
            for qkv, o, gate_up, down in stacked:
                for w, inp in ((qkv, x), (o, x), (gate_up, x), (down, h)):
                    F.linear(inp, w)

        if n > 1:
            run["split"] = split
        run["stacked"] = plain_stacked
    if dtype == torch.bfloat16 and fast_decode.BF16_ONEDNN:
        reorder = lambda ws: torch.ops.mkldnn._reorder_linear_weight(torch.cat(ws), 1)  # noqa: E731
        stacked = [[reorder([lin.weight for lin in lins[:3]]), reorder([lins[3].weight]),
                    reorder([lin.weight for lin in lins[4:6]]), reorder([lins[6].weight])] for lins in layers]

        def ours_stacked():
            for qkv, o, gate_up, down in stacked:
                for w, inp in ((qkv, x), (o, x), (gate_up, x), (down, h)):
                    torch.ops.mkldnn._linear_pointwise(inp, w, None, "none", [], "")

        run["stacked"] = ours_stacked
    with torch.inference_mode():
        t = {k: best_time(fn) for k, fn in run.items()}
    dt = str(dtype).removeprefix("torch.")
    gbs = lambda k: f"{nbytes / t[k] / 1e9:.1f}" if k in t else "-"  # noqa: E731
    print(f"| {name} | {dt} | {len(layers)} | {nbytes / 1e6:.0f} | {gbs('plain')} | {gbs('split')} | {gbs('fast')} "
          f"| {t['plain'] / t['fast']:.2f}x | {gbs('stacked')} |")


def attention(S):
    q = torch.randn(1, 9, 1, 64, dtype=torch.bfloat16)  # a bf16 model's query, keys and values
    k, v = torch.randn(1, 3, S, 64, dtype=torch.bfloat16), torch.randn(1, 3, S, 64, dtype=torch.bfloat16)
    kf, vf = k.float(), v.float()  # an fp32 cache holding the same values
    sdpa = F.scaled_dot_product_attention
    run = {torch.bfloat16: lambda: [sdpa(q, k, v, enable_gqa=True) for _ in range(100)],
           torch.float32: lambda: [sdpa(q.float(), kf, vf, enable_gqa=True).bfloat16() for _ in range(100)]}
    with torch.inference_mode():
        t = {dt: best_time(fn) / 100 for dt, fn in run.items()}
    print(f"| {S} | {t[torch.bfloat16] * 1e6:.1f} | {t[torch.float32] * 1e6:.1f} "
          f"| {t[torch.bfloat16] / t[torch.float32]:.2f}x |")


def main(layers: int | None = None):
    """Time the decode kernels alone.

    layers: layers per shape (default: the model's own count)
    """
    print(f"`python benchmarks/bench_cpu_kernels.py {' '.join(sys.argv[1:])}`: torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"oneDNN bf16 kernels: {fast_decode.BF16_ONEDNN}\n")
    print("One-row products through every layer's projections (best of 5):\n")
    print("| shapes | dtype | layers | MB | F.linear GB/s | split GB/s | FastLinear GB/s | speed-up "
          "| stacked q/k/v, gate/up GB/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            products(name, dtype, layers)
    print("\nAttention of one query (9 query heads, 3 key/value heads, head_dim 64), us per call (best of 5 x 100;"
          " fp32: the bf16 query converted, keys and values from an fp32 cache, the result rounded back):\n")
    print("| keys | bf16 us | fp32 us | bf16 / fp32 |")
    print("|---|---|---|---|")
    for S in (40, 120, 1000):
        attention(S)


if __name__ == "__main__":
    cli(main)
