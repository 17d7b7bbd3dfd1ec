"""
fast_decode: faster batch-1 decoding on a CPU for the collection's four model files, applied from outside.

    import smollm2, fast_decode
    model = smollm2.SmolLM2.from_pretrained("checkpoints/SmolLM2-135M-Instruct")
    fast_decode.fast(model, threads=True)   # in place; threads=True, as the CLIs pass, also picks the thread count
    fast_decode.fast(model, weights="int8") # or: int8 weight-only products (a quarter of fp32's bytes per token)
    fast_decode.fast(model, weights="a8w8", calibration=ids)  # or: int8 activations too (ids: (1, T) of text)

The model files stay plain (`nn.Linear`, each projection called directly), as gpt-fast keeps `model.py` plain and
puts its speed beside it: `fast(model)` works on the models of smollm2.py, llama31.py, nanollm.py and lm2.py
alike, because all it touches is their `nn.Linear` modules. A model file copied alone runs
plain, and gives the same tokens.

Where the speed comes from. Decoding one token multiplies one row by every weight matrix, so on a CPU its speed
is the speed of streaming the weights from memory, and two PyTorch kernels leave much of that unused
(`python benchmarks/bench_cpu_kernels.py` times each kernel alone; figures in README.md):
- fp32: the one-row product (MKL's matrix-vector kernel) runs on one thread whatever `torch.get_num_threads()`
  says. `FastLinear` can view the output rows as one block per thread and run the blocks as one `bmm`, whose
  batch PyTorch spreads over the threads: the same product on every core. This paid 1.54-1.60x on the AMD
  EPYC development machine, where one thread streamed a fraction of the bandwidth; on the 2-vCPU Xeon (AMX)
  one thread already streams 19-25 of its 23-28 GB/s, and the split measured 0.81-0.96x (README.md). So it is
  a measured choice: the first calls of each shape time both routes, and the faster one stays
  (split_or_linear).
- bf16 (where oneDNN has bf16 kernels): `F.linear` reorders the weight into oneDNN's blocked layout on every
  call. `FastLinear` keeps a reordered copy (made at the first inference call, remade when the weight changes,
  kept only while it fits in half the free memory) and multiplies with it directly. Each oneDNN call also
  costs 25-40 us whatever its size (a 64 x 64 product: 2 us through F.linear, on the Xeon under load), so the
  sibling layers a model calls on one input (q/k/v, gate/up) share one stacked reordered copy and one call,
  and hand each other their slices of it (Siblings): 4 calls a layer instead of 7.
- int8 (`weights="int8"`, opt-in: it changes the numbers): each layer becomes an `Int8Linear` holding an int8
  copy of its weight with one bf16 scale per output row (symmetric, absmax / 127), multiplied by PyTorch's
  weight-only int8 kernel (`aten._weight_int8pack_mm`, the one gpt-fast's int8 path uses) with the activation
  row in bf16: 1 byte per weight streamed instead of 4 (fp32) or 2 (bf16). `python
  benchmarks/bench_int8_kernels.py` times every route PyTorch offers; README.md has the figures and the
  exactness (`benchmarks/bench_int8_quality.py`: perplexity, logits, greedy tokens against fp32).
- a8w8 (`weights="a8w8"`, opt-in, calibrated on a few hundred tokens of text): the same int8 bytes per token,
  but the activation row is rounded to 8 bits too (one scale and zero point per row), so the product runs on
  fbgemm's int8 kernel (`quantized.linear_dynamic`, torch.ao's dynamic Linear), which multiplies int8 by uint8
  in integer registers and streams large weights faster than the weight-only kernel, which widens every weight
  to bf16 first. End to end on the idle 2-vCPU Xeon, 2 threads, bf16 models: Llama 3.2 1B's shape 12.7-12.9
  tok/s against int8's 9.8-9.9 (llama.cpp Q8_0 20.6-20.9); but SmolLM2-135M 34 against 48-49: its small
  matrices leave the product's extra ops (smoothing, outlier channels) and the kernel's own per-call cost
  dominant, so a8w8 is for the larger models. One scale per row alone cost
  SmolLM2 +4% perplexity (outlier channels); SmoothQuant's smoothing and 16 outlier channels kept in float
  (A8W8Linear) bring it to the weight-only kernel's exactness (figures beside quantize_a8w8).
Everything else (norms, RoPE, the cache, attention) is the model file's own code, unchanged.

How it is applied: each `nn.Linear` of the model becomes a `FastLinear` by a class swap
(`module.__class__ = FastLinear`), the way gpt-fast's quantize.py swaps linear layers, except that the module
object stays: same parameters (a tied output head stays tied), same names, same `state_dict()`, and an
optimizer or a LoRA wrapper holding the parameter still holds it. Training, autograd and torch.compile take
`nn.Linear`'s own path (`F.linear`), so gradients are those of the plain model; finetune.py's `apply_lora`
wraps a `FastLinear` as it wraps an `nn.Linear` (the wrapped layer then runs `F.linear` plus its adapter), and
`fast` leaves a `LoRALinear` alone, so either order works.

What holds for int8 (and a8w8), and what does not. The float weight stays the parameter: names, `state_dict()`
(the float weights; the int8 copies are not in it, and `fast(model, weights="int8")` after loading it remakes
them exactly; a8w8's calibrated input ranges are plain attributes, not in it either: calibrate again), ties,
training and LoRA are as above, and an in-place update of a weight remakes its int8 copy at the next product.
So int8 saves bytes per token, not memory: the int8 copy (1 byte per weight, plus a scale per row) comes on top
of the float weights. They cannot simply go, because the model files read them directly: the tied
embedding looks rows up in the head's matrix, `setup_cache` takes the KV cache's dtype from `lm_head.weight`,
and nanollm's absorbed MLA decode multiplies with `kv_b_proj.weight` itself (that one product stays float;
`absorb=False` decodes through the int8 layer). lm2.py's tied head is `F.linear` on the embedding, no module, so
it stays float too.

What the model files did before and this module does not (README.md has the figures):
- q/k/v and gate/up stacked in fp32: it would need a stacked copy of two thirds of the weights beside them (the
  bf16 stack replaces the layers' own reordered copies; fp32 has none), for the 0-5% that one-row fp32 products
  gained from it on the Xeon, one thread, under load (`benchmarks/bench_cpu_kernels.py`, its stacked column);
- attention in fp32 on an fp32 KV cache for bf16 models: on the Xeon (AMX) PyTorch's bf16 attention takes
  0.55-0.73x the time of the fp32 one (it was 2.2-8.5x slower on the EPYC machine), and swapping it in from
  outside would mean copying each model's attention forward.
"""

import os
import platform
import statistics
import time
import warnings
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

# oneDNN's bf16 matmul kernels exist where the CPU has AVX-512 (BF16 or AMX for full speed); on an AVX2-only CPU
# this is False and bf16 products stay with F.linear. x86 only: the path is measured and tested there, and
# oneDNN's ARM builds are a different library underneath.
BF16_ONEDNN = (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
               and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def free_memory() -> int:
    """Bytes the OS can hand out: Linux's MemAvailable (free pages + reclaimable file cache, which a freshly read
    checkpoint fills), else the free pages, else 0 where it cannot tell (then no reordered copies are kept)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 0


def version_key(t: torch.Tensor) -> tuple:
    """What changes when tensor t's values may have: its data pointer (`.data =` swaps storage under the same
    Parameter) and its version (bumped by every in-place update). subtle: inference tensors (made under
    torch.inference_mode) have no version; they cannot be updated in place outside inference mode, but inside it
    they can, unseen."""
    return t.data_ptr(), None if t.is_inference() else t._version


class Derived:
    """A weight kept in another form beside a FastLinear's parameter (oneDNN's bf16 layout, or int8 with its
    scales), and what it was made from: the weight tensor (a weak reference, so a new tensor that the allocator
    puts at the old one's address is still new), its data pointer (`.data =` swaps storage under the same
    Parameter) and its version (bumped by every in-place update).

    subtle: a oneDNN tensor is opaque (no storage): deepcopy, pickle or torch.save of a module holding one
    raises. Copies of this holder come out empty, so a copied or saved model remakes its own at first use."""

    def __init__(self):
        self.source, self.key, self.weight = None, None, None

    def __deepcopy__(self, memo):
        return Derived()

    def __reduce__(self):
        return Derived, ()

    def get(self, w: torch.Tensor, make):
        """The held form of weight w, remade by make(w) (which may return None: keep none) when w changed."""
        key = version_key(w)
        if self.key != key or self.source() is not w:
            self.weight = None  # free a stale copy before deciding on a new one
            self.weight = make(w.detach())
            self.source, self.key = weakref.ref(w), key
        return self.weight


def cpu_inference(x: torch.Tensor) -> bool:
    """Whether a product of x may take this module's kernels: on the CPU, without autograd, not being compiled
    (training, autograd and torch.compile take nn.Linear's own F.linear). It runs on every product: the cheapest
    and the most often decisive check comes first."""
    return not torch.is_grad_enabled() and x.is_cpu and not torch.compiler.is_compiling()


class FastLinear(nn.Linear):
    """nn.Linear (same parameters, same names) whose CPU inference products take the faster kernels above."""

    def forward(self, x):
        if cpu_inference(x):
            if x.dtype == torch.bfloat16 and BF16_ONEDNN:
                siblings = self.__dict__.get("siblings")
                if siblings is not None and x.numel() == self.in_features:
                    y = siblings.product(self, x)
                    if y is not None:
                        return y
                w = self.reordered_weight()
                if w is not None:
                    return torch.ops.mkldnn._linear_pointwise(x, w, self.bias, "none", [], "")
            elif x.dtype == torch.float32:
                n = torch.get_num_threads()
                if n > 1 and x.numel() == self.in_features and self.out_features % n == 0 and self.bias is None:
                    return split_or_linear(self, x, n)
        return F.linear(x, self.weight, self.bias)

    def split_product(self, x, n):
        """The one-row product with one block of output rows per thread: a batched matmul whose blocks run in
        parallel."""
        w = self.weight.view(n, self.out_features // n, self.in_features)  # a view, no copy
        y = torch.bmm(x.reshape(1, 1, -1).expand(n, 1, -1), w.transpose(1, 2))  # (n, 1, out/n)
        return y.view(x.shape[:-1] + (self.out_features,))

    def reordered_weight(self) -> torch.Tensor | None:
        """The weight in oneDNN's bf16 layout, remade when the weight changed; None where none is kept."""
        if "reordered" not in self.__dict__:
            self.reordered = Derived()
        return self.reordered.get(self.weight, reorder_bf16)


def reorder_bf16(w: torch.Tensor) -> torch.Tensor | None:
    """w in oneDNN's blocked bf16 layout, if w is bf16 and the copy fits in half the free memory; else None.
    (bf16 weights only: under autocast, bf16 activations meet fp32 weights, which F.linear casts.)"""
    ok = w.dtype == torch.bfloat16 and 2 * w.nbytes < free_memory()
    return torch.ops.mkldnn._reorder_linear_weight(w, 1) if ok else None


# fp32, one row, more than one thread: the split or F.linear, whichever measured faster here for this shape and
# thread count. The first TRIAL_CALLS calls of each route (alternating, on whatever layers of that shape come
# next: the weights stream from memory as they will later) are timed, and the lower median wins for the rest of
# the process. It is a measurement, not a rule, because the answer is the machine's: the split paid 1.54-1.60x
# on the EPYC machine and cost 0.81-0.96x on the Xeon (README.md).
TRIAL_CALLS = 8
SPLIT_WINS: dict[tuple[int, int, int], bool] = {}  # (out_features, in_features, threads) -> split is faster
TRIALS: dict[tuple[int, int, int], tuple[list, list]] = {}  # shapes still on trial -> (F.linear, split) times
clock = time.perf_counter  # (a test replaces it with a clock it controls)


def split_or_linear(layer: FastLinear, x: torch.Tensor, n: int) -> torch.Tensor:
    key = (layer.out_features, layer.in_features, n)
    wins = SPLIT_WINS.get(key)
    if wins is not None:
        return layer.split_product(x, n) if wins else F.linear(x, layer.weight)
    times = TRIALS.setdefault(key, ([], []))
    split = len(times[1]) < len(times[0])  # alternate, F.linear first
    t0 = clock()
    y = layer.split_product(x, n) if split else F.linear(x, layer.weight)
    times[split].append(clock() - t0)
    if len(times[1]) == TRIAL_CALLS:
        SPLIT_WINS[key] = statistics.median(times[1]) < statistics.median(times[0])
        del TRIALS[key]
    return y


# Sibling layers: the projections a model file calls one after another on the same input. One bf16 product
# through their weights stacked (one reordered copy, in place of each layer's own) streams them as one matrix,
# in one oneDNN call instead of three or two, each of which costs 25-40 us here whatever its size.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class Siblings:
    """FastLinear layers of one parent module, named as in SIBLINGS, with the same input width and no bias: their
    one-row bf16 products can come from one stacked product, handed out by slices.

    How it stays what the plain model computes, whatever calls the layers:
    - It is off until it has seen every member called with the same input tensor (the same object, unchanged),
      one after another. Until then, and whenever it is off, each layer takes its own product.
    - On, the first member called with a new input computes the stacked product and keeps it with that input (a
      weak reference, and its version key); a member called with that same input takes its slice (a member called
      twice takes it again). The product (one row) is kept until the next one.
    - A member called with another input while some member has not yet taken its slice turns stacking off (until
      a full round is seen again): the layers are not being called together (lm2.py's memory reads tokens with
      q_proj and its bank with k_proj and v_proj; a layer that finetune.py's apply_lora replaced after fast() is
      never called again), and off, a wasted stacked product costs no more than once per round seen.
    - The stacked copy is remade when any member's weight changed (version_key), like a layer's own copy; a
      handed-out slice is checked against its own layer's weight too.
    subtle: under torch.inference_mode inputs have no version: an input changed in place between two siblings'
    calls would be handed the product of its old values. The model files never do that (the input is a norm's
    fresh output)."""

    def __init__(self, members: list[FastLinear]):
        self.members = members
        self.bounds = [0]  # member i's rows of the stacked weight: bounds[i]:bounds[i + 1]
        for m in members:
            self.bounds.append(self.bounds[-1] + m.out_features)
        self.reset()

    def reset(self):
        """Off, nothing seen, nothing held."""
        self.weight, self.keys, self.sources = None, None, None  # the stacked copy, and what it was made from
        self.on, self.seen, self.last = False, set(), None  # observation: members seen with input `last`
        # the last stacked product: (its input, the input's version key, the product, the weights' version keys),
        # one tuple so that a model used by two threads at once never pairs one call's input with another's
        # product; and the members that have not taken their slice of it
        self.pending, self.left = None, set()

    # deep copies and pickles start observing afresh (a oneDNN tensor cannot be copied); subtle: in a deep copy
    # of a model the members are still being built when this runs, so it reads nothing of theirs
    def __getstate__(self):
        return {"members": self.members, "bounds": self.bounds}

    def __setstate__(self, state):
        self.members, self.bounds = state["members"], state["bounds"]
        self.reset()

    def product(self, member: FastLinear, x: torch.Tensor) -> torch.Tensor | None:
        """member's product of x (one row), sliced from the stacked product; None: take member's own product."""
        i = self.members.index(member)
        pending = self.pending
        if pending is not None and pending[0]() is x and pending[1] == version_key(x):
            if version_key(member.weight) != pending[3][i]:
                return None
            self.left.discard(i)
            return pending[2][..., self.bounds[i]:self.bounds[i + 1]]
        if self.left:  # the last stacked product was not taken whole: these layers are not called together
            self.reset()
        if not self.on:
            if self.last is None or self.last[0]() is not x or self.last[1] != version_key(x):
                self.seen, self.last = set(), (weakref.ref(x), version_key(x))
            self.seen.add(i)
            self.on = len(self.seen) == len(self.members)
            return None
        w = self.stacked_weight()
        if w is None:
            return None
        out = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        self.pending = (weakref.ref(x), version_key(x), out, self.keys)
        self.left = set(range(len(self.members))) - {i}
        return out[..., self.bounds[i]:self.bounds[i + 1]]

    def stacked_weight(self) -> torch.Tensor | None:
        """The members' weights stacked in oneDNN's bf16 layout, remade when one changed; None where none is kept
        (weights not all bf16, or no room)."""
        ws = [m.weight for m in self.members]
        keys = [version_key(w) for w in ws]
        if keys != self.keys or any(s() is not w for s, w in zip(self.sources, ws)):
            self.weight = None  # free a stale copy first
            same = all(w.dtype == torch.bfloat16 and w.device == ws[0].device for w in ws)
            self.weight = reorder_bf16(torch.cat([w.detach() for w in ws])) if same else None
            self.keys, self.sources = keys, [weakref.ref(w) for w in ws]
            if self.weight is not None:
                for m in self.members:
                    m.reordered = Derived()  # their own copies go: the stacked one replaces them
        return self.weight


def stack_siblings(model: nn.Module):
    """Group each parent's sibling FastLinear layers (SIBLINGS) into a Siblings, afresh; Int8Linear and A8W8Linear
    layers are not grouped (their products do not read it)."""
    for module in model.modules():
        module.__dict__.pop("siblings", None)
    for parent in model.modules():
        for names in SIBLINGS:
            members = [m for m in (getattr(parent, n, None) for n in names)  # (int8 layers have their own path)
                       if type(m) is FastLinear and m.bias is None]
            members = [m for m in members if m.in_features == members[0].in_features]
            if len(members) > 1:
                siblings = Siblings(members)
                for m in members:
                    m.siblings = siblings


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one bf16 scale per output row: w ~= q * scale[:, None], |q| <= 127.

    The scale is rounded to bf16 (the kernel's scale dtype) before q is computed from it, so that q is rounded
    against the very scale the kernel multiplies by; where the scale rounded down, a row's largest weight clips
    by at most 1/256 of itself."""
    scale = (w.float().abs().amax(1) / 127).clamp(min=torch.finfo(torch.bfloat16).tiny).bfloat16()
    q = (w.float() / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(FastLinear):
    """A FastLinear whose CPU inference products read an int8 copy of the weight (one bf16 scale per output row;
    see quantize_int8) through PyTorch's weight-only int8 kernel, with bf16 activations: a quarter of the fp32
    bytes per token. The float parameter stays as it is (names, state_dict, ties, training: those of nn.Linear)."""

    def forward(self, x):
        if cpu_inference(x):
            q, scale = self.int8_weight()
            x2 = x.reshape(-1, self.in_features).bfloat16()
            if self.in_features % 16 == 0:
                y = torch.ops.aten._weight_int8pack_mm(x2, q, scale)
            else:  # subtle: the kernel reads past the row (wrong sums, or a crash) unless 16 divides it
                y = (F.linear(x2.float(), q.float()) * scale.float()).bfloat16()  # the kernel's sums, slowly
            y = y.view(x.shape[:-1] + (self.out_features,)).to(x.dtype)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)

    def int8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The int8 weight and its scales (quantize_int8), remade when the weight changed."""
        if "int8" not in self.__dict__:
            self.int8 = Derived()
        return self.int8.get(self.weight, quantize_int8)


# The A8W8 product rounds each activation row to 8 bits with one scale for the row, and a row of a transformer's
# activations has outlier channels up to 20x its median (SmolLM2's q/k/v and down_proj inputs): one scale for
# all of them leaves few steps for the rest (+4% perplexity on SmolLM2, +64% where torch.ao's kernel takes one
# scale for a whole 512-token window). Two known cures, both applied, each measured to help on SmolLM2-135M
# (`python benchmarks/bench_int8_quality.py --variants int8-fp32,int8-bf16,a8w8-fp32,a8w8-bf16`, 14 windows of
# 512 tokens of the GPL v3, calibrated on 1024 tokens of the Apache License 2.0; perplexity against fp32's, fp32
# model / bf16 model: as committed (16 float channels) +0.55% / +0.85%; with OUTLIERS set to 8, +0.73% / +1.05%,
# and to 0 (smoothing alone) +1.24% / +1.59%; the weight-only int8 kernel +0.56% / +0.89%; llama.cpp's Q8_0
# +0.28% against its own F32):
# - SmoothQuant (Xiao et al. 2023, arXiv 2211.10438): input channel j divided by s_j = max|X_j|^a / max|W_j|^(1-a)
#   (X measured on calibration text), weight column j multiplied by it: the product is unchanged and the rounding
#   error shared between activations and weights. a = 0.5, the paper's default (0.65 and 0.8 measured worse);
# - LLM.int8()'s decomposition (Dettmers et al. 2022, arXiv 2208.07339): the OUTLIERS channels of largest
#   calibrated range leave the int8 product and are multiplied in the weight's dtype, a (1, 16) x (16, out)
#   product (16 columns of each weight: 1.3% more bytes per token on Llama 3.2 1B's shapes).
SMOOTH_ALPHA = 0.5
OUTLIERS = 16


def quantize_a8w8(w: torch.Tensor, act_absmax: torch.Tensor):
    """The A8W8 form of weight w (out, in), given its layer's largest |input| per channel: (packed, inv_s, idx,
    w_out). packed: w's columns times s (SMOOTH_ALPHA), those of the OUTLIERS channels idx zeroed, rounded to int8
    with one fp32 scale per output row and packed for fbgemm's dynamic int8 kernel; inv_s: 1/s, 0 at idx, by which
    the activation row is multiplied before that product; w_out: w's columns idx, transposed (k, out)."""
    idx = act_absmax.topk(min(OUTLIERS, w.size(1))).indices
    inf = float("inf")  # (norms of order inf: largest |value| in one pass, no |w| copy: the 1B has 1.2e9 weights)
    col_absmax = torch.linalg.vector_norm(w, inf, 0, dtype=torch.float32)
    s = act_absmax.clamp(min=1e-5) ** SMOOTH_ALPHA / col_absmax.clamp(min=1e-5) ** (1 - SMOOTH_ALPHA)
    w_out = w[:, idx].t().contiguous()  # (in the weight's dtype, the activations' own)
    w = (w.float() * s).index_fill_(1, idx, 0)  # a new tensor: the parameter stays as it is
    scale = (torch.linalg.vector_norm(w, inf, 1) / 127).clamp(min=1e-12)
    q = w.div_(scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    with warnings.catch_warnings():  # quantized tensors are deprecated in PyTorch, fbgemm's kernel still takes one
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(len(q), dtype=torch.long), 0)
        packed = torch.ops.quantized.linear_prepack(qw, None)
    return packed, (1 / s).index_fill_(0, idx, 0), idx, w_out


def rowwise_a8w8(x: torch.Tensor, packed, block: int = 4096) -> torch.Tensor:
    """What fbgemm's dynamic int8 kernel computes for each row of x (M, K) alone: the row rounded to uint8 with its
    own scale and zero point (its min and max, 0 included), times the int8 weight, times both scales. The kernel
    itself takes one scale for all rows of a call, so several rows go through a float product of the same
    integers (exact up to fp32 summation), a block of weight rows at a time to bound the float copy."""
    lo, hi = x.amin(1, keepdim=True).clamp(max=0), x.amax(1, keepdim=True).clamp(min=0)
    sx = ((hi - lo) / 255).clamp(min=1e-12)
    zero = (-lo / sx).round()
    xq = ((x / sx).round() + zero).clamp(0, 255) - zero  # (M, K), integers in [-255, 255]
    qw = torch.ops.quantized.linear_unpack(packed)[0]
    q, scale = qw.int_repr(), qw.q_per_channel_scales().float()
    y = torch.cat([F.linear(xq, q[i:i + block].float()) for i in range(0, len(q), block)], 1)
    return y * sx * scale


class A8W8Linear(FastLinear):
    """A FastLinear whose CPU inference products round the activation row to 8 bits too (one scale and zero point
    per row, as fbgemm's dynamic int8 kernel, `quantized.linear_dynamic`, does), after SmoothQuant's smoothing and
    with the OUTLIERS channels in float (see quantize_a8w8): int8 weights with one fp32 scale per output row.
    It needs each layer's input range per channel, `act_absmax`, measured by fast(..., calibration=tokens). The
    float parameter stays as it is (names, state_dict, ties, training: those of nn.Linear); act_absmax is a plain
    attribute, not in state_dict."""

    def forward(self, x):
        if cpu_inference(x):
            packed, inv_s, idx, w_out = self.int8_weight()
            x2 = x.reshape(-1, self.in_features)
            xs = torch.mul(x2, inv_s)  # fp32 (inv_s is): x / s, one op on the row; 0 in the outlier channels
            if len(xs) == 1:
                y = torch.ops.quantized.linear_dynamic(xs, packed, False)  # False: full 8 bits, not 7
            else:
                y = rowwise_a8w8(xs, packed)
            # + the outlier channels' float product, in the weight's dtype (the .to()s are no-ops where x has it)
            y = torch.addmm(y.to(w_out.dtype), x2.index_select(1, idx).to(w_out.dtype), w_out)
            y = y.view(x.shape[:-1] + (self.out_features,)).to(x.dtype)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)

    def int8_weight(self):
        """The A8W8 form of the weight (quantize_a8w8), remade when the weight changed."""
        if "a8w8" not in self.__dict__:
            self.a8w8 = Derived()
        return self.a8w8.get(self.weight, lambda w: quantize_a8w8(w, self.act_absmax))


WEIGHTS = {None: FastLinear, "int8": Int8Linear, "a8w8": A8W8Linear}
COPIES = {FastLinear: "reordered", Int8Linear: "int8", A8W8Linear: "a8w8"}  # what each class keeps beside the weight


@torch.no_grad()
def input_absmax(model: nn.Module, layers: list[nn.Linear], tokens: torch.Tensor) -> dict:
    """The largest |input| per input channel that each layer sees while model runs on tokens (fp32); a layer
    the tokens never reach (an expert no token is routed to) is absent."""
    found = {}

    def record(layer, args):
        if args[0].numel() == 0:  # (an expert's call with no tokens)
            return
        a = args[0].detach().reshape(-1, layer.in_features).abs().amax(0).float()
        found[layer] = torch.maximum(found[layer], a) if layer in found else a

    hooks = [layer.register_forward_pre_hook(record) for layer in layers]
    try:
        model(tokens)
    finally:
        for h in hooks:
            h.remove()
    return found


def fast(model: nn.Module, threads: bool = False, weights: str | None = None,
         calibration: torch.Tensor | None = None) -> nn.Module:
    """Make model decode faster on a CPU, in place (and return it): every plain nn.Linear becomes a FastLinear,
    or with weights="int8" an Int8Linear, or with weights="a8w8" an A8W8Linear.

    Parameters, names, state_dict(), tied weights and training behaviour are unchanged; subclasses of nn.Linear
    (finetune.py's LoRALinear) are left as they are. Calling it again is harmless, and the last call's weights
    decide. threads=True (what the model files' command lines pass) also sets torch's thread count for decoding
    now: decode_threads(), below. weights="int8" quantizes every weight now (not at the first token), and
    holds the int8 copy beside the float weight: see Int8Linear. weights="a8w8" needs calibration, token ids
    (batch, T) of ordinary text (a few hundred tokens), which the model runs once, with float products, to
    measure each layer's input range; a layer they never reach takes Int8Linear's weight-only product. Sibling
    layers (q/k/v, gate/up) are grouped for stacked bf16 products: see Siblings."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: use None (the model's own), 'int8' or 'a8w8'")
    if (weights == "a8w8") != (calibration is not None):
        raise ValueError("weights='a8w8' needs calibration=token ids (batch, T) of some text, and only it uses them")
    cls = WEIGHTS[weights]
    layers = [m for m in model.modules() if type(m) in (nn.Linear, *COPIES)]
    for module in layers:
        module.__class__ = nn.Linear  # plain float products while calibrating (no reordered copies)
        for name in COPIES.values():
            # the other kinds' copies, and a8w8's own: it is made from the calibration, which may be new
            if name != COPIES[cls] or cls is A8W8Linear:
                module.__dict__.pop(name, None)
        module.__dict__.pop("act_absmax", None)
    absmax = input_absmax(model, layers, calibration) if cls is A8W8Linear else {}
    for module in layers:
        if cls is A8W8Linear:
            module.__class__ = A8W8Linear if module in absmax else Int8Linear
            module.act_absmax = absmax.get(module)
        else:
            module.__class__ = cls
        if cls is not FastLinear:
            module.int8_weight()  # quantize now, not at the first token
    stack_siblings(model)
    if threads:
        torch.set_num_threads(decode_threads())
    return model


# -----------------------------------------------------------------------------
# Threads on a busy machine (issue #13)
#
# A parallel region of PyTorch's OpenMP runtime ends when every one of its threads has finished its part, and
# a waiting thread spins (OMP_WAIT_POLICY=active, libgomp's default while threads <= cores). With another job
# on the cores, a thread of ours is descheduled for a time slice while its partner spins on the other core,
# taking that core from the very job that pushed ours off. A decode step is dozens (plain: attention, the
# output head) to hundreds (fast fp32: every product) of such regions, so it waits on the scheduler rather
# than on memory. Measured with SmolLM2-135M fp32 on the 2 development cores under other developers' jobs:
# 2 threads 0.8-2.7 tok/s plain or fast, 1 thread 7-13 tok/s; with OMP_WAIT_POLICY=passive (which only works
# when set before torch is imported) 2 threads gave 5.4-6.9 tok/s. The split is not the cause (plain
# collapses alike); the waiting is. Hence: one thread per core that other jobs leave idle (README.md has the
# busy-machine rows of the decode benchmarks).

MAX_THREADS = torch.get_num_threads()  # torch's own choice (OMP_NUM_THREADS, else one per core), read at import


def busy_cpus(seconds: float = 0.1) -> float:
    """How many CPUs other processes keep busy, from /proc/stat over a short sample while this process waits
    (0 where there is no /proc/stat)."""
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
    cpus = os.cpu_count() or 1
    return cpus * (1 - (idle1 - idle0) / max(total1 - total0, 1))


def decode_threads() -> int:
    """Threads for decoding now: one per core that other jobs leave idle, at least one, at most torch's default.
    The CLIs set it through fast(model, threads=True) before generating."""
    cores = min(MAX_THREADS, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else MAX_THREADS)
    return max(1, min(cores, round(cores - busy_cpus())))
