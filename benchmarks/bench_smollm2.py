"""
Decode speed of smollm2.py, plain and with fast_decode.fast(), against HF transformers' `generate` on the same
weights, same machine, same run; then the same on a busy machine (one competing CPU-bound process).

    python benchmarks/bench_smollm2.py                       # real SmolLM2-135M-Instruct, fp32 and bf16
    python benchmarks/bench_smollm2.py --new_tokens 64 --dtypes bfloat16 --threads 1 --busy false

Batch 1, greedy, a chat prompt, a fixed number of new tokens (no early stop). Decode tokens/s is timed from the
first generated token to the last, so prefill is excluded for all. Decoding at batch 1 is memory-bound: every
token reads all weights once (the tied 49152 x 576 embedding is read as the output head) plus the KV cache,
so the roofline is (read bandwidth) / (bytes per token); the read bandwidth is measured here too.
Also reports from_pretrained's load time and peak memory (in a fresh process, above what importing torch takes;
file pages read through the memory map count, so a bf16 load from an fp32 file also counts the fp32 file).
The busy rows run with a Python busy loop beside them: HF and smollm2.py with torch's default threads, and
smollm2.py with fast_decode.decode_threads(), the choice the CLI makes.
"""

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import smollm2  # noqa: E402
from decode_timing import (competing_process, hf_decode_tps, load_average, machine_line, num_threads,  # noqa: E402
                          ours_decode_tps, read_bandwidth_gbs)
from fast_decode import decode_threads, fast  # noqa: E402
from tokenizer_bpe import Tokenizer  # noqa: E402
from cli import cli  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_stats(ckpt_dir, dtype) -> dict:
    """from_pretrained in a fresh process: wall time, and peak resident memory (VmHWM) once every weight has been
    read (weights that stay memory-mapped from the file are only resident after their first use)."""
    code = f"""
import sys, time, torch; sys.path.insert(0, {str(ROOT)!r}); import smollm2
hwm = lambda: int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) * 1024
base = hwm()
t0 = time.perf_counter()
m = smollm2.SmolLM2.from_pretrained({str(ckpt_dir)!r}, dtype=torch.{dtype})
dt = time.perf_counter() - t0
for p in m.parameters(): p.sum()
print(dt, hwm() - base, sum(p.numel() * p.element_size() for p in m.parameters()))
"""
    dt, peak, weights = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       check=True).stdout.split()
    return dict(load_s=float(dt), peak_gib=int(peak) / 2**30, weights_gib=int(weights) / 2**30)


def main(ckpt_dir: str = str(ROOT / "checkpoints" / "SmolLM2-135M-Instruct"), new_tokens: int = 128,
         dtypes: str = "float32,bfloat16", repeats: int = 3, threads: int | None = None, busy: bool = True,
         busy_tokens: int = 32):
    """Decode speed of smollm2.py (fast and plain) against HF generate.

    ckpt_dir: a SmolLM2 checkpoint folder
    new_tokens: tokens generated per timed run
    dtypes: comma-separated, float32 and/or bfloat16
    repeats: interleaved timed runs per implementation (the best counts)
    threads: torch threads (default: torch's own choice, one per core)
    busy: also time each dtype beside a competing CPU-bound process
    busy_tokens: tokens per timed run on the busy machine (2 spin-waiting threads can fall to ~1 tok/s)
    """
    from transformers import LlamaForCausalLM

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    tok = Tokenizer.from_file(ckpt_dir)
    ids = smollm2.encode_chat(tok, [{"role": "user", "content": "Write a short story about a lighthouse keeper."}])
    bw = read_bandwidth_gbs()
    n_threads = torch.get_num_threads()
    print(machine_line(f"{n_threads} threads", bw))
    rows, busy_rows = [], []
    for name in dtypes.split(","):
        dtype = DTYPES[name]
        quick = fast(smollm2.SmolLM2.from_pretrained(ckpt_dir, dtype=dtype))
        plain = smollm2.SmolLM2.from_pretrained(ckpt_dir, dtype=dtype)
        hf = LlamaForCausalLM.from_pretrained(ckpt_dir, dtype=dtype).eval()
        n_params = sum(p.numel() for p in quick.parameters())
        # bytes read per decoded token: every weight once, plus on average half the final KV cache
        kv = 2 * quick.args.n_layers * quick.args.n_kv_heads * quick.args.head_dim * (len(ids) + new_tokens / 2)
        bytes_per_token = (n_params + kv) * dtype.itemsize
        runs = {"fast": lambda n: ours_decode_tps(quick, ids, n), "plain": lambda n: ours_decode_tps(plain, ids, n),
                "hf": lambda n: hf_decode_tps(hf, ids, n)}
        for run in runs.values():
            run(8)  # warm-up (and the one-time reorder of the bf16 weights)
        # interleave the runs so a change in machine load hits all alike; best of `repeats`, and the roofline
        # from the best bandwidth seen in the whole run (a shared machine's bandwidth varies over minutes)
        results = {k: [] for k in runs}
        for _ in range(repeats):
            for k, run in runs.items():
                results[k].append(run(new_tokens))
            bw = max(bw, read_bandwidth_gbs())
        best = {k: max(v) for k, v in results.items()}
        ls = load_stats(ckpt_dir, name)
        rows.append(dict(dtype=name, **best, ratio=best["fast"] / best["hf"], vs_plain=best["fast"] / best["plain"],
                         mb_per_token=bytes_per_token / 1e6, **ls))
        if busy:
            with competing_process():
                chosen = decode_threads()  # measured while the competing job runs, as the CLI would see it
                timed = {("HF generate", n_threads): runs["hf"], ("smollm2.py", n_threads): runs["fast"]}
                if chosen != n_threads:
                    timed[("smollm2.py", chosen)] = runs["fast"]
                results = {k: [] for k in timed}
                for _ in range(repeats):
                    for (impl, n), run in timed.items():
                        with num_threads(n):
                            results[(impl, n)].append(run(busy_tokens))
            hf_best = max(results[("HF generate", n_threads)])
            for (impl, n), v in results.items():
                busy_rows.append(dict(dtype=name, impl=impl, threads=n, tps=max(v), ratio=max(v) / hf_best,
                                      chosen=n == chosen))
        del quick, plain, hf
    for r in rows:
        r["roofline"] = bw * 1e3 / r["mb_per_token"]
        r["frac"] = r["fast"] / r["roofline"]
    cmd = " ".join(["python benchmarks/bench_smollm2.py"] + sys.argv[1:])
    print(f"\n`{cmd}`: SmolLM2-135M-Instruct, batch 1, greedy, {len(ids)}-token prompt, {new_tokens} new tokens, "
          f"{n_threads} threads, best of {repeats}, best read bandwidth {bw:.1f} GB/s, {load_average()} at the end\n")
    print("| dtype | smollm2.py + fast tok/s | smollm2.py plain tok/s | HF generate tok/s | fast vs HF | fast vs plain "
          "| MB/token | roofline tok/s | of roofline | load s | peak RSS above torch, GiB (weights GiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['fast']:.1f} | {r['plain']:.1f} | {r['hf']:.1f} | **{r['ratio']:.2f}x** "
              f"| {r['vs_plain']:.2f}x | {r['mb_per_token']:.0f} | {r['roofline']:.1f} | {r['frac']:.0%} "
              f"| {r['load_s']:.2f} | {r['peak_gib']:.2f} ({r['weights_gib']:.2f}) |")
    if busy_rows:
        print(f"\nBusy machine: the same, {busy_tokens} new tokens, beside one competing CPU-bound process "
              f"(`python -c 'while True: pass'`); the chosen threads are fast_decode.decode_threads()'s:\n")
        print("| dtype | implementation | threads | decode tok/s | vs HF generate |")
        print("|---|---|---|---|---|")
        for r in busy_rows:
            what = r["impl"] + (" + fast" if r["impl"] == "smollm2.py" else "")
            print(f"| {r['dtype']} | {what} | {r['threads']}{' (chosen)' if r['chosen'] else ''} | {r['tps']:.1f} "
                  f"| {r['ratio']:.2f}x |")
    print(json.dumps(dict(idle=rows, busy=busy_rows)))


if __name__ == "__main__":
    cli(main)
