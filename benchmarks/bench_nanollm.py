"""
Decode speed of nanollm.py, plain and with fast_decode.fast(), against HF transformers' `DeepseekV3ForCausalLM`
`generate` on the same random weights, same run.

    python benchmarks/bench_nanollm.py                            # nano-327m shapes, fp32 and bf16
    python benchmarks/bench_nanollm.py --preset nano-small --dtypes fp32 --max_new_tokens 32

The weights are random: HF's model is built from the preset's config and written with save_pretrained, which
nanollm.py then loads (the path test_parity.py checks for equal logits). HF can only place MoE blocks after k
dense ones (`first_k_dense_replace`), so a preset whose MoE blocks are interleaved (nano-327m: 3, 7, 11, 15, 19)
gets MoE on every block from its first one on: nano-327m's widths, DeepSeek-V3's layout. Batch 1, greedy, a
random prompt, a fixed number of new tokens, prefill excluded (see decode_timing.py); nanollm decodes with the
absorbed MLA (its default), HF with its own attention.
"""

import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import nanollm  # noqa: E402
from decode_timing import (hf_decode_tps, interleaved_best, load_average, machine_line, model_class,  # noqa: E402
                          ours_decode_tps, read_bandwidth_gbs, shared_copy)
from fast_decode import fast  # noqa: E402
from cli import cli  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(preset: str, dtype):
    """A random HF DeepseekV3ForCausalLM, nanollm.py's model of the same checkpoint, and a fast() copy of it that
    shares its tensors."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    args = nanollm.ModelArgs.from_name(preset)
    args.moe_layers = tuple(range(args.moe_layers[0], args.n_layers)) if args.moe_layers else ()
    torch.manual_seed(0)
    hf = DeepseekV3ForCausalLM._from_config(DeepseekV3Config(**args.to_hf_config()), dtype=dtype).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        plain = model_class(nanollm).from_pretrained(tmp, dtype=dtype)
    return hf, plain, fast(shared_copy(plain))


def main(preset: str = "nano-327m", dtypes: str = "fp32,bf16", max_new_tokens: int = 64, prompt_len: int = 64,
         repeats: int = 3):
    """Decode speed of nanollm.py (fast and plain) against HF's DeepseekV3 generate, random weights.

    preset: a nanollm.py preset (its widths; MoE on every block from its first MoE block on)
    dtypes: comma-separated: fp32, bf16
    max_new_tokens: tokens generated per timed run
    prompt_len: random prompt tokens
    repeats: interleaved timed runs per implementation (the best counts)
    """
    bw = read_bandwidth_gbs()
    print(machine_line(f"{torch.get_num_threads()} threads", bw), file=sys.stderr)
    rows = []
    for name in dtypes.split(","):
        dtype = DTYPES[name]
        hf, plain, quick = build(preset, dtype)
        ids = torch.randint(0, plain.args.vocab_size, (prompt_len,),
                            generator=torch.Generator().manual_seed(0)).tolist()
        n_params = sum(p.numel() for p in plain.parameters())
        best = interleaved_best({"nanollm.py + fast": lambda n: ours_decode_tps(quick, ids, n),
                                 "nanollm.py plain": lambda n: ours_decode_tps(plain, ids, n),
                                 "HF generate": lambda n: hf_decode_tps(hf, ids, n)}, max_new_tokens, repeats)
        bw = max(bw, read_bandwidth_gbs())
        for k, tps in best.items():
            rows.append(dict(impl=k, dtype=name, tps=tps, ratio=tps / best["HF generate"],
                             vs_plain=tps / best["nanollm.py plain"], params_m=n_params / 1e6))
        del hf, plain, quick
    cmd = " ".join(["python benchmarks/bench_nanollm.py"] + sys.argv[1:])
    print(f"\n`{cmd}`: {preset} widths, random weights, {torch.get_num_threads()} threads, batch 1, greedy, "
          f"{prompt_len}-token prompt, {max_new_tokens} new tokens, best of {repeats}, best read bandwidth "
          f"{bw:.1f} GB/s, {load_average()} at the end\n")
    print("| implementation | dtype | parameters (M, all experts) | decode tok/s | vs HF generate | vs plain |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['dtype']} | {r['params_m']:.0f} | {r['tps']:.2f} | {r['ratio']:.2f}x "
              f"| {r['vs_plain']:.2f}x |")
    print(json.dumps(rows), file=sys.stderr)


if __name__ == "__main__":
    cli(main)
