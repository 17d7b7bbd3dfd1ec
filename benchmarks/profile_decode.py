"""
Where one decode step's time goes: a per-op profile of batch-1 decoding with fast_decode, split into the weight
products (which stream the weights: bandwidth-bound) and everything else (norms, RoPE, cache writes, attention,
views: a fixed cost per op), against the bound each part meets.

    python benchmarks/profile_decode.py --model smollm2-135m --precision fp32
    python benchmarks/profile_decode.py --model llama3.2-1b --precision int4   # the checkpoint bench_llamacpp.py made
    python benchmarks/profile_decode.py --model smollm2-135m --precision fp32 --compile   # the compiled step

The same models, checkpoints and precisions as bench_llamacpp.py (int8 and int4: the rest of the model in
--quant_dtype). After a prompt (SmolLM2: its 39-token chat prompt; 1B: 64
random tokens) the model's own forward_cached runs --steps decode steps (greedy), first timed plainly (wall ms per
token), then under torch.profiler (which adds a few microseconds to every op; the split is read from it and
scaled to the plain wall time). Printed: the ops by self time per token, and a summary: the products' time
against the bandwidth floor (weight bytes / read bandwidth, the least any engine can take for them), and the
rest, ops per token and their mean cost. With --compile (fast_decode.compile_decode) the step's fused loops run
inside one profiled call a step (`## Call CompiledFxGraph ...`), beside dynamo's check of its guards (`TorchDynamo
Cache Lookup`); the weight products stay their kernels, each still an op of its own (an fp32 model's split
products may be fused into the compiled code, and then count as the rest).
"""

import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fast_decode  # noqa: E402
import smollm2  # noqa: E402
from bench_llamacpp import DTYPES, PRECISIONS, load_ours, random_llama_checkpoint  # noqa: E402
from decode_timing import load_average, read_bandwidth_gbs, streamed_bytes  # noqa: E402
from tokenizer_bpe import Tokenizer  # noqa: E402
from cli import cli  # noqa: E402

# the ops that multiply by a weight matrix (fp32 F.linear -> addmm/mm; the fast fp32 split -> bmm; bf16 ->
# oneDNN's linear; int8 and int4 -> fast_decode.cpp's kernels, or PyTorch's where those cannot run; a8w8 -> fbgemm's,
# and addmm for its outlier channels). A step in one call (fast_decode.OneCallTrunk) multiplies inside
# fast_decode::llama_layers, which counts as products here, its norms, RoPE and attention with them.
PRODUCTS = {"aten::mm", "aten::addmm", "aten::bmm", "mkldnn::_linear_pointwise", "aten::_weight_int8pack_mm",
            "aten::_weight_int4pack_mm_for_cpu", "quantized::linear_dynamic", "fast_decode::int4_linear",
            "fast_decode::int6_linear", "fast_decode::int8_linear", "fast_decode::bf16_linear",
            "fast_decode::llama_layers"}


def decode_steps(model, ids, steps):
    """Prefill ids, then `steps` greedy decode steps through the model's forward_cached; returns a function that
    reruns the decode steps from the same state (the cache slots are simply rewritten)."""
    model.setup_cache(1, len(ids) + steps + 1)
    with torch.no_grad():
        logits = model.forward_cached(torch.tensor([ids]), torch.arange(len(ids)))
    first = logits.argmax(-1, keepdim=True)  # (1, 1)

    @torch.no_grad()
    def run():
        tok = first
        for i in range(steps):
            tok = model.forward_cached(tok, torch.tensor([len(ids) + i])).argmax(-1, keepdim=True)
    return run


def main(model: str = "smollm2-135m", precision: str = "fp32", steps: int = 32, top: int = 15,
         threads: int | None = None, quant_dtype: str = "float32", compile: bool = False,
         smollm2_dir: str = str(ROOT / "checkpoints" / "SmolLM2-135M-Instruct"),
         tokenizer_dir: str = str(ROOT / "checkpoints" / "Llama-3.2-tokenizer"),
         out_dir: str = str(ROOT / "runs" / "bench_llamacpp")):
    """Per-op profile of batch-1 decoding with fast_decode.

    model: smollm2-135m or llama3.2-1b
    precision: fp32, bf16, int8 or int4 (as bench_llamacpp.py)
    steps: decode steps profiled
    top: ops listed
    threads: torch threads (default: torch's own choice, one per core)
    quant_dtype: float32 or bfloat16: the dtype of the rest of an int8 or int4 model
    compile: profile the decode step compiled (fast_decode.compile_decode; the compiling happens in the warm-up); a
    step that is one call of fast_decode.cpp already (int8, int4, bf16) stays one
    smollm2_dir: the SmolLM2-135M-Instruct checkpoint
    tokenizer_dir: the Llama 3 tokenizer (for making the random 1B checkpoint, if bench_llamacpp.py has not)
    out_dir: where bench_llamacpp.py keeps the random 1B checkpoint
    """
    if threads:
        torch.set_num_threads(threads)
    if precision not in PRECISIONS:
        raise SystemExit(f"error: unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
    dtype, weights, _ = PRECISIONS[precision]
    dtype = dtype or DTYPES[quant_dtype]
    if model == "smollm2-135m":
        ckpt = Path(smollm2_dir)
        ids = smollm2.encode_chat(Tokenizer.from_file(ckpt), [{"role": "user", "content": "Write a short story "
                                                              "about a lighthouse keeper."}])
    elif model == "llama3.2-1b":
        ckpt = random_llama_checkpoint(Path(out_dir), Path(tokenizer_dir))
        ids = torch.randint(0, 128000, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    else:
        raise SystemExit(f"error: unknown model {model!r}: use smollm2-135m or llama3.2-1b")
    m = load_ours(model, ckpt, dtype, precision)
    if compile:
        fast_decode.compile_decode(m)
    bw = read_bandwidth_gbs()
    run = decode_steps(m, ids, steps)
    run()  # warm-up (and the bf16 reorder)
    wall = []
    for _ in range(3):
        t0 = time.perf_counter()
        run()
        wall.append((time.perf_counter() - t0) / steps)
        bw = max(bw, read_bandwidth_gbs())
    wall_ms = min(wall) * 1e3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    per_op = defaultdict(lambda: [0, 0.0])  # name -> [calls, self us]
    for e in prof.key_averages():
        per_op[e.key][0] += e.count
        per_op[e.key][1] += e.self_cpu_time_total
    total_us = sum(us for _, us in per_op.values())
    scale = wall_ms * 1e3 * steps / total_us  # profiled time -> plain wall time
    product_us = sum(us for k, (_, us) in per_op.items() if k in PRODUCTS) * scale / steps
    other_us = wall_ms * 1e3 - product_us
    n_other = sum(c for k, (c, _) in per_op.items() if k not in PRODUCTS) / steps
    n_products = sum(c for k, (c, _) in per_op.items() if k in PRODUCTS) / steps
    weight_mb = streamed_bytes(m) / 1e6
    floor_ms = weight_mb / 1e3 / bw * 1e3
    cmd = " ".join(["python benchmarks/profile_decode.py"] + sys.argv[1:])
    print(f"`{cmd}`: {model} {precision}{', compiled' if compile else ''}, {steps} decode steps, "
          f"{torch.get_num_threads()} threads, read bandwidth {bw:.1f} GB/s, {load_average()}\n")
    print("| op | calls/token | ms/token (self, scaled to wall) | share |")
    print("|---|---|---|---|")
    for k, (c, us) in sorted(per_op.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"| {k}{' (product)' if k in PRODUCTS else ''} | {c / steps:.0f} | {us * scale / steps / 1e3:.3f} "
              f"| {us / total_us:.0%} |")
    print(f"\nwall {wall_ms:.2f} ms/token ({1e3 / wall_ms:.1f} tok/s). Weight products: {product_us / 1e3:.2f} ms "
          f"({n_products:.0f} calls) for {weight_mb:.0f} MB of weights = {weight_mb / product_us * 1e3:.1f} GB/s, "
          f"against a bandwidth floor of {floor_ms:.2f} ms ({floor_ms / (product_us / 1e3):.0%} of the read "
          f"bandwidth). Everything else: {other_us / 1e3:.2f} ms in {n_other:.0f} ops = {other_us / n_other:.1f} us "
          f"per op ({other_us / (wall_ms * 1e3):.0%} of the step). Roofline (floor alone): {1e3 / floor_ms:.1f} tok/s.")


if __name__ == "__main__":
    cli(main)
