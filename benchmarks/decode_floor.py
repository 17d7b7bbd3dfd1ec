"""
How fast one token can decode with fast_decode's 4-bit layers on this CPU: the floors under smollm2.py + fast_decode.

    python benchmarks/decode_floor.py                                  # SmolLM2-135M and Llama-3.2-1B shapes
    python benchmarks/decode_floor.py --models smollm2-135m --threads 2

For each model's shapes, random weights held as fast_decode.py holds an int4 model (its Int4Linear layers, 4 bits in
groups of 32, q/k/v and gate/up stacked; the output head an Int6Linear; all on fast_decode.cpp's integer kernels,
or PyTorch's `_weight_int4pack_mm_for_cpu` and, for an int8 head, `_weight_int8pack_mm` where those cannot be
built), one token at a
time, same run, best of `repeats`:
1. products alone: the step's 4 products per layer and the head, back to back: the time no implementation on
   these kernels can beat, whatever else it does;
2. eager step: a whole decode step in gpt-fast's form (one preallocated cache read through a mask, so every step
   has the same shapes), written with as few ops as a Llama block needs;
3. the same under torch.compile: the products alone (inductor may generate its own int4 product where it finds
   one faster) and the whole step (it also fuses the element-wise ops);
4. smollm2.py's own step (`forward_cached` of `fast_decode.load(SmolLM2, ..., weights="int4")`), on the real
   weights, when --smollm2_dir holds them (SmolLM2's shapes only).
What 1 leaves to 2-4 is the cost of the rest of the step; llama.cpp's whole step is in bench_llamacpp.py's output.
"""
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import fast_decode  # noqa: E402
from cli import cli  # noqa: E402
from smollm2 import SmolLM2, apply_rope, rope_cos_sin  # noqa: E402

# (dim, hidden_dim, n_heads, n_kv_heads, n_layers, vocab_size); head_dim 64, RoPE theta 10^4 (the value is immaterial)
SHAPES = {"smollm2-135m": (576, 1536, 9, 3, 30, 49152), "llama3.2-1b": (2048, 8192, 32, 8, 16, 128256)}
HEAD_DIM = 64


def quantized(kind: str, n: int, k: int):
    w = torch.randn(n, k) * 0.02
    return fast_decode.quantized_layer(kind, [fast_decode.quantize(w, kind, 32)], 32, torch.float32)


def make_model(shape, cache_len: int) -> dict:
    d, hidden, nh, nkv, n_layers, vocab = shape
    layers = [{"qkv": quantized("int4", (nh + 2 * nkv) * HEAD_DIM, d), "o": quantized("int4", d, nh * HEAD_DIM),
               "gate_up": quantized("int4", 2 * hidden, d), "down": quantized("int4", d, hidden),
               "norm1": torch.ones(d), "norm2": torch.ones(d),
               "k": torch.zeros(1, nkv, cache_len, HEAD_DIM), "v": torch.zeros(1, nkv, cache_len, HEAD_DIM)}
              for _ in range(n_layers)]
    inv_freq = 1.0 / 10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    head = quantized("int6" if fast_decode.kernels() else "int8", vocab, d)  # (as quantize_layers picks)
    return {"shape": shape, "layers": layers, "head": head, "inv_freq": inv_freq,
            "slots": torch.arange(cache_len)}


def products(m: dict, x: torch.Tensor) -> list[torch.Tensor]:
    """Every product of a step on stand-in inputs, all returned (a compiler drops the ones whose result is unused)."""
    _, hidden, nh = m["shape"][:3]
    out = []
    for ly in m["layers"]:
        out += [ly["qkv"](x), ly["o"](x.new_zeros(1, nh * HEAD_DIM)), ly["gate_up"](x),
                ly["down"](x.new_zeros(1, hidden))]
    return out + [m["head"](x)]


def step(m: dict, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x (1, d): the token's embedding at position pos (1,) -> logits (1, vocab)."""
    d, _, nh, nkv = m["shape"][:4]
    cos, sin = rope_cos_sin(m["inv_freq"], pos[None], x.dtype)  # (1, 1, 1, head_dim)
    mask = (m["slots"] <= pos)[None, None, None]  # (1, 1, 1, cache_len): the filled slots
    for ly in m["layers"]:
        q, k, v = ly["qkv"](ly["norm1"] * F.rms_norm(x, (d,), eps=1e-5)).split(
            [nh * HEAD_DIM, nkv * HEAD_DIM, nkv * HEAD_DIM], dim=-1)
        q = apply_rope(q.view(1, nh, 1, HEAD_DIM), cos, sin)  # one token: (1, T, h, hd) -> (1, h, T, hd) is a view
        ly["k"].index_copy_(2, pos, apply_rope(k.view(1, nkv, 1, HEAD_DIM), cos, sin))
        ly["v"].index_copy_(2, pos, v.view(1, nkv, 1, HEAD_DIM))
        y = F.scaled_dot_product_attention(q, ly["k"], ly["v"], attn_mask=mask, enable_gqa=True)
        x = x + ly["o"](y.view(1, nh * HEAD_DIM))
        gate, up = ly["gate_up"](ly["norm2"] * F.rms_norm(x, (d,), eps=1e-5)).chunk(2, dim=-1)
        x = x + ly["down"](F.silu(gate) * up)
    return m["head"](x)


def best_ms(runs: dict, tokens: int, repeats: int) -> dict:
    """{name: fn(pos)} -> {name: best over repeats of the mean ms of one call at positions 8 .. 8 + tokens}, the
    variants interleaved (one timed run of each in turn), after a warm-up of each."""
    best = {name: float("inf") for name in runs}
    with torch.inference_mode():
        for fn in runs.values():
            for pos in range(8):
                fn(pos)
        for _ in range(repeats):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                for pos in range(8, 8 + tokens):
                    fn(pos)
                best[name] = min(best[name], (time.perf_counter() - t0) / tokens * 1e3)
    return best


def smollm2_step(ckpt_dir: Path, cache_len: int):
    model = fast_decode.load(SmolLM2, ckpt_dir, weights="int4")
    model.setup_cache(1, cache_len)
    token = torch.tensor([[1]])
    return lambda pos: model.forward_cached(token, torch.tensor([pos]))


def main(models: str = "smollm2-135m,llama3.2-1b", threads: int | None = None, tokens: int = 64,
         repeats: int = 3, compile: bool = True, smollm2_dir: str = str(ROOT / "checkpoints/SmolLM2-135M-Instruct")):
    """Time the floors of a 4-bit decode step.

    models: comma-separated: smollm2-135m, llama3.2-1b
    threads: torch threads (default: torch's own choice)
    tokens: decode steps per timed run
    repeats: timed runs per variant (the best counts)
    compile: also time the products and the step under torch.compile (about a minute of compiling per model)
    smollm2_dir: SmolLM2-135M-Instruct's checkpoint, for smollm2.py's own step (skipped where it is absent)
    """
    models = [m for m in models.split(",") if m]
    if unknown := set(models) - SHAPES.keys():
        raise SystemExit(f"error: unknown --models {sorted(unknown)}; choose from {', '.join(SHAPES)}")
    if tokens < 1 or repeats < 1:
        raise SystemExit("error: --tokens and --repeats must be at least 1")
    if threads is not None:
        if threads < 1:
            raise SystemExit("error: --threads must be at least 1")
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    cache_len = 8 + tokens
    print(f"`python benchmarks/decode_floor.py {' '.join(sys.argv[1:])}`: torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}\n")
    print("| model | what | ms/token | tok/s | products alone (eager) / this |")
    print("|---|---|---|---|---|")
    for name in models:
        m = make_model(SHAPES[name], cache_len)
        x = torch.randn(1, SHAPES[name][0])
        runs = {"products alone": lambda pos: products(m, x),
                "eager step, gpt-fast's form": lambda pos: step(m, x, torch.tensor([pos]))}
        if compile:
            compiled_products, compiled_step = torch.compile(products), torch.compile(step)
            runs["products alone, torch.compile"] = lambda pos: compiled_products(m, x)
            runs["the same step, torch.compile"] = lambda pos: compiled_step(m, x, torch.tensor([pos]))
        if name == "smollm2-135m" and (Path(smollm2_dir) / "model.safetensors").is_file():
            runs["smollm2.py + fast_decode.load(int4), real weights"] = smollm2_step(Path(smollm2_dir), cache_len)
        times = best_ms(runs, tokens, repeats)
        for what, ms in times.items():
            print(f"| {name} | {what} | {ms:.2f} | {1e3 / ms:.1f} | {times['products alone'] / ms:.0%} |")
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    cli(main)
