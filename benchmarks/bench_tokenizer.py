"""Encode throughput: tokenizer_bpe vs HF `tokenizers` vs tiktoken, same vocabulary, same text, same run.

Text: the Python stdlib sources (Lib/*.py), concatenated, first `mb` MB. Each encoder gets a warm-up call,
then the best of `repeats` timed single calls. Ours is also timed with a cold cache and with a cache warmed
on other Python source (Lib/*/*.py), see `report`.
Worst case: one piece of 1 MB (`worst_mb`) of one letter, of spaces and of random lowercase letters: the whole
text goes through one merge loop (ours: bpe_long's numpy rounds), with the cache emptied before each call, ours
and HF's calls interleaved; see `worst_case`.
tiktoken cannot run SmolLM2's vocabulary (its pre-tokenizer splits digits first, its merges follow the
`merges` list and 21 byte values have no token), so that row has HF only.
Against an earlier tokenizer_bpe.py (`--baseline FILE`): ours and that file's encoders on the same texts, their calls
interleaved, cold and warm cache; the ratio is ours / baseline, so a change's cost is measured in one run, on one load.
Run: python benchmarks/bench_tokenizer.py [--mb 4 --repeats 5 --worst_mb 1]   (--long: the worst cases only)
     git show HEAD~1:tokenizer_bpe.py > /tmp/before.py; python benchmarks/bench_tokenizer.py --baseline /tmp/before.py
Needs: python download.py smollm2-135m-instruct llama3.2-tokenizer
"""
import importlib.util
import os
import random
import statistics
import string
import sys
import sysconfig
import time
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tokenizers import Tokenizer as HFTokenizer

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, ROOT)
from cli import cli  # noqa: E402
from tokenizer_bpe import LLAMA3_PATTERN, LLAMA3_SPECIAL_TOKENS, Tokenizer  # noqa: E402


def stdlib_text(mb: float, pattern: str = "*.py") -> str:
    """Stdlib sources matching `pattern`, concatenated in sorted order, cut to `mb` MB of UTF-8."""
    paths = sorted(Path(sysconfig.get_paths()["stdlib"]).glob(pattern))
    text = "".join(p.read_text(encoding="utf-8", errors="replace") for p in paths)
    return text.encode()[:int(mb * 1e6)].decode(errors="ignore")


def mb_per_s(fn, nbytes: int, repeats: int, before=lambda: None) -> tuple[float, float]:
    """Best of `repeats` in wall-clock and in CPU time of this process. The machine is shared: CPU time
    is the steadier figure there (all three encoders run on one thread for a single call)."""
    fn()  # warm-up
    wall = cpu = float("inf")
    for _ in range(repeats):
        before()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    return nbytes / wall / 1e6, nbytes / cpu / 1e6


def report(name: str, text: str, other: str, ours: Tokenizer, hf: HFTokenizer, tik, repeats: int):
    """Ours three ways: cold (cache emptied before each call), steady (cache holding the pieces of `other`,
    different Python source: a long-running job's state) and warm (cache holding this text's pieces, as
    the warm-up leaves it; HF's own BPE cache is warm the same way)."""
    nbytes = len(text.encode())
    ours.cache.clear()
    ours.encode(other)
    steady_cache = dict(ours.cache)
    rows = {"ours, cold cache": mb_per_s(lambda: ours.encode(text), nbytes, repeats, before=ours.cache.clear),
            "ours, steady cache": mb_per_s(lambda: ours.encode(text), nbytes, repeats,
                                           before=lambda: (ours.cache.clear(), ours.cache.update(steady_cache))),
            "ours, warm cache": mb_per_s(lambda: ours.encode(text), nbytes, repeats),
            "HF tokenizers": mb_per_s(lambda: hf.encode(text, add_special_tokens=False), nbytes, repeats)}
    if tik is not None:
        rows["tiktoken"] = mb_per_s(lambda: tik.encode_ordinary(text), nbytes, repeats)
    refs = [r for r in ("HF tokenizers", "tiktoken") if r in rows]
    print(f"{name}: {nbytes / 1e6:.2f} MB of Python source, best of {repeats}")
    print(f"  {'':20s} {'MB/s wall':>10s} {'MB/s CPU':>9s}" + "".join(f"  {'/ ' + r:>16s}" for r in refs))
    for row, (wall, cpu) in rows.items():
        ratios = "".join(f"  {wall / rows[r][0]:6.2f} ({cpu / rows[r][1]:5.2f})" for r in refs)
        print(f"  {row:20s} {wall:10.2f} {cpu:9.2f}" + (ratios if row.startswith("ours") else ""))
    print("  targets: ours / HF tokenizers >= 3, ours / tiktoken >= 0.33 (ratios: wall-clock (CPU time))")
    if tik is not None:
        print(f"  ids identical to tiktoken: {ours.encode(text) == tik.encode_ordinary(text)}")


def worst_case(name: str, mb: float, ours: Tokenizer, hf: HFTokenizer, tik, repeats: int):
    """One long piece: ours and HF's calls interleaved, `repeats` rounds (each call takes up to a second or so),
    best and median CPU seconds; ids checked against HF's and tiktoken's. tiktoken only on the letters: on 1 MB
    of spaces its regex (`\\s+(?!\\S)`, backtracking) overflows its stack and panics, as tiktoken 0.14 does from
    about 0.5 MB on."""
    n = int(mb * 1e6)
    rng = random.Random(0)
    for what, text in [("one letter", "a" * n), ("spaces", " " * n),
                       ("random letters", "".join(rng.choice(string.ascii_lowercase) for _ in range(n)))]:
        runs = {"ours": lambda: (ours.cache.clear(), ours.encode(text)),
                "HF tokenizers": lambda: hf.encode(text, add_special_tokens=False)}
        if tik is not None and what != "spaces":
            runs["tiktoken"] = lambda: tik.encode_ordinary(text)
        for fn in runs.values():  # warm-up: our merge table for these bytes, HF's and tiktoken's first call
            fn()
        cpu = {row: [] for row in runs}
        for _ in range(repeats):
            for row, fn in runs.items():
                c0 = time.process_time()
                fn()
                cpu[row].append(time.process_time() - c0)
        same = {"HF": ours.encode(text) == hf.encode(text, add_special_tokens=False).ids}
        if "tiktoken" in runs:
            same["tiktoken"] = ours.encode(text) == tik.encode_ordinary(text)
        line = "  ".join(f"{row} {min(t):.2f}s (median {statistics.median(t):.2f}s)" for row, t in cpu.items())
        ratio = statistics.median(cpu["ours"]) / statistics.median(cpu["HF tokenizers"])
        print(f"{name}, {mb:g} MB of {what}, CPU: {line}; ours / HF median time {ratio:.2f}; ids identical: {same}")


def against_baseline(path: str, files: dict[str, str], text: str, repeats: int):
    """Ours / the baseline tokenizer_bpe.py at `path`, encoding the same text with the same tokenizer files: best of
    `repeats` interleaved calls each (CPU time), cold cache (emptied before each call) and warm; ids compared."""
    spec = importlib.util.spec_from_file_location("baseline_tokenizer_bpe", path)
    baseline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(baseline)
    for name, file in files.items():
        tokenizers = {"ours": Tokenizer.from_file(file), "baseline": baseline.Tokenizer.from_file(file)}
        for cache in ("cold", "warm"):
            cpu = {row: float("inf") for row in tokenizers}
            for tok in tokenizers.values():
                tok.encode(text)  # warm-up
            for _ in range(repeats):
                for row, tok in tokenizers.items():
                    if cache == "cold":
                        tok.cache.clear()
                    c0 = time.process_time()
                    tok.encode(text)
                    cpu[row] = min(cpu[row], time.process_time() - c0)
            same = tokenizers["ours"].encode(text) == tokenizers["baseline"].encode(text)
            print(f"{name}, {cache} cache: ours {cpu['ours']:.3f}s, baseline {cpu['baseline']:.3f}s CPU for "
                  f"{len(text.encode()) / 1e6:.2f} MB: ours / baseline time {cpu['ours'] / cpu['baseline']:.3f}; "
                  f"ids identical: {same}")


def main(mb: float = 4.0, repeats: int = 5, worst_mb: float = 1.0, long: bool = False, baseline: str = ""):
    """Encode throughput of tokenizer_bpe against HF tokenizers and tiktoken, or against an earlier tokenizer_bpe.py.

    mb: megabytes of Python source to encode
    repeats: timed calls per row (the best counts)
    worst_mb: megabytes of the one-piece worst cases (one letter, spaces, random letters)
    long: run only the one-piece worst cases
    baseline: a tokenizer_bpe.py file to compare ours with, on the same text (then nothing else runs)
    """
    llama = os.path.join(ROOT, "checkpoints", "Llama-3.2-tokenizer")
    smol = os.path.join(ROOT, "checkpoints", "SmolLM2-135M-Instruct")
    if not (os.path.isdir(llama) and os.path.isdir(smol)):
        raise SystemExit("error: checkpoints missing: run `python download.py smollm2-135m-instruct llama3.2-tokenizer`")
    if baseline:
        if not os.path.isfile(baseline):
            raise SystemExit(f"error: --baseline {baseline} is not a file")
        return against_baseline(baseline, {"Llama 3 (tokenizer.model)": os.path.join(llama, "tokenizer.model"),
                                           "SmolLM2 (tokenizer.json)": os.path.join(smol, "tokenizer.json")},
                                stdlib_text(mb), repeats)
    ranks = load_tiktoken_bpe(os.path.join(llama, "tokenizer.model"))
    tik = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                            special_tokens={s: len(ranks) + i for i, s in enumerate(LLAMA3_SPECIAL_TOKENS)})
    if not long:
        text, other = stdlib_text(mb), stdlib_text(mb, pattern="*/*.py")
        report("Llama 3 (tokenizer.model; HF from tokenizer.json)", text, other,
               Tokenizer.from_file(os.path.join(llama, "tokenizer.model")),
               HFTokenizer.from_file(os.path.join(llama, "tokenizer.json")), tik, repeats)
        report("SmolLM2 (tokenizer.json)", text, other, Tokenizer.from_file(smol),
               HFTokenizer.from_file(os.path.join(smol, "tokenizer.json")), None, repeats)
    worst_repeats = repeats if long else min(repeats, 3)
    worst_case("Llama 3", worst_mb, Tokenizer.from_file(os.path.join(llama, "tokenizer.model")),
               HFTokenizer.from_file(os.path.join(llama, "tokenizer.json")), tik, worst_repeats)
    worst_case("SmolLM2", worst_mb, Tokenizer.from_file(smol),
               HFTokenizer.from_file(os.path.join(smol, "tokenizer.json")), None, worst_repeats)


if __name__ == "__main__":
    cli(main)
