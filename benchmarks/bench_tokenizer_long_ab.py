"""Long pieces (bpe_long's numpy rounds): this tokenizer_bpe.py against an earlier one, same texts, same run.

One megabyte of one letter, of spaces and of random lowercase letters (each one pre-tokenizer piece), encoded with the
cache emptied before every call, the two files' calls interleaved, best of `repeats` CPU seconds; ids compared.
(benchmarks/bench_tokenizer.py --baseline compares ordinary text; --long compares with HF and tiktoken.)

Run: git show HEAD~1:tokenizer_bpe.py > /tmp/tokenizer_before.py
     python benchmarks/bench_tokenizer_long_ab.py --baseline /tmp/tokenizer_before.py
Needs: python download.py smollm2-135m-instruct llama3.2-tokenizer
"""
import importlib.util
import os
import random
import string
import sys
import time

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, ROOT)
import tokenizer_bpe  # noqa: E402
from cli import cli  # noqa: E402


def main(baseline: str = "", mb: float = 1.0, repeats: int = 3):
    """Long-piece encoding time of tokenizer_bpe.py against a baseline tokenizer_bpe.py.

    baseline: an earlier tokenizer_bpe.py (git show REV:tokenizer_bpe.py > FILE)
    mb: megabytes of each one-piece text
    repeats: interleaved calls per side (the best counts)
    """
    if not os.path.isfile(baseline):
        raise SystemExit("error: --baseline must name an earlier tokenizer_bpe.py (git show REV:tokenizer_bpe.py > F)")
    spec = importlib.util.spec_from_file_location("tokenizer_bpe_baseline", baseline)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    n, rng = int(mb * 1e6), random.Random(0)
    texts = {"one letter": "a" * n, "spaces": " " * n,
             "random letters": "".join(rng.choice(string.ascii_lowercase) for _ in range(n))}
    for name, path in [("Llama 3", "checkpoints/Llama-3.2-tokenizer/tokenizer.model"),
                       ("SmolLM2", "checkpoints/SmolLM2-135M-Instruct")]:
        toks = {"after": tokenizer_bpe.Tokenizer.from_file(os.path.join(ROOT, path)),
                "before": old.Tokenizer.from_file(os.path.join(ROOT, path))}
        for what, text in texts.items():
            ids, cpu = {}, {k: float("inf") for k in toks}
            for k, tok in toks.items():  # warm-up: the merge table of these bytes
                tok.cache.clear()
                ids[k] = tok.encode(text)
            for _ in range(repeats):
                for k, tok in toks.items():
                    tok.cache.clear()
                    c0 = time.process_time()
                    tok.encode(text)
                    cpu[k] = min(cpu[k], time.process_time() - c0)
            print(f"{name}, {mb:g} MB of {what}: after {cpu['after']:.3f}s, before {cpu['before']:.3f}s CPU; "
                  f"after/before {cpu['after'] / cpu['before']:.3f}; ids identical: {ids['after'] == ids['before']}")
    print(f"load at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    cli(main)
