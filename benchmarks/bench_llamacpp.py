"""
Decode speed of the model files (with fast_decode.fast) against llama.cpp, the engine people run these models
with on a CPU: the same weights converted to GGUF at the same precision, both engines timed in one run,
interleaved (ours, llama.cpp, ours, llama.cpp, ...), so that a change in machine load hits both alike.

    python benchmarks/bench_llamacpp.py --llama_cpp ~/llama.cpp-build
    python benchmarks/bench_llamacpp.py --models smollm2-135m --precisions int8 --repeats 2   # one row

Rows: SmolLM2-135M-Instruct (real weights: checkpoints/SmolLM2-135M-Instruct, run by smollm2.py) and a
Llama-3.2-1B-shaped checkpoint of random weights (made once here with transformers, bf16, the Llama 3
tokenizer from checkpoints/Llama-3.2-tokenizer; run by llama31.py), each at
- fp32: fast(model) on an fp32 model, against a GGUF converted with `--outtype f32`;
- bf16: fast(model) on a bf16 model, against `--outtype bf16`;
- int8: fast(model, weights="int8") on a bf16 model (int8 weights, one bf16 scale per row), against llama.cpp's
  Q8_0 (`--outtype q8_0`: int8 weights with one fp16 scale per 32);
- a8w8: fast(model, weights="a8w8") on a bf16 model (int8 activations too, SmoothQuant-smoothed, outlier channels
  in bf16; calibrated on 512 tokens of the Apache License 2.0), against the same Q8_0.
Both engines decode N tokens from an empty context: llama.cpp with `llama-bench -p 0 -n N` (its own timing of
the generation), ours with the model file's generate from a one-token prompt (the model's BOS), batch 1,
greedy, tokens/s from the first new token to the last. (subtle: a context before the timed tokens, `-d`, would
be closer to a chat, but on this CPU llama.cpp's Q8_0 then crashes: its AMX-repacked Q8_0 product for more than
one row executes AMX tile instructions that this virtual machine forbids; `--repack 0` avoids it at two thirds
its decode speed.) Both use the same threads (torch's default, one per core; `-t` for llama-bench), best of
--repeats for each.
MB/token is what one decode step reads: every weight the products stream once (a tied embedding is the
output head; for int8 and a8w8 the int8 copy and its scales, not the float table, of which one row is read) plus the
KV cache filled so far (on average N/2 positions; llama.cpp keeps its cache in f16, ours in the model's dtype;
llama31.py reads its whole preallocated cache, 1 + N positions, a fixed shape as gpt-fast). The roofline is the
best read bandwidth measured in the run (a 1 GiB sum, as the other decode benchmarks) over MB/token. Memory:
ours, the bytes of every tensor the model holds (parameters, plus the bf16 reordered or int8 copies fast_decode
keeps beside them); llama.cpp, llama-bench's peak resident memory (its mapped GGUF, KV cache and buffers).

Getting llama.cpp (optional: without it this script prints one line and stops; no test needs it). The
llama-cpp-python sdist on PyPI vendors llama.cpp's source and convert_hf_to_gguf.py:

    pip install sentencepiece   # convert_hf_to_gguf.py imports it for every Llama checkpoint
    pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    cd llama_cpp_python-*/vendor/llama.cpp && rm .git   # a submodule pointer to a missing gitdir: ninja
                                                        # would re-run cmake forever
    cmake -B ~/llama.cpp-build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
    cmake --build ~/llama.cpp-build --target llama-bench llama-perplexity -j2   # ~10+ min on 2 cores

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

import llama31  # noqa: E402
import smollm2  # noqa: E402
from decode_timing import load_average, machine_line, ours_decode_tps, read_bandwidth_gbs  # noqa: E402
from fast_decode import A8W8Linear, Int8Linear, fast  # noqa: E402
from tokenizer_bpe import Tokenizer  # noqa: E402

MODELS = ("smollm2-135m", "llama3.2-1b")
# precision -> ours: (dtype, fast's weights); llama.cpp: the GGUF outtype
PRECISIONS = {"fp32": (torch.float32, None, "f32"), "bf16": (torch.bfloat16, None, "bf16"),
              "int8": (torch.bfloat16, "int8", "q8_0"), "a8w8": (torch.bfloat16, "a8w8", "q8_0")}
CALIBRATION_TEXT = "/usr/share/common-licenses/Apache-2.0"  # what a8w8 calibrates on (not the text it is scored on)


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


def to_gguf(script: Path, ckpt: Path, outtype: str, out: Path) -> Path:
    """ckpt converted by llama.cpp's own convert_hf_to_gguf.py (once; reused while it exists)."""
    if not out.is_file():
        env = dict(os.environ, PYTHONPATH=str(script.parent / "gguf-py"))  # the gguf package of the same version
        part = out.with_suffix(".part")  # renamed when complete: an interrupted conversion is never reused
        subprocess.run([sys.executable, str(script), str(ckpt), "--outtype", outtype, "--outfile", str(part)],
                       check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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


def a8w8_bytes(m) -> int:
    """Bytes of an A8W8Linear's A8W8 form: the packed int8 weight and its row scales, 1/s, the outlier columns."""
    _, inv_s, idx, w_out = m.int8_weight()
    return m.out_features * (m.in_features + 4) + inv_s.nbytes + idx.nbytes + w_out.nbytes


def held_bytes(model) -> int:
    """Bytes of every tensor the model holds: parameters and fast_decode's copies beside them."""
    total = sum(p.nbytes for p in model.parameters())
    total += sum(a8w8_bytes(m) for m in model.modules() if type(m) is A8W8Linear)
    holders = [h for m in model.modules() for h in (m.__dict__.get("reordered"), m.__dict__.get("int8"))]
    # (a Siblings, shared by its members, holds their stacked copy)
    holders += {id(m.siblings): m.siblings for m in model.modules() if "siblings" in m.__dict__}.values()
    for held in holders:
        w = held.weight if held is not None else None
        if isinstance(w, tuple):
            total += sum(t.nbytes for t in w)
        elif w is not None:
            total += w.nbytes if not w.is_mkldnn else w.numel() * w.element_size()
    return total


def streamed_bytes(model) -> int:
    """Weight bytes one decode step reads: each linear layer's weight (its int8 copy and scales for an
    Int8Linear) once, every other parameter once, but of an embedding table only the row it looks up."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    seen = {id(m.weight) for m in linears}
    total = 0
    for m in {id(m.weight): m for m in linears}.values():  # a tied weight counts once
        total += (sum(t.nbytes for t in m.int8.weight) if type(m) is Int8Linear else
                  a8w8_bytes(m) if type(m) is A8W8Linear else m.weight.nbytes)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return total + sum(p.nbytes for p in model.parameters() if id(p) not in seen and id(p) not in embeddings)


def load_ours(name: str, ckpt: Path, dtype, weights):
    """The model with fast_decode applied; a8w8 calibrates on 512 tokens of the Apache License 2.0 (as
    bench_int8_quality.py does), tokenized by the checkpoint's own tokenizer."""
    cls = smollm2.SmolLM2 if name == "smollm2-135m" else llama31.Llama
    model = cls.from_pretrained(str(ckpt), dtype=dtype)
    calibration = None
    if weights == "a8w8":
        text = Path(CALIBRATION_TEXT).read_text(encoding="utf-8")
        calibration = torch.tensor([Tokenizer.from_file(str(ckpt)).encode(text)[:512]])
    return fast(model, weights=weights, calibration=calibration).eval()


def main(llama_cpp: str | None = None, llama_cpp_src: str | None = None, models: str = ",".join(MODELS),
         precisions: str = ",".join(PRECISIONS), new_tokens: int = 128, repeats: int = 3, threads: int | None = None,
         smollm2_dir: str = str(ROOT / "checkpoints" / "SmolLM2-135M-Instruct"),
         tokenizer_dir: str = str(ROOT / "checkpoints" / "Llama-3.2-tokenizer"),
         out_dir: str = str(ROOT / "runs" / "bench_llamacpp")):
    """Decode speed of the model files + fast_decode against llama.cpp on the same weights.

    llama_cpp: llama.cpp's build folder (or the folder holding llama-bench); default $LLAMA_CPP_DIR, then PATH
    llama_cpp_src: llama.cpp's source folder (for convert_hf_to_gguf.py); default: the one the build names
    models: comma-separated: smollm2-135m, llama3.2-1b
    precisions: comma-separated: fp32, bf16, int8, a8w8 (llama.cpp: f32, bf16, Q8_0, Q8_0)
    new_tokens: tokens generated per timed run
    repeats: interleaved timed runs per engine (the best counts)
    threads: threads for both engines (default: torch's own choice, one per core)
    smollm2_dir: the SmolLM2-135M-Instruct checkpoint
    tokenizer_dir: the Llama 3 tokenizer, for the random 1B checkpoint's GGUF
    out_dir: GGUF files and the random checkpoint (made once, reused)
    """
    bin_dir, why = find_llama_cpp(llama_cpp)
    if bin_dir is None:
        print(f"skipped: llama.cpp not found ({why}); benchmarks/bench_llamacpp.py's docstring says how to build it")
        return
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
            ckpt, ids = Path(smollm2_dir), [smollm2.ModelArgs.bos_id]
        elif name == "llama3.2-1b":
            ckpt, ids = random_llama_checkpoint(out, Path(tokenizer_dir)), [llama31.BOS]
        else:
            raise SystemExit(f"error: unknown model {name!r}: use {', '.join(MODELS)}")
        for precision in precisions.split(","):
            if precision not in PRECISIONS:
                raise SystemExit(f"error: unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
            dtype, weights, outtype = PRECISIONS[precision]
            gguf = to_gguf(script, ckpt, outtype, out / f"{name}-{outtype}.gguf")
            model = load_ours(name, ckpt, dtype, weights)
            args = model.args
            per_position = 2 * args.n_layers * args.n_kv_heads * args.head_dim  # a key and a value per layer
            filled = len(ids) + new_tokens / 2  # on average over the run (ids: the one BOS token)
            # (llama31.py attends over its whole preallocated cache, as gpt-fast: fixed shapes)
            ours_kv = per_position * (len(ids) + new_tokens if name == "llama3.2-1b" else filled)
            ours_mb = (streamed_bytes(model) + ours_kv * dtype.itemsize) / 1e6
            # llama.cpp streams its tensor data (the GGUF less its header and vocabulary, ~1%) and an f16 cache
            theirs_mb = (gguf.stat().st_size + per_position * filled * 2) / 1e6
            ours_decode_tps(model, ids, 4)  # warm-up (and the one-time reorder of bf16 weights)
            llama_bench(bin_dir, gguf, threads, 4)
            ours, theirs, rss = [], [], 0
            for _ in range(repeats):
                ours.append(ours_decode_tps(model, ids, new_tokens))
                tps, peak = llama_bench(bin_dir, gguf, threads, new_tokens)
                theirs.append(tps)
                rss = max(rss, peak)
                bw = max(bw, read_bandwidth_gbs())
            rows.append(dict(model=name, precision=precision, engine="ours", tps=max(ours), mb=ours_mb,
                             mem_gib=held_bytes(model) / 2**30, llama_cpp=max(theirs)))
            rows.append(dict(model=name, precision=precision, engine=f"llama.cpp {outtype.upper()}",
                             tps=max(theirs), mb=theirs_mb, mem_gib=rss / 2**30, llama_cpp=max(theirs)))
            print(f"{name} {precision}: ours {max(ours):.1f} tok/s, llama.cpp {max(theirs):.1f} tok/s "
                  f"({load_average()})", file=sys.stderr)
            del model
    cmd = " ".join(["python benchmarks/bench_llamacpp.py"] + sys.argv[1:])
    print(f"\n`{cmd}`: batch 1, greedy, {new_tokens} new tokens from an empty context, {threads} threads, best of "
          f"{repeats} interleaved runs, best read bandwidth {bw:.1f} GB/s, {load_average()} at the end\n")
    print("| model | precision | engine | decode tok/s | vs llama.cpp | MB/token | of roofline | memory GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        frac = r["tps"] * r["mb"] * 1e6 / (bw * 1e9)
        print(f"| {r['model']} | {r['precision']} | {r['engine']} | {r['tps']:.1f} | {r['tps'] / r['llama_cpp']:.2f}x "
              f"| {r['mb']:.0f} | {frac:.0%} | {r['mem_gib']:.2f} |")
    print(json.dumps(dict(bandwidth_gbs=bw, rows=rows)), file=sys.stderr)


if __name__ == "__main__":
    smollm2.cli(main)
