"""
Decode speed and memory of the model files (with fast_decode) against llama.cpp, the engine people run these models
with on a CPU: the same weights at the same precision, both engines timed in one run, interleaved (ours,
llama.cpp, ours, llama.cpp, ...), so that a change in machine load hits both alike.

    python benchmarks/bench_llamacpp.py --llama_cpp ~/llama.cpp-build --threads 2
    python benchmarks/bench_llamacpp.py --models smollm2-135m --precisions int4 --repeats 2   # one row

Rows: SmolLM2-135M-Instruct (real weights: checkpoints/SmolLM2-135M-Instruct, run by smollm2.py) and a
Llama-3.2-1B-shaped checkpoint of random weights (made once here with transformers, bf16, the Llama 3 tokenizer
from checkpoints/Llama-3.2-tokenizer; run by llama31.py). Both engines start from the same float weights:
llama.cpp's own convert_hf_to_gguf.py writes them as an F32 GGUF, and its llama-quantize makes every other type
from that file; ours reads the same checkpoint. Per precision:
- fp32: fast(model) on an fp32 model, against F32;
- bf16: fast(model) on a bf16 model, against BF16;
- int8: fast_decode.load(..., weights="int8") (int8 weights, one bf16 scale per row, the float weights never
  held), against Q8_0 (int8 with one fp16 scale per 32 weights);
- a8w8: fast(model, weights="a8w8", calibration=...) (int8 weights and 8-bit activations on fbgemm's kernel,
  SmoothQuant-smoothed, 16 outlier channels in float; calibrated on 512 tokens of the Apache License 2.0),
  against the same Q8_0;
- int4: fast_decode.load(..., weights="int4") (groups of 32 with a scale and zero, a byte each; the output head
  in 6-bit groups of 32, as Int6Linear holds it),
  against Q4_0 (4-bit, one fp16 scale per 32, the output head Q8_0 or Q6_K) and, as a second reference,
  Q4_K_M (llama-quantize's mix; on SmolLM2, whose width 576 is no multiple of 256, most of its tensors fall
  back to Q5_0 and Q8_0);
- int4-a8w8-head: fast_decode.load(..., weights="int4", calibration=...) (the same, but the output head on
  fbgemm's A8W8 kernel, calibrated on what the int4 model feeds it; a tied embedding keeps the 6-bit head as its
  own copy), against Q4_0.
int8 and int4 keep the rest of the model (norms, attention, the KV cache) in --quant_dtype: float32 by default,
since on this machine PyTorch's one-query bf16 attention is several times slower than fp32's
(bench_cpu_kernels.py), and the products take bf16 activations either way.
Where all of a model's products are on fast_decode.cpp's integer kernels (int8, int4 in float32), its decode step
is one call of fast_decode.cpp ("one call a step": fast_decode.OneCallTrunk), as the CLIs run it.
With --compile, ours is timed a second time, its decode step compiled (fast_decode.compile_decode: torch.compile of
the model's own step, without the one call; one graph for every step, the prefill eager), interleaved with the
other two; the compiling happens in the warm-up.
Both engines decode N tokens from an empty context: llama.cpp with `llama-bench -p 0 -n N` (its own timing of
the generation), ours with the model file's generate from a one-token prompt (the model's BOS), batch 1,
greedy, tokens/s from the first new token to the last. Both use the same threads (torch's default, one per
core; `-t` for llama-bench), best of --repeats for each.
MB/token is what one decode step reads: every weight the products stream once (decode_timing.streamed_bytes:
a tied embedding is the output head) plus the KV cache: llama.cpp's filled part (on average N/2 positions, f16),
ours whole (1 + N positions in the model's dtype: the model files attend over their whole preallocated cache, a
fixed shape as gpt-fast). The roofline is the best read bandwidth measured in the run (a 1 GiB sum, as the
other decode benchmarks) over MB/token. Memory: peak resident memory of a fresh process that loads the model as
the CLI does (fast_decode.load), with its tokenizer, and decodes 16 tokens; llama.cpp's, llama-bench's peak (its
mapped GGUF, KV cache and buffers); and ours, the bytes of every tensor the model holds.

Getting llama.cpp (optional: without it this script prints one line and stops; no test needs it). The
llama-cpp-python sdist on PyPI vendors llama.cpp's source and convert_hf_to_gguf.py:

    pip install sentencepiece   # convert_hf_to_gguf.py imports it for every Llama checkpoint
    pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    mv llama_cpp_python-*/vendor/llama.cpp ~/llama.cpp-src && rm ~/llama.cpp-src/.git  # a submodule pointer to a
                                                        # missing gitdir: ninja would re-run cmake forever
    cmake -S ~/llama.cpp-src -B ~/llama.cpp-build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
    cmake --build ~/llama.cpp-build --target llama-bench llama-perplexity llama-quantize -j2   # ~20 min, 2 cores

Both engines held to AVX2 on a CPU that has AVX-512 (what an AVX2-only CPU's kernels do, on this one's memory):
a second build with `-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
-DGGML_AVX512=OFF`, and this script run with `ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2` in its
environment (fp32, int8 and int4 only: oneDNN's bf16 and fbgemm's int8 kernels follow the CPU's own flags).

llama.cpp is found at --llama_cpp (a build folder, or the folder holding llama-bench), else $LLAMA_CPP_DIR,
else llama-bench on PATH; convert_hf_to_gguf.py in the source folder that the build folder's CMakeCache.txt
names, or at --llama_cpp_src / $LLAMA_CPP_SRC. GGUF files and the random checkpoint go to --out_dir (reused
by later runs).
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fast_decode  # noqa: E402
import llama31  # noqa: E402
import smollm2  # noqa: E402
from tokenizer_bpe import Tokenizer  # noqa: E402
from cli import cli  # noqa: E402
from decode_timing import (held_bytes, load_average, machine_line, ours_decode_tps, peak_rss_gib,  # noqa: E402
                           read_bandwidth_gbs, streamed_bytes)

MODELS = ("smollm2-135m", "llama3.2-1b")
# precision -> ours: (dtype, fast_decode's weights); llama.cpp: the types it is timed at (the first: the ratio's)
PRECISIONS = {"fp32": (torch.float32, None, ("F32",)), "bf16": (torch.bfloat16, None, ("BF16",)),
              "int8": (None, "int8", ("Q8_0",)), "int4": (None, "int4", ("Q4_0", "Q4_K_M")),
              "a8w8": (None, "a8w8", ("Q8_0",)), "int4-a8w8-head": (None, "int4", ("Q4_0",))}
CALIBRATED = ("a8w8", "int4-a8w8-head")  # the precisions calibrated on a text
CALIBRATION_TEXT = "/usr/share/common-licenses/Apache-2.0"  # what they calibrate on (512 tokens)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# -----------------------------------------------------------------------------
# llama.cpp: finding it, converting checkpoints, timing


def find_llama_cpp(where: str | None) -> tuple[Path | None, str]:
    """The folder holding llama-bench, or None and the reason."""
    where = where or os.environ.get("LLAMA_CPP_DIR")
    if where:
        for d in (Path(where), Path(where) / "bin", Path(where) / "build" / "bin"):
            if (d / "llama-bench").is_file():
                return d, ""
        return None, f"no llama-bench in {where} (nor in its bin/ or build/bin/)"
    found = shutil.which("llama-bench")
    return (Path(found).parent, "") if found else (None, "llama-bench is not on PATH and neither --llama_cpp "
                                                         "nor $LLAMA_CPP_DIR is set")


def find_convert_script(bin_dir: Path, src: str | None) -> Path:
    """convert_hf_to_gguf.py: in --llama_cpp_src / $LLAMA_CPP_SRC, else in the source folder the build was
    configured from (CMakeCache.txt, one folder above bin/)."""
    src = src or os.environ.get("LLAMA_CPP_SRC")
    if not src:
        cache = bin_dir.parent / "CMakeCache.txt"
        lines = cache.read_text().splitlines() if cache.is_file() else []
        src = next((line.split("=", 1)[1] for line in lines if line.startswith("CMAKE_HOME_DIRECTORY")), None)
    script = Path(src or ".") / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise SystemExit("error: convert_hf_to_gguf.py not found: pass --llama_cpp_src (llama.cpp's source folder)")
    return script


def to_gguf(script: Path, bin_dir: Path, ckpt: Path, kind: str, out_dir: Path, name: str) -> Path:
    """ckpt as a GGUF of type kind (F32, BF16, Q8_0, Q4_0, Q4_K_M, ...): convert_hf_to_gguf.py writes the F32 file,
    llama-quantize every other type from it, as a llama.cpp user makes them (made once, reused while it exists)."""
    out = out_dir / f"{name}-{kind.lower()}.gguf"
    if out.is_file():
        return out
    part = out.with_suffix(".part")  # renamed when complete: an interrupted conversion is never reused
    if kind == "F32":
        env = dict(os.environ, PYTHONPATH=str(script.parent / "gguf-py"))  # the gguf package of the same version
        cmd = [sys.executable, str(script), str(ckpt), "--outtype", "f32", "--outfile", str(part)]
    else:
        env, cmd = None, [str(bin_dir / "llama-quantize"), str(to_gguf(script, bin_dir, ckpt, "F32", out_dir, name)),
                          str(part), kind]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    part.rename(out)
    return out


def llama_bench(bin_dir: Path, gguf: Path, threads: int, new_tokens: int) -> tuple[float, int]:
    """llama-bench's decode tokens/s for new_tokens from an empty context, one repetition, and its peak resident
    memory in bytes."""
    cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", "0", "-n", str(new_tokens),
           "-r", "1", "-o", "json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    # subtle: its peak RSS is read from /proc while it runs: the rusage of a child counts the memory of this
    # (large) process it was forked from, before it exec'd llama-bench
    peak = 0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                peak = max(peak, next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")))
        except (OSError, StopIteration):
            pass
        time.sleep(0.05)
    out = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"error: {' '.join(cmd)} failed with exit code {proc.returncode}")
    return json.loads(out)[0]["avg_ts"], peak


# -----------------------------------------------------------------------------
# The checkpoints and our side


def random_llama_checkpoint(out_dir: Path, tokenizer_dir: Path) -> Path:
    """A Llama-3.2-1B-shaped HF checkpoint of random weights (bf16, made once), with the Llama 3 tokenizer."""
    ckpt = out_dir / "llama3.2-1b-random"
    if not (ckpt / "model.safetensors").is_file():
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        args = llama31.ModelArgs.from_name("llama3.2-1b")
        LlamaForCausalLM._from_config(LlamaConfig(**args.to_hf_config()), dtype=torch.bfloat16).save_pretrained(ckpt)
        # subtle: the Llama 3.2 tokenizer may carry the vision models' <|image|> (id 128256), one past the text
        # models' vocabulary, which convert_hf_to_gguf.py rejects: keep the ids the model has rows for
        tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
        tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] < args.vocab_size]
        (ckpt / "tokenizer.json").write_text(json.dumps(tok))
        cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
        cfg["added_tokens_decoder"] = {k: v for k, v in cfg.get("added_tokens_decoder", {}).items()
                                       if int(k) < args.vocab_size}
        (ckpt / "tokenizer_config.json").write_text(json.dumps(cfg))
    return ckpt


def model_file(name: str):
    return smollm2.SmolLM2 if name == "smollm2-135m" else llama31.Llama


def load_ours(name: str, ckpt: Path, dtype, precision: str):
    """The model as the CLI loads it: fast(cls.from_pretrained(...)) for float weights, fast_decode.load for
    int8 and int4 (quantized as each layer is read, or from the file `fast_decode.py quantize` wrote);
    int4-a8w8-head: the same, its head calibrated on 512 tokens of the Apache License 2.0 as it loads (what
    `quantize --calibration` stores); a8w8: fast() on the float model, calibrated alike."""
    cls, weights = model_file(name), PRECISIONS[precision][1]
    text = Path(CALIBRATION_TEXT).read_text(encoding="utf-8") if precision in CALIBRATED else None
    ids = torch.tensor([Tokenizer.from_file(str(ckpt)).encode(text)[:512]]) if text else None
    if weights == "a8w8":
        return fast_decode.fast(cls.from_pretrained(ckpt, dtype=dtype), weights=weights, calibration=ids)
    return fast_decode.load(cls, ckpt, weights=weights, dtype=dtype, calibration=ids)


def ours_peak_rss(name: str, ckpt: Path, dtype, precision: str) -> float:
    """Peak resident memory (GiB) of a fresh process that loads the model as load_ours does, and its tokenizer,
    and decodes 16 tokens."""
    return peak_rss_gib(f"import torch, sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
                        f"from bench_llamacpp import load_ours\nfrom tokenizer_bpe import Tokenizer\n"
                        f"m = load_ours({name!r}, {str(ckpt)!r}, {dtype}, {precision!r})\n"
                        f"tok = Tokenizer.from_file({str(ckpt)!r})\n"
                        f"m.generate([tok.encode('Hello')], 16, stop_tokens=[])")


def main(llama_cpp: str | None = None, llama_cpp_src: str | None = None, models: str = ",".join(MODELS),
         precisions: str = ",".join(PRECISIONS), new_tokens: int = 128, repeats: int = 3, threads: int | None = None,
         quant_dtype: str = "float32", compile: bool = False,
         smollm2_dir: str = str(ROOT / "checkpoints" / "SmolLM2-135M-Instruct"),
         tokenizer_dir: str = str(ROOT / "checkpoints" / "Llama-3.2-tokenizer"),
         out_dir: str = str(ROOT / "runs" / "bench_llamacpp")):
    """Decode speed and memory of the model files + fast_decode against llama.cpp on the same weights.

    llama_cpp: llama.cpp's build folder (or the folder holding llama-bench); default $LLAMA_CPP_DIR, then PATH
    llama_cpp_src: llama.cpp's source folder (for convert_hf_to_gguf.py); default: the one the build names
    models: comma-separated: smollm2-135m, llama3.2-1b
    precisions: comma-separated: fp32, bf16, int8, a8w8, int4, int4-a8w8-head (llama.cpp: F32, BF16, Q8_0, Q8_0,
      Q4_0 and Q4_K_M, Q4_0)
    new_tokens: tokens generated per timed run
    repeats: interleaved timed runs per engine (the best counts)
    threads: threads for both engines (default: torch's own choice, one per core)
    quant_dtype: float32 or bfloat16: the dtype of the rest of an int8 or int4 model (norms, attention, cache)
    compile: also time ours with its decode step compiled (about a minute of compiling per model and precision)
    smollm2_dir: the SmolLM2-135M-Instruct checkpoint
    tokenizer_dir: the Llama 3 tokenizer, for the random 1B checkpoint's GGUF
    out_dir: GGUF files and the random checkpoint (made once, reused)
    """
    bin_dir, why = find_llama_cpp(llama_cpp)
    if bin_dir is None:
        print(f"skipped: llama.cpp not found ({why}); benchmarks/bench_llamacpp.py's docstring says how to build it")
        return
    if quant_dtype not in DTYPES:
        raise SystemExit(f"error: --quant_dtype must be float32 or bfloat16, got {quant_dtype}")
    script = find_convert_script(bin_dir, llama_cpp_src)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    bw = read_bandwidth_gbs()
    print(machine_line(f"{threads} threads", bw, f"llama.cpp {bin_dir}, "), file=sys.stderr)
    rows = []
    for name in models.split(","):
        if name == "smollm2-135m":
            ckpt, ids = Path(smollm2_dir), [smollm2.ModelArgs.bos_token_id]
        elif name == "llama3.2-1b":
            ckpt, ids = random_llama_checkpoint(out, Path(tokenizer_dir)), [llama31.BOS]
        else:
            raise SystemExit(f"error: unknown model {name!r}: use {', '.join(MODELS)}")
        for precision in precisions.split(","):
            if precision not in PRECISIONS:
                raise SystemExit(f"error: unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
            dtype, weights, kinds = PRECISIONS[precision]
            dtype = dtype or DTYPES[quant_dtype]
            ggufs = {k: to_gguf(script, bin_dir, ckpt, k, out, name) for k in kinds}
            model = load_ours(name, ckpt, dtype, precision)
            args = model.args
            per_position = 2 * args.n_layers * args.n_kv_heads * args.head_dim  # a key and a value per layer
            filled = len(ids) + new_tokens / 2  # on average over the run (ids: the one BOS token)
            ours_kv = per_position * (len(ids) + new_tokens)  # the whole preallocated cache, as gpt-fast: fixed shapes
            ours_mb = (streamed_bytes(model) + ours_kv * dtype.itemsize) / 1e6
            ours_decode_tps(model, ids, 4)  # warm-up (and the one-time reorder of bf16 weights)
            one_call = vars(model).get("trunk")  # fast_decode's OneCallTrunk, where the products are all on its tiles
            if compile:  # torch.compile's step of the model's own layers, without the one call
                vars(model).pop("trunk", None)
                compiled = fast_decode.compile_decode(model).forward_cached
                ours_decode_tps(model, ids, 4)  # the compiling
                del model.forward_cached  # the eager method again; the compiled one is set for its own runs
            for gguf in ggufs.values():
                llama_bench(bin_dir, gguf, threads, 4)
            ours, ours_compiled, theirs, rss = [], [], {k: [] for k in kinds}, dict.fromkeys(kinds, 0)
            for _ in range(repeats):
                if one_call:
                    model.trunk = one_call
                ours.append(ours_decode_tps(model, ids, new_tokens))
                if compile:
                    vars(model).pop("trunk", None)
                    model.forward_cached = compiled
                    ours_compiled.append(ours_decode_tps(model, ids, new_tokens))
                    del model.forward_cached
                for k, gguf in ggufs.items():
                    tps, peak = llama_bench(bin_dir, gguf, threads, new_tokens)
                    theirs[k].append(tps)
                    rss[k] = max(rss[k], peak)
                bw = max(bw, read_bandwidth_gbs())
            held = held_bytes(model) / 2**30
            del model
            ref = max(theirs[kinds[0]])
            what = f"{weights + ' ' if weights else ''}{dtype}"
            rows.append(dict(model=name, precision=precision,
                             engine=f"ours ({what}{', one call a step' if one_call else ''})", tps=max(ours),
                             mb=ours_mb, rss_gib=ours_peak_rss(name, ckpt, dtype, precision), held_gib=held, ref=ref))
            if compile:  # (its peak memory is not measured: a fresh process would compile again)
                rows.append(dict(model=name, precision=precision, engine=f"ours ({what}), compiled",
                                 tps=max(ours_compiled), mb=ours_mb, rss_gib=None, held_gib=held, ref=ref))
            for k, gguf in ggufs.items():
                # llama.cpp streams its tensor data (the GGUF less its header and vocabulary, ~1%) and an f16 cache
                rows.append(dict(model=name, precision=precision, engine=f"llama.cpp {k}", tps=max(theirs[k]),
                                 mb=(gguf.stat().st_size + per_position * filled * 2) / 1e6,
                                 rss_gib=rss[k] / 2**30, held_gib=None, ref=ref))
            print(f"{name} {precision}: ours {max(ours):.1f}"
                  + (f", compiled {max(ours_compiled):.1f}" if compile else "") + " tok/s, llama.cpp "
                  f"{', '.join(f'{k} {max(v):.1f}' for k, v in theirs.items())} tok/s ({load_average()})",
                  file=sys.stderr)
    cmd = " ".join(["python benchmarks/bench_llamacpp.py"] + sys.argv[1:])
    print(f"\n`{cmd}`: batch 1, greedy, {new_tokens} new tokens from an empty context, {threads} threads, best of "
          f"{repeats} interleaved runs, best read bandwidth {bw:.1f} GB/s, {load_average()} at the end\n")
    print("| model | precision | engine | decode tok/s | vs llama.cpp | MB/token | of roofline | peak RSS GiB "
          "| weights held GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        frac = r["tps"] * r["mb"] * 1e6 / (bw * 1e9)
        held = "" if r["held_gib"] is None else f"{r['held_gib']:.3f}"
        rss = "" if r["rss_gib"] is None else f"{r['rss_gib']:.2f}"
        print(f"| {r['model']} | {r['precision']} | {r['engine']} | {r['tps']:.1f} | {r['tps'] / r['ref']:.2f}x "
              f"| {r['mb']:.0f} | {frac:.0%} | {rss} | {held} |")
    print(json.dumps(dict(bandwidth_gbs=bw, rows=rows)), file=sys.stderr)


if __name__ == "__main__":
    cli(main)
