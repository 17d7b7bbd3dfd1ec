"""BPE training in tokenizer_bpe.py: the saved tokenizer.json loads in HF `tokenizers` and encodes identically,
the incremental pair counts learn exactly what a full recount (minbpe's way) learns, ties are deterministic.

Run: python -m pytest tests/test_tokenizer_train.py -q
"""
import os
import sys
import sysconfig
from pathlib import Path

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tokenizer_bpe import LLAMA3_PATTERN, Tokenizer, get_stats, merge, train  # noqa: E402

FILES = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
TRAIN = [p.read_text(encoding="utf-8")[:20000] for p in FILES[10:16]]  # ~120 KB of Python source
HELD_OUT = [p.read_text(encoding="utf-8")[:4000] for p in FILES[40:43]] + [
    "Größe und Straße, ¿qué tal? Привет мир, 你好世界 👨‍👩‍👧 1234567 \r\n\t  x",
    "<|endoftext|> inside text, and <|pad|>",
]
SPECIALS = ["<|endoftext|>", "<|pad|>"]


@pytest.fixture(scope="module")
def trained():
    return train(TRAIN, vocab_size=700, special_tokens=SPECIALS)


@pytest.fixture(scope="module")
def saved(trained, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    trained.save(path)
    return path


def hf_ids(hf, text, special=False):
    hf.encode_special_tokens = not special  # HF matches special strings unless told not to
    return hf.encode(text, add_special_tokens=False).ids


def test_vocab_size_and_special_ids(trained):
    assert trained.vocab_size == 700
    assert trained.special_tokens == {"<|endoftext|>": 698, "<|pad|>": 699}


def test_hf_loads_saved_file_and_encodes_identically(trained, saved):
    hf = HFTokenizer.from_file(saved)
    assert hf.get_vocab_size() == trained.vocab_size
    ours_reloaded = Tokenizer.from_file(saved)
    for text in HELD_OUT:
        ids = trained.encode(text)
        assert ids == hf_ids(hf, text) == ours_reloaded.encode(text)
        assert trained.decode(ids) == hf.decode(ids, skip_special_tokens=False) == text
        # the vocabulary compresses held-out Python: far fewer tokens than bytes
    assert len(trained.encode(HELD_OUT[0])) < 0.5 * len(HELD_OUT[0].encode())


def test_special_tokens_as_hf(trained, saved):
    hf = HFTokenizer.from_file(saved)
    text = HELD_OUT[-1]
    ids = trained.encode(text, allowed_special="all")
    assert ids == hf_ids(hf, text, special=True)
    assert ids[0] == 698 and 699 in ids
    assert not {698, 699} & set(trained.encode(text))  # plain text by default
    assert trained.encode(text, allowed_special={"<|pad|>"}).count(699) == 1


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=50))
def test_roundtrip_any_text(trained, text):
    """Every byte has a token, so any string survives encode -> decode."""
    assert trained.decode(trained.encode(text)) == text


def full_recount_train(texts, vocab_size):
    """The reference: minbpe's loop, counting every pair of every (unique) word again after each merge,
    with the same tie rule (highest count, then smallest pair)."""
    counts = {}
    for text in texts:
        for w in regex.findall(LLAMA3_PATTERN, text):
            counts[w] = counts.get(w, 0) + 1
    words = {tuple(w.encode()): n for w, n in counts.items()}
    vocab = [bytes([b]) for b in range(256)]
    merges = {}
    while len(vocab) < vocab_size:
        stats = {}
        for word, n in words.items():
            get_stats(list(word), stats, n)
        stats = {p: n for p, n in stats.items() if n > 0}
        if not stats:
            break
        pair = min(stats, key=lambda p: (-stats[p], p))
        merges[(vocab[pair[0]], vocab[pair[1]])] = len(merges)
        words = {tuple(merge(list(w), pair, len(vocab))): n for w, n in words.items()}
        vocab.append(vocab[pair[0]] + vocab[pair[1]])
    return vocab, merges


def test_incremental_counts_equal_full_recount():
    texts = [t[:3000] for t in TRAIN[:3]] + ["aaaa aaaaaaa    aaaaa          x"]  # runs: overlapping pairs
    vocab, merges = full_recount_train(texts, 420)
    tok = train(texts, 420)
    assert tok.merges == merges
    assert tok.vocab == {b: i for i, b in enumerate(vocab)}


def test_deterministic_and_independent_of_text_order(trained):
    again = train(TRAIN[::-1], vocab_size=700, special_tokens=SPECIALS)
    assert again.merges == trained.merges and again.vocab == trained.vocab


def test_ties_go_to_the_smallest_pair():
    # every pair occurs once: the first merge is the smallest (left id, right id), here (' ', 'c')
    tok = train(["ab cd"], vocab_size=257)
    assert list(tok.merges) == [(b" ", b"c")]
