"""Long pieces (fast_bpe.py): bpe_long (numpy rounds) gives exactly tokenizer_bpe.bpe()'s parts on random
vocabularies, with and without its windowed merges, and the ids of HF `tokenizers` / tiktoken on the real vocabularies for runs
of one letter, of spaces and for long words of random letters (each one piece of the pre-tokenizer).

Run: python -m pytest tests/test_tokenizer_long.py -q
"""
import math
import os
import random
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import fast_bpe  # noqa: E402
from fast_bpe import MergeTable, bpe_long, window_min  # noqa: E402
from tokenizer_bpe import LLAMA3_PATTERN, LLAMA3_SPECIAL_TOKENS, Tokenizer, bpe  # noqa: E402


@st.composite
def vocabularies_of_three_letters(draw):
    """Random tokens over a 3-letter alphabet and their rank function: HF style (a list of merges, in any order,
    so a merge may rank below the merges that make its parts) or tiktoken style (a pair ranks as its merged
    bytes' id)."""
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
        return tokens, lambda a, b: merges.get((a, b))
    vocab = {t: i for i, t in zip(order, dict.fromkeys(t for p in pairs for t in [p[0] + p[1]]))}
    return tokens, lambda a, b: vocab.get(a + b)


# lowest rank only (the rounds of runs), and the windowed merges in every round; no round is handed to bpe() for
# merging too little, so the rounds are what is checked
ROUNDS = {"lowest rank only": {"WINDOW_SHARE": math.inf, "MIN_ROUND_SHARE": math.inf},
          "windows every round": {"WINDOW_SHARE": 0, "MIN_ROUND_SHARE": math.inf}}


@pytest.mark.parametrize("rounds", ROUNDS)
@settings(max_examples=300, deadline=None)
@given(vocabulary=vocabularies_of_three_letters(), text=st.text(alphabet="ab ", max_size=300))
def test_bpe_long_equals_bpe_on_random_vocabularies(rounds, vocabulary, text):
    tokens, rank = vocabulary
    data = text.encode()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in ROUNDS[rounds].items():
            patch.setattr(fast_bpe, name, value)
        assert bpe_long(data, MergeTable.of(tokens, rank), bpe) == bpe([data[i:i + 1] for i in range(len(data))], rank)


@settings(max_examples=300, deadline=None)
@given(vocabulary=vocabularies_of_three_letters(), text=st.text(alphabet="ab ", min_size=1, max_size=300))
def test_longest_in_bounds_the_tokens_that_occur(vocabulary, text):
    tokens, rank = vocabulary
    data = text.encode()
    longest = MergeTable.of(tokens, rank).longest_in(data)
    assert longest >= max(len(t) for t in tokens if t in data)
    if all(len(t) <= 8 for t in tokens) or any(len(t) > 8 and t[:8] in data for t in tokens):
        return  # the bound is the table's longest token, or a long token's first 8 bytes occur
    assert longest == max(len(t) for t in tokens if t in data)


@given(st.lists(st.integers(0, 20), min_size=1, max_size=60), st.integers(1, 20))
def test_window_min(x, width):
    want = [min(x[max(i - width, 0):i + width + 1]) for i in range(len(x))]
    assert window_min(np.array(x), width).tolist() == want


def test_bpe_long_hands_over_when_a_created_pair_ranks_lower():
    """' ab ab' with (a, b) first in the round, but the pairs its product makes merge before the round's next
    (a, b): bpe() merges ' ', 'ab', then ' ab', ' ', then ' ab ', 'a', taking the second pair's 'a'. A round
    merging both (a, b) pairs would give [' ab', ' ab']; bpe_long must see that and hand over."""
    merges = {(b"a", b"b"): 5, (b" ", b"ab"): 1, (b" ab", b" "): 2, (b" ab ", b"a"): 3}
    rank = lambda a, b: merges.get((a, b))  # noqa: E731
    tokens = [b"a", b"b", b" ", *(a + b for a, b in merges)]
    assert bpe([bytes([c]) for c in b" ab ab"], rank) == [b" ab a", b"b"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fast_bpe, "MIN_ROUND_SHARE", math.inf)
        assert bpe_long(b" ab ab", MergeTable.of(tokens, rank), bpe) == [b" ab a", b"b"]
        # the mirror image: the product's right neighbour starts the chain, which runs into the next pair
        merges = {(b"a", b"b"): 5, (b"ab", b" "): 1, (b"ab ", b"a"): 2}
        tokens = [b"a", b"b", b" ", *(a + b for a, b in merges)]
        assert bpe_long(b"ab ab", MergeTable.of(tokens, rank), bpe) == bpe([bytes([c]) for c in b"ab ab"], rank) \
            == [b"ab a", b"b"]


def test_window_reaches_as_far_as_the_longest_token():
    """In 'thers', (r, s) ranks lowest within 2 pairs on either side, but bpe() merges 'th', 'the', 'ther' first
    and takes its 'r': the window must span the longest token that occurs ('ther', 4 pairs) to see (t, h)."""
    merges = {(b"t", b"h"): 0, (b"th", b"e"): 1, (b"the", b"r"): 2, (b"r", b"s"): 3}
    rank = lambda a, b: merges.get((a, b))  # noqa: E731
    table = MergeTable.of([bytes([c]) for c in b"thers "] + [a + b for a, b in merges], rank)
    data = b"thers " * 3
    with pytest.MonkeyPatch.context() as patch:
        for name, value in ROUNDS["windows every round"].items():
            patch.setattr(fast_bpe, name, value)
        assert bpe_long(data, table, bpe) == bpe([data[i:i + 1] for i in range(len(data))], rank) == \
            [b"ther", b"s", b" "] * 3


@pytest.fixture(scope="module")
def vocabularies(smollm2_dir, llama_tokenizer_dir):
    """(name, ours, HF tokenizers, tiktoken or None) for SmolLM2's tokenizer.json and Llama 3's tokenizer.model."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    ranks = load_tiktoken_bpe(str(llama_tokenizer_dir / "tokenizer.model"))
    tik = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                            special_tokens={s: len(ranks) + i for i, s in enumerate(LLAMA3_SPECIAL_TOKENS)})
    return [("smollm2", Tokenizer.from_file(str(smollm2_dir)),
             HFTokenizer.from_file(str(smollm2_dir / "tokenizer.json")), None),
            ("llama3", Tokenizer.from_file(str(llama_tokenizer_dir / "tokenizer.model")),
             HFTokenizer.from_file(str(llama_tokenizer_dir / "tokenizer.json")), tik)]


def random_word(alphabet: str, n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(alphabet) for _ in range(n))


def test_long_pieces_match_hf_and_tiktoken(vocabularies):
    """Long runs and random long words from small alphabets, each one piece of the pre-tokenizer."""
    rng = random.Random(0)
    texts = ["a" * 200_000, " " * 100_000, "=" * 50_000, "ab" * 30_000, "\n" * 20_000 + "x",
             *(random_word(alphabet, rng.randrange(1000, 20_000), rng.random())
               for alphabet in ["ab", "aab", "xyz", "    \t", "=-", "ééa"] for _ in range(2))]
    for name, ours, hf, tik in vocabularies:
        for text in texts:
            ids = ours.encode(text)
            assert ids == hf.encode(text, add_special_tokens=False).ids, (name, text[:20])
            if tik is not None:  # tiktoken's regex overflows its stack on 1 MB of spaces, not on these
                assert ids == tik.encode_ordinary(text), (name, text[:20])


def test_long_words_of_varied_letters_match_hf(vocabularies):
    """30 KB words of random letters (lowercase; all cases with accents and Cyrillic): no run for the lowest rank
    to sweep, so the windowed merges do the work; the ids must still be HF's and tiktoken's."""
    texts = [random_word("abcdefghijklmnopqrstuvwxyz", 30_000, 1),
             random_word("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZéèüßжщы", 30_000, 2)]
    for name, ours, hf, tik in vocabularies:
        for text in texts:
            ids = ours.encode(text)
            assert ids == hf.encode(text, add_special_tokens=False).ids, (name, text[:20])
            if tik is not None:
                assert ids == tik.encode_ordinary(text), (name, text[:20])


def test_rounds_do_the_merging(vocabularies):
    """The rounds merge long runs and long random words to the end: bpe() is never handed a stretch, else the
    fast path would silently be the heap."""
    handed = []
    finish = lambda parts, rank: handed.append(len(parts)) or bpe(parts, rank)  # noqa: E731
    for name, ours, _, _ in vocabularies:
        for text in ["a" * 100_000, " " * 100_000, random_word("abcdefghijklmnopqrstuvwxyz", 30_000, 3)]:
            data = text.encode()
            parts = bpe_long(data, ours.long.table_for(data), finish)
            assert not handed, (name, text[:20], handed[:10])
            assert parts == bpe([data[i:i + 1] for i in range(len(data))], ours.rank), (name, text[:20])


def test_tokenizer_bpe_copied_alone_gives_the_same_ids(vocabularies, smollm2_dir, tmp_path):
    """tokenizer_bpe.py uses fast_bpe.py when it sits beside it, and a copy of tokenizer_bpe.py alone (no fast_bpe.py)
    merges long pieces with bpe() into the same ids."""
    import shutil
    import subprocess
    text = "a" * 3000 + " " + random_word("abcdefghijklmnopqrstuvwxyz", 3000, 4)
    ours = vocabularies[0][1]
    assert isinstance(ours.long, fast_bpe.LongPieces)
    shutil.copy(os.path.join(os.path.dirname(__file__), "..", "tokenizer_bpe.py"), tmp_path)
    code = ("import sys, tokenizer_bpe as t; assert t.LongPieces is None; "
            "print(t.Tokenizer.from_file(sys.argv[1]).encode(sys.argv[2]))")
    out = subprocess.run([sys.executable, "-c", code, str(smollm2_dir), text], cwd=tmp_path, capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONPATH": ""})
    assert out.stdout.strip() == str(ours.encode(text))
