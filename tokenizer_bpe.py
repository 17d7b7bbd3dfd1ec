"""
Byte-level BPE tokenizer in one file: load, encode, decode, train, save, and the chat formats of the checkpoints.

The tokenizer of GPT-2, SmolLM2 and Llama 3: text is cut into pieces by regexes (pre-tokenization), each piece's
UTF-8 bytes are merged pairwise by learned rank until no merge applies, and the byte strings are looked up in the
vocabulary. Loads a Hugging Face `tokenizer.json` (or `vocab.json` + `merges.txt`) and Meta's tiktoken
`tokenizer.model`; trains a new vocabulary and saves a `tokenizer.json` that HF `tokenizers` encodes identically.

References: minbpe (the algorithm in plain Python, `get_stats` / `merge`, opt-in `allowed_special`); tiktoken and HF
`tokenizers`, the ground truth for the ids of `tokenizer.model` and `tokenizer.json`; Meta's llama3 `ChatFormat` and
HF's chat templates for apply_chat_template.

Departures, on purpose:
- Special-token strings in text are plain text unless allowed (`allowed_special`; "all" allows every one), so user
  text never forges a control token (tiktoken raises on one, HF always matches them). `encode` adds no BOS/EOS.
- Long inputs are not cut, as Meta's wrapper does: the merge loop is a heap, O(n log n), and pieces of LONG_PIECE
  bytes or more merge in numpy rounds, with the same ids, where fast_bpe.py sits beside this file.
- Only byte-level BPE: any other normalizer, pre-tokenizer or model option raises NotImplementedError naming it.
- The `regex` module knows Unicode 17's new letters and digits, which tiktoken's and HF's engines see as unassigned:
  pieces around those 4,657 code points differ (test_parity.py's NEWER_UNICODE), no others do.
- Patterns read from a tokenizer.json run within a time bound (PATTERN_SECONDS): one that backtracks
  catastrophically is one ValueError, not a hang.

Usage:
    python tokenizer_bpe.py --path checkpoints/Llama-3.2-tokenizer --text "Hello world"   (--help: the flags)
    tok = Tokenizer.from_file("checkpoints/SmolLM2-135M-Instruct"); tok.encode("Hi"); tok.decode(ids)
    tok = train(texts, vocab_size=4096, special_tokens=["<|endoftext|>"]); tok.save("out/tokenizer.json")
    ids = apply_chat_template(tok, [{"role": "user", "content": "Hi"}])   (ChatML or Llama 3, as the tokens say)
"""
import base64
import heapq
import json
import os
import time
from collections import Counter, defaultdict
from functools import lru_cache

import regex
from tqdm import tqdm

try:  # long pieces (a megabyte of one letter is one piece) merge in numpy rounds, where fast_bpe.py is beside this file
    from fast_bpe import LongPieces
except ImportError:  # copied alone: every piece goes through bpe(), the same ids, slower on huge pieces
    LongPieces = None

# -----------------------------------------------------------------------------
# pre-tokenization patterns

# GPT-2's pattern, which HF's ByteLevel(use_regex=True) applies (SmolLM2 after splitting off every digit)
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# tiktoken's cl100k_base pattern, used by Llama 3: case-insensitive contractions, numbers of at most 3 digits
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Meta's llama3 tokenizer.py: 256 special tokens from id 128000, in this order (the HF tokenizer.json agrees)
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(2, 247)]
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}


def split_then_bytes(pattern: str) -> dict:
    """The HF pre_tokenizer config of Llama 3 and of trained tokenizers: a regex Split, then ByteLevel."""
    split = {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}
    return {"type": "Sequence", "pretokenizers": [split, BYTE_LEVEL]}


CACHE_SIZE = 1 << 18  # pieces remembered by encode; cleared when full so memory stays bounded
LONG_PIECE = 1000  # bytes from which a piece is merged by fast_bpe.LongPieces (when present); shorter ones by bpe()
PATTERN_SECONDS = 1.0  # the time pre-tokenization may take on any text, plus a second per 10,000 characters

# -----------------------------------------------------------------------------
# helpers


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character: how byte-level vocabularies store bytes in JSON.
    Printable Latin-1 bytes map to themselves, the other 68 to U+0100 onwards (so a space becomes 'Ġ')."""
    # control characters, the space and the soft hyphen would be invisible or mangled in a JSON vocabulary
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {ord(c): b for b, c in BYTE_TO_CHAR.items()}  # a str.translate table


def token_bytes(token: str) -> bytes:
    """A vocabulary string ('Ġhello') back to the bytes it stands for (b' hello')."""
    return token.translate(CHAR_TO_BYTE).encode("latin-1")  # code points 0-255 are the bytes themselves


def token_str(data: bytes) -> str:
    """Bytes -> their vocabulary string, for writing a tokenizer.json."""
    return "".join(BYTE_TO_CHAR[b] for b in data)


def get_stats(ids: list[int], counts: dict | None = None, weight: int = 1) -> dict:
    """Count adjacent pairs, as minbpe: [1, 2, 3, 1, 2] -> {(1, 2): 2, (2, 3): 1, (3, 1): 1}; `weight` lets one
    distinct word stand for all its occurrences in training."""
    counts = {} if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + weight
    return counts


def merge(ids: list[int], pair: tuple[int, int], idx: int) -> list[int]:
    """Replace every occurrence of `pair`, left to right, by `idx`, as minbpe: [1, 2, 3, 1, 2], (1, 2) -> [4, 3, 4]."""
    out, i = [], 0
    while i < len(ids):  # left to right, skipping past a match: in [a, a, a] the pair (a, a) merges once, at the left
        match = i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]
        out.append(idx if match else ids[i])
        i += 2 if match else 1
    return out


def bpe(parts: list[bytes], rank) -> list[bytes]:
    """Merge adjacent parts, the pair of lowest `rank(a, b)` first and the leftmost among equals (tiktoken's and HF's
    order), until no pair has a rank (None). minbpe rescans all pairs after each merge, O(n^2); like HF's
    `Word.merge_all` we keep a heap of candidate merges over a linked list, O(n log n)."""
    nxt = [*range(1, len(parts)), -1]  # linked list over start positions; merged-away parts become None
    prv = [*range(-1, len(parts) - 1)]
    # entries (rank, position, left part, right part): lowest rank first, then leftmost
    heap = [(r, i, a, b) for i, (a, b) in enumerate(zip(parts, parts[1:])) if (r := rank(a, b)) is not None]
    heapq.heapify(heap)
    while heap:  # each pop is the next merge tiktoken's linear scan would pick
        _, i, a, b = heapq.heappop(heap)
        j = nxt[i]
        # stale entry: a side of the pair has since been merged into a new (longer) bytes object
        if parts[i] is not a or j == -1 or parts[j] is not b:
            continue
        parts[i] = ab = a + b
        parts[j] = None
        nxt[i] = k = nxt[j]
        # only the pairs with the new part's neighbours are new candidates
        if k != -1:
            prv[k] = i
            if (r := rank(ab, parts[k])) is not None:
                heapq.heappush(heap, (r, i, ab, parts[k]))
        if (h := prv[i]) != -1 and (r := rank(parts[h], ab)) is not None:
            heapq.heappush(heap, (r, h, parts[h], ab))
    return [p for p in parts if p is not None]


def with_gaps(pattern: str) -> str:
    # subtle: HF keeps the text between matches as pieces too, findall drops it; a second alternative that consumes
    # characters while the pattern does not match turns those gaps into matches
    return "(?:{0})|(?:(?!(?:{0}))[\\s\\S])+".format(pattern)


# the patterns this file ships, linear in time: pre_tokenize runs them without the time bound, which slows the regex
# module down
LINEAR_PATTERNS = {with_gaps(GPT2_PATTERN), with_gaps(LLAMA3_PATTERN), r"\p{N}|\P{N}+", r"\p{N}+|\P{N}+"}


def compile_pre_tokenizer(cfg: dict | None) -> list[regex.Pattern]:
    """An HF pre_tokenizer config -> the regexes that cut text into pieces, one after the other. Split(Isolated) keeps
    matches and the gaps between them; Digits is a Split on \\p{N} (HF's char::is_numeric); ByteLevel(use_regex) is
    a Split on GPT-2's pattern and comes last, since it maps bytes to characters later steps would see."""
    steps = cfg["pretokenizers"] if cfg and cfg["type"] == "Sequence" else [cfg]
    # without ByteLevel the vocabulary is not byte-level (SentencePiece-style '▁' words): not ours to guess
    if not steps[-1] or steps[-1]["type"] != "ByteLevel" or any(s["type"] == "ByteLevel" for s in steps[:-1]):
        raise NotImplementedError(f"only byte-level BPE (ByteLevel last in the pre_tokenizer) is supported: {cfg}")
    patterns = []
    for s in steps:
        if s["type"] == "Split" and s["behavior"] == "Isolated" and not s["invert"]:
            p = s["pattern"]
            patterns.append(with_gaps(p["Regex"] if "Regex" in p else regex.escape(p["String"])))
        elif s["type"] == "Digits":  # each digit (or run of digits) and each run of other characters
            patterns.append(r"\p{N}|\P{N}+" if s["individual_digits"] else r"\p{N}+|\P{N}+")
        elif s["type"] == "ByteLevel" and not s["add_prefix_space"]:
            # add_prefix_space would prepend ' ' to every piece and break decode(encode(s)) == s: refused
            patterns += [with_gaps(GPT2_PATTERN)] if s["use_regex"] else []
        else:
            raise NotImplementedError(f"pre-tokenizer step not supported: {s}")
    try:
        compiled = [regex.compile(p) for p in patterns]
    except regex.error as e:
        raise ValueError(f"a pre-tokenizer pattern is not a valid regex ({e})") from None
    # findall returns the groups instead of the whole match when a pattern has any
    if any(c.groups for c in compiled):
        raise NotImplementedError("pre-tokenizer regexes with capture groups are not supported")
    return compiled


def read_json(path) -> dict:
    """A JSON object from a file, else a ValueError naming the file (json's own errors do not)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError; brackets nested 10^5 deep
        raise ValueError(f"{path} is not valid JSON ({e}); download it again") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object (it holds a {type(data).__name__})")
    return data


@lru_cache(maxsize=64)  # chat formatting encodes many short texts with the same few special tokens
def special_regex(allowed: frozenset[str]) -> regex.Pattern:
    """A regex splitting text at the allowed special tokens, keeping them; longest first, so the alternation finds
    the leftmost-longest match, as HF's added-token matcher."""
    return regex.compile("(" + "|".join(map(regex.escape, sorted(allowed, key=len, reverse=True))) + ")")


def pre_tokenize(text: str, patterns: list[regex.Pattern]) -> list[str]:
    """Cut text into pieces with each pattern in turn (SmolLM2: each digit alone, then GPT-2's pattern). A pattern from
    a file may backtrack catastrophically (`(?:\\w|\\w)*!` on a long word runs for hours): together they get
    PATTERN_SECONDS plus one per 10,000 characters, then a ValueError; LINEAR_PATTERNS run unbounded."""
    budget = PATTERN_SECONDS + len(text) / 10_000
    deadline, pieces = time.monotonic() + budget, [text]
    try:
        for pattern in patterns:
            # as HF: a later step only cuts the pieces of the earlier ones, never joins across them
            if pattern.pattern in LINEAR_PATTERNS:
                pieces = [p for chunk in pieces for p in pattern.findall(chunk)]
            else:  # subtle: the regex module reads a negative timeout as none at all, so a spent budget is 0
                pieces = [p for chunk in pieces
                          for p in pattern.findall(chunk, timeout=max(deadline - time.monotonic(), 0.0))]
    except TimeoutError:
        raise ValueError(f"pre-tokenizing {len(text):,} characters took over {budget:.0f}s: a pre-tokenizer pattern "
                         "of this tokenizer.json backtracks catastrophically; use another tokenizer") from None
    return pieces

# -----------------------------------------------------------------------------
# the tokenizer


class Tokenizer:
    def __init__(self, vocab: dict[bytes, int], merges: dict[tuple[bytes, bytes], int] | None,
                 pre_tokenizer: dict, special_tokens: dict[str, int], ignore_merges: bool = False):
        """vocab: token bytes -> id. merges: (a, b) -> rank, as HF files rank a pair by its line; None: tiktoken's rule,
        a pair ranks as its merged bytes' id (the two agree on Llama 3, not in general). pre_tokenizer: HF JSON config.
        ignore_merges: a piece found whole in the vocabulary is one token (HF's option; tiktoken always does so)."""
        self.vocab, self.merges, self.ignore_merges = vocab, merges, ignore_merges
        self.rank = (lambda a, b: vocab.get(a + b)) if merges is None else (lambda a, b: merges.get((a, b)))
        self.pre_tokenizer, self.patterns = pre_tokenizer, compile_pre_tokenizer(pre_tokenizer)
        self.special_tokens = dict(special_tokens)
        # id -> bytes; a special token decodes to its text (SmolLM2 also lists them in the vocabulary)
        self.decoder = {i: b for b, i in vocab.items()} | {i: s.encode() for s, i in special_tokens.items()}
        self.vocab_size = max(self.decoder) + 1  # the embedding rows the ids need, as HF's get_vocab_size()
        self.cache: dict[str, list[int]] = {}
        self.long = LongPieces(vocab, self.rank, bpe) if LongPieces else None
        self.missing_bytes = bytes(b for b in range(256) if bytes([b]) not in vocab)  # see _encode_piece

    # ---- loading

    @classmethod
    def from_file(cls, path: str) -> "Tokenizer":
        """A tokenizer.json, a folder holding one (or vocab.json + merges.txt, or tokenizer.model), or a tiktoken
        tokenizer.model. A missing, unreadable or malformed file is a FileNotFoundError or ValueError naming it."""
        path = os.fspath(path)
        if os.path.isdir(path):
            # tokenizer.json first: it names its own pre-tokenizer and special tokens, and HF reads it too
            for name in ("tokenizer.json", "vocab.json", "tokenizer.model"):
                if os.path.exists(os.path.join(path, name)):
                    return cls.from_file(os.path.join(path, name))
            raise FileNotFoundError(f"no tokenizer.json, vocab.json or tokenizer.model in {path}")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer file at {path}")
        merges = os.path.join(os.path.dirname(path), "merges.txt")
        if path.endswith("vocab.json") and not os.path.isfile(merges):
            raise FileNotFoundError(f"{path} needs merges.txt beside it, and {merges} is missing")
        if path.endswith(".json"):
            data = read_json(path)
            try:
                return cls._from_vocab_merges(data, merges) if path.endswith("vocab.json") else cls._from_hf(data)
            except KeyError as e:  # e.g. a config.json or tokenizer_config.json given as the tokenizer
                raise ValueError(f"{path} is not a Hugging Face tokenizer.json: no {e.args[0]!r} entry") from None
            except (TypeError, ValueError, AttributeError) as e:  # entries of the wrong shape
                raise ValueError(f"{path} is not a well-formed tokenizer file ({type(e).__name__}: {e})") from None
        return cls._from_tiktoken(path)

    @classmethod
    def _from_hf(cls, data: dict) -> "Tokenizer":
        model, decoder = data["model"], data.get("decoder") or {"type": "ByteLevel"}
        unsupported = {"normalizer": data.get("normalizer"), "model": model["type"] if model["type"] != "BPE" else None,
                       "decoder": decoder if decoder["type"] != "ByteLevel" else None}
        unsupported |= {k: model.get(k) for k in ("dropout", "byte_fallback", "continuing_subword_prefix",
                                                  "end_of_word_suffix")}
        if unsupported := {k: v for k, v in unsupported.items() if v}:
            raise NotImplementedError(f"unsupported tokenizer.json settings: {unsupported}")
        as_bytes = {t: token_bytes(t) for t in model["vocab"]}  # merges name vocabulary entries
        vocab = {as_bytes[t]: i for t, i in model["vocab"].items()}
        # with an unk_token HF would emit it for a byte the vocabulary lacks, where we drop the byte
        if model.get("unk_token") and len([b for b in vocab if len(b) == 1]) < 256:
            raise NotImplementedError("an unk_token with missing byte tokens (HF would emit unk) is not supported")
        # merges are "a b" strings in older files and [a, b] lists in newer ones; rank = position
        pairs = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
        merges = {(as_bytes[a], as_bytes[b]): rank for rank, (a, b) in enumerate(pairs)}
        special = {}
        for t in data.get("added_tokens", []):
            # HF matches non-special added tokens in all text and strips around lstrip/rstrip ones: not ours
            if not t["special"] or t["lstrip"] or t["rstrip"] or t["single_word"]:
                raise NotImplementedError(f"added token {t['content']!r}: only plain special tokens are supported")
            special[t["content"]] = t["id"]
        return cls(vocab, merges, data["pre_tokenizer"], special, model.get("ignore_merges", False))

    @classmethod
    def _from_vocab_merges(cls, vocab: dict, merges_path: str) -> "Tokenizer":
        """GPT-2's original files (vocab.json's contents, merges.txt): GPT-2's pattern, one special <|endoftext|>."""
        with open(merges_path, encoding="utf-8") as f:
            lines = [line.split() for line in f.read().splitlines() if line and not line.startswith("#version")]
        special = {s: i for s, i in vocab.items() if s == "<|endoftext|>"}
        model = {"type": "BPE", "vocab": vocab, "merges": lines}
        pre = {**BYTE_LEVEL, "use_regex": True}
        return cls._from_hf({"model": model, "pre_tokenizer": pre, "decoder": BYTE_LEVEL,
                             "added_tokens": [{"id": i, "content": s, "special": True, "lstrip": False,
                                               "rstrip": False, "single_word": False} for s, i in special.items()]})

    @classmethod
    def _from_tiktoken(cls, path: str) -> "Tokenizer":
        """Meta's Llama 3 tokenizer.model: one `base64(token) rank` line per token; the pattern and the special tokens
        are Llama 3's, as in Meta's tokenizer.py (the file holds neither)."""
        with open(path, "rb") as f:
            lines = f.read().splitlines()
        vocab = {}
        for n, line in enumerate(lines):
            try:  # a token's rank is its id; validate=True tells a binary SentencePiece model apart
                token, rank = line.split()
                vocab[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                if n == 0:  # not even the first line: another format
                    raise NotImplementedError(f"{path} is not a tiktoken file (SentencePiece models are not "
                                              "supported)") from None
                raise ValueError(f"{path} is corrupt or truncated: line {n + 1} is not `base64-token rank`; "
                                 "download it again") from None
        if not vocab:
            raise ValueError(f"{path} is empty; download it again")
        special = {s: len(vocab) + i for i, s in enumerate(LLAMA3_SPECIAL_TOKENS)}
        return cls(vocab, None, split_then_bytes(LLAMA3_PATTERN), special, ignore_merges=True)

    # ---- encoding

    def _encode_piece(self, piece: str) -> list[int]:
        data = piece.encode("utf-8")
        # a piece that is a vocabulary entry is one token, even where no chain of merges reaches it
        # (Llama 3 has such entries, e.g. ' Tiếng'; tiktoken always takes them, HF with ignore_merges)
        if self.ignore_merges and data in self.vocab:
            return [self.vocab[data]]
        # subtle: SmolLM2's vocabulary has no token for 21 byte values (0x04 0x06 ... 0xF5-0xFF). HF
        # `tokenizers` (BPE without unk_token) silently drops such bytes before merging; we match it.
        data = data.translate(None, self.missing_bytes)
        parts = self.long(data) if self.long and len(data) >= LONG_PIECE else \
            bpe([data[i:i + 1] for i in range(len(data))], self.rank)
        return [self.vocab[p] for p in parts]

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode with every special-token string treated as plain text."""
        # the one speed trick: text repeats its pieces (' the', 'self', '    '), so remember each one's ids
        cache, ids = self.cache, []
        for piece in pre_tokenize(text, self.patterns):
            piece_ids = cache.get(piece)
            if piece_ids is None:  # first sight of this piece: run BPE once
                if len(cache) >= CACHE_SIZE:
                    cache.clear()
                piece_ids = cache[piece] = self._encode_piece(piece)
            ids.extend(piece_ids)
        return ids

    def encode(self, text: str, allowed_special: str | frozenset | set = frozenset()) -> list[int]:
        """Text -> ids. Special-token strings are special only if in `allowed_special` ("all": every one), else plain
        text, so user text cannot forge control tokens."""
        allowed = self.special_tokens.keys() if allowed_special == "all" else frozenset(allowed_special)
        if unknown := allowed - self.special_tokens.keys():
            raise ValueError(f"not special tokens of this vocabulary: {sorted(unknown)}")
        # only the allowed tokens that occur: substring searches are far cheaper than a 256-way alternation
        present = frozenset(s for s in allowed if s in text)
        if not present:
            return self.encode_ordinary(text)
        ids = []
        for i, chunk in enumerate(special_regex(present).split(text)):  # odd positions hold the separators
            ids.extend([self.special_tokens[chunk]] if i % 2 else self.encode_ordinary(chunk))
        return ids

    # ---- decoding

    def decode_bytes(self, ids: list[int]) -> bytes:
        """Ids -> raw bytes (a token may end inside a UTF-8 character); an unknown id is a KeyError, a bug to see."""
        return b"".join(self.decoder[i] for i in ids)

    def decode(self, ids: list[int]) -> str:
        # errors="replace": ids may stop mid-character (a truncated generation); HF uses from_utf8_lossy alike
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ---- saving

    def save(self, path: str) -> None:
        """Write an HF tokenizer.json (to `path`, or `path`/tokenizer.json for a folder)."""
        if self.merges is None:
            raise NotImplementedError("saving a tiktoken vocabulary needs merges derived from ranks; not supported")
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        # the fields HF writes itself, so any recent `tokenizers` loads it; merges as "a b" (read everywhere)
        flags = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        data = {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": i, "content": s, **flags} for s, i in sorted(self.special_tokens.items(),
                                                                                  key=lambda kv: kv[1])],
            "normalizer": None, "pre_tokenizer": self.pre_tokenizer, "post_processor": None,
            "decoder": {**BYTE_LEVEL, "add_prefix_space": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": self.ignore_merges,
                      "vocab": {token_str(b): i for b, i in sorted(self.vocab.items(), key=lambda kv: kv[1])},
                      "merges": [f"{token_str(a)} {token_str(b)}" for a, b in sorted(self.merges,
                                                                                   key=self.merges.get)]},
        }
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False)

# -----------------------------------------------------------------------------
# training


def train(texts, vocab_size: int, pattern: str = LLAMA3_PATTERN, special_tokens=()) -> Tokenizer:
    """Learn a byte-level BPE vocabulary of `vocab_size` ids (256 bytes + merges + special tokens, which come last)
    from an iterable of strings. minbpe recounts all pairs of the whole text after every merge; here the text is
    reduced to its distinct pieces with their counts, and a merge re-counts only the words holding the pair (`where`).
    Ties: the most frequent pair wins, then the smallest (left id, right id), so training is deterministic."""
    pre = split_then_bytes(pattern)
    patterns = compile_pre_tokenizer(pre)
    # merges never cross pieces, so only the distinct pieces and their counts matter (far fewer than all pieces)
    word_counts = Counter(piece for text in texts for piece in pre_tokenize(text, patterns))
    words = [list(w.encode("utf-8")) for w in word_counts]  # distinct pieces as byte ids
    counts = list(word_counts.values())
    vocab = [bytes([b]) for b in range(256)]  # id -> bytes
    merges = []  # (id a, id b) in the order learned: the rank
    stats, where = {}, defaultdict(set)
    for w, (word, n) in enumerate(zip(words, counts)):
        get_stats(word, stats, n)
        for pair in zip(word, word[1:]):
            where[pair].add(w)
    # entries (-count, pair): most frequent first, then the smallest pair. A merge only lowers the counts of existing
    # pairs, so a popped entry whose count has dropped is re-queued with the true one
    heap = [(-n, pair) for pair, n in stats.items()]
    heapq.heapify(heap)
    target = vocab_size - len(special_tokens)
    progress = tqdm(total=target - 256, desc="bpe merges", disable=target - 256 < 1000)  # only long runs
    while len(vocab) < target and heap:  # a small text may run out of pairs first: a smaller vocabulary
        neg, pair = heapq.heappop(heap)
        if -neg != stats[pair]:
            if stats[pair] > 0:
                heapq.heappush(heap, (-stats[pair], pair))
            continue
        # subtle: no two merges make the same bytes ('a'+'bc' and 'ab'+'c'): a token's span can only form
        # if no merge ever crossed its edges, so inside every word it grows exactly as the span alone would
        idx = len(vocab)
        vocab.append(vocab[pair[0]] + vocab[pair[1]])
        merges.append(pair)
        progress.update()
        # re-count the words holding the pair (`where` may list a word that lost it: merging changes nothing then)
        touched = set()
        for w in where.pop(pair):
            word, n = words[w], counts[w]
            for p in zip(word, word[1:]):
                stats[p] -= n
            words[w] = word = merge(word, pair, idx)
            for p in zip(word, word[1:]):
                stats[p] = stats.get(p, 0) + n
                where[p].add(w)
                if idx in p:
                    touched.add(p)
        for p in touched:  # pairs with the new token are the only ones whose counts grew
            heapq.heappush(heap, (-stats[p], p))
    progress.close()
    special = {s: len(vocab) + i for i, s in enumerate(special_tokens)}  # after the merges, as Llama 3
    byte_merges = {(vocab[a], vocab[b]): rank for rank, (a, b) in enumerate(merges)}
    return Tokenizer({b: i for i, b in enumerate(vocab)}, byte_merges, pre, special)

# -----------------------------------------------------------------------------
# chat templates: the two formats of the checkpoints here, as HF's tokenizer.apply_chat_template gives them


def apply_chat_template(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                        default_system: str | None = None, date_string: str = "26 Jul 2024") -> list[int]:
    """A conversation's ids exactly as the checkpoint's HF chat template renders them and HF tokenizes them, in the
    format the tokenizer's special tokens name: ChatML (SmolLM2, nanollm) or Llama 3.1's headers. Special tokens go
    in as ids and the text between two of them is encoded as plain text, so typing "<|im_end|>" cannot end a turn.
    default_system: ChatML's first turn when there is no system turn (SmolLM2-Instruct's template has one); Llama 3
    opens with its own. date_string: Llama 3.1's "Today Date" line (its template's default)."""
    sp = tokenizer.special_tokens
    if "<|im_start|>" in sp and "<|im_end|>" in sp:  # <|im_start|>role\ncontent<|im_end|>\n
        start, end = sp["<|im_start|>"], sp["<|im_end|>"]
        if default_system is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": default_system}] + list(messages)
        ids = []
        for m in messages:
            ids += [start] + tokenizer.encode(f"{m['role']}\n{m['content']}") + [end] + tokenizer.encode("\n")
        if add_generation_prompt:
            ids += [start] + tokenizer.encode("assistant\n")
        return ids
    if "<|start_header_id|>" in sp:
        # a system turn with the knowledge-cutoff date comes first; contents are stripped (Jinja's |trim); no tools
        start, end, eot = sp["<|start_header_id|>"], sp["<|end_header_id|>"], sp["<|eot_id|>"]
        system = ""
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"].strip(), messages[1:]
        ids = [sp["<|begin_of_text|>"], start] + tokenizer.encode("system") + [end]
        ids += tokenizer.encode(f"\n\nCutting Knowledge Date: December 2023\nToday Date: {date_string}\n\n{system}")
        ids.append(eot)
        for m in messages:
            ids += [start] + tokenizer.encode(m["role"]) + [end] + tokenizer.encode("\n\n" + m["content"].strip())
            ids.append(eot)
        if add_generation_prompt:
            ids += [start] + tokenizer.encode("assistant") + [end] + tokenizer.encode("\n\n")
        return ids
    raise ValueError("the tokenizer has neither ChatML (<|im_start|>, <|im_end|>) nor Llama 3 header tokens, so the "
                     "checkpoint has no chat format; use --chat false")

# -----------------------------------------------------------------------------
# command line


def main(path: str = "checkpoints/Llama-3.2-tokenizer", text: str = "Hello world! 12345 <|eot_id|>",
         special: bool = True):
    """Print the ids of a text and the bytes of each token.

    path: a tokenizer.json, tokenizer.model, or a folder holding one
    text: the text to encode
    special: special-token strings in the text count as special tokens (false: plain text)
    """
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} not found: run `python download.py llama3.2-tokenizer` "
                         "(or smollm2-135m-instruct), or pass --path")
    try:
        tok = Tokenizer.from_file(path)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        raise SystemExit(f"error: {e}")
    ids = tok.encode(text, allowed_special="all" if special else frozenset())
    print(ids)
    print([tok.decode_bytes([i]) for i in ids])


if __name__ == "__main__":
    from cli import cli  # the flag parser of the repo's scripts (cli.py)

    cli(main)
