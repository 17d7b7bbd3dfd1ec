"""Deliberate copies between the repo's files stay copies (as HF transformers' utils/check_copies.py does).

A top-level def or class preceded by the line `# Same as smollm2.py: sample` must read exactly as the top-level
block `sample` of smollm2.py, after the renames the marker may state: `# Same as smollm2.py: Decoder (with
SmolLM2->Llama)` replaces SmolLM2 by Llama in the source's text before comparing. A block runs from its def or
class line (decorators included) to its last line, as Python's ast places them. A copy that has to differ drops
its marker and says in a comment why it differs.
"""
import ast
import difflib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"# Same as (?P<file>[\w./-]+\.py): (?P<name>\w+)(?: \(with (?P<renames>[^)]*)\))?\s*$")


def blocks(path: Path) -> dict[str, tuple[int, str]]:
    """{name: (first line number, text)} of every top-level def and class of a file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out = {}
    for node in ast.parse("\n".join(lines)).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            out[node.name] = (first, "\n".join(lines[first - 1:node.end_lineno]))
    return out


def renamed(text: str, renames: str | None) -> str:
    for pair in (renames or "").split(","):
        if pair.strip():
            old, sep, new = pair.strip().partition("->")
            if not sep:
                raise ValueError(f"rename {pair.strip()!r} is not OLD->NEW")
            text = text.replace(old.strip(), new.strip())
    return text


def copy_problems(root: Path) -> list[str]:
    """One line per marked copy that differs from its source, or whose marker is wrong; [] when all agree."""
    problems, cache = [], {}
    for path in sorted([*root.glob("*.py"), *root.glob("benchmarks/*.py")]):  # scripts copy the CLI blocks too
        lines = path.read_text(encoding="utf-8").splitlines()
        here = {first: name for name, (first, _) in blocks(path).items()}
        for i, line in enumerate(lines, start=1):
            if not line.startswith("# Same as"):
                continue
            where = f"{path.name}:{i}"
            m = MARKER.match(line)
            if m is None:
                problems.append(f"{where}: malformed marker {line!r} (want `# Same as FILE.py: NAME (with A->B)`)")
                continue
            if i + 1 not in here:
                problems.append(f"{where}: the marker is not directly above a top-level def or class")
                continue
            source = root / m["file"]
            if not source.is_file():
                problems.append(f"{where}: names {m['file']}, which does not exist")
                continue
            if source not in cache:
                cache[source] = blocks(source)
            if m["name"] not in cache[source]:
                problems.append(f"{where}: {m['file']} has no top-level def or class {m['name']}")
                continue
            if source == path and m["name"] == here[i + 1]:
                problems.append(f"{where}: a block cannot be a copy of itself")
                continue
            try:
                want = renamed(cache[source][m["name"]][1], m["renames"])
            except ValueError as e:
                problems.append(f"{where}: {e}")
                continue
            got = blocks(path)[here[i + 1]][1]
            if got != want:
                diff = difflib.unified_diff(want.splitlines(), got.splitlines(), f"{m['file']}: {m['name']}",
                                            where, lineterm="", n=0)
                problems.append(f"{where}: {here[i + 1]} differs from {m['file']}: {m['name']}\n" + "\n".join(diff))
    return problems


def test_marked_copies_match_their_source():
    problems = copy_problems(ROOT)
    assert not problems, "\n".join(problems)


# Blocks repeated on purpose across the model files (README "How to read the code"); each must be marked.
SHARED = {
    "smollm2.py": ["RMSNorm", "apply_rope", "KVCache", "Attention", "MLP", "Block", "doc_positions_and_mask",
                   "logits_to_probs", "sample", "encode_chat"],
    "llama31.py": ["rope_inv_freq", "rope_cos_sin"],
}
MODEL_FILES = ["smollm2.py", "llama31.py", "nanollm.py", "lm2.py"]


def test_every_intended_repetition_is_marked():
    """A model file that repeats a shared block's name marks it as a copy, or says where it differs: a copy that
    silently drifts is what the markers exist to prevent."""
    unmarked = []
    for path in (ROOT / f for f in MODEL_FILES):
        text = path.read_text(encoding="utf-8")
        for source, names in SHARED.items():
            for name in names:
                if path.name == source or name not in blocks(path) or name in SHARED.get(path.name, []):
                    continue
                lines, first = text.splitlines(), blocks(path)[name][0]
                comment = []  # the comment lines directly above the block
                while first - 2 - len(comment) >= 0 and lines[first - 2 - len(comment)].startswith("#"):
                    comment.append(lines[first - 2 - len(comment)])
                if not (comment[:1] == [f"# Same as {source}: {name}"] or "differs" in " ".join(comment).lower()):
                    unmarked.append(f"{path.name}: {name}")
    assert not unmarked, f"shared blocks without a marker or a note on how they differ: {unmarked}"


# The command line's one source: the model files import the flag parser and the chat loop from tokenizer_bpe.py (the
# file a reader copies along with any of them), and with them the chat templates and the checkpoint-weight readers;
# scripts that must answer --help before numpy loads (download.py) keep marked copies.
CLI_BLOCKS = ["FlagParser", "HelpFormatter", "cli", "parse_bool", "utf8",
               "check_generation_flags", "is_chat_checkpoint", "stream_printer", "converse",
               "apply_chat_template", "load_safetensors", "check_state", "check_sampling",
               "check_generate"]


def test_the_command_line_has_one_source():
    """No model file defines its own flag parser or chat loop, and every other file that does marks each block as a
    copy of tokenizer_bpe.py's, so test_marked_copies_match_their_source compares it."""
    assert set(CLI_BLOCKS) <= set(blocks(ROOT / "tokenizer_bpe.py"))
    wrong = []
    for path in sorted([*ROOT.glob("*.py"), *ROOT.glob("benchmarks/*.py")]):
        if path.name == "tokenizer_bpe.py":
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        for name, (first, _) in blocks(path).items():
            marked = first >= 2 and lines[first - 2] == f"# Same as tokenizer_bpe.py: {name}"
            if name in CLI_BLOCKS and (path.name in MODEL_FILES or not marked):
                wrong.append(f"{path.name}: {name}")
    assert not wrong, f"flag-parser blocks that are not an import or a marked copy of tokenizer_bpe.py's: {wrong}"


@pytest.mark.parametrize("change", ["edit", "missing_source", "missing_file", "misplaced", "bad_rename"])
def test_a_drifted_or_dangling_copy_is_reported(tmp_path, change):
    """The check itself can fail: one edited copy, a marker naming a block or file that does not exist, a marker
    above nothing, a rename that is not OLD->NEW."""
    (tmp_path / "a.py").write_text("def sample(x):\n    return x + 1\n\n\nclass A:\n    pass\n")
    copy = {"edit": "# Same as a.py: sample\ndef sample(x):\n    return x + 2\n",
            "missing_source": "# Same as a.py: nothing\ndef nothing():\n    pass\n",
            "missing_file": "# Same as z.py: sample\ndef sample(x):\n    return x + 1\n",
            "misplaced": "# Same as a.py: sample\n\ndef sample(x):\n    return x + 1\n",
            "bad_rename": "# Same as a.py: A (with A=B)\nclass B:\n    pass\n"}[change]
    (tmp_path / "b.py").write_text(copy)
    problems = copy_problems(tmp_path)
    assert len(problems) == 1 and problems[0].startswith("b.py:1:"), problems
    good = {"edit": "# Same as a.py: sample\ndef sample(x):\n    return x + 1\n",
            "bad_rename": "# Same as a.py: A (with A->B)\nclass B:\n    pass\n"}
    if change in good:  # and passes once the copy is right again
        (tmp_path / "b.py").write_text(good[change])
        assert copy_problems(tmp_path) == []
