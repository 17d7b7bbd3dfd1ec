"""Absorbed MLA decode of nanollm.py against an earlier nanollm.py, on the same random weights, in one run.

Each preset's model is built with the baseline file and shares its tensors with this file's model; both generate 64
new tokens after a 64-token random prompt (batch 1, greedy, the absorbed path), calls interleaved, best of `repeats`.
Then the MLA layer alone: one decode step against a filled random cache of 128 and of 1024 tokens, 50 calls, best of 5.
Ratios are this file / the baseline.

Run: git show HEAD~1:nanollm.py > /tmp/nanollm_before.py
     python benchmarks/bench_mla_absorb.py --baseline /tmp/nanollm_before.py [--presets nano-small:fp32,nano-327m:bf16]
"""
import importlib.util
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import nanollm  # noqa: E402
from cli import cli  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def pair(baseline, preset: str, dtype) -> dict:
    """{"before": the baseline file's model, "after": this file's, sharing its tensors}, random weights."""
    torch.manual_seed(0)
    before = baseline.NanoLLM(baseline.ModelArgs.from_name(preset)).to(dtype).eval()
    with torch.device("meta"):
        after = nanollm.NanoLLM(nanollm.ModelArgs.from_name(preset))
    after.load_state_dict(before.state_dict(), assign=True)
    if after.args.tie_embeddings:
        after.lm_head.weight = after.model.embed_tokens.weight
    after.init_rope()
    return {"before": before, "after": after.eval()}


def layer_time_us(models: dict, S: int, dtype) -> dict:
    """Best of 5 x 50 calls of the first MLA layer of each model, one query against the same filled cache of S."""
    m = models["after"]
    x = torch.randn(1, 1, m.args.dim, dtype=dtype)
    cos, sin = nanollm.rope_cos_sin(m.inv_freq, torch.tensor([[S - 1]]), dtype, m.rope_factor)
    mask, pos = torch.ones(1, 1, 1, S, dtype=torch.bool), torch.tensor([S - 1])
    cache = nanollm.MLACache(1, S, m.args.kv_lora_rank, m.args.qk_rope_head_dim, dtype, "cpu")
    cache.kv.normal_(), cache.pe.normal_()
    attn = {k: model.model.layers[0].self_attn for k, model in models.items()}
    best = {k: float("inf") for k in attn}
    with torch.inference_mode():
        for a in attn.values():
            a.cache = cache
        for _ in range(5):
            for k, a in attn.items():
                t0 = time.perf_counter()
                for _ in range(50):
                    a(x, cos, sin, mask, pos, True)
                best[k] = min(best[k], (time.perf_counter() - t0) / 50 * 1e6)
        for a in attn.values():
            a.cache = None
    return best


def main(baseline: str = "", presets: str = "nano-small:fp32,nano-small:bf16,nano-327m:fp32,nano-327m:bf16",
         repeats: int = 7):
    """Absorbed MLA decode speed of nanollm.py against a baseline nanollm.py, same weights, same run.

    baseline: an earlier nanollm.py (git show REV:nanollm.py > FILE)
    presets: comma-separated preset:dtype pairs (dtype fp32 or bf16)
    repeats: interleaved generate calls per side (the best counts)
    """
    if not os.path.isfile(baseline):
        raise SystemExit("error: --baseline must name an earlier nanollm.py (git show REV:nanollm.py > FILE)")
    spec = importlib.util.spec_from_file_location("nanollm_baseline", baseline)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, load {os.getloadavg()[0]:.2f}")
    for item in presets.split(","):
        preset, dtype = item.split(":")[0], DTYPES[item.split(":")[1]]
        models = pair(old, preset, dtype)
        ids = torch.randint(0, models["after"].args.vocab_size, (64,), generator=torch.Generator().manual_seed(0))
        same = models["before"].generate([ids.tolist()], 32, stop_tokens=[]) == \
            models["after"].generate([ids.tolist()], 32, stop_tokens=[])
        tps = {k: [] for k in models}
        for _ in range(repeats):
            for k, m in models.items():
                t0 = time.perf_counter()
                m.generate([ids.tolist()], 64, stop_tokens=[])
                tps[k].append(64 / (time.perf_counter() - t0))
        layer = {S: layer_time_us(models, S, dtype) for S in (128, 1024)}
        print(f"{item}: decode tok/s after {max(tps['after']):.1f} (median {statistics.median(tps['after']):.1f}), "
              f"before {max(tps['before']):.1f} (median {statistics.median(tps['before']):.1f}), after/before "
              f"{max(tps['after']) / max(tps['before']):.3f}; greedy tokens identical: {same}; MLA layer time "
              + ", ".join(f"cache {S}: after/before {t['after'] / t['before']:.3f}" for S, t in layer.items()))
    print(f"load at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    cli(main)
