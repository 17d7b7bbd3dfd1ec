"""
fast_decode: faster batch-1 decoding on a CPU for the four model files, and their weights in 8 or 4 bits.

    import smollm2, fast_decode
    model = smollm2.SmolLM2.from_pretrained("checkpoints/SmolLM2-135M-Instruct")
    fast_decode.fast(model)                   # in place: the same numbers, faster products
    fast_decode.fast(model, weights="int4")   # or 4-bit weights, a scale and a zero per 32 ("int8": per row)

    # 4 bits without ever holding the float model: quantize once (a file beside model.safetensors), then load
    python fast_decode.py quantize --ckpt_dir checkpoints/SmolLM2-135M-Instruct --weights int4
    model = fast_decode.load(smollm2.SmolLM2, "checkpoints/SmolLM2-135M-Instruct", weights="int4")

As gpt-fast's quantize.py does, it works from outside the model: the model files call plain `nn.Linear` layers
and this module swaps them for layers with faster products, so a model file copied alone runs plain.
- `fast(model)`: parameters, names, `state_dict()`, training and LoRA stay those of `nn.Linear`; only CPU
  inference products change kernel (FastLinear; a bf16 model's one-row products on fast_decode.cpp's bf16 one).
- `weights="int8"` / `"int4"`: the quantized weights replace the float ones (held once; inference only).
  int8: one scale per output row. int4: groups of `group_size` weights along a row, each with a scale and a zero.
  On x86 CPUs both multiply on fast_decode.cpp's integer kernels (the input rounded to int8 in blocks of 32, as
  llama.cpp multiplies; compiled for the CPU on first use), faster than PyTorch's own; elsewhere on
  PyTorch's `_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu` (on CUDA `_weight_int4pack_mm`, written as
  gpt-fast uses it but never run: no GPU was at hand). The output head, and an embedding tied to it, is 6-bit
  groups in int4 models (Int6Linear, on fast_decode.cpp; int8 without it), as llama.cpp's Q4_0 keeps its output
  tensor in Q6_K; given `calibration=` token ids (or a quantized file made with `quantize --calibration FILE`), the
  head is A8W8 (below), whose kernel multiplied a 1B model's head faster than the int8 one before the one-call
  step below, not since, nor faster than the 6-bit one (docs/speed.md).
- `weights="a8w8"` (with `calibration=` token ids): int8 weights and 8-bit activations on fbgemm's integer
  kernel, faster than the weight-only int8 one on large matrices; SmoothQuant and float outlier channels keep
  its exactness (A8W8Linear).
- Quantized layers that a model calls one after another on one input (q/k/v, gate/up) are multiplied as one
  stacked matrix (Stack): one kernel call instead of three or two.
- The weight matrices the kernels stream, 2 MB or more (quantized tiles, a bf16 model's weights), are held on 2 MB
  pages (huge): on 4 kB ones a virtual machine spends much of a step translating addresses.
- `threads=True` (what the CLIs pass) also sets the thread count: one per core other jobs leave idle.
- A decode step of smollm2.py's and llama31.py's models whose products fast_decode.cpp takes (int8 or int4 weights
  in a float32 model, or a bf16 model's own weights) runs its layers in one call of fast_decode.cpp (OneCallTrunk):
  the hundreds of small calls around the products cost a small model's step more than its products do.
- `compile_decode(model)` (the CLIs' `--compile`): the one-token decode step of the others under torch.compile,
  which fuses the thousands of small ops around the products (smollm2.py's and llama31.py's models); its attention,
  one query row a head, on fast_decode.cpp's decode_attention.

Figures (speed, memory and perplexity against llama.cpp, per-op profiles, the machines) and how each choice
here was measured: docs/speed.md; the commands are in benchmarks/.
"""

import functools
import json
import logging
import os
import platform
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Threads


MAX_THREADS = torch.get_num_threads()  # torch's own choice (OMP_NUM_THREADS, else one per core), read at import


def busy_cpus(seconds: float = 0.1) -> float:
    """How many CPUs other processes keep busy, from /proc/stat over a short sample (0 where there is none)."""
    def times():
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]  # the "cpu" line: all CPUs, in clock ticks
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = times()
        time.sleep(seconds)
        total1, idle1 = times()
    except (OSError, ValueError, IndexError):
        return 0.0
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / max(total1 - total0, 1))


def decode_threads() -> int:
    """Threads for decoding now: one per core that other jobs leave idle, at least one, at most torch's default.
    A waiting OpenMP thread spins, so two threads beside another job lose their time slices to each other and
    decode 4-10x slower than one (docs/speed.md, busy machine)."""
    cores = min(MAX_THREADS, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else MAX_THREADS)
    return max(1, min(cores, round(cores - busy_cpus())))


# -----------------------------------------------------------------------------
# Float weights: the same parameters, faster products

# oneDNN's bf16 kernels exist where the CPU has AVX-512 (BF16 or AMX for full speed); x86 only, where it is tested
BF16_ONEDNN = (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
               and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def free_memory() -> int:
    """Bytes the OS can hand out (Linux's MemAvailable), else the free pages, else 0."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 0


def version(t: torch.Tensor) -> tuple:
    """What changes when t's values may have: its storage (`.data =` swaps it) and its version (bumped by every
    in-place update). subtle: tensors made under torch.inference_mode have no version to read."""
    return t.data_ptr(), None if t.is_inference() else t._version


class Reordered:
    """A bf16 weight in oneDNN's blocked layout, and the version of the weight it was made from: remade when the
    weight changed, kept only while it fits in half the free memory. Copies and pickles of it come out empty (a
    oneDNN tensor has no storage to copy), so a copied model remakes its own."""

    def __init__(self):
        self.source, self.key, self.weight = None, None, None

    def __deepcopy__(self, memo):
        return Reordered()

    def __reduce__(self):
        return Reordered, ()

    def get(self, w: torch.Tensor) -> torch.Tensor | None:
        if self.key != version(w) or self.source() is not w:
            self.weight = None  # free a stale copy before making the next
            fits = w.dtype == torch.bfloat16 and 2 * w.nbytes < free_memory()
            self.weight = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1) if fits else None
            self.source, self.key = weakref.ref(w), version(w)
        return self.weight


@torch.compiler.assume_constant_result  # (a compiled step keeps the count it was compiled with: dynamo cannot trace it)
def num_threads() -> int:
    return torch.get_num_threads()


class FastLinear(nn.Linear):
    """nn.Linear, same parameter, whose CPU inference products take faster kernels:
    - bf16: F.linear reorders the weight into oneDNN's blocked layout on every call; this keeps the reordered
      copy (Reordered) and multiplies with it.
    - fp32, one row, several threads: MKL's one-row product runs on one thread; viewed as one block of rows
      per thread, bmm runs it on every core. Whether that pays depends on the CPU (it did on an AVX2 EPYC, not
      on an AMX Xeon), so fast() times both on each shape and sets `split` where it pays (time_split).
    - bf16, one row (decoding), where fast() found the model in bf16: fast_decode.cpp's bf16 product
      (`bf16_kernel`), which reads the weight as it is, in eager and compiled steps alike.
    Training and autograd take nn.Linear's own F.linear, and so does torch.compile for bf16 rows other than one (it
    cannot trace the reordered copy's bookkeeping); a compiled decode step keeps the fp32 split (compile_decode)."""

    split = False
    bf16_kernel = False

    def forward(self, x):
        if not torch.is_grad_enabled() and x.is_cpu:
            if self.bf16_kernel and x.numel() == self.in_features and x.dtype == self.weight.dtype == torch.bfloat16:
                return output(torch.ops.fast_decode.bf16_linear(x, self.weight), x, self.bias)
            if x.dtype == torch.bfloat16 and BF16_ONEDNN and not torch.compiler.is_compiling():
                if "reordered" not in self.__dict__:
                    self.reordered = Reordered()
                w = self.reordered.get(self.weight)
                if w is not None:
                    return torch.ops.mkldnn._linear_pointwise(x, w, self.bias, "none", [], "")
            elif self.split and x.numel() == self.in_features and x.dtype == self.weight.dtype:
                return self.split_product(x, num_threads())
        return F.linear(x, self.weight, self.bias)

    def split_product(self, x, n):
        """The one-row product, one block of out_features / n rows per thread, as one batched matmul."""
        if n < 2 or self.out_features % n:
            return F.linear(x, self.weight, self.bias)
        w = self.weight.view(n, self.out_features // n, self.in_features)  # a view, no copy
        y = torch.bmm(x.reshape(1, 1, -1).expand(n, 1, -1), w.transpose(1, 2)).view(x.shape[:-1] + (-1,))
        return y if self.bias is None else y + self.bias


@torch.no_grad()
def time_split(layers: list[FastLinear], calls: int = 8):
    """For each fp32 weight shape: time F.linear and the split alternately on the layers of that shape (their
    weights stream from memory, as in decoding) and set `split` on them where its median time is lower."""
    n = torch.get_num_threads()
    shapes = {}
    for m in layers:
        m.split = False
        if n > 1 and m.weight.dtype == torch.float32 and m.weight.is_cpu and m.out_features % n == 0:
            shapes.setdefault(tuple(m.weight.shape), []).append(m)
    for (out, inp), group in shapes.items():
        x = torch.randn(1, inp)
        times = ([], [])
        for i in range(2 * calls):
            m, split = group[i // 2 % len(group)], i % 2
            t0 = time.perf_counter()
            m.split_product(x, n) if split else F.linear(x, m.weight)
            times[split].append(time.perf_counter() - t0)
        for m in group:
            m.split = statistics.median(times[1]) < statistics.median(times[0])


# -----------------------------------------------------------------------------
# Quantized weights, held once


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 rows: w ~= q * scale[:, None], |q| <= 127, one bf16 scale per row. q is rounded against the
    bf16 scale the kernel multiplies by (where the scale rounded down, a row's largest weight clips by <= 1/256)."""
    scale = (w.detach().float().abs().amax(1) / 127).clamp(min=torch.finfo(torch.bfloat16).tiny).bfloat16()
    q = (w.detach().float() / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group_size: int = 32, rounding: str = "nearest"):
    """Asymmetric 4-bit groups: each run of group_size weights along a row gets a scale and zero and each weight
    the nearest of (q - 8) * scale + zero, q in 0..15, the form PyTorch's int4 kernels multiply (quantize_groups).
    -> (q: uint8 (n, k / 2), two per byte, the even column's in the high nibble, as the CUDA kernel packs them;
        scales_and_zeros: bf16 (n, k / group_size, 2))"""
    q, scales_and_zeros = quantize_groups(w, 4, group_size, rounding)
    return (q[:, 0::2] << 4) | q[:, 1::2], scales_and_zeros


def quantize_groups(w: torch.Tensor, bits: int, group_size: int = 32, rounding: str = "nearest"):
    """Asymmetric groups of `bits` bits (4; 6 for an int4 model's output head, as Int6Linear holds it): each run of
    group_size weights along a row gets a scale and zero and each weight the nearest of (q - mid) * scale + zero, q
    in 0..top (top = 2^bits - 1, mid = 2^(bits - 1)). The step spans the group's range (q = 0 at its minimum, top at
    its maximum); rounding="hqq" then moves each zero to where the rounding errors are smaller (hqq_zeros). Each
    row's scales are whole multiples 1..255 of one power of two and its zeros -127..127 of another (on_grid), so
    that fast_decode.cpp holds a group's scale and zero in two bytes (4-bit weights: 4.5 bits a weight with group 32,
    as llama.cpp's Q4_0 and Q4_K; free bf16 ones took four, 5 bits) and they are still exact bf16 values for
    PyTorch's kernels. q is rounded against the scale and zero so held.
    -> (q: uint8 (n, k), one per byte; scales_and_zeros: bf16 (n, k / group_size, 2))"""
    n, k = w.shape
    if n > ROWS:  # (a block of rows at a time: a large head's float copies would double what loading it holds)
        parts = [quantize_groups(w[i:i + ROWS], bits, group_size, rounding) for i in range(0, n, ROWS)]
        return tuple(torch.cat(t) for t in zip(*parts))
    top, mid = 2 ** bits - 1, 2 ** (bits - 1)
    g = w.detach().float().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = on_grid(((hi - lo) / top).clamp(min=1e-10), SCALE_CODES, 1)  # (n, k / group_size)
    zero = on_grid(lo + mid * scale, ZERO_CODES)
    if rounding == "hqq":
        zero = on_grid(hqq_zeros(g, scale, zero, top), ZERO_CODES)
    elif rounding != "nearest":
        raise ValueError(f"rounding={rounding!r}: use 'nearest' or 'hqq'")
    q = ((g - zero[..., None]) / scale[..., None] + mid).round_().clamp_(0, top).to(torch.uint8).view(n, k)
    return q, torch.stack([scale, zero], -1).bfloat16()


ROWS = 4096  # rows quantized or packed at a time (a multiple of the kernels' 16)
SCALE_CODES, ZERO_CODES = 255, 127  # a group's scale as a uint8 code (0 unused), its zero as an int8 one
# a quantized int4 file's metadata: its scales and zeros are on_grid's, its output head 6-bit where the kernels are
INT4_FORM = "grid scales, 6-bit head"


def grid_unit(v: torch.Tensor, codes: int) -> torch.Tensor:
    """The least power of two u per row of v (..., G) with every |v| <= codes * u: (..., 1). (frexp is exact:
    max / codes = m * 2^e, m in [0.5, 1), so u = 2^e, or 2^(e - 1) where m is 0.5.)"""
    m, e = torch.frexp(v.abs().amax(-1, keepdim=True).clamp(min=1e-30) / codes)
    return torch.ldexp(torch.ones_like(m), e - (m == 0.5).int())


def on_grid(v: torch.Tensor, codes: int, least: int = -ZERO_CODES) -> torch.Tensor:
    """v (..., G) rounded to whole multiples least..codes of its row's grid_unit."""
    u = grid_unit(v, codes)
    return (v / u).round_().clamp_(least, codes) * u


def hqq_zeros(g, scale, zero, top: int = 15, steps: int = 20, p: float = 0.7, beta: float = 10.0,
              kappa: float = 1.01):
    """Half-Quadratic Quantization's zero points (Badri & Shaji 2023, "Half-Quadratic Quantization of Large
    Machine Learning Models", github.com/mobiusml/hqq, optimize_weights_proximal_legacy; no calibration data):
    minimise the l_p norm (p < 1: a few large errors cost less than many small ones) of w - dequant(q) over each
    group's zero, scale fixed, by alternating a shrinkage of the error and a closed-form zero, for at most `steps`
    rounds while the mean |error| falls. g (n, G, group_size), scale and zero (n, G) as quantize_groups makes them
    for q in 0..top; in HQQ's terms a weight is (q - z) * scale, with z = mid - zero / scale."""
    mid = (top + 1) // 2
    s, z = scale[..., None], (mid - zero / scale)[..., None]
    best, best_z = float("inf"), z
    for _ in range(steps):
        q = (g / s + z).round_().clamp_(0, top)
        e = g - (q - z) * s
        err = e.abs().mean().item()
        if err >= best:
            break
        best, best_z = err, z
        e = e.sign() * F.relu(e.abs() - e.abs().add(1e-8).pow(p - 1) / beta)  # the l_p proximal step
        z = (q - (g - e) / s).mean(-1, keepdim=True)
        beta *= kappa
    return ((mid - best_z) * s)[..., 0]


def unpack_int4(q: torch.Tensor) -> torch.Tensor:
    """(n, k / 2) uint8, two values per byte (quantize_int4's order) -> (n, k) int32, each in 0..15."""
    return torch.stack([q >> 4, q & 15], -1).view(q.size(0), -1).int()


def dequantize_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """The fp32 weights (n, k) that quantize_int4's q and scales_and_zeros stand for."""
    return dequantize_groups(unpack_int4(q), scales_and_zeros, 4)


def dequantize_groups(q: torch.Tensor, scales_and_zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """The fp32 weights (..., k) that quantize_groups' q (..., k), one per byte, and scales_and_zeros (..., G, 2)
    stand for: (q - 2^(bits - 1)) * scale + zero."""
    v = q.float().unflatten(-1, (scales_and_zeros.size(-2), -1))  # (..., G, group_size)
    sz = scales_and_zeros.float()
    return ((v - 2 ** (bits - 1)) * sz[..., :1] + sz[..., 1:]).flatten(-2)


def int4_fits(in_features: int, out_features: int, group_size: int) -> bool:
    """Whether PyTorch's CPU int4 kernel takes this shape (it needs 16 | out_features); a layer that it does not
    take is quantized to int8 instead."""
    return in_features % group_size == 0 and out_features % 16 == 0


# -----------------------------------------------------------------------------
# Integer products: fast_decode.cpp, compiled for this CPU on first use

KERNELS = Path(__file__).with_name("fast_decode.cpp")


def cpu_flags() -> set:
    """The CPU's instruction set extensions as Linux names them (empty where /proc/cpuinfo is not there)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


@functools.cache
def kernels() -> bool:
    """Whether fast_decode.cpp's integer products are loaded (torch.ops.fast_decode), compiling them on the first
    call (a few seconds; torch.utils.cpp_extension keeps the build under ~/.cache/torch_extensions, or
    TORCH_EXTENSIONS_DIR). They multiply 4- and 8-bit weights with 8-bit activations in integer registers, faster
    than PyTorch's own int4 and int8 CPU kernels, one bf16 row with bf16 weights (AVX-512 BF16 where the CPU has
    it) (docs/speed.md, "Integer kernels"), and a decode step's attention (use_decode_attention). x86 only:
    AVX-512 with VNNI where PyTorch itself runs AVX-512 code (so ATEN_CPU_CAPABILITY=avx2 holds both to AVX2), else
    AVX2. Without them (another CPU, no C++ compiler) the layers use PyTorch's kernels, and say so once."""
    capability = torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() not in ("x86_64", "amd64") or capability not in ("AVX2", "AVX512"):
        return False
    flags = cpu_flags()
    wide = capability == "AVX512" and {"avx512bw", "avx512vl", "avx512_vnni"} <= flags
    bf16 = wide and "avx512_bf16" in flags
    isa = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"] if wide else []
    isa += ["-mavx512bf16"] if bf16 else []
    builder = logging.getLogger("torch.utils.cpp_extension")
    level = builder.level
    builder.setLevel(logging.ERROR)  # (its warnings about the compiler: the one line below says what matters)
    try:
        from torch.utils.cpp_extension import load
        start = time.perf_counter()
        name = "fast_decode_" + ("avx512_bf16" if bf16 else "avx512" if wide else "avx2")
        load(name=name, sources=[str(KERNELS)], is_python_module=False,
             extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp", *isa], extra_ldflags=["-fopenmp"])
        if time.perf_counter() - start > 2:  # (it compiled: a kept build loads in milliseconds)
            print(f"fast_decode: compiled {KERNELS.name} for this CPU in {time.perf_counter() - start:.0f} s (once: "
                  "torch keeps the build)", file=sys.stderr)
    except Exception as e:  # (no compiler, no ninja, a missing header: each raises its own kind)
        # the compiler's or the shell's own words, not the build's command lines
        said = [line.strip() for line in str(e).splitlines() if line.strip() and "TORCH_EXTENSION_NAME" not in line
                and not line.startswith(("Error building extension", "[", "FAILED", "ninja: build stopped"))]
        print(f"fast_decode: could not compile {KERNELS.name} ({said[0] if said else type(e).__name__}); the 4- and "
              "8-bit layers, bf16 rows and compiled attention use PyTorch's slower kernels", file=sys.stderr)
        return False
    finally:
        builder.setLevel(level)
    for op in ("int4_linear", "int8_linear", "bf16_linear"):  # what torch.compile traces in their place: the shape
        torch.library.register_fake(f"fast_decode::{op}")(
            lambda x, w, *scales: x.new_empty(x.numel() // x.size(-1), w.size(0), dtype=torch.float32))
    torch.library.register_fake("fast_decode::decode_attention")(lambda q, k, v, mask, scale: q.new_empty(q.shape))
    return True


def integer_kernel(in_features: int, out_features: int, group_size: int = 32) -> bool:
    """Whether fast_decode.cpp's products take a layer of this shape (64 | in_features, rows in tiles of 16) and
    4-bit group size (any check_weights takes that divides in_features)."""
    return in_features % max(64, group_size) == 0 and out_features % 16 == 0 and kernels()


HUGE_PAGE = 2 ** 21  # bytes: a transparent huge page (x86-64)


def huge(t: torch.Tensor, release: bool = False) -> torch.Tensor:
    """t (a layer's weights, once fast_decode.cpp is loaded) copied onto 2 MB pages where it fills one or more
    (fast_decode.cpp's huge_pages: a decode step streams every weight, and on 4 kB pages a virtual machine spends
    much of that time translating addresses), else t itself. release: t's own pages are handed back as it is copied
    (a parameter, which may be a checkpoint's memory map)."""
    big = t.is_cpu and t.numel() * t.element_size() >= HUGE_PAGE
    return torch.ops.fast_decode.huge_pages(t, release) if big else t


def release_free_memory():
    """Once a model's weights are copied (quantized, packed, onto huge pages): the memory their originals held, which
    the C library keeps in its heap when freed, handed back (fast_decode.cpp's release_free_memory), where the kernels
    are loaded (a float32 model's fast() never loads them)."""
    if kernels.cache_info().currsize and kernels():
        torch.ops.fast_decode.release_free_memory()


def bf16_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """x as the (rows, k) bf16 matrix the int8 and int4 kernels take (no cast where it is bf16 already)."""
    x = x.reshape(-1, k)
    return x if x.dtype == torch.bfloat16 else x.bfloat16()


def output(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A kernel's (rows, n) bf16 product y, shaped and typed as x, plus the bias."""
    y = y.view(x.shape[:-1] + y.shape[-1:])
    y = y if y.dtype == x.dtype else y.to(x.dtype)
    return y if bias is None else y + bias


class Int8Linear(nn.Linear):
    """A linear layer held only as int8 weights with one bf16 scale per output row (quantize_int8): 1 byte per
    weight streamed instead of fp32's 4. On x86 CPUs fast_decode.cpp multiplies them with the input rounded to
    int8 in blocks of 32 (llama.cpp's Q8_0 x Q8_0); elsewhere PyTorch's weight-only int8 kernel, which is
    vectorized for bf16 activations only (fp32 ones run 5-8x slower), so the input is rounded to bf16 for it.
    The output comes back in the model's dtype. `weight` is the dequantized weight, made when read (the model
    files read a head's dtype and device from it)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None = None):
        nn.Module.__init__(self)  # (not nn.Linear's: it would make a float weight)
        self.out_features, self.in_features = n, k = q.shape
        self.scale, self.dtype, self.bias = scale.bfloat16(), dtype, bias
        self.integer = q.is_cpu and integer_kernel(k, n)
        if self.integer:  # fast_decode.cpp's tiles of 16 rows, each weight + 128 as a byte
            q = huge((q.view(torch.uint8) ^ 128).view(n // 16, 16, k // 4, 4).transpose(1, 2).reshape(n, k))
        self.q = q

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The dequantized weights of rows ids (any shape) -> ids.shape + (in_features,), in dtype."""
        if self.integer:
            n, k = self.q.shape
            tiles = self.q.view(n // 16, k // 4, 16, 4)[ids // 16, :, ids % 16]  # (*ids.shape, k / 4, 4)
            q = (tiles ^ 128).view(torch.int8).reshape(*ids.shape, k)
        else:
            q = self.q[ids]
        return q.to(self.dtype).mul_(self.scale[ids].to(self.dtype)[..., None])

    def forward(self, x):
        if self.integer:
            return output(torch.ops.fast_decode.int8_linear(x, self.q, self.scale), x, self.bias)
        x2 = bf16_rows(x, self.in_features)
        if not x2.is_cpu:  # (gpt-fast's int8 product; never run: no GPU was at hand)
            y = F.linear(x2, self.q.to(x2.dtype)) * self.scale
        elif self.in_features % 16 == 0:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.q, self.scale)
        else:  # subtle: the kernel reads past the row (wrong sums, or a crash) unless 16 divides it
            y = (F.linear(x2.float(), self.q.float()) * self.scale.float()).bfloat16()  # its sums, slowly
        return output(y, x, self.bias)

    @property
    def weight(self) -> torch.Tensor:
        return self.rows(torch.arange(self.out_features))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_int4_cpu(q: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """quantize_int4's q (n, k / 2) in the CPU kernel's packed layout, `rows` rows at a time: the layout packs blocks
    of 32 (AVX2) or 64 (AVX-512) rows apart, so chunks of 256 rows pack as the whole does, and the int32 copy that
    the packing takes stays small (large passing copies leave the heap fragmented: +130 MB at peak on SmolLM2)."""
    out = torch.empty_like(q)
    for i in range(0, len(q), rows):
        out[i:i + rows] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(q[i:i + rows]), 1)
    return out


def int4_inner_k_tiles(k: int) -> int:
    """The CUDA kernel's K tiling (16 * tiles must divide k), as gpt-fast picks it."""
    return next(t for t in (8, 4, 2) if k % (16 * t) == 0)


def pack_int4_tiles(q: torch.Tensor, scales_and_zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_int4's q (n, k / 2) and scales_and_zeros (n, k / group, 2) in fast_decode.cpp's tiles of 16 rows:
    each tile k / 8 chunks of 64 bytes, chunk c's byte 4r + i holding weights 8c + i (low nibble) and 8c + 4 + i
    (high) of row r; the scales and zeros as tile_codes."""
    n, k = q.size(0), 2 * q.size(1)
    v = torch.stack([q >> 4, q & 15], -1).view(n // 16, 16, k // 8, 2, 4)  # (tile, row, chunk, half, i): weight 8c+4h+i
    tiles = (v[..., 0, :] | v[..., 1, :] << 4).permute(0, 2, 1, 3)  # (tile, chunk, row, i)
    return tiles.contiguous().view(n, k // 2), tile_codes(scales_and_zeros)


def unpack_int4_tiles(tiles: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pack_int4_tiles undone: quantize_int4's (q (n, k / 2), scales_and_zeros (n, k / group, 2))."""
    n, k = tiles.size(0), 2 * tiles.size(1)
    t = tiles.view(n // 16, k // 8, 16, 4).permute(0, 2, 1, 3)  # (tile, row, chunk, i)
    v = torch.stack([t & 15, t >> 4], -2).reshape(n, k)  # each weight's q, in order
    rows = codes.permute(0, 3, 1, 2).reshape(n, *codes.shape[1:3])
    return (v[:, 0::2] << 4) | v[:, 1::2], scales_from_codes(rows)


def tile_codes(scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """quantize_groups' scales_and_zeros (n, G, 2) as fast_decode.cpp's tiles hold them: uint8 (n / 16, 1 + G, 2, 16),
    first each row's two grid units' exponents (int8), then per group each row's scale code (uint8) and zero code
    (int8). Scales and zeros off on_grid's grid are refused."""
    n, groups = scales_and_zeros.shape[:2]
    sz = scales_and_zeros.float()
    units = torch.cat([grid_unit(sz[..., 0], SCALE_CODES), grid_unit(sz[..., 1], ZERO_CODES)], 1)  # (n, 2)
    codes = sz / units[:, None]
    if not (torch.equal(codes, codes.round()) and codes[..., 0].min() >= 0 and codes.abs().max() <= SCALE_CODES
            and codes[..., 1].abs().max() <= ZERO_CODES):
        raise ValueError("these scales and zeros are not on quantize_groups' grid (made by an earlier "
                         "fast_decode?): quantize the weights again")
    header = torch.frexp(units)[1] - 1  # (n, 2): each unit's exponent
    sz = torch.cat([header[:, None], codes.int()], 1).to(torch.int8).view(torch.uint8)  # (n, 1 + groups, 2)
    return sz.view(n // 16, 16, groups + 1, 2).permute(0, 2, 3, 1).contiguous()


def scales_from_codes(rows: torch.Tensor) -> torch.Tensor:
    """Rows of tile_codes (..., 1 + G, 2) uint8 -> their scales_and_zeros (..., G, 2) bf16."""
    codes = rows.view(torch.int8).int()
    codes[..., 1:, 0] &= 255  # (scale codes are unsigned)
    return torch.ldexp(codes[..., 1:, :].float(), codes[..., :1, :]).bfloat16()


def pack_int6_tiles(q: torch.Tensor, scales_and_zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_groups' 6-bit q (n, k) and scales_and_zeros (n, k / group, 2) in fast_decode.cpp's tiles of 16 rows
    (its grouped_tile): per block of 32 weights, the low nibbles as pack_int4_tiles lays a block out (4 chunks of
    64 bytes), then 2 chunks of the top two bits, chunk j's byte 4r + i holding in bits 2m, 2m + 1 those of row r's
    weight 16j + 4m + i -> (tiles (n, 3 k / 4) uint8, tile_codes)."""
    n, k = q.shape
    if n > ROWS:  # (a block of rows at a time, as quantize_groups)
        parts = [pack_int6_tiles(q[i:i + ROWS], scales_and_zeros[i:i + ROWS]) for i in range(0, n, ROWS)]
        return tuple(torch.cat(t) for t in zip(*parts))
    v = q.view(n // 16, 16, k // 32, 4, 2, 4)  # (tile, row, block, chunk, half, i): weight 32b + 8c + 4h + i
    nibbles = (v[..., 0, :] & 15) | (v[..., 1, :] & 15) << 4  # (tile, row, block, chunk, i)
    top = (v >> 4).view(n // 16, 16, k // 32, 2, 4, 4)  # (tile, row, block, j, m, i): weight 32b + 16j + 4m + i
    crumbs = top[..., 0, :] | top[..., 1, :] << 2 | top[..., 2, :] << 4 | top[..., 3, :] << 6  # (t, r, b, j, i)
    tiles = torch.cat([nibbles, crumbs], 3).permute(0, 2, 3, 1, 4)  # (tile, block, 6 chunks, row, i)
    return tiles.contiguous().view(n, 3 * k // 4), tile_codes(scales_and_zeros)


def unpack_int6_rows(tiles: torch.Tensor, codes: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows ids (any shape) of pack_int6_tiles' form -> their q (*ids.shape, k) and scales_and_zeros."""
    n, k = tiles.size(0), 4 * tiles.size(1) // 3
    v = tiles.view(n // 16, k // 32, 6, 16, 4)[ids // 16, :, :, ids % 16]  # (*ids.shape, block, 6 chunks, i)
    nibbles = torch.stack([v[..., :4, :] & 15, v[..., :4, :] >> 4], -2)  # (..., block, chunk, half, i)
    crumbs = v[..., 4:, :]  # (..., block, j, i)
    top = torch.stack([crumbs >> 2 * m & 3 for m in range(4)], -2)  # (..., block, j, m, i)
    q = nibbles.flatten(-3) | top.flatten(-3) << 4
    return q.flatten(-2), scales_from_codes(codes[ids // 16, :, :, ids % 16])


class Int4Linear(nn.Linear):
    """A linear layer held only as 4-bit weights in groups of group_size along each row, each group with a scale
    and zero (quantize_int4): 0.5625 bytes per weight with group 32 on fast_decode.cpp (a byte each for the scale
    and zero), 0.625 on PyTorch's kernels (two bf16). On x86 CPUs fast_decode.cpp multiplies
    them with the input rounded to int8 in blocks of 32 (llama.cpp's Q4_1 x Q8_1); elsewhere PyTorch's
    int4 kernel with bf16 activations, as Int8Linear. Both kernels' layouts are the CPU's own (PyTorch's differs
    between its AVX2 and AVX-512 builds), so the weights are packed here, where they run, from quantize_int4's
    portable form. `weight` is the dequantized weight, made when read."""

    def __init__(self, q: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, dtype: torch.dtype,
                 bias: torch.Tensor | None = None):
        nn.Module.__init__(self)  # (not nn.Linear's: it would make a float weight)
        self.out_features, self.in_features = q.size(0), 2 * q.size(1)
        self.group_size, self.dtype, self.bias = group_size, dtype, bias
        self.integer = q.is_cpu and integer_kernel(self.in_features, self.out_features, group_size)
        if self.integer:
            self.packed, self.scales_and_zeros = pack_int4_tiles(q, scales_and_zeros)
            self.packed = huge(self.packed)
            return
        if q.is_cpu:
            self.packed = pack_int4_cpu(q)
        else:  # gpt-fast's WeightOnlyInt4Linear; never run: no GPU was at hand
            self.packed = torch.ops.aten._convert_weight_to_int4pack(q, int4_inner_k_tiles(self.in_features))
        self.scales_and_zeros = scales_and_zeros.bfloat16().transpose(0, 1).contiguous()  # (k / group, n, 2)

    def forward(self, x):
        if self.integer:
            return output(torch.ops.fast_decode.int4_linear(x, self.packed, self.scales_and_zeros), x, self.bias)
        x2 = bf16_rows(x, self.in_features)
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu if x2.is_cpu else torch.ops.aten._weight_int4pack_mm
        return output(mm(x2, self.packed, self.group_size, self.scales_and_zeros), x, self.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The weights as the kernel computes them: from fast_decode.cpp's tiles, or (PyTorch's layout) from its
        kernel's product with the identity, rounded to bf16 as it rounds its output."""
        if self.integer:
            return dequantize_int4(*unpack_int4_tiles(self.packed, self.scales_and_zeros)).to(self.dtype)
        eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.packed.device)
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu if eye.is_cpu else torch.ops.aten._weight_int4pack_mm
        return mm(eye, self.packed, self.group_size, self.scales_and_zeros).t().to(self.dtype)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"bias={self.bias is not None}")


class Int6Linear(nn.Linear):
    """An int4 model's output head where fast_decode.cpp's kernels take it: 6-bit weights in groups of group_size
    along each row, each group with a scale and zero (quantize_groups(w, 6)): 0.8125 bytes per weight with group 32,
    as llama.cpp's Q4_0 models keep their output tensor in Q6_K (0.82), where int8 took 1. Its product is
    fast_decode.cpp's (there is no PyTorch kernel for it: without fast_decode.cpp the head is an Int8Linear).
    `weight` is the dequantized weight, made when read."""

    def __init__(self, q: torch.Tensor, scales_and_zeros: torch.Tensor, dtype: torch.dtype,
                 bias: torch.Tensor | None = None):
        nn.Module.__init__(self)  # (not nn.Linear's: it would make a float weight)
        self.out_features, self.in_features = q.shape
        self.group_size = self.in_features // scales_and_zeros.size(1)
        self.dtype, self.bias, self.integer = dtype, bias, True
        if not (q.is_cpu and integer_kernel(self.in_features, self.out_features, self.group_size)):
            raise ValueError("6-bit weights multiply on fast_decode.cpp's kernels alone, on the CPU, in tiles of 16 "
                             "rows with 64 | in_features: quantize this layer to int8")
        self.packed, self.scales_and_zeros = pack_int6_tiles(q, scales_and_zeros)
        self.packed = huge(self.packed)

    def forward(self, x):
        return output(torch.ops.fast_decode.int6_linear(x, self.packed, self.scales_and_zeros), x, self.bias)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The dequantized weights of rows ids (any shape) -> ids.shape + (in_features,), in dtype."""
        return dequantize_groups(*unpack_int6_rows(self.packed, self.scales_and_zeros, ids), 6).to(self.dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.rows(torch.arange(self.out_features))

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"bias={self.bias is not None}")


class TiedEmbedding(nn.Module):
    """An embedding tied to a quantized output head (Int8Linear or Int6Linear): it looks its rows up in the head's
    weights, so the matrix is held once."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, ids):
        return self.head.rows(ids)

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight


# A8W8: int8 weights and int8 activations, on fbgemm's integer kernel (torch.ao's dynamic Linear), which
# multiplies large matrices 1.8x faster than the weight-only int8 kernel here (docs/speed.md). It rounds the
# activation row to 8 bits with one scale, and a transformer's rows have outlier channels up to 20x their median
# (+4% perplexity on SmolLM2 with one scale alone), so two known cures, calibrated on a few hundred tokens:
# - SmoothQuant (Xiao et al. 2023, arXiv 2211.10438): input channel j divided by s_j = max|X_j|^a / max|W_j|^(1-a),
#   weight column j multiplied by it: the product is unchanged, the rounding error shared. a = 0.5, the paper's;
# - LLM.int8()'s decomposition (Dettmers et al. 2022, arXiv 2208.07339): the OUTLIERS channels of largest range
#   leave the int8 product and are multiplied in float (16 columns of each weight).
SMOOTH_ALPHA = 0.5
OUTLIERS = 16
A8W8_KEYS = ("a8w8_qweight", "a8w8_scales", "a8w8_inv_s", "a8w8_idx", "a8w8_w_out")  # in a quantized file


def quantize_a8w8(w: torch.Tensor, act_absmax: torch.Tensor):
    """The A8W8 form of weight w (out, in), given its layer's largest |input| per channel: (q, scale, inv_s, idx,
    w_out). q, scale: w's columns times s, those of the OUTLIERS channels idx zeroed, rounded to int8 with one fp32
    scale per row; inv_s: 1/s, 0 at idx, by which the activation row is multiplied first; w_out: w's columns idx,
    transposed (k, out), in w's dtype."""
    idx = act_absmax.topk(min(OUTLIERS, w.size(1))).indices
    col_absmax = torch.linalg.vector_norm(w, float("inf"), 0, dtype=torch.float32)
    s = act_absmax.clamp(min=1e-5) ** SMOOTH_ALPHA / col_absmax.clamp(min=1e-5) ** (1 - SMOOTH_ALPHA)
    w_out = w[:, idx].t().contiguous()
    w = (w.float() * s).index_fill_(1, idx, 0)
    scale = (torch.linalg.vector_norm(w, float("inf"), 1) / 127).clamp(min=1e-12)
    q = w.div_(scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale, (1 / s).index_fill_(0, idx, 0), idx, w_out


def rowwise_a8w8(x: torch.Tensor, packed, block: int = 4096) -> torch.Tensor:
    """What fbgemm's kernel computes for each row of x (M, K) alone: the row rounded to uint8 with its own scale and
    zero point, times the int8 weight, times both scales. The kernel takes one scale for all rows of a call, so
    several rows go through a float product of the same integers, a block of weight rows at a time."""
    lo, hi = x.amin(1, keepdim=True).clamp(max=0), x.amax(1, keepdim=True).clamp(min=0)
    sx = ((hi - lo) / 255).clamp(min=1e-12)
    zero = (-lo / sx).round()
    xq = ((x / sx).round() + zero).clamp(0, 255) - zero  # (M, K), integers in [-255, 255]
    qw = torch.ops.quantized.linear_unpack(packed)[0]
    q, scale = qw.int_repr(), qw.q_per_channel_scales().float()
    y = torch.cat([F.linear(xq, q[i:i + block].float()) for i in range(0, len(q), block)], 1)
    return y * sx * scale


class A8W8Linear(nn.Linear):
    """A linear layer held only in its A8W8 form (quantize_a8w8): int8 weights packed for fbgemm (here, where they
    run, as Int4Linear packs its own), the activation row smoothed, rounded to 8 bits by the kernel, and its outlier
    channels multiplied in float. `weight` is the dequantized weight, made when read."""

    def __init__(self, q, scale, inv_s, idx, w_out, dtype: torch.dtype, bias: torch.Tensor | None = None):
        import warnings
        nn.Module.__init__(self)  # (not nn.Linear's: it would make a float weight)
        self.out_features, self.in_features = q.shape
        with warnings.catch_warnings():  # quantized tensors are deprecated in PyTorch, fbgemm's kernel still takes one
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(len(q), dtype=torch.long), 0)
            self.packed = torch.ops.quantized.linear_prepack(qw, None)
        self.inv_s, self.idx, self.w_out, self.dtype, self.bias = inv_s, idx, w_out, dtype, bias

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features)
        xs = torch.mul(x2, self.inv_s)  # fp32: x / s, one op on the row; 0 in the outlier channels
        y = (torch.ops.quantized.linear_dynamic(xs, self.packed, False) if len(xs) == 1  # False: full 8 bits
             else rowwise_a8w8(xs, self.packed))
        # + the outlier channels' float product, in the weight's dtype
        y = torch.addmm(y.to(self.w_out.dtype), x2.index_select(1, self.idx).to(self.w_out.dtype), self.w_out)
        return output(y, x, self.bias)

    @property
    def weight(self) -> torch.Tensor:
        w = torch.ops.quantized.linear_unpack(self.packed)[0].dequantize() * self.inv_s
        return w.index_copy_(1, self.idx, self.w_out.t().float()).to(self.dtype)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@torch.no_grad()
def input_absmax(model: nn.Module, layers: list[nn.Linear], tokens: torch.Tensor) -> dict:
    """The largest |input| per input channel that each layer sees while model runs on tokens (fp32); a layer the
    tokens never reach (an expert no token is routed to) is absent."""
    found = {}

    def record(layer, args):
        if args[0].numel():  # (an expert's call with no tokens)
            a = args[0].detach().reshape(-1, layer.in_features).abs().amax(0).float()
            found[layer] = torch.maximum(found[layer], a) if layer in found else a

    hooks = [layer.register_forward_pre_hook(record) for layer in layers]
    try:
        model(tokens)
    finally:
        for h in hooks:
            h.remove()
    return found


def output_heads(model: nn.Module) -> dict:
    """{path: layer} of the model's output head: the layer HF names lm_head (none where the model has none)."""
    return {p: m for p, m in model.named_modules() if p.rpartition(".")[2] == "lm_head"}


# Layers a model file calls one after another on the same input, by their (HF) names
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class Stack(nn.Module):
    """Sibling layers (SIBLINGS) as one quantized layer of their stacked rows. A model calls them one after
    another on the same input: the first call computes the product for all and each sibling takes its rows, so
    one kernel call serves three (q/k/v) or two (gate/up), each call costing 10-30 us besides its bytes. A
    sibling called with another input (lm2.py's memory reads tokens with q_proj, its bank with k_proj and
    v_proj) gets the stacked product of that input: correct, at the stacked cost.
    subtle: under inference_mode an input has no version: one changed in place between two siblings' calls
    would get its old product. The model files never do that (the input is a norm's fresh output).
    While torch.compile traces a step (compile_decode), where neither versions nor weak references can be read,
    the siblings share the product of the traced input by its identity (`traced`, emptied before every call, so
    that the compiled step's guards always find it empty); a compiled graph keeps one product for all, as here."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer, self.last = layer, None  # last: (the input, a weak reference; its version; its product)
        self.traced = None  # (the traced input, its product) while torch.compile traces

    def forward(self, x):
        if torch.compiler.is_compiling():
            if self.traced is None or self.traced[0] is not x:
                self.traced = (x, self.layer(x))
            return self.traced[1]
        last = self.last
        if last is None or last[0]() is not x or last[1] != version(x):
            last = self.last = (weakref.ref(x), version(x), self.layer(x))
        return last[2]

    def __getstate__(self):  # copies start with nothing held (a weak reference cannot be copied)
        return {**self.__dict__, "last": None, "traced": None}


class Sibling(nn.Module):
    """One sibling layer: rows start:end of a Stack's layer."""

    def __init__(self, stack: Stack, start: int, end: int, in_features: int):
        super().__init__()
        self.stack, self.start, self.end = stack, start, end
        self.in_features, self.out_features = in_features, end - start

    def forward(self, x):
        y = self.stack(x)[..., self.start:self.end]
        return y if y.is_contiguous() else y.contiguous()  # (one row's slice is contiguous already)

    @property
    def weight(self) -> torch.Tensor:
        return self.stack.layer.weight[self.start:self.end]

    def extra_repr(self):
        return f"rows {self.start}:{self.end} of the stack"


def quantized_layer(kind: str, parts: list[tuple], group_size: int, dtype, bias=None) -> nn.Module:
    """An Int8Linear, Int6Linear, Int4Linear or A8W8Linear from the quantized forms of one or more layers (stacked
    by rows)."""
    if kind == "a8w8":
        return A8W8Linear(*parts[0], dtype, bias)
    tensors = [torch.cat(t) for t in zip(*parts)]
    if kind == "int4":
        return Int4Linear(*tensors, group_size, dtype, bias)
    return (Int8Linear if kind == "int8" else Int6Linear)(*tensors, dtype, bias)


def quantize_layers(model: nn.Module, weights: str, group_size: int, get, bias=lambda t: t.detach(),
                    calibrated=frozenset(), device: torch.device | None = None) -> dict:
    """Replace every plain linear layer of model by its quantized form (siblings stacked) and every embedding tied to
    a replaced layer by a TiedEmbedding, in place. get(path, layer, kind) gives a layer's quantized tensors
    (quantized from its weight, or read from a file), bias(layer.bias) its bias; device: where they will be (by
    default each layer's own). Returns {path: kind}.

    kind: "int8" for weights="int8"; in int4 models "int6" for the output head (lm_head) and a layer tied to an
    embedding where fast_decode.cpp's kernels take them (as llama.cpp's 4-bit models keep their output tensor in
    Q6_K), else "int8", as for a shape the int4 kernel does not take; else "int4". calibrated: the paths of the
    layers that have an A8W8 form (calibrated on some text): with weights="a8w8" each of them is "a8w8" (not
    stacked), with "int4" the output head. An embedding tied to an a8w8 head gets a copy of its own in the form the
    head would have without (fbgemm's packed weights have no rows to look up)."""
    tied = {id(m.weight) for m in model.modules() if type(m) is nn.Embedding}
    heads, kinds = {}, {}

    def kind_of(path, name, layer, calibration=True):
        if calibration and path in calibrated and (weights == "a8w8" or name == "lm_head"):
            return "a8w8"
        n, k = layer.out_features, layer.in_features
        if weights != "int4":  # (an a8w8 model's layer that the calibration never reached: weight-only int8)
            return "int8"
        if name == "lm_head" or id(layer.weight) in tied:
            cpu = (device or layer.weight.device).type in ("cpu", "meta")
            return "int6" if cpu and integer_kernel(k, n, group_size) else "int8"
        return "int4" if int4_fits(k, n, group_size) else "int8"

    for parent_path, parent in list(model.named_modules()):
        children = {n: c for n, c in parent.named_children() if type(c) in (nn.Linear, FastLinear)}
        groups = [[n for n in names if n in children and children[n].bias is None] for names in SIBLINGS]
        groups = [g for g in groups if len(g) > 1 and len({children[n].in_features for n in g}) == 1
                  and weights != "a8w8"]
        grouped = {n for g in groups for n in g}
        for name in [n for n in children if n not in grouped]:
            layer, path = children[name], f"{parent_path}.{name}".lstrip(".")
            kinds[path] = kind_of(path, name, layer)
            new = quantized_layer(kinds[path], [get(path, layer, kinds[path])], group_size, layer.weight.dtype,
                                  None if layer.bias is None else bias(layer.bias))
            if id(layer.weight) in tied:  # (an a8w8 head's embedding: the head's form without calibration)
                kind = kind_of(path, name, layer, calibration=False)
                heads[id(layer.weight)] = new if kinds[path] != "a8w8" else quantized_layer(
                    kind, [get(path, layer, kind)], group_size, layer.weight.dtype)
            setattr(parent, name, new)
        for group in groups:
            layers, paths = [children[n] for n in group], [f"{parent_path}.{n}".lstrip(".") for n in group]
            kind = "int8" if any(kind_of(p, n, m) == "int8" for p, n, m in zip(paths, group, layers)) else "int4"
            kinds.update(dict.fromkeys(paths, kind))
            stack = Stack(quantized_layer(kind, [get(p, m, kind) for p, m in zip(paths, layers)], group_size,
                                          layers[0].weight.dtype))
            start = 0
            for name, layer in zip(group, layers):
                setattr(parent, name, Sibling(stack, start, start + layer.out_features, layer.in_features))
                start += layer.out_features
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Embedding and id(child.weight) in heads:
                setattr(parent, name, TiedEmbedding(heads[id(child.weight)]))
    return kinds


def quantize(w: torch.Tensor, kind: str, group_size: int, rounding: str = "nearest", path: str = "") -> tuple:
    """Layer `path`'s weight w in the quantized form of `kind` ("int8", "int4" or "int6")."""
    if not torch.isfinite(torch.stack(torch.aminmax(w))).all():  # (its group or row would quantize to NaN, silently)
        raise ValueError(f"{path or 'a layer'} has a NaN or infinite weight: the checkpoint is corrupt (or its "
                         f"training diverged); quantize finite weights")
    if kind == "int8":
        return quantize_int8(w)
    return quantize_int4(w, group_size, rounding) if kind == "int4" else quantize_groups(w, 6, group_size, rounding)


# -----------------------------------------------------------------------------
# fast(), and loading a quantized model without the float one

WEIGHTS = (None, "int8", "int4", "a8w8")


def check_weights(weights, group_size, rounding, calibration=None):
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: use None (the model's own), 'int8', 'int4' or 'a8w8'")
    if group_size not in (32, 64, 128, 256):
        raise ValueError(f"group_size={group_size}: PyTorch's int4 kernels take 32, 64, 128 or 256")
    if rounding not in ("nearest", "hqq"):
        raise ValueError(f"rounding={rounding!r}: use 'nearest' or 'hqq'")
    if weights == "a8w8" and calibration is None:
        raise ValueError("weights='a8w8' needs calibration=token ids (batch, T) of some text")
    if calibration is not None and weights not in ("a8w8", "int4"):
        raise ValueError("calibration= is for weights='a8w8' (every layer) and 'int4' (the output head) only")


def fast(model: nn.Module, weights: str | None = None, group_size: int = 32, rounding: str = "nearest",
         calibration: torch.Tensor | None = None, threads: bool = False) -> nn.Module:
    """Make model decode faster on a CPU, in place (and return it).

    weights None: every plain nn.Linear becomes a FastLinear (same parameters, names, state_dict, ties and
    training; subclasses such as finetune.py's LoRALinear stay as they are; a bf16 smollm2.py or llama31.py model
    then decodes each step in one call, one_call_step). weights "int8", "int4" or "a8w8":
    every plain nn.Linear is replaced by its quantized form (Int8Linear, Int4Linear, A8W8Linear; siblings as a
    Stack), the float weights are dropped, and the model is for inference only; group_size and rounding
    ("nearest" or "hqq") are int4's (quantize_int4); a8w8 needs calibration, token ids (batch, T) of ordinary text
    (a few hundred tokens) that the model runs once, in float, to measure each layer's input range; int4 takes it
    too, for its output head alone (A8W8Linear instead of Int6Linear: faster than an int8 head on a 1B before the
    one-call step, not since, nor than the 6-bit one: docs/speed.md; a tied embedding then holds a 6-bit copy of its
    own). A smollm2.py or llama31.py model in float32 whose products all land on fast_decode.cpp's integer kernels
    then decodes each step in one call (one_call_step). threads=True also sets torch's thread count for decoding
    now (decode_threads)."""
    check_weights(weights, group_size, rounding, calibration)
    if threads:
        torch.set_num_threads(decode_threads())
    layers = [m for m in model.modules() if type(m) in (nn.Linear, FastLinear)]
    if weights is None:
        bf16 = any(m.weight.dtype == torch.bfloat16 and m.weight.is_cpu for m in layers) and kernels()
        for m in layers:
            m.__class__ = FastLinear
            m.bf16_kernel = bf16 and m.in_features % 32 == 0
        if bf16:  # every parameter in memory of its own, the large ones on huge pages (huge), so that nothing is
            # left of a checkpoint's memory map, whose pages, read once, would stay counted beside the copies
            for w in model.parameters():  # (each once, a tied one too)
                w.data = huge(w.data, release=True) if w.numel() * w.element_size() >= HUGE_PAGE else w.data.clone()
        release_free_memory()
        time_split(layers)
        one_call_step(model)
        return model
    absmax = {}
    if calibration is not None:
        for m in layers:
            m.__class__ = nn.Linear  # float products while calibrating (no reordered copies)
        # a8w8: every layer; int4: the output head alone
        measured = layers if weights == "a8w8" else [m for m in output_heads(model).values() if m in layers]
        absmax = input_absmax(model, measured, calibration)

    def get(path, m, kind):
        return quantize_a8w8(m.weight, absmax[m]) if kind == "a8w8" else quantize(m.weight, kind, group_size,
                                                                                   rounding, path)

    with torch.no_grad():
        quantize_layers(model, weights, group_size, get, calibrated={p for p, m in model.named_modules()
                                                                      if m in absmax})
    release_free_memory()
    one_call_step(model)
    return model


def quantized_path(ckpt_dir, weights: str, group_size: int = 32) -> Path:
    """Where `python fast_decode.py quantize` writes a checkpoint's quantized weights: beside model.safetensors."""
    return Path(ckpt_dir) / (f"quantized-int4-g{group_size}.safetensors" if weights == "int4"
                             else "quantized-int8.safetensors")


def float_files(ckpt_dir) -> dict:
    """{tensor name: the safetensors file holding it} of a HF checkpoint folder (one file, or shards listed by
    model.safetensors.index.json)."""
    ckpt_dir = Path(ckpt_dir)
    index = ckpt_dir / "model.safetensors.index.json"
    if index.is_file():
        return {k: ckpt_dir / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open
    with safe_open(ckpt_dir / "model.safetensors", "pt") as f:
        return dict.fromkeys(f.keys(), ckpt_dir / "model.safetensors")


def fingerprint(ckpt_dir) -> str:
    """The float checkpoint's files, sizes and modification times: a quantized file records the fingerprint of
    what it was made from, and load() refuses one made from other weights."""
    files = sorted(set(float_files(ckpt_dir).values()))
    return json.dumps([[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files])


class Reader:
    """Tensors read one at a time from safetensors files. Each read maps its file anew, and the mapping goes with the
    tensor: a weight quantized and dropped leaves nothing of the file resident (a mapping kept open would hold
    every page read so far)."""

    def __init__(self, files: dict):
        self.files = files

    def __iter__(self):
        return iter(self.files)

    def __contains__(self, name):
        return name in self.files

    def __getitem__(self, name) -> torch.Tensor:
        from safetensors import safe_open
        with safe_open(self.files[name], "pt") as f:
            return f.get_tensor(name)


def tensor_names(model: nn.Module) -> dict:
    """{id of a parameter or persistent buffer: every state_dict name it goes by (a tied matrix has two)}"""
    names = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(
            remove_duplicate=False)):
        owner, _, leaf = name.rpartition(".")
        if leaf not in model.get_submodule(owner)._non_persistent_buffers_set:
            names.setdefault(id(t), []).append(name)
    return names


def build(cls, ckpt_dir, weights: str, group_size: int, rounding: str, device, dtype, stored: Path | None,
          kept: dict | None = None, calibration: torch.Tensor | None = None, **kwargs) -> nn.Module:
    """load()'s quantized model: cls.from_pretrained on the meta device, each linear layer quantized from its float
    weight as it is read (or read from `stored`, a quantized file), the other tensors read into place. kept: where
    given, every layer's quantized tensors are also put into it, under the names a quantized file uses.
    calibration: token ids; an int8 or int6 output head then becomes an A8W8Linear, calibrated on what this model
    feeds it there (its int8 or int6 form stays, as the tied embedding's own copy)."""
    model = cls.from_pretrained(ckpt_dir, "meta", dtype, **kwargs)
    head_weights = {p: m.weight for p, m in output_heads(model).items()}
    floats, names = Reader(float_files(ckpt_dir)), tensor_names(model)
    quantized = Reader(dict.fromkeys(safe_keys(stored), stored)) if stored else None

    def read(t):  # a parameter or buffer's value from the checkpoint, under any name it goes by
        name = next((n for n in names[id(t)] if n in floats), None)
        if name is None:
            raise ValueError(f"{ckpt_dir} has no tensor {names[id(t)][0]}: fast_decode.load() reads every weight "
                             f"from the checkpoint (use fast(cls.from_pretrained(...)) for a model that makes some)")
        return floats[name]

    def get(path, layer, kind):
        keys = ([f"{path}.{k}" for k in A8W8_KEYS] if kind == "a8w8" else
                [f"{path}.qweight", f"{path}.scales" if kind == "int8" else f"{path}.scales_and_zeros"])
        if quantized is None:
            tensors = quantize(read(layer.weight).to(device), kind, group_size, rounding, path)
        elif all(k in quantized for k in keys):
            tensors = tuple(quantized[k].to(device) for k in keys)
        else:
            raise ValueError(f"{stored} does not hold {path} as {kind}: make it again with "
                             f"`python fast_decode.py quantize --ckpt_dir {ckpt_dir} --weights {weights}`")
        if kept is not None:
            kept.update(zip(keys, tensors))
        return tensors

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small element-wise ops: beside a busy core two threads wait on each other (30x)
    try:
        with torch.no_grad():
            calibrated = {k.rpartition(".")[0] for k in quantized or () if k.rpartition(".")[2] == A8W8_KEYS[0]}
            quantize_layers(model, weights, group_size, get, lambda t: read(t).to(device=device, dtype=t.dtype),
                            calibrated, device)
            done = {}  # (a tensor tied under two names is read once)
            for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
                if t.is_meta and id(t) in names:
                    if id(t) not in done:
                        value = read(t).to(device=device, dtype=t.dtype)
                        done[id(t)] = nn.Parameter(value, t.requires_grad) if isinstance(t, nn.Parameter) else value
                    owner, _, leaf = name.rpartition(".")
                    setattr(model.get_submodule(owner), leaf, done[id(t)])
    finally:
        torch.set_num_threads(threads)
    if hasattr(model, "init_rope"):
        model.init_rope(device)  # (the RoPE tables or frequencies: not in a checkpoint, made on the meta device)
    left = [f"{n}.{k}" for n, m in model.named_modules() for k, t in list(m._parameters.items())
            + list(m._buffers.items()) + list(vars(m).items()) if isinstance(t, torch.Tensor) and t.is_meta]
    if left:
        raise NotImplementedError(f"fast_decode.load() cannot make {left[0]} of {cls.__name__} (not in the "
                                  f"checkpoint, no init_rope): use fast(cls.from_pretrained(...), weights=...)")
    heads = {p: model.get_submodule(p) for p in head_weights} if calibration is not None else {}
    heads = {p: h for p, h in heads.items() if type(h) in (Int8Linear, Int6Linear)}  # (not one held as A8W8)
    if heads:  # the output head on fbgemm's kernel, calibrated on what this quantized model feeds it
        absmax = input_absmax(model.eval(), list(heads.values()), calibration.to(device))
        embedded = {id(m.head) for m in model.modules() if type(m) is TiedEmbedding}
        for path, head in heads.items():
            tensors = quantize_a8w8(read(head_weights[path]).to(device=device, dtype=head.dtype), absmax[head])
            if kept is not None:
                kept.update(zip([f"{path}.{k}" for k in A8W8_KEYS], tensors))
                if id(head) not in embedded:  # (untied: nothing reads its int8 or int6 form any more)
                    for k in [k for k in kept if k.rpartition(".")[0] == path and k.rpartition(".")[2] not in
                              A8W8_KEYS]:
                        del kept[k]
            owner, _, leaf = path.rpartition(".")
            setattr(model.get_submodule(owner), leaf, A8W8Linear(*tensors, head.dtype))
    return model.eval()


def safe_keys(path: Path) -> list[str]:
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return list(f.keys())


def load(cls, ckpt_dir, weights: str | None = None, group_size: int = 32, rounding: str = "nearest",
         device=None, dtype: torch.dtype | None = None, threads: bool = False, calibration: torch.Tensor | None = None,
         **kwargs) -> nn.Module:
    """cls.from_pretrained(ckpt_dir, device, dtype, **kwargs) made fast (see fast()), for the model class of
    smollm2.py, llama31.py, nanollm.py or lm2.py.

    With weights "int8" or "int4" the float model is never held: cls.from_pretrained builds it on the meta
    device (the checkpoint's config and ties, no weight read) and its linear layers are replaced one by one by
    their quantized forms, read from the file `python fast_decode.py quantize` wrote (quantized_path) where there
    is one (rounding is then that file's), else quantized as each float weight is read; the other tensors (norms,
    an untied embedding) are read into place, in dtype. RoPE's tensors are made by the model's init_rope(device).
    int4 with calibration= token ids: the output head takes fbgemm's A8W8 kernel, calibrated on what the quantized
    model feeds it (a quantized file may hold it so made: `quantize --calibration`). A decode step in one call where
    it applies, as fast() gives."""
    if weights == "a8w8":
        raise ValueError("weights='a8w8' is calibrated on the float model: use fast(cls.from_pretrained(...), "
                         "weights='a8w8', calibration=token_ids)")
    check_weights(weights, group_size, rounding, calibration)
    device = torch.device(device or "cpu")
    if weights is None:
        return fast(cls.from_pretrained(ckpt_dir, device, dtype, **kwargs), threads=threads)
    stored = quantized_path(ckpt_dir, weights, group_size)
    if stored.is_file():
        from safetensors import safe_open
        with safe_open(stored, "pt") as f:
            meta = f.metadata() or {}
        again = f"make it again with `python fast_decode.py quantize --ckpt_dir {ckpt_dir} --weights {weights}`"
        if meta.get("source") != fingerprint(ckpt_dir):
            raise ValueError(f"{stored} was made from other weights than {ckpt_dir}/model.safetensors: {again}")
        if weights == "int4" and meta.get("form") != INT4_FORM:
            raise ValueError(f"{stored} was made by an earlier fast_decode (4-bit scales off the grid that "
                             f"quantize_int4 puts them on now, an int8 output head): {again}")
    model = build(cls, ckpt_dir, weights, group_size, rounding, device, dtype, stored if stored.is_file() else None,
                  calibration=calibration, **kwargs)
    release_free_memory()
    one_call_step(model)
    if threads:
        torch.set_num_threads(decode_threads())
    return model


def save_quantized(cls, ckpt_dir, weights: str = "int4", group_size: int = 32, rounding: str = "nearest",
                   calibration: torch.Tensor | None = None) -> Path:
    """Quantize a checkpoint's linear layers one by one (the float model is never held) and write them to
    quantized_path(ckpt_dir, ...), which load() then reads instead of quantizing again; with calibration (int4),
    the output head's A8W8 form too (load()). Written as finetune.py saves (run_folder.save_atomic): a failed write
    leaves an earlier file as it was and names its cause in one line."""
    from safetensors.torch import save_file

    from run_folder import save_atomic
    check_weights(weights, group_size, rounding, calibration)
    if weights not in ("int8", "int4"):
        raise ValueError(f"weights={weights!r}: a quantized file holds 'int8' or 'int4'")
    kept = {}
    build(cls, ckpt_dir, weights, group_size, rounding, torch.device("cpu"), None, None, kept, calibration)
    out = quantized_path(ckpt_dir, weights, group_size)
    meta = {"weights": weights, "group_size": str(group_size), "rounding": rounding, "source": fingerprint(ckpt_dir),
            **({"form": INT4_FORM} if weights == "int4" else {})}
    save_atomic(str(out), lambda tmp: save_file({k: v.contiguous() for k, v in kept.items()}, tmp, metadata=meta))
    return out


# -----------------------------------------------------------------------------
# A compiled decode step


# The model classes whose decode step compiles to one graph. nanollm.py's and lm2.py's steps read lengths from
# tensors (the cache's filled part; nanollm's experts' token counts, which change every token), which split a
# compiled step into pieces that compile again whenever those values change.
COMPILED = ("SmolLM2", "Llama")


def check_compiled(cls):
    if cls.__name__ not in COMPILED:
        raise ValueError(f"compiling the decode step takes smollm2.py's and llama31.py's models, not {cls.__name__}: "
                         f"its step reads lengths from tensors, which would compile it again as they change; run "
                         f"without --compile")


def use_decode_attention(graph: torch.fx.Graph):
    """A pass over the graphs compile_decode compiles: each call of aten's CPU flash attention (what
    F.scaled_dot_product_attention runs on a CPU) that attends one query row a head through a mask of the query's
    dtype, float32 or bf16, as a decode step attends over its cache, becomes fast_decode.cpp's decode_attention: for
    one row the flash kernel takes 1.4-1.7 times its time in float32 (1.0-1.3 held to AVX2) and 6-10 times in bf16
    (benchmarks/bench_decode_attention.py), 30 calls a SmolLM2 token."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    for node in [n for n in graph.nodes if n.target is flash]:
        q, k, v, dropout, causal = (list(node.args) + [0.0, False])[:5]
        mask, scale, fake = node.kwargs.get("attn_mask"), node.kwargs.get("scale"), q.meta["val"]
        # (the log-sum-exp, output 1, is read only where gradients are taken)
        if (fake.size(2) != 1 or fake.dtype not in (torch.float32, torch.bfloat16) or dropout or causal
                or mask is None or mask.meta["val"].dtype != fake.dtype or fake.size(-1) % 16
                or any(u.args[1] != 0 for u in node.users)):
            continue
        with graph.inserting_before(node):
            new = graph.call_function(torch.ops.fast_decode.decode_attention.default,
                                      (q, k, v, mask, fake.size(-1) ** -0.5 if scale is None else scale))
        new.meta["val"] = fake.new_empty(fake.shape)
        for user in list(node.users):
            user.replace_all_uses_with(new)
            graph.erase_node(user)
        graph.erase_node(node)


def decode_attention_pass():
    """use_decode_attention as inductor takes a pass: a graph pass, not a decomposition (whose table inductor's
    cache cannot key), with a uuid, so that the compiled step is kept for the next process: the hash of the files it
    depends on, and the CPU capability PyTorch and fast_decode.cpp run with (a bf16 step compiled under AVX-512 and
    read back under ATEN_CPU_CAPABILITY=avx2 gave wrong logits). (torch._inductor, a second to import, only here:
    torch.compile imports it anyway.)"""
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class DecodeAttention(CustomGraphPass):
        def __call__(self, graph):
            use_decode_attention(graph)

        def uuid(self):
            return get_hash_for_files((__file__, str(KERNELS))), torch.backends.cpu.get_cpu_capability()
    return DecodeAttention()


def compile_decode(model: nn.Module) -> nn.Module:
    """Compile model's one-token decode step with torch.compile (inductor), in place, as gpt-fast does; return model.

    Eagerly a SmolLM2-135M step runs some 6,000 small ops besides its weight products (norms, RoPE, casts, cache
    writes, views: 1-2 us each, more than half of the step), which inductor fuses into a few C++ loops around the
    products (each still its own kernel's call); attention takes fast_decode.cpp's decode_attention where it
    builds (use_decode_attention). smollm2.py's and llama31.py's models (COMPILED): they attend over their
    whole preallocated KV cache through a mask, so one graph serves every step; the cache's length is marked
    dynamic, so the cache that generate() sizes to each request compiles no second graph. The prefill (a new length
    every request) stays eager. The first step compiles (about a minute for SmolLM2 on 2 cores; inductor
    keeps what it built in its cache folder, so a later process takes seconds); it needs a C++ compiler, as
    inductor does on a CPU. The compiled step's logits match the eager step's to rounding, not bit for bit:
    its fused loops sum in another order, and a near tie may then pick another greedy token. Measured and tested on
    the CPU only (the CLIs' --compile is CPU-only); on CUDA it has never run. A model whose step is one call of
    fast_decode.cpp already (one_call: its products all on the integer kernels' tiles) is left as it is: that step
    is faster than a compiled one (docs/speed.md)."""
    check_compiled(type(model))
    if one_call(model):
        return model
    options = {"post_grad_custom_pre_pass": decode_attention_pass()} if kernels() else {}
    eager, step = model.forward_cached, torch.compile(model.forward_cached, options=options)
    stacks = [m for m in model.modules() if isinstance(m, Stack)]
    marked = weakref.WeakSet()  # caches whose length is marked dynamic

    def forward_cached(tokens, input_pos, pad=None):
        cache = model.model.layers[0].self_attn.cache
        if cache not in marked:  # generate() makes a cache for each request
            for layer in model.model.layers:  # (B, n_kv_heads, S, hd): S changes with the next request
                torch._dynamo.maybe_mark_dynamic(layer.self_attn.cache.k, 2)
                torch._dynamo.maybe_mark_dynamic(layer.self_attn.cache.v, 2)
            marked.add(cache)
        if tokens.size(1) != 1:  # a prefill
            return eager(tokens, input_pos, pad)
        for s in stacks:
            s.traced = None
        # (a module's buffers are static shapes to dynamo unless this is off; the mark above then holds)
        with torch._dynamo.config.patch(force_parameter_static_shapes=False):
            return step(tokens, input_pos, pad)

    model.forward_cached = forward_cached  # an instance attribute: generate() calls it instead of the method
    return model


# -----------------------------------------------------------------------------
# A decode step in one call


NONE = torch.empty(0, dtype=torch.bfloat16)  # llama_layers' empty slot: no scales, or a matrix stacked into another


def tiles(layer: nn.Module | None) -> list[torch.Tensor] | None:
    """A layer's weights as fast_decode.cpp's llama_layers takes them (weights and scales), or None where it cannot:
    a quantized layer on the integer kernels' tiles, or a bf16 FastLinear (rows as the model holds them), no bias."""
    if layer is None or getattr(layer, "bias", None) is not None:
        return None
    if type(layer) in (Int4Linear, Int8Linear) and layer.integer:
        return [layer.packed, layer.scales_and_zeros] if type(layer) is Int4Linear else [layer.q, layer.scale]
    if (type(layer) is FastLinear and layer.weight.dtype == torch.bfloat16 and layer.weight.is_contiguous()
            and layer.in_features % 64 == 0 and layer.out_features % 16 == 0):
        return [layer.weight, NONE]
    return None


def stacked(*siblings: nn.Module) -> nn.Module | None:
    """The Stack's layer whose rows the siblings are, one after another from the first, or None."""
    stack = getattr(siblings[0], "stack", None)
    ends = [0] + [getattr(s, "end", None) for s in siblings]
    if not all(type(s) is Sibling and s.stack is stack and s.start == e for s, e in zip(siblings, ends)):
        return None
    return stack.layer if ends[-1] == stack.layer.out_features else None


def one_call_weights(model: nn.Module) -> list[torch.Tensor] | None:
    """What fast_decode.cpp's llama_layers takes of model's layers, 16 tensors a layer (its input norm; q, k, v and
    o, each weights and scales, k's and v's NONE where q/k/v are one Stack; its post-attention norm; gate, up and
    down, up NONE where gate/up are one Stack), or None where it cannot run them: a model not of smollm2.py's or
    llama31.py's classes, a product neither on fast_decode.cpp's 4- and 8-bit tiles in a float32 model nor bf16 in a
    bf16 one."""
    if type(model).__name__ not in COMPILED or model.args.head_dim % 16:
        return None
    weights, dtype = [], model.model.norm.weight.dtype
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv, gate_up = stacked(attn.q_proj, attn.k_proj, attn.v_proj), stacked(mlp.gate_proj, mlp.up_proj)
        products = [tiles(m) for m in ([qkv] if qkv else [attn.q_proj, attn.k_proj, attn.v_proj])]
        products += [[NONE, NONE]] * 2 if qkv else []
        products += [tiles(attn.o_proj)]
        products += [tiles(m) for m in ([gate_up] if gate_up else [mlp.gate_proj, mlp.up_proj])]
        products += [[NONE, NONE]] if gate_up else []
        products += [tiles(mlp.down_proj)]
        norms = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
        if (None in products or dtype not in (torch.float32, torch.bfloat16)
                or any(n.dtype != dtype or n.device.type not in ("cpu", "meta") for n in norms)
                or any((w.dtype == torch.bfloat16) != (dtype == torch.bfloat16) for w, _ in products if w is not NONE)):
            return None
        weights += [norms[0], *products[0], *products[1], *products[2], *products[3], norms[1], *products[4],
                    *products[5], *products[6]]
    return weights if kernels() else None  # (last: a float32 model's fast() never compiles fast_decode.cpp)


class OneCallTrunk:
    """model.trunk for a decode step of smollm2.py's and llama31.py's models whose products fast_decode.cpp's
    llama_layers takes (one_call_weights: 4- and 8-bit tiles in float32, bf16 weights in bf16): the layers of a step
    (one token a row, against the cache) in one call, where a PyTorch step makes hundreds of calls, each its own
    parallel region with Python between them, which cost a SmolLM2 step more than its products do (docs/speed.md).
    The embedding, RoPE's angles and the final norm are the model's own; every other call (a prefill, training, a
    cacheless forward) runs the model's own trunk. Its logits match the model's own step to rounding (the same
    products and rounded inputs, a bf16 model's every rounding to bf16 where the model rounds; norms, softmax and
    SiLU summed in another order). The tensors are read again for each new cache (generate() makes one a
    request)."""

    def __init__(self, model: nn.Module):
        self.model, self.cache, self.weights, self.caches = model, None, None, []
        self.rope_cos_sin = sys.modules[type(model).__module__].rope_cos_sin  # the model file's own

    def __call__(self, tokens, pos, mask, input_pos=None):
        model = self.model
        cache = model.model.layers[0].self_attn.cache
        if input_pos is None or tokens.size(1) != 1 or cache is None:
            return type(model).trunk(model, tokens, pos, mask, input_pos)
        if cache is not self.cache:  # a new request: its caches, and the weights as they are now
            self.cache, self.weights = cache, one_call_weights(model)
            self.caches = [t for layer in model.model.layers
                           for t in (layer.self_attn.cache.k, layer.self_attn.cache.v)]
        x = None if self.weights is None else model.model.embed_tokens(tokens)  # (B, 1, dim)
        if x is None or x.dtype != self.caches[0].dtype:
            return type(model).trunk(model, tokens, pos, mask, input_pos)
        B, _, dim = x.shape
        cos, sin = self.rope_cos_sin(model.inv_freq, pos, x.dtype)  # (B, 1, 1, head_dim)
        h = torch.ops.fast_decode.llama_layers(
            x.view(B, dim), self.weights, self.caches, cos.view(B, -1), sin.view(B, -1), mask.reshape(B, -1),
            int(input_pos[0]), model.args.n_heads, model.args.n_kv_heads, model.args.norm_eps)
        return model.model.norm(h.view(B, 1, dim))


def one_call_step(model: nn.Module):
    """Give model a OneCallTrunk where fast_decode.cpp's llama_layers takes its layers (one_call_weights), in place."""
    if one_call_weights(model) is not None:
        model.trunk = OneCallTrunk(model)  # an instance attribute: forward_cached calls it instead of the method


def one_call(model: nn.Module) -> bool:
    """Whether model's decode step is one call of fast_decode.cpp (one_call_step gave it a OneCallTrunk)."""
    return isinstance(vars(model).get("trunk"), OneCallTrunk)


# -----------------------------------------------------------------------------
# Command line: python fast_decode.py quantize --ckpt_dir DIR --weights int4


def model_class(ckpt_dir, name: str | None = None):
    """The model class that reads ckpt_dir: the file named (smollm2, llama31, nanollm, lm2), else the one its
    config.json asks for (DeepSeek-V3 layout: nanollm; an LM2's: lm2; Llama 3's scaled RoPE: llama31; any other
    Llama: smollm2)."""
    import importlib
    if name is None:
        cfg = json.loads((Path(ckpt_dir) / "config.json").read_text())
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        name = ("nanollm" if cfg.get("model_type") == "deepseek_v3" else "lm2" if "lm2" in cfg
                else "llama31" if rope.get("rope_type", rope.get("type")) == "llama3" else "smollm2")
    if name not in ("smollm2", "llama31", "nanollm", "lm2"):
        raise ValueError(f"--model {name}: use smollm2, llama31, nanollm or lm2")
    module = importlib.import_module(name)
    return next(v for v in vars(module).values() if isinstance(v, type) and issubclass(v, nn.Module)
                and hasattr(v, "from_pretrained") and hasattr(v, "generate"))


def main(*command: str, ckpt_dir: str = "checkpoints/SmolLM2-135M-Instruct", weights: str = "int4",
         group_size: int = 32, rounding: str = "nearest", model: str | None = None, calibration: str | None = None):
    """Write a checkpoint's quantized weights once (`quantize`), beside its model.safetensors; the model CLIs and
    fast_decode.load() then read them instead of quantizing at every start.

    command: quantize
    ckpt_dir: a HF checkpoint folder
    weights: int4 or int8
    group_size: weights per int4 scale and zero: 32, 64, 128 or 256
    rounding: nearest (round to nearest), or hqq (Half-Quadratic Quantization's zero points)
    model: the model file that reads the checkpoint (smollm2, llama31, nanollm, lm2); default: from its config.json
    calibration: a text file (int4): its first 512 tokens calibrate the output head on fbgemm's A8W8 kernel
    """
    if list(command) != ["quantize"]:
        raise SystemExit("error: the one command is `quantize`: python fast_decode.py quantize --ckpt_dir DIR "
                         "--weights int4")
    if not (Path(ckpt_dir) / "config.json").is_file():
        raise SystemExit(f"error: no checkpoint at {ckpt_dir} (no config.json): give a HF checkpoint folder")
    t0 = time.time()
    try:
        ids = None
        if calibration is not None:
            from tokenizer_bpe import Tokenizer
            text = Path(calibration).read_text(encoding="utf-8")
            ids = torch.tensor([Tokenizer.from_file(ckpt_dir).encode(text)[:512]])
            if ids.numel() < 16:
                raise ValueError(f"{calibration} holds {ids.numel()} tokens: calibrating takes a few hundred")
        out = save_quantized(model_class(ckpt_dir, model), ckpt_dir, weights, group_size, rounding, ids)
    except (ValueError, OSError, NotImplementedError) as e:
        raise SystemExit(f"error: {e}")
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) in {time.time() - t0:.1f}s")


def command_line(argv: list[str] | None = None):
    """main() with its flags from the command line, parsed as every CLI here parses them."""
    from cli import cli
    cli(main, argv=argv)


if __name__ == "__main__":
    command_line()
