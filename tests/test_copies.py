"""Deliberate copies between the repo's files stay copies (as HF transformers' utils/check_copies.py does).

A def or class preceded by the line `# Same as smollm2.py: sample` must read exactly as the block `sample` of
smollm2.py, after the renames the marker may state: `# Same as smollm2.py: SmolLM2.generate (with SmolLM2->Llama)`
marks a method, and replaces SmolLM2 by Llama in the source's text before comparing. A block runs from its def or
class line (decorators included) to its last line, as Python's ast places them; a method's marker stands at the
method's indentation. A copy that has to differ drops its marker and says in a comment why it differs.

Repetition the markers do not cover is measured too: unmarked_shared_lines counts the lines a model file shares with
smollm2.py outside its marked blocks, and each file keeps at most SHARED_LINE_BUDGET of them.
"""
import ast
import difflib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"^ *# Same as (?P<file>[\w./-]+\.py): (?P<name>[\w.]+)(?: \(with (?P<renames>[^)]*)\))?\s*$")
MODEL_FILES = ["smollm2.py", "llama31.py", "nanollm.py", "lm2.py"]


def blocks(path: Path) -> dict[str, tuple[int, int, str]]:
    """{name: (first line, last line, text)} of every top-level def and class of a file, and of every method of its
    classes as "Class.method"."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out = {}

    def add(node, name):
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        out[name] = (first, node.end_lineno, "\n".join(lines[first - 1:node.end_lineno]))

    for node in ast.parse("\n".join(lines)).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            add(node, node.name)
            for method in node.body if isinstance(node, ast.ClassDef) else []:
                if isinstance(method, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    add(method, f"{node.name}.{method.name}")
    return out


def renamed(text: str, renames: str | None) -> str:
    for pair in (renames or "").split(","):
        if pair.strip():
            old, sep, new = pair.strip().partition("->")
            if not sep:
                raise ValueError(f"rename {pair.strip()!r} is not OLD->NEW")
            text = text.replace(old.strip(), new.strip())
    return text


def marked_blocks(path: Path) -> list[tuple[int, str, re.Match | None]]:
    """(marker line, name of the block below it or None, match or None) for every `# Same as` line of a file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    here = {first: name for name, (first, _, _) in blocks(path).items()}
    return [(i, here.get(i + 1), MARKER.match(line)) for i, line in enumerate(lines, start=1)
            if line.lstrip().startswith("# Same as")]


def copy_problems(root: Path) -> list[str]:
    """One line per marked copy that differs from its source, or whose marker is wrong; [] when all agree."""
    problems, cache = [], {}
    for path in sorted([*root.glob("*.py"), *root.glob("benchmarks/*.py")]):  # scripts copy the CLI blocks too
        for i, name, m in marked_blocks(path):
            where = f"{path.name}:{i}"
            if m is None:
                problems.append(f"{where}: malformed marker (want `# Same as FILE.py: NAME (with A->B)`)")
                continue
            if name is None:
                problems.append(f"{where}: the marker is not directly above a def or class")
                continue
            source = root / m["file"]
            if not source.is_file():
                problems.append(f"{where}: names {m['file']}, which does not exist")
                continue
            if source not in cache:
                cache[source] = blocks(source)
            if m["name"] not in cache[source]:
                problems.append(f"{where}: {m['file']} has no def or class {m['name']}")
                continue
            if source == path and m["name"] == name:
                problems.append(f"{where}: a block cannot be a copy of itself")
                continue
            try:
                want = renamed(cache[source][m["name"]][2], m["renames"])
            except ValueError as e:
                problems.append(f"{where}: {e}")
                continue
            got = blocks(path)[name][2]
            if got != want:
                diff = difflib.unified_diff(want.splitlines(), got.splitlines(), f"{m['file']}: {m['name']}",
                                            where, lineterm="", n=0)
                problems.append(f"{where}: {name} differs from {m['file']}: {m['name']}\n" + "\n".join(diff))
    return problems


def test_marked_copies_match_their_source():
    problems = copy_problems(ROOT)
    assert not problems, "\n".join(problems)


# Top-level blocks repeated on purpose across the model files (README "How to read the code"); each must be marked.
SHARED = {
    "smollm2.py": ["config_get", "llama_fields", "llama_config", "RMSNorm", "rope_inv_freq", "rope_cos_sin",
                   "apply_rope", "KVCache", "Attention", "MLP", "Block", "doc_positions_and_mask", "read_json",
                   "read_config", "read_header", "build", "check_generate", "logits_to_probs", "sample",
                   "encode_chat"],
    "llama31.py": ["rope_inv_freq"],
}


def test_every_intended_repetition_is_marked():
    """A model file that repeats a shared block's name marks it as a copy, or says where it differs: a copy that
    silently drifts is what the markers exist to prevent."""
    unmarked = []
    for path in (ROOT / f for f in MODEL_FILES):
        lines, have = path.read_text(encoding="utf-8").splitlines(), blocks(path)
        for source, names in SHARED.items():
            for name in names:
                if path.name == source or name not in have or name in SHARED.get(path.name, []):
                    continue
                first, comment = have[name][0], []  # the comment lines directly above the block
                while first - 2 - len(comment) >= 0 and lines[first - 2 - len(comment)].startswith("#"):
                    comment.append(lines[first - 2 - len(comment)])
                marked = comment[:1] and re.fullmatch(rf"# Same as [\w./-]+\.py: {name}", comment[0])
                if not (marked or "differs" in " ".join(comment).lower()):
                    unmarked.append(f"{path.name}: {name}")
    assert not unmarked, f"shared blocks without a marker or a note on how they differ: {unmarked}"


# -----------------------------------------------------------------------------
# Repetition outside the marked blocks

SHARED_LINE_BUDGET = 25
MIN_CHARS = 25  # shorter lines (`return x`, `super().__init__()`) repeat in any Python file


def unmarked_shared_lines(path: Path, source: Path) -> list[str]:
    """The lines of path, stripped, of MIN_CHARS or more, that also stand in source, outside path's marked blocks
    (a `# Same as` copy, top-level or a method). Separator lines (`# ----`), imports and def / class lines do not
    count: the four files share one API on purpose (`def setup_cache(self, batch_size: int, max_seq_len: int):`),
    and what the measure looks for is repeated bodies."""
    lines = path.read_text(encoding="utf-8").splitlines()
    inside = set()
    for i, name, m in marked_blocks(path):
        if m is not None and name is not None:
            inside.update(range(i, blocks(path)[name][1] + 1))
    theirs = {line.strip() for line in source.read_text(encoding="utf-8").splitlines()}
    return [line.strip() for n, line in enumerate(lines, start=1)
            if n not in inside and len(line.strip()) >= MIN_CHARS and line.strip() in theirs
            and not re.fullmatch(r"[#\s=-]+", line) and not re.match(r"(def|class|import|from) ", line.strip())]


@pytest.mark.parametrize("name", MODEL_FILES[1:])
def test_unmarked_repetition_stays_small(name):
    """Every model file shares at most SHARED_LINE_BUDGET lines with smollm2.py outside its marked copies: the rest of
    what it repeats is marked, so a reader knows each block they may skip."""
    shared = unmarked_shared_lines(ROOT / name, ROOT / "smollm2.py")
    assert len(shared) <= SHARED_LINE_BUDGET, f"{name}: {len(shared)} unmarked shared lines:\n" + "\n".join(shared)


def test_unmarked_shared_lines_counts_what_is_not_marked(tmp_path):
    """The measure itself: a pasted method counts until it is marked; separators and short lines never do."""
    body = ("class A:\n    def f(self, first_argument, second_argument):\n"
            "        return first_argument + second_argument\n")
    (tmp_path / "src.py").write_text(f"# ---------------------------------\n{body}")
    (tmp_path / "copy.py").write_text(f"# ---------------------------------\n{body.replace('class A', 'class B')}")
    assert unmarked_shared_lines(tmp_path / "copy.py", tmp_path / "src.py") == [
        "return first_argument + second_argument"]
    marked = body.replace("class A", "class B").replace("    def f", "    # Same as src.py: A.f\n    def f")
    (tmp_path / "copy.py").write_text(marked)
    assert unmarked_shared_lines(tmp_path / "copy.py", tmp_path / "src.py") == []
    assert copy_problems(tmp_path) == []


# -----------------------------------------------------------------------------
# The command line has one home, cli.py

CLI_BLOCKS = ["FlagParser", "HelpFormatter", "flag_help", "cli", "parse_bool", "utf8", "check_generation_flags",
              "is_chat_checkpoint", "load_model", "chat_main", "stream_printer", "converse"]
LOADING_BLOCKS = ["read_json", "read_config", "read_header", "build", "check_generate"]


def test_the_command_line_has_one_source():
    """No model file or tokenizer_bpe.py defines a flag parser or chat loop (cli.py does; a model file's main imports
    it), and every other file that does marks each block as a copy of cli.py's, so test_marked_copies_match_their_source
    compares it."""
    assert set(CLI_BLOCKS) <= set(blocks(ROOT / "cli.py"))
    wrong = []
    for path in sorted([*ROOT.glob("*.py"), *ROOT.glob("benchmarks/*.py")]):
        if path.name == "cli.py":
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        for name, (first, _, _) in blocks(path).items():
            marked = first >= 2 and lines[first - 2] == f"# Same as cli.py: {name}"
            if name in CLI_BLOCKS and (path.name in [*MODEL_FILES, "tokenizer_bpe.py"] or not marked):
                wrong.append(f"{path.name}: {name}")
    assert not wrong, f"command-line blocks that are not an import or a marked copy of cli.py's: {wrong}"


def test_the_tokenizer_file_holds_the_tokenizer_only():
    """tokenizer_bpe.py tokenizes, trains and formats chats; reading a checkpoint is each model file's (marked
    copies of smollm2.py's loading block), so a reader following from_pretrained stays in the model file."""
    tokenizer = set(blocks(ROOT / "tokenizer_bpe.py"))
    assert not tokenizer & {*CLI_BLOCKS, *LOADING_BLOCKS} - {"read_json"}, tokenizer & {*CLI_BLOCKS, *LOADING_BLOCKS}
    for name in MODEL_FILES:
        assert set(LOADING_BLOCKS) <= set(blocks(ROOT / name)), name
        source = (ROOT / name).read_text(encoding="utf-8")
        assert "from cli import" not in source.split("\ndef main(")[0], f"{name} imports cli.py outside main"


@pytest.mark.parametrize("change", ["edit", "missing_source", "missing_file", "misplaced", "bad_rename", "method"])
def test_a_drifted_or_dangling_copy_is_reported(tmp_path, change):
    """The check itself can fail: one edited copy, a marker naming a block or file that does not exist, a marker
    above nothing, a rename that is not OLD->NEW, an edited method copy."""
    (tmp_path / "a.py").write_text("def sample(x):\n    return x + 1\n\n\n"
                                   "class A:\n    def f(self):\n        return 1\n")
    copy = {"edit": "# Same as a.py: sample\ndef sample(x):\n    return x + 2\n",
            "missing_source": "# Same as a.py: nothing\ndef nothing():\n    pass\n",
            "missing_file": "# Same as z.py: sample\ndef sample(x):\n    return x + 1\n",
            "misplaced": "# Same as a.py: sample\n\ndef sample(x):\n    return x + 1\n",
            "bad_rename": "# Same as a.py: A (with A=B)\nclass B:\n    def f(self):\n        return 1\n",
            "method": "class B:\n    # Same as a.py: A.f\n    def f(self):\n        return 2\n"}[change]
    (tmp_path / "b.py").write_text(copy)
    problems = copy_problems(tmp_path)
    line = 2 if change == "method" else 1
    assert len(problems) == 1 and problems[0].startswith(f"b.py:{line}:"), problems
    good = {"edit": "# Same as a.py: sample\ndef sample(x):\n    return x + 1\n",
            "bad_rename": "# Same as a.py: A (with A->B)\nclass B:\n    def f(self):\n        return 1\n",
            "method": "class B:\n    # Same as a.py: A.f\n    def f(self):\n        return 1\n"}
    if change in good:  # and passes once the copy is right again
        (tmp_path / "b.py").write_text(good[change])
        assert copy_problems(tmp_path) == []
