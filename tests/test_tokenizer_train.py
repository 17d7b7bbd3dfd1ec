"""BPE training in tokenizer_bpe.py: the saved tokenizer.json loads in HF `tokenizers` and encodes identically,
the incremental pair counts learn exactly what a full recount (minbpe's way) learns, ties are deterministic.
And the merge of long pieces (bpe_long, numpy rounds) against bpe() and against HF `tokenizers` / tiktoken on
the real vocabularies (needs: python download.py smollm2-135m-instruct llama3.2-tokenizer).

Run: python -m pytest tests/test_tokenizer_train.py -q
"""
import math
import os
import random
import sys
import sysconfig
from pathlib import Path
from unittest import mock

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import tokenizer_bpe  # noqa: E402
from tokenizer_bpe import (LLAMA3_PATTERN, LLAMA3_SPECIAL_TOKENS, Tokenizer, bpe, bpe_long, get_stats,  # noqa: E402
                           merge, train)

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


# -----------------------------------------------------------------------------
# long pieces: bpe_long (numpy rounds) must give exactly bpe()'s parts


@st.composite
def rank_tables(draw):
    """A random rank function over a 3-letter alphabet: HF style (a list of merges, in any order, so a merge
    may rank below the merges that make its parts) or tiktoken style (a pair ranks as its merged bytes' id)."""
    tokens = [b"a", b"b", b" "]
    pairs = []
    for _ in range(draw(st.integers(1, 25))):
        pair = (draw(st.sampled_from(tokens)), draw(st.sampled_from(tokens)))
        if pair not in pairs:
            pairs.append(pair)
            tokens.append(pair[0] + pair[1])
    order = draw(st.permutations(range(len(pairs))))
    if draw(st.booleans()):
        merges = dict(zip(pairs, order))
        return lambda a, b: merges.get((a, b))
    vocab = {t: i for i, t in zip(order, dict.fromkeys(t for p in pairs for t in [p[0] + p[1]]))}
    return lambda a, b: vocab.get(a + b)


@settings(max_examples=300, deadline=None)
@given(rank_tables(), st.text(alphabet="ab ", max_size=300))
def test_bpe_long_equals_bpe_on_random_vocabularies(rank, text):
    data = text.encode()
    # every round runs (none is handed to bpe() for merging too little), so the rounds are what is checked
    with mock.patch.object(tokenizer_bpe, "MIN_ROUND_SHARE", math.inf):
        assert bpe_long(data, rank) == bpe([data[i:i + 1] for i in range(len(data))], rank)


def test_bpe_long_hands_over_when_a_created_pair_ranks_lower():
    """' ab ab' with (a, b) first in the round, but the pairs its product makes merge before the round's next
    (a, b): bpe() merges ' ', 'ab', then ' ab', ' ', then ' ab ', 'a', taking the second pair's 'a'. A round
    merging both (a, b) pairs would give [' ab', ' ab']; bpe_long must see that and hand over."""
    merges = {(b"a", b"b"): 5, (b" ", b"ab"): 1, (b" ab", b" "): 2, (b" ab ", b"a"): 3}
    rank = lambda a, b: merges.get((a, b))  # noqa: E731
    assert bpe([bytes([c]) for c in b" ab ab"], rank) == [b" ab a", b"b"]
    with mock.patch.object(tokenizer_bpe, "MIN_ROUND_SHARE", math.inf):
        assert bpe_long(b" ab ab", rank) == [b" ab a", b"b"]
        # the mirror image: the product's right neighbour starts the chain, which runs into the next pair
        merges = {(b"a", b"b"): 5, (b"ab", b" "): 1, (b"ab ", b"a"): 2}
        assert bpe_long(b"ab ab", rank) == bpe([bytes([c]) for c in b"ab ab"], rank) == [b"ab a", b"b"]


def need(path):
    if not os.path.exists(path):
        pytest.fail(f"{path} missing: run `python download.py smollm2-135m-instruct llama3.2-tokenizer`")
    return path


CKPT = Path(__file__).resolve().parents[1] / "checkpoints"


@pytest.fixture(scope="module")
def vocabularies():
    """(name, ours, HF tokenizers, tiktoken or None) for SmolLM2's tokenizer.json and Llama 3's tokenizer.model."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    smol, llama = CKPT / "SmolLM2-135M-Instruct" / "tokenizer.json", CKPT / "Llama-3.2-tokenizer"
    ranks = load_tiktoken_bpe(need(str(llama / "tokenizer.model")))
    tik = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                            special_tokens={s: len(ranks) + i for i, s in enumerate(LLAMA3_SPECIAL_TOKENS)})
    return [("smollm2", Tokenizer.from_file(need(str(smol))), HFTokenizer.from_file(str(smol)), None),
            ("llama3", Tokenizer.from_file(str(llama / "tokenizer.model")),
             HFTokenizer.from_file(need(str(llama / "tokenizer.json"))), tik)]


def test_long_pieces_match_hf_and_tiktoken(vocabularies):
    """Long runs and random long words from small alphabets, each one piece of the pre-tokenizer."""
    rng = random.Random(0)
    texts = ["a" * 200_000, " " * 100_000, "=" * 50_000, "ab" * 30_000, "\n" * 20_000 + "x",
             *("".join(rng.choice(alphabet) for _ in range(rng.randrange(1000, 20_000)))
               for alphabet in ["ab", "aab", "xyz", "    \t", "=-", "ééa"] for _ in range(2))]
    for name, ours, hf, tik in vocabularies:
        for text in texts:
            ids = ours.encode(text)
            assert ids == hf.encode(text, add_special_tokens=False).ids, (name, text[:20])
            if tik is not None:  # tiktoken's regex overflows its stack on 1 MB of spaces, not on these
                assert ids == tik.encode_ordinary(text), (name, text[:20])


def test_runs_merge_in_rounds(vocabularies, monkeypatch):
    """The rounds do the merging of a long run: bpe() gets at most a short remainder, else the fast path
    would silently be the heap."""
    handed = []
    monkeypatch.setattr(tokenizer_bpe, "bpe", lambda parts, rank: handed.append(len(parts)) or bpe(parts, rank))
    for name, ours, _, _ in vocabularies:
        for text in ["a" * 100_000, " " * 100_000]:
            data = text.encode()
            assert bpe_long(data, ours.rank) == bpe([data[i:i + 1] for i in range(len(data))], ours.rank)
    assert max(handed, default=0) < 100_000 // 8, handed
