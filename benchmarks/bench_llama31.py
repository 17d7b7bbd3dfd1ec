"""
Decode speed of llama31.py against HF transformers' `generate` on the same random weights, same run.

    python benchmarks/bench_llama31.py                                   # CPU: Llama 3.2 1B, fp32 and bf16
    python benchmarks/bench_llama31.py --max_new_tokens 16 --dtypes bf16 # a quick check
    python benchmarks/bench_llama31.py --device cuda --model llama3.1-8b --dtypes bf16 --compile

The weights are random (a preset's shapes; no download needed) and shared by both models: HF's parameters
are assigned into llama31's, so memory holds them once. Batch 1, greedy, a fixed number of new tokens (no
early stop). Decode tokens/s is timed from the first generated token to the last, so prefill is excluded for
both. Decoding at batch 1 is memory-bound: every token reads every weight once (a tied embedding is read as
the output head) plus the KV cache, so the roofline is (read bandwidth) / (bytes per token); the read
bandwidth is measured here too. --compile also times llama31 with its decode step under torch.compile
("reduce-overhead", i.e. CUDA graphs, on GPU; inductor's weight freezing on CPU), on a KV cache set up once
so every step has the same shapes.
"""

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import llama31  # noqa: E402
from decode_timing import hf_decode_tps, ours_decode_tps, read_bandwidth_gbs  # noqa: E402

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
    """A random HF LlamaForCausalLM and a llama31.Llama holding the very same parameter tensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):  # built and initialised directly in `dtype`: 8B in bf16 is 16 GB, in fp32 32 GB
        hf = LlamaForCausalLM._from_config(LlamaConfig(**args.to_hf_config()), dtype=dtype).eval()
    with torch.device("meta"):
        ours = llama31.Llama(args)
    ours.load_state_dict(hf.state_dict(), strict=True, assign=True)
    if args.tie_embeddings:
        ours.lm_head.weight = ours.model.embed_tokens.weight
    ours.init_rope(device)
    return hf, ours.eval()


def main(model: str = "llama3.2-1b", dtypes: str = "fp32,bf16", max_new_tokens: int = 128, prompt_len: int = 64,
         repeats: int = 3, device: str = "cpu", compile: bool = False):
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda was requested but no CUDA device is available")
    args = llama31.ModelArgs.from_name(model)
    args.max_seq_len = prompt_len + max_new_tokens
    ids = torch.randint(0, min(args.vocab_size, 128000), (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    bw = read_bandwidth_gbs(device)
    where = torch.cuda.get_device_name() if device.startswith("cuda") else f"{torch.get_num_threads()} CPU threads"
    print(f"machine: {where}, read bandwidth {bw:.1f} GB/s, torch {torch.__version__}", file=sys.stderr)
    rows = []
    for name in dtypes.split(","):
        dtype = DTYPES[name]
        hf, ours = build_pair(args, dtype, device)
        n_params = sum(p.numel() for p in ours.parameters())  # a tied matrix counts once, and is read once
        # bytes read per decoded token: every weight once, plus the whole preallocated KV cache, which attention
        # reads (masked) every step; on a CPU the cache is fp32
        kv = 2 * args.n_layers * args.n_kv_heads * args.head_dim * (prompt_len + max_new_tokens)
        bytes_per_token = n_params * dtype.itemsize + kv * (4 if device == "cpu" else dtype.itemsize)
        runs = {"llama31.py": lambda n: ours_decode_tps(ours, ids, n),
                "HF generate": lambda n: hf_decode_tps(hf, ids, n)}
        if compile:
            runs["llama31.py compiled"] = compiled_run(ours, ids, device)
        for run in runs.values():  # warm-up (and compilation)
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
                             mb_per_token=bytes_per_token / 1e6))
        ours.clear_cache()
        del hf, ours, runs
    for r in rows:
        r["roofline"] = bw * 1e3 / r["mb_per_token"]
        r["frac"] = r["tps"] / r["roofline"]
    cmd = " ".join(["python benchmarks/bench_llama31.py"] + sys.argv[1:])
    print(f"\n`{cmd}`: {model} random weights, {where}, batch 1, greedy, {prompt_len}-token prompt, "
          f"{max_new_tokens} new tokens, best read bandwidth {bw:.1f} GB/s\n")
    print("| implementation | dtype | decode tok/s | vs HF generate | MB/token | roofline tok/s | of roofline |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['dtype']} | {r['tps']:.2f} | {r['ratio']:.2f}x | {r['mb_per_token']:.0f} "
              f"| {r['roofline']:.2f} | {r['frac']:.0%} |")
    print(json.dumps(rows), file=sys.stderr)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
