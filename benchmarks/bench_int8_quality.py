"""
What int8 weights cost in exactness on the real SmolLM2-135M-Instruct: fast(model, weights="int8") against the
fp32 model, and perplexity on a held-out text beside llama.cpp's own f32 / bf16 / Q8_0 on the same text.

    python benchmarks/bench_int8_quality.py                                   # ours only
    python benchmarks/bench_int8_quality.py --llama_cpp ~/llama.cpp-build   # and llama-perplexity

Variants of ours (--variants): fp32 (the reference, always run), bf16 (fast), int8 on an fp32 model, int8 on a
bf16 model (what bench_llamacpp.py times), a8w8 on an fp32 and on a bf16 model (fast_decode's weights="a8w8":
SmoothQuant and float outlier channels, calibrated on the first --calibration_windows windows of
--calibration_text, the Apache License 2.0 by default, not the scored text), and the plain torch.ao dynamic int8
Linear (fbgemm) that a8w8 builds on, without its cures: one scale for the whole input of a call (a 512-token
window here, where a8w8 takes one per row), with and without its reduce_range (7-bit activations). For each, over
the text:
- logits against fp32 at every scored position: max and mean |difference|, and how often the top token agrees;
- perplexity as llama-perplexity computes it: the text cut into windows of --ctx tokens, each window run alone,
  the second half of each scored (every scored token then sees at least ctx/2 tokens of context);
- greedy generation: for 4 chat prompts, 64 new tokens each, how many leading tokens equal fp32's.
llama.cpp (where found, as bench_llamacpp.py finds it): `llama-perplexity -c CTX -b CTX --no-repack` on GGUF
conversions of the same checkpoint (--no-repack: its AMX-repacked products crash on this virtual machine, see
bench_llamacpp.py; the sums are the same). Its windows start with the BOS token its GGUF asks for and its
tokenizer is its own, so compare each engine's int8 against its own fp32 (the "vs fp32" column), not the
absolute values across engines. The default text is the GNU GPL v3 as Debian ships it
(/usr/share/common-licenses/GPL-3): on every Debian machine, unused by anything here; any UTF-8 file works
(--text).
"""

import copy
import re
import warnings
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import smollm2  # noqa: E402
from bench_llamacpp import find_convert_script, find_llama_cpp, to_gguf  # noqa: E402
from decode_timing import load_average  # noqa: E402
from fast_decode import fast, quantize_int8  # noqa: E402
from tokenizer_bpe import Tokenizer  # noqa: E402

PROMPTS = ["What is gravity?", "Write a haiku about the sea.", "Explain what a hash table is.",
           "Give three tips for learning a language."]


class DynamicInt8Linear(nn.Linear):
    """torch.ao's dynamic int8 product (fbgemm): the same int8 weights as fast_decode's, and the activation row
    rounded to 8 bits (7 with reduce_range) with one scale for the whole row."""

    def forward(self, x):
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, self.in_features).float(), self.packed,
                                               self.reduce_range)
        return y.view(x.shape[:-1] + (self.out_features,)).to(x.dtype)


def dynamic_int8(model, reduce_range: bool):
    for m in model.modules():
        if type(m) is nn.Linear:
            q, scale = quantize_int8(m.weight)
            with warnings.catch_warnings():  # quantized tensors are deprecated; this route is measured, not used
                warnings.simplefilter("ignore")
                zero = torch.zeros(len(scale), dtype=torch.long)
                qw = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
                m.packed = torch.ops.quantized.linear_prepack(qw, None)
            m.reduce_range, m.__class__ = reduce_range, DynamicInt8Linear
    return model


VARIANTS = {"bf16": lambda m, cal: fast(m.to(torch.bfloat16)),
            "int8-fp32": lambda m, cal: fast(m, weights="int8"),
            "int8-bf16": lambda m, cal: fast(m.to(torch.bfloat16), weights="int8"),
            "a8w8-fp32": lambda m, cal: fast(m, weights="a8w8", calibration=cal),
            "a8w8-bf16": lambda m, cal: fast(m.to(torch.bfloat16), weights="a8w8", calibration=cal),
            "a8w8-dynamic": lambda m, cal: dynamic_int8(m, False),
            "a8w8-dynamic-reduce-range": lambda m, cal: dynamic_int8(m, True)}


def windows(ids: list[int], ctx: int) -> torch.Tensor:
    n = len(ids) // ctx
    return torch.tensor(ids[:n * ctx]).view(n, ctx)


@torch.no_grad()
def score(model, chunks: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Logits at the scored positions (second half of each window, the position before each scored token), and
    the perplexity of the scored tokens."""
    half = chunks.size(1) // 2
    logits = torch.cat([model(c[None])[0, half - 1:-1].float() for c in chunks])  # (n * half, vocab)
    nll = F.cross_entropy(logits, chunks[:, half:].flatten())
    return logits, nll.exp().item()


def llama_perplexity(bin_dir: Path, gguf: Path, text: Path, ctx: int) -> float:
    out = subprocess.run([str(bin_dir / "llama-perplexity"), "-m", str(gguf), "-f", str(text), "-c", str(ctx),
                          "-b", str(ctx), "-t", str(torch.get_num_threads()), "--no-repack"], capture_output=True,
                         text=True)
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
    if out.returncode or not found:
        raise SystemExit(f"error: llama-perplexity failed on {gguf}:\n{(out.stdout + out.stderr)[-2000:]}")
    return float(found.group(1))


def main(ckpt_dir: str = str(ROOT / "checkpoints" / "SmolLM2-135M-Instruct"),
         text: str = "/usr/share/common-licenses/GPL-3", ctx: int = 512, max_windows: int = 16,
         new_tokens: int = 64, variants: str = ",".join(VARIANTS),
         calibration_text: str = "/usr/share/common-licenses/Apache-2.0", calibration_windows: int = 2,
         llama_cpp: str | None = None,
         llama_cpp_src: str | None = None,
         out_dir: str = str(ROOT / "runs" / "bench_llamacpp")):
    """int8 exactness and perplexity of SmolLM2-135M-Instruct, against fp32 and llama.cpp.

    ckpt_dir: the SmolLM2 checkpoint
    text: a held-out UTF-8 text for perplexity
    ctx: window length (llama-perplexity's -c)
    max_windows: windows scored at most (from the start of the text)
    new_tokens: greedy tokens per chat prompt
    variants: comma-separated variants of ours besides fp32 (empty: fp32 only)
    calibration_text: the text whose first windows the a8w8 variants calibrate on (not the scored text)
    calibration_windows: how many windows of ctx tokens of it
    llama_cpp: llama.cpp's build folder, as in bench_llamacpp.py (default $LLAMA_CPP_DIR, then PATH)
    llama_cpp_src: llama.cpp's source folder (default: the one the build names)
    out_dir: where GGUF conversions are kept (shared with bench_llamacpp.py)
    """
    tok = Tokenizer.from_file(ckpt_dir)
    chunks = windows(tok.encode(Path(text).read_text()), ctx)[:max_windows]
    print(f"{text}: {chunks.numel()} tokens in {len(chunks)} windows of {ctx}, {chunks.numel() // 2} scored; "
          f"{load_average()}", file=sys.stderr)
    fp32 = smollm2.SmolLM2.from_pretrained(ckpt_dir).eval()
    chosen = [v for v in variants.split(",") if v]
    unknown = set(chosen) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"error: unknown variants {sorted(unknown)}: use {', '.join(VARIANTS)}")
    cal = windows(tok.encode(Path(calibration_text).read_text()), ctx)[:calibration_windows]
    models = {"fp32": fp32} | {v: VARIANTS[v](copy.deepcopy(fp32), cal) for v in chosen}
    prompts = [smollm2.encode_chat(tok, [{"role": "user", "content": p}]) for p in PROMPTS]
    ref_logits, ref_ppl = score(fp32, chunks)
    ref_tokens = [fp32.generate([p], new_tokens, stop_tokens=[])[0] for p in prompts]
    rows = []
    for name, model in models.items():
        logits, ppl = (ref_logits, ref_ppl) if model is fp32 else score(model, chunks)
        diff = (logits - ref_logits).abs()
        top1 = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
        same = []
        for p, want in zip(prompts, ref_tokens):
            got = model.generate([p], new_tokens, stop_tokens=[])[0]
            same.append(next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want)))
        rows.append(("ours " + name, ppl, diff.max().item(), diff.mean().item(), top1, same))
        print(f"{name}: ppl {ppl:.3f} ({load_average()})", file=sys.stderr)
    theirs = []
    bin_dir, why = find_llama_cpp(llama_cpp)
    if bin_dir is None:
        print(f"llama.cpp rows skipped: llama.cpp not found ({why})", file=sys.stderr)
    else:
        script = find_convert_script(bin_dir, llama_cpp_src)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        for outtype in ("f32", "bf16", "q8_0"):
            gguf = to_gguf(script, Path(ckpt_dir), outtype, Path(out_dir) / f"smollm2-135m-{outtype}.gguf")
            theirs.append((f"llama.cpp {outtype.upper()}", llama_perplexity(bin_dir, gguf, Path(text), ctx)))
    cmd = " ".join(["python benchmarks/bench_int8_quality.py"] + sys.argv[1:])
    print(f"\n`{cmd}`: SmolLM2-135M-Instruct, {Path(text).name}, {len(chunks)} windows of {ctx} tokens "
          f"({chunks.numel() // 2} scored), greedy: {len(prompts)} chat prompts x {new_tokens} tokens\n")
    print("| engine, weights | perplexity | vs fp32 | max abs logit diff | mean abs logit diff | top-1 = fp32 "
          "| greedy tokens = fp32 (leading, per prompt) |")
    print("|---|---|---|---|---|---|---|")
    for name, ppl, dmax, dmean, top1, same in rows:
        print(f"| {name} | {ppl:.3f} | {ppl / ref_ppl - 1:+.2%} | {dmax:.3f} | {dmean:.4f} | {top1:.1%} "
              f"| {', '.join(map(str, same))} of {new_tokens} |")
    for name, ppl in theirs:
        print(f"| {name} | {ppl:.3f} | {ppl / theirs[0][1] - 1:+.2%} | | | | |")


if __name__ == "__main__":
    smollm2.cli(main)
