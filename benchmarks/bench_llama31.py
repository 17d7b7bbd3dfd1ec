"""
Decode speed of llama31.py, plain and with fast_decode.fast(), against HF transformers' `generate` on the same
random weights, same run; then the same on a busy machine (one competing CPU-bound process).

    python benchmarks/bench_llama31.py                                   # CPU: Llama 3.2 1B, fp32 and bf16
    python benchmarks/bench_llama31.py --max_new_tokens 16 --dtypes bf16 --busy false  # a quick check
    python benchmarks/bench_llama31.py --device cuda --model llama3.1-8b --dtypes bf16 --compile

The weights are random (a preset's shapes; no download needed) and shared by all three models: HF's parameters
are assigned into llama31's (a plain copy of the module tree and a fast one), so memory holds them once.
Batch 1, greedy, a fixed number of new tokens (no early stop). Decode tokens/s is timed from the first
generated token to the last, so prefill is excluded for all. Decoding at batch 1 is memory-bound: every token
reads every weight once (a tied embedding is read as the output head) plus the KV cache, so the roofline is
(read bandwidth) / (bytes per token); the read bandwidth is measured here too. --compile also times plain
llama31 with its decode step under torch.compile ("reduce-overhead", i.e. CUDA graphs, on GPU; inductor's
weight freezing on CPU), on a KV cache set up once so every step has the same shapes. The busy rows (CPU)
run with a Python busy loop beside them: HF and llama31.py with torch's default threads, and llama31.py with
fast_decode.decode_threads(), the CLI's choice.
"""

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import llama31  # noqa: E402
from decode_timing import (competing_process, hf_decode_tps, load_average, machine_line, num_threads,  # noqa: E402
                          ours_decode_tps, read_bandwidth_gbs)
from fast_decode import decode_threads, fast  # noqa: E402
from cli import cli  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def compiled_run(model, ids, device):
    """A run of llama31 whose decode step is torch.compile'd (CUDA graphs on GPU, frozen weights on CPU), as
    gpt-fast does."""
    mode = "reduce-overhead" if device.startswith("cuda") else "default"
    if not device.startswith("cuda"):  # CPU: weights become constants, reordered once for oneDNN's kernels
        torch._inductor.config.freezing = True
    compiled = torch.compile(model.forward_cached, mode=mode, fullgraph=True)
    model.setup_cache(1, model.args.max_seq_len)  # kept: generate reuses it, so the graphs see fixed buffers

    def run(n):
        model.forward_cached = compiled  # an instance attribute shadows the method for this run only
        try:
            return ours_decode_tps(model, ids, n)
        finally:
            del model.forward_cached
    return run


def build_pair(args, dtype, device):
    """A random HF LlamaForCausalLM, and two llama31.Llama (plain, and with fast()) holding the very same
    parameter tensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):  # built and initialised directly in `dtype`: 8B in bf16 is 16 GB, in fp32 32 GB
        hf = LlamaForCausalLM._from_config(LlamaConfig(**args.to_hf_config()), dtype=dtype).eval()
    ours = []
    for _ in range(2):
        with torch.device("meta"):
            model = llama31.Llama(args)
        model.load_state_dict(hf.state_dict(), strict=True, assign=True)
        if args.tie_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.init_rope(device)
        ours.append(model.eval())
    return hf, ours[0], fast(ours[1])


def main(model: str = "llama3.2-1b", dtypes: str = "fp32,bf16", max_new_tokens: int = 128, prompt_len: int = 64,
         repeats: int = 3, device: str = "cpu", compile: bool = False, busy: bool = True, busy_tokens: int = 16):
    """Decode speed of llama31.py (fast and plain) against HF generate, random weights.

    model: a llama31.py preset
    dtypes: comma-separated: fp32, bf16
    max_new_tokens: tokens generated per timed run
    prompt_len: random prompt tokens
    repeats: interleaved timed runs per implementation (the best counts)
    device: cpu or cuda
    compile: also time llama31.py with its decode step under torch.compile
    busy: also time each dtype beside a competing CPU-bound process (CPU only)
    busy_tokens: tokens per timed run on the busy machine
    """
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda was requested but no CUDA device is available")
    args = llama31.ModelArgs.from_name(model)
    args.max_seq_len = prompt_len + max_new_tokens
    ids = torch.randint(0, min(args.vocab_size, 128000), (prompt_len,),
                        generator=torch.Generator().manual_seed(0)).tolist()
    bw = read_bandwidth_gbs(device)
    n_threads = torch.get_num_threads()
    where = torch.cuda.get_device_name() if device.startswith("cuda") else f"{n_threads} CPU threads"
    print(machine_line(where, bw), file=sys.stderr)
    rows, busy_rows = [], []
    for name in dtypes.split(","):
        dtype = DTYPES[name]
        hf, plain, quick = build_pair(args, dtype, device)
        n_params = sum(p.numel() for p in quick.parameters())  # a tied matrix counts once, and is read once
        # bytes read per decoded token: every weight once, plus the whole preallocated KV cache, which attention
        # reads (masked) every step
        kv = 2 * args.n_layers * args.n_kv_heads * args.head_dim * (prompt_len + max_new_tokens)
        bytes_per_token = (n_params + kv) * dtype.itemsize
        runs = {"llama31.py + fast": lambda n: ours_decode_tps(quick, ids, n),
                "llama31.py plain": lambda n: ours_decode_tps(plain, ids, n),
                "HF generate": lambda n: hf_decode_tps(hf, ids, n)}
        if compile:
            runs["llama31.py compiled"] = compiled_run(plain, ids, device)
        for run in runs.values():  # warm-up (and compilation, and the one-time reorder of bf16 weights)
            run(4)
        # interleave the runs so a change in machine load hits all alike; best of `repeats`, and the roofline
        # from the best bandwidth seen in the whole run (a shared machine's bandwidth varies over minutes)
        results = {k: [] for k in runs}
        for _ in range(repeats):
            for k, run in runs.items():
                results[k].append(run(max_new_tokens))
            bw = max(bw, read_bandwidth_gbs(device))
        best = {k: max(v) for k, v in results.items()}
        for k, tps in best.items():
            rows.append(dict(impl=k, dtype=str(dtype).removeprefix("torch."), tps=tps, ratio=tps / best["HF generate"],
                             vs_plain=tps / best["llama31.py plain"], mb_per_token=bytes_per_token / 1e6))
        if busy and device == "cpu":
            with competing_process():
                chosen = decode_threads()  # measured while the competing job runs, as the CLI would see it
                timed = [("HF generate", n_threads), ("llama31.py + fast", n_threads)]
                timed += [("llama31.py + fast", chosen)] if chosen != n_threads else []
                results = {k: [] for k in timed}
                for _ in range(repeats):
                    for impl, n in timed:
                        with num_threads(n):
                            results[(impl, n)].append(runs[impl](busy_tokens))
            for (impl, n), v in results.items():
                busy_rows.append(dict(impl=impl, dtype=str(dtype).removeprefix("torch."), threads=n, tps=max(v),
                                      ratio=max(v) / max(results[("HF generate", n_threads)]), chosen=n == chosen))
        plain.clear_cache()
        del hf, plain, quick, runs
    for r in rows:
        r["roofline"] = bw * 1e3 / r["mb_per_token"]
        r["frac"] = r["tps"] / r["roofline"]
    cmd = " ".join(["python benchmarks/bench_llama31.py"] + sys.argv[1:])
    print(f"\n`{cmd}`: {model} random weights, {where}, batch 1, greedy, {prompt_len}-token prompt, "
          f"{max_new_tokens} new tokens, best of {repeats}, best read bandwidth {bw:.1f} GB/s, "
          f"{load_average()} at the end\n")
    print("| implementation | dtype | decode tok/s | vs HF generate | vs plain | MB/token | roofline tok/s "
          "| of roofline |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['dtype']} | {r['tps']:.2f} | {r['ratio']:.2f}x | {r['vs_plain']:.2f}x "
              f"| {r['mb_per_token']:.0f} | {r['roofline']:.2f} | {r['frac']:.0%} |")
    if busy_rows:
        print(f"\nBusy machine: the same, {busy_tokens} new tokens, beside one competing CPU-bound process "
              f"(`python -c 'while True: pass'`); the chosen threads are fast_decode.decode_threads()'s:\n")
        print("| implementation | dtype | threads | decode tok/s | vs HF generate |")
        print("|---|---|---|---|---|")
        for r in busy_rows:
            print(f"| {r['impl']} | {r['dtype']} | {r['threads']}{' (chosen)' if r['chosen'] else ''} "
                  f"| {r['tps']:.2f} | {r['ratio']:.2f}x |")
    print(json.dumps(dict(idle=rows, busy=busy_rows)), file=sys.stderr)


if __name__ == "__main__":
    cli(main)
