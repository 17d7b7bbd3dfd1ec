"""
Decode speed of smollm2.py against HF transformers' `generate` on the same weights, same machine, same run.

    python benchmarks/bench_smollm2.py                       # real SmolLM2-135M-Instruct, fp32 and bf16
    python benchmarks/bench_smollm2.py --new_tokens 64 --dtypes bfloat16 --threads 1

Batch 1, greedy, a chat prompt, a fixed number of new tokens (no early stop). Decode tokens/s is timed from the
first generated token to the last, so prefill is excluded for both. Decoding at batch 1 is memory-bound: every
token reads all weights once (the tied 49152 x 576 embedding is read as the output head) plus the KV cache,
so the roofline is (read bandwidth) / (bytes per token); the read bandwidth is measured here too.
Also reports from_pretrained's load time and peak memory (in a fresh process, above what importing torch takes;
file pages read through the memory map count, so a bf16 load from an fp32 file also counts the fp32 file).
"""

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import smollm2  # noqa: E402
from tokenizer_bpe import Tokenizer  # noqa: E402
from decode_timing import hf_decode_tps, ours_decode_tps, read_bandwidth_gbs  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_stats(ckpt_dir, dtype) -> dict:
    """from_pretrained in a fresh process: wall time, and peak resident memory (VmHWM) once every weight has been
    read (weights that stay memory-mapped from the file are only resident after their first use)."""
    code = f"""
import sys, time, torch; sys.path.insert(0, {str(ROOT)!r}); import smollm2
hwm = lambda: int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) * 1024
base = hwm()
t0 = time.perf_counter(); m = smollm2.SmolLM2.from_pretrained({str(ckpt_dir)!r}, dtype=torch.{dtype}); dt = time.perf_counter() - t0
for p in m.parameters(): p.sum()
print(dt, hwm() - base, sum(p.numel() * p.element_size() for p in m.parameters()))
"""
    dt, peak, weights = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       check=True).stdout.split()
    return dict(load_s=float(dt), peak_gib=int(peak) / 2**30, weights_gib=int(weights) / 2**30)


def main(ckpt_dir: str = str(ROOT / "checkpoints" / "SmolLM2-135M-Instruct"), new_tokens: int = 128,
         dtypes: str = "float32,bfloat16", repeats: int = 3, threads: int | None = None):
    """threads: torch threads (default: torch's own choice, one per core)."""
    from transformers import LlamaForCausalLM

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    tok = Tokenizer.from_file(ckpt_dir)
    ids = smollm2.encode_chat(tok, [{"role": "user", "content": "Write a short story about a lighthouse keeper."}])
    bw = read_bandwidth_gbs()
    print(f"machine: {torch.get_num_threads()} threads, read bandwidth {bw:.1f} GB/s, torch {torch.__version__}")
    rows = []
    for name in dtypes.split(","):
        dtype = DTYPES[name]
        ours = smollm2.SmolLM2.from_pretrained(ckpt_dir, dtype=dtype)
        hf = LlamaForCausalLM.from_pretrained(ckpt_dir, dtype=dtype).eval()
        n_params = sum(p.numel() for p in ours.parameters())
        # bytes read per decoded token: every weight once, plus on average half the final KV cache (fp32 on a CPU)
        kv = 2 * ours.args.n_layers * ours.args.n_kv_heads * ours.args.head_dim * (len(ids) + new_tokens / 2)
        bytes_per_token = n_params * dtype.itemsize + kv * 4
        ours_decode_tps(ours, ids, 8), hf_decode_tps(hf, ids, 8)  # warm-up
        # interleave the runs so a change in machine load hits both alike; best of `repeats`, and the roofline
        # from the best bandwidth seen in the whole run (a shared machine's bandwidth varies over minutes)
        o, h = [], []
        for _ in range(repeats):
            o.append(ours_decode_tps(ours, ids, new_tokens))
            h.append(hf_decode_tps(hf, ids, new_tokens))
            bw = max(bw, read_bandwidth_gbs())
        o, h = max(o), max(h)
        ls = load_stats(ckpt_dir, name)
        rows.append(dict(dtype=name, ours=o, hf=h, ratio=o / h, mb_per_token=bytes_per_token / 1e6, **ls))
        del ours, hf
    for r in rows:
        r["roofline"] = bw * 1e3 / r["mb_per_token"]
        r["frac"] = r["ours"] / r["roofline"]
    print(f"\nSmolLM2-135M-Instruct, batch 1, greedy, {len(ids)}-token prompt, {new_tokens} new tokens, "
          f"best read bandwidth {bw:.1f} GB/s")
    print("| dtype | smollm2.py tok/s | HF generate tok/s | ratio | MB/token | roofline tok/s | of roofline "
          "| load s | peak RSS above torch, GiB (weights GiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['ours']:.1f} | {r['hf']:.1f} | {r['ratio']:.2f}x | {r['mb_per_token']:.0f} "
              f"| {r['roofline']:.1f} | {r['frac']:.0%} | {r['load_s']:.2f} | {r['peak_gib']:.2f} ({r['weights_gib']:.2f}) |")
    print(json.dumps(rows))


if __name__ == "__main__":
    import fire

    fire.Fire(main)
