"""
Long pieces for tokenizer_bpe.py: BPE of a piece of many bytes in numpy rounds, exactly the parts of its merge loop.

A pre-tokenizer piece can be a megabyte (one letter repeated, a run of spaces, a long word of random letters: each
is one match of the pattern). tokenizer_bpe.bpe() merges it with a heap in O(n log n), one Python step per merge:
seconds for such a piece. Here minbpe's loop runs on numpy arrays instead, many merges per pass, with the same
result (tests/test_tokenizer_long.py checks it against bpe() on random vocabularies and against HF `tokenizers` and
tiktoken on the real ones).

tokenizer_bpe.py uses this file for pieces of LONG_PIECE bytes or more when it sits beside it; copied alone,
tokenizer_bpe.py merges them with bpe(), the same ids, slower (figures: docs/tokenizer.md).

Usage (tokenizer_bpe.Tokenizer does this itself):
    long = LongPieces(vocab, rank, bpe); parts = long(data)   # bytes -> the token bytes bpe() would give
"""
import typing

import numpy as np

NO_RANK = 2**31 - 1  # the rank of a pair that does not merge; ranks of merges are below it
MIN_ROUND_SHARE = 100  # a round must merge one part in this many to beat bpe() on the rest
WINDOW_SHARE = 100  # the windowed merges join in when the lowest rank merges fewer than one part in this many


class MergeTable(typing.NamedTuple):
    """The merges among a set of tokens as sorted numpy arrays, for bpe_long (built by `of`). A part is a code: its
    index in `tokens`."""
    tokens: list[bytes]  # code -> token, longest first
    code: dict[bytes, int]  # token -> code
    byte_code: np.ndarray  # byte value -> the code of that byte alone (-1: not a token)
    pairs: np.ndarray  # left code << 32 | right code, of every merge, sorted; and a last row for no merge
    ranks: np.ndarray  # the rank of each (NO_RANK in the last row)
    merged: np.ndarray  # the code of the token each merge makes
    rank: typing.Callable  # the rank function they come from, for `finish`
    first8: np.ndarray  # each token's first 8 bytes as a big-endian number, padded with zero bytes
    last8: np.ndarray  # the same padded with 0xFF bytes: the numbers of all 8 bytes starting with the token

    @classmethod
    def of(cls, tokens, rank) -> "MergeTable":
        """Every cut of a token into two tokens that `rank` merges: HF lists these merges, tiktoken ranks every
        such cut, and no other pair of tokens can merge (HF refuses a merge whose result is not a token)."""
        code = {t: i for i, t in enumerate(sorted(set(tokens), key=len, reverse=True))}
        rows = [(code[t[:k]] << 32 | code[t[k:]], r, i) for t, i in code.items() for k in range(1, len(t))
                if t[:k] in code and t[k:] in code and (r := rank(t[:k], t[k:])) is not None]
        rows = sorted(rows) + [(np.iinfo(np.int64).max, NO_RANK, -1)]  # above every pair of codes
        pairs, ranks, merged = np.array(rows, dtype=np.int64).T
        if ranks.min() < 0 or ranks[:-1].max(initial=0) >= NO_RANK:
            raise NotImplementedError(f"merge ranks outside 0 to {NO_RANK - 1} are not supported")
        byte_code = np.array([code.get(bytes([b]), -1) for b in range(256)])
        first8 = np.array([int.from_bytes(t[:8].ljust(8, b"\0"), "big") for t in code], dtype=np.uint64)
        last8 = np.array([int.from_bytes(t[:8].ljust(8, b"\xff"), "big") for t in code], dtype=np.uint64)
        return cls(list(code), code, byte_code, pairs, ranks, merged, rank, first8, last8)

    def row(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        """The row of the merge of each pair (left[k], right[k]), the last row if none: a binary search each."""
        keys = left << 32 | right
        found = np.searchsorted(self.pairs, keys)
        found[self.pairs[found] != keys] = -1
        return found

    def rank_of(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        return self.ranks[self.row(left, right)]

    def merged_of(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        return self.merged[self.row(left, right)]

    def longest_in(self, data: bytes) -> int:
        """The length of the longest token that occurs in `data` (one of more than 8 bytes counts if its first 8 do): no
        merge of `data` makes a longer one. With every 8 bytes of `data` as a big-endian number, sorted, the 8 bytes
        that start with a given token form a range: one binary search per end."""
        if len(self.tokens[0]) <= 8:  # the longest token of the table is bound enough
            return len(self.tokens[0])
        padded = np.frombuffer(data + bytes(7), dtype=np.uint8).astype(np.uint64)
        grams = np.zeros(len(data), dtype=np.uint64)
        for k in range(8):
            grams |= padded[k:k + len(data)] << np.uint64(56 - 8 * k)
        grams.sort()
        found = np.searchsorted(grams, self.last8, "right") > np.searchsorted(grams, self.first8)
        return len(self.tokens[np.argmax(found)])  # tokens are longest first


def window_min(x: np.ndarray, width: int) -> np.ndarray:
    """min(x[i - width : i + width + 1]) for each i (beyond the ends: x's maximum), in log2(width) numpy
    passes: minima over spans of 1, 2, 4, ... elements, then two overlapping spans cover each window."""
    pad = np.full(width, x.max())
    m, span = np.concatenate([pad, x, pad]), 1
    while 2 * span <= 2 * width + 1:
        m, span = np.minimum(m[:-span], m[span:]), 2 * span  # m[j] = min(x padded [j : j + span])
    return np.minimum(m[:len(x)], m[2 * width + 1 - span:][:len(x)])


def bpe_long(data: bytes, table: MergeTable, finish) -> list[bytes]:
    """bpe() of the single bytes of `data` (bpe(): tokenizer_bpe's merge loop, passed as `finish`): minbpe's loop on
    numpy arrays, many merges per pass. `table` holds every token that can form from `data`. A round merges the pairs
    bpe() is sure to merge as they stand:
    - every pair of the lowest rank present, left to right, if no pair they create ranks at or below them (checked);
    - when those are too few to pay for a pass, also every pair whose (rank, position) is the lowest within `longest`
      pairs on either side (`longest`: the longest token occurring in `data`), if the pairs it creates rank above it:
      only a neighbour built by earlier merges could take one of its parts first, and its pairs lie in the window.
    A pair with no mergeable pair within `longest` pairs on either side is a wall no merge crosses: parts between two
    walls are finished and set aside. When a round would merge too little, or a check fails, `finish` merges each
    stretch between walls."""
    c = table.byte_code[np.frombuffer(data, dtype=np.uint8)]  # a code per part
    start = np.arange(len(c))  # each part's first byte: where set-aside parts go back in order
    finished = []  # (start, code) arrays of the parts set aside
    # each pair (c[i], c[i + 1]) as rank << 32 | position: ordered as bpe() picks them
    key = table.rank_of(c[:-1], c[1:]) << 32 | start[:-1]
    NEVER = NO_RANK << 32  # keys from here on are pairs that do not merge
    wall = np.zeros(len(key), dtype=bool)
    longest = None  # found when the second kind is first needed
    while len(key) and (low := key.min() >> 32) != NO_RANK:
        at = np.flatnonzero(key < (low + 1) << 32)
        # subtle: in 'aaa' the pair (a, a) occurs twice, overlapping; bpe() merges the leftmost first,
        # so in each run of adjacent occurrences only every other one, from the left, is merged
        run_start = np.maximum.accumulate(np.where(np.diff(at, prepend=-2) != 1, np.arange(len(at)), 0))
        at = at[(np.arange(len(at)) - run_start) % 2 == 0]
        # ranks of the pairs the sequential merges create, in order: (left neighbour then, product), (product,
        # right neighbour then); the left neighbour is the previous product when the occurrences touch
        made = np.repeat(table.merged_of(c[at[:1]], c[at[:1] + 1]), len(at))
        touching = np.diff(at, prepend=-3) == 2
        left = table.rank_of(np.where(touching, made, c[at - 1]), made)  # at[0] - 1 may be -1: not used
        right = table.rank_of(made, c[np.minimum(at + 2, len(c) - 1)])
        if (left[at > 0] <= low).any() or (right[at + 2 < len(c)] <= low).any():
            break  # bpe() would merge a created pair before the rest of these: not a round
        right[:-1] = np.where(touching[1:], left[1:], right[:-1])  # (product, next product) in the end
        if len(at) * WINDOW_SHARE < len(c):  # too few for a pass: the second kind too, and walls
            longest = longest or table.longest_in(data)
            near = window_min(key, longest)
            wall |= near >= NEVER
            # these never touch each other or the first kind (they would be in its window)
            alone = np.flatnonzero((key == near) & (key >= (low + 1) << 32) & (key < NEVER))
            rank, product = key[alone] >> 32, table.merged_of(c[alone], c[alone + 1])
            alone_left = table.rank_of(c[alone - 1], product)
            alone_right = table.rank_of(product, c[np.minimum(alone + 2, len(c) - 1)])
            ok = ~((alone > 0) & (alone_left <= rank) | (alone + 2 < len(c)) & (alone_right <= rank))
            order = np.argsort(np.concatenate([at, alone[ok]]))
            at, made, left, right = (np.concatenate(both)[order] for both in (
                (at, alone[ok]), (made, product[ok]), (left, alone_left[ok]), (right, alone_right[ok])))
            if len(at) * MIN_ROUND_SHARE < len(c):
                break
        c[at] = made
        keep = np.ones(len(c), dtype=bool)
        keep[at + 1] = False
        c, start, key, wall = c[keep], start[keep], key[keep[1:]], wall[keep[1:]]  # drops the merged pairs
        pos = at - np.arange(len(at))  # the products' new positions; the pairs beside them get the ranks above
        first, last = pos > 0, pos < len(c) - 1
        key[pos[first] - 1] = left[first] << 32 | start[pos[first] - 1]
        key[pos[last]] = right[last] << 32 | start[pos[last]]
        if (done := np.concatenate([[True], wall]) & np.concatenate([wall, [True]])).any():
            finished.append((start[done], c[done]))
            # a pair beside a finished part is a wall: keeping, for each kept part, the pair on its right
            # makes the pair of two kept parts that used to be apart a wall too
            kept = np.flatnonzero(~done)
            c, start, key, wall = c[kept], start[kept], key[kept[:-1]], wall[kept[:-1]]
    if len(key) and key.min() < NEVER:  # the rounds stopped early: `finish` merges each stretch between walls
        for s in np.split(np.arange(len(c)), np.flatnonzero(wall) + 1):
            parts = finish([table.tokens[k] for k in c[s].tolist()], table.rank)
            finished.append((start[s[0]] + np.cumsum([0] + [len(p) for p in parts[:-1]]),
                             np.array([table.code[p] for p in parts])))
    else:
        finished.append((start, c))
    start, c = (np.concatenate(x) for x in zip(*finished))
    return [table.tokens[k] for k in c[np.argsort(start)].tolist()]


class LongPieces:
    """bpe_long with its merge table, made of the tokens whose bytes all occur in the long pieces seen so far, not of
    the whole vocabulary (slow to list, for Llama 3): the first piece with new bytes pays for the table."""

    def __init__(self, vocab: typing.Iterable[bytes], rank, finish):
        self.vocab, self.rank, self.finish = vocab, rank, finish
        self.table, self.table_bytes = None, b""

    def table_for(self, data: bytes) -> MergeTable:
        alphabet = np.flatnonzero(np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256))
        alphabet = alphabet.astype(np.uint8).tobytes()
        if alphabet.translate(None, self.table_bytes):  # bytes the table lacks: grow it to all seen so far
            self.table_bytes = bytes(sorted(set(self.table_bytes + alphabet)))
            self.table = MergeTable.of([t for t in self.vocab if not t.translate(None, self.table_bytes)], self.rank)
        return self.table

    def __call__(self, data: bytes) -> list[bytes]:
        return bpe_long(data, self.table_for(data), self.finish)
