"""Training speed: tokenizer_bpe.train vs HF `tokenizers` BpeTrainer, same text, same pre-tokenizer, same run.

Text: the Python stdlib sources, concatenated, first `mb` MB. Both learn a byte-level vocabulary of
`vocab_size` ids (HF's includes the special token, as ours) with Llama 3's pre-tokenization pattern.
Run: python benchmarks/bench_tokenizer_train.py [--mb 2 --vocab_size 4096 --repeats 3]
"""
import glob
import os
import sys
import sysconfig
import time

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from cli import cli  # noqa: E402
from tokenizer_bpe import LLAMA3_PATTERN, train  # noqa: E402


def stdlib_texts(mb: float) -> list[str]:
    """Whole stdlib files in sorted order until `mb` MB of UTF-8 (the last one cut)."""
    texts, left = [], int(mb * 1e6)
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        with open(path, encoding="utf-8") as f:
            data = f.read().encode()[:left].decode(errors="ignore")
        texts.append(data)
        left -= len(data.encode())
        if left <= 0:
            break
    return texts


def train_hf(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def best_time(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main(mb: float = 2.0, vocab_size: int = 4096, repeats: int = 3):
    texts = stdlib_texts(mb)
    size = sum(len(t.encode()) for t in texts) / 1e6
    t_hf, hf = best_time(lambda: train_hf(texts, vocab_size), repeats)
    t_ours, ours = best_time(lambda: train(texts, vocab_size, special_tokens=["<|endoftext|>"]), repeats)
    print(f"{size:.2f} MB of Python source, vocab {vocab_size}, best of {repeats}")
    print(f"HF BpeTrainer        {t_hf:6.2f} s  (vocab {hf.get_vocab_size()})")
    print(f"tokenizer_bpe.train  {t_ours:6.2f} s  (vocab {ours.vocab_size}, {len(ours.merges)} merges)")
    print(f"ours / HF            {t_ours / t_hf:6.2f}x the time (target: at most 5x)")


if __name__ == "__main__":
    cli(main)
