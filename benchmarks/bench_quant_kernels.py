"""
Which low-bit kernel makes batch-1 decoding fastest on this CPU: every route PyTorch offers for a one-row product
with an int8 or int4 weight, timed through every layer's projections, against the fp32 and bf16 products, and
fast_decode.py's own layers (`weights="int8"`, `weights="int4"`: on fast_decode.cpp's integer kernels where they
build, else PyTorch's with bf16 activations; q/k/v and gate/up stacked).

    python benchmarks/bench_quant_kernels.py                 # SmolLM2-135M and Llama 3.2 1B layer shapes
    python benchmarks/bench_quant_kernels.py --layers 4      # fewer layers (quicker; more of it fits in cache)

The int8 routes hold the weight as int8 with one scale per output row (symmetric, absmax / 127); some also round
the activation row to int8 (A8W8, as llama.cpp's Q8_0 product does, which rounds it to blocks of 32):
- fp32 F.linear, bf16 oneDNN (reordered once): the float products, for reference (4 and 2 bytes per weight);
- `_weight_int8pack_mm` (bf16 or fp32 row): PyTorch's weight-only int8 kernel (gpt-fast's int8 path);
- `ao dynamic`: torch.ao's dynamic quantized Linear (`quantized.linear_dynamic`, x86 engine: fbgemm), which
  rounds the row to uint8 per tensor;
- `_int_mm`: the row rounded to int8 (one scale), an int8 x int8 -> int32 product, then both scales;
- `oneDNN qlinear`: oneDNN's int8 Linear (`onednn.qlinear_pointwise`, weight prepacked once, VNNI/AMX where the
  CPU has them), the row rounded to uint8 with one scale and zero point, output straight to fp32; `s8`: the row
  rounded symmetrically to int8 (no zero point), the scale passed as a tensor (no sync to read it);
- `dequantize blocks`: the int8 weight turned to bf16 a block of rows at a time (small enough to stay in
  cache) and multiplied there; one Python loop step per block;
- `_weight_int4pack_mm_for_cpu bf16`: PyTorch's int4 kernel, groups of 32 with a bf16 scale and zero (the row in
  bf16; in fp32 the kernel is not vectorized);
- `fast_decode int8` and `fast_decode int4`: fast_decode.py's own layers on fp32 weights (Int8Linear, Int4Linear:
  fast_decode.cpp's kernels, which round the row to int8 in blocks of 32 as llama.cpp does, where they build),
  each layer alone, a whole module call (fp32 row in and out), as a decode step makes it.
GB/s counts the weight bytes streamed (int8: a byte per weight, scales are 1/K of them; int4: 0.625, the
4-bit weights and a bf16 scale and zero per 32, on fast_decode.cpp 0.5625, the scale and zero a byte each) over the
time of all layers' products; "ms/token"
is that time, i.e. the floor the products alone put under one decode step; "max err" is the largest difference
from the fp32 product with the unrounded weights, relative to that product's largest value.
"""

import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_cpu_kernels import SHAPES, best_time  # noqa: E402  (the same layer shapes and timer)
from decode_timing import load_average, read_bandwidth_gbs  # noqa: E402
from fast_decode import fast, pack_int4_cpu, quantize_int4  # noqa: E402
from cli import cli  # noqa: E402


def quantize(w):
    """int8 weight and one fp32 scale per output row: w ~= q * scale[:, None]."""
    scale = w.abs().amax(1).clamp(min=1e-12) / 127
    return (w / scale[:, None]).round().to(torch.int8), scale


def routes():
    """name -> (prepare(w_fp32) -> state, product(x_fp32_row, state) -> (1, out) fp32)."""
    engine = torch.backends.quantized.engine

    def row_int8(x):  # symmetric per-row int8 rounding of the activations
        s = x.abs().amax().clamp(min=1e-12) / 127
        return (x / s).round().to(torch.int8), s

    def block_dequant(x, st, rows=256):
        q, scale = st
        xb = x.to(torch.bfloat16)
        out = torch.empty(1, q.size(0), dtype=torch.bfloat16)
        for i in range(0, q.size(0), rows):
            torch.mm(xb, q[i:i + rows].to(torch.bfloat16).t(), out=out[:, i:i + rows])
        return out.float() * scale

    def onednn_prepare(w):
        q, scale = quantize(w)
        return torch.ops.onednn.qlinear_prepack(q, None), scale, torch.zeros(len(scale), dtype=torch.long)

    def onednn_product(x, st):
        packed, scale, zp = st
        lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
        s = ((hi - lo) / 255).clamp(min=1e-12).item()
        z = int((-lo / s).round())
        qx = (x / s + z).round().clamp(0, 255).to(torch.uint8)
        return torch.ops.onednn.qlinear_pointwise(qx, s, z, packed, scale, zp, None, 1.0, 0, torch.float32,
                                                  "none", [], "")

    def onednn_s8_product(x, st):  # the row rounded symmetrically to int8: no zero point, scales as tensors
        packed, scale, zp = st
        s = x.abs().amax().clamp(min=1e-12) / 127
        qx = (x / s).round_().to(torch.int8)
        return torch.ops.onednn.qlinear_pointwise.tensor(qx, s, zp[:1], packed, scale, zp, None, 1.0, 0,
                                                         torch.float32, "none", [], "")

    def layer(w, weights):  # fast_decode's own layer on an fp32 model (as bench_llamacpp.py times), whole forward
        m = nn.Linear(w.size(1), w.size(0), bias=False)
        m.weight.data.copy_(w)
        return fast(nn.Sequential(m), weights=weights)[0]

    def int4_prepare(w):
        q, sz = quantize_int4(w)
        return pack_int4_cpu(q), sz.transpose(0, 1).contiguous()

    def ao_prepare(w):
        q, scale = quantize(w)
        qw = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(len(scale), dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qw, None)

    return {
        "fp32 F.linear": (lambda w: w, lambda x, w: F.linear(x, w)),
        "bf16 oneDNN": (lambda w: torch.ops.mkldnn._reorder_linear_weight(w.bfloat16(), 1),
                        lambda x, w: torch.ops.mkldnn._linear_pointwise(x.bfloat16(), w, None, "none", [], "")),
        "_weight_int8pack_mm bf16": (lambda w: (lambda q, s: (q, s.bfloat16()))(*quantize(w)),
                                     lambda x, st: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), *st)),
        "_weight_int8pack_mm fp32": (quantize, lambda x, st: torch.ops.aten._weight_int8pack_mm(x, *st)),
        f"ao dynamic ({engine})": (ao_prepare, lambda x, p: torch.ops.quantized.linear_dynamic(x, p, True)),
        "_int_mm (A8W8)": ((lambda w: (lambda q, s: (q.t().contiguous(), s))(*quantize(w))),
                           lambda x, st: (lambda qx, sx: torch._int_mm(qx, st[0]) * (sx * st[1]))(*row_int8(x))),
        "oneDNN qlinear (A8W8)": (onednn_prepare, onednn_product),
        "oneDNN qlinear s8 (A8W8)": (onednn_prepare, onednn_s8_product),
        "dequantize blocks bf16": (quantize, block_dequant),
        "_weight_int4pack_mm_for_cpu bf16": (int4_prepare, lambda x, st: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.bfloat16(), st[0], 32, st[1])),
        "fast_decode int8 (Int8Linear)": (lambda w: layer(w, "int8"), lambda x, m: m(x)),
        "fast_decode int4 (Int4Linear)": (lambda w: layer(w, "int4"), lambda x, m: m(x)),
    }


def products(name, n_layers, bw):
    dim, hidden, nh, nkv, depth = SHAPES[name]
    shapes = [(nh * 64, dim), (nkv * 64, dim), (nkv * 64, dim), (dim, nh * 64), (hidden, dim), (hidden, dim),
              (dim, hidden)]  # (out, in) of q, k, v, o, gate, up, down
    torch.manual_seed(0)
    weights = [[torch.randn(o, i) / i ** 0.5 for o, i in shapes] for _ in range(n_layers or depth)]
    x, h = torch.randn(1, dim), torch.randn(1, hidden)
    inputs = [x, x, x, x, x, x, h]
    n_int8 = sum(w.numel() for ws in weights for w in ws)
    for route, (prepare, product) in routes().items():
        states = None  # free the last route's copies before making this one's
        try:
            states = [[prepare(w) for w in ws] for ws in weights]
        except (RuntimeError, NotImplementedError) as e:
            print(f"| {name} | {route} | unavailable: {str(e).splitlines()[0][:80]} | | | |")
            continue
        ref, got = F.linear(h, weights[0][6]), product(h, states[0][6]).float()
        err = ((got - ref).abs().max() / ref.abs().max()).item()

        def run():
            for st in states:
                for s, inp in zip(st, inputs):
                    product(inp, s)

        with torch.inference_mode():
            t = best_time(run)
        per_weight = (4 if route.startswith("fp32") else 2 if route.startswith("bf16") else
                      0.5625 if route.startswith("fast_decode int4") else 0.625 if "int4" in route else 1)
        print(f"| {name} | {route} | {n_int8 * per_weight / t / 1e9:.1f} | {t * 1e3:.1f} "
              f"| {n_int8 * per_weight / bw / 1e6:.1f} | {err:.1e} |")


def main(layers: int | None = None):
    """Time every int8 and int4 route for one-row products.

    layers: layers per shape (default: the model's own count)
    """
    bw = read_bandwidth_gbs()
    print(f"`python benchmarks/bench_quant_kernels.py {' '.join(sys.argv[1:])}`: torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"read bandwidth {bw:.1f} GB/s, {load_average()}\n")
    print("| shapes | route | weight GB/s | ms/token (products) | bandwidth floor ms | max err |")
    print("|---|---|---|---|---|---|")
    for name in SHAPES:
        products(name, layers, bw)
    print(f"\n{load_average()} at the end")


if __name__ == "__main__":
    cli(main)
