"""
Decode speed of lm2.py with fast_decode.fast() against lm2.py plain, on the real SmolLM2-135M-Instruct weights
with LM2's memory added (fresh, in every block: the file's default), same run.

    python benchmarks/bench_lm2.py                         # fp32 and bf16
    python benchmarks/bench_lm2.py --dtypes bf16 --max_new_tokens 32

There is no HF LM2 to compare with; the memory module's products (its q/k/v and gates) go through FastLinear
as the decoder's do. Batch 1, greedy, a chat prompt, a fixed number of new tokens, prefill excluded (see
decode_timing.py).
"""

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lm2  # noqa: E402
import smollm2  # noqa: E402
from decode_timing import (interleaved_best, load_average, machine_line, model_class, ours_decode_tps,  # noqa: E402
                          read_bandwidth_gbs, shared_copy)
from fast_decode import fast  # noqa: E402
from cli import cli  # noqa: E402
from tokenizer_bpe import Tokenizer  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main(ckpt_dir: str = str(ROOT / "checkpoints" / "SmolLM2-135M-Instruct"), dtypes: str = "fp32,bf16",
         max_new_tokens: int = 128, repeats: int = 3):
    """Decode speed of lm2.py, fast against plain.

    ckpt_dir: a SmolLM2 (Llama-architecture) checkpoint folder
    dtypes: comma-separated: fp32, bf16
    max_new_tokens: tokens generated per timed run
    repeats: interleaved timed runs per implementation (the best counts)
    """
    ids = smollm2.encode_chat(Tokenizer.from_file(ckpt_dir),
                              [{"role": "user", "content": "Write a short story about a lighthouse keeper."}])
    bw = read_bandwidth_gbs()
    print(machine_line(f"{torch.get_num_threads()} threads", bw), file=sys.stderr)
    rows = []
    for name in dtypes.split(","):
        torch.manual_seed(0)  # the fresh memory's initial weights
        plain = model_class(lm2).from_pretrained(ckpt_dir, dtype=DTYPES[name])
        quick = fast(shared_copy(plain))
        best = interleaved_best({"lm2.py + fast": lambda n: ours_decode_tps(quick, ids, n),
                                 "lm2.py plain": lambda n: ours_decode_tps(plain, ids, n)}, max_new_tokens, repeats)
        rows.append(dict(dtype=name, fast=best["lm2.py + fast"], plain=best["lm2.py plain"],
                         ratio=best["lm2.py + fast"] / best["lm2.py plain"],
                         params_m=sum(p.numel() for p in plain.parameters()) / 1e6))
        del plain, quick
    cmd = " ".join(["python benchmarks/bench_lm2.py"] + sys.argv[1:])
    print(f"\n`{cmd}`: SmolLM2-135M-Instruct + LM2 memory, {torch.get_num_threads()} threads, batch 1, greedy, "
          f"{len(ids)}-token prompt, {max_new_tokens} new tokens, best of {repeats}, {load_average()} at the end\n")
    print("| dtype | parameters (M) | lm2.py + fast tok/s | lm2.py plain tok/s | fast vs plain |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['params_m']:.0f} | {r['fast']:.1f} | {r['plain']:.1f} | **{r['ratio']:.2f}x** |")
    print(json.dumps(rows), file=sys.stderr)


if __name__ == "__main__":
    cli(main)
