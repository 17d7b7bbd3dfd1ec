"""Bad inputs to tokenizer_bpe.py and download.py: each gets one line naming the file or flag and the fix, and
the CLIs exit non-zero with `error: ...` instead of a traceback; a failed download never replaces a complete one.

In-process through `cli(main, argv=[...])` (fast), plus a subprocess run per CLI for the real exit status.
Run: python -m pytest tests/test_bad_input_tokenizer_download.py -q
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tokenizer_bpe  # noqa: E402
from tokenizer_bpe import Tokenizer  # noqa: E402

LLAMA_MODEL = ROOT / "checkpoints" / "Llama-3.2-tokenizer" / "tokenizer.model"
SMOL_JSON = ROOT / "checkpoints" / "SmolLM2-135M-Instruct" / "tokenizer.json"


def need(path):
    if not path.exists():
        pytest.fail(f"{path} missing: run `python download.py smollm2-135m-instruct llama3.2-tokenizer`")
    return path


def exit_message(fn, argv):
    """The SystemExit message of cli(fn, argv): the one line a user sees."""
    with pytest.raises(SystemExit) as e:
        tokenizer_bpe.cli(fn, argv=argv)
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


# -----------------------------------------------------------------------------
# tokenizer files


def tokenizer_cases(tmp):
    """(file written into tmp, what its message must say)."""
    cases = []

    def case(name, content, expected):
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        cases.append((path, expected))

    case("config/tokenizer.json", json.dumps({"architectures": ["LlamaForCausalLM"]}),
         "is not a Hugging Face tokenizer.json: no 'model' entry")
    case("novocab/tokenizer.json", json.dumps({"model": {"type": "BPE"}, "pre_tokenizer": None}),
         "no 'vocab' entry")
    case("list/tokenizer.json", "[1, 2]", "is not a well-formed tokenizer.json")
    case("broken/tokenizer.json", '{"model": {"type": "BPE", "vocab": {', "is not valid JSON (Expecting")
    case("binary/tokenizer.json", b"\xff\xfe\x00garbage", "is not valid JSON")
    case("empty/tokenizer.model", b"", "is empty; download it again")
    case("gpt2/vocab.json", "{}", "needs merges.txt beside it")
    case("gpt2bad/vocab.json", "{oops", "is not valid JSON")
    (tmp / "gpt2bad" / "merges.txt").write_text("#version: 0.2\n")
    model = need(LLAMA_MODEL).read_bytes()
    case("truncated/tokenizer.model", model[:len(model) // 2], "is corrupt or truncated: line ")
    return cases


def test_tokenizer_files_fail_in_one_line_naming_the_file(tmp_path):
    for path, expected in tokenizer_cases(tmp_path):
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            Tokenizer.from_file(str(path))
        assert expected in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value), str(e.value)
        # the same through the folder, as the model files load it, and through the CLI
        assert str(path) in exit_message(tokenizer_bpe.main, ["--path", str(path.parent)])
    missing = tmp_path / "missing" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match=f"no tokenizer file at {missing}"):
        Tokenizer.from_file(str(missing))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json, vocab.json or tokenizer.model in"):
        Tokenizer.from_file(str(tmp_path / "nothing"))
    assert "not found" in exit_message(tokenizer_bpe.main, ["--path", str(missing)])


def test_tokenizer_cli_flags():
    assert exit_message(tokenizer_bpe.main, ["--specal", "false"]) == \
        "error: unknown flag --specal; did you mean --special? (see --help)"
    assert "expected true or false" in exit_message(tokenizer_bpe.main, ["--special", "maybe"])


def test_tokenizer_cli_subprocess(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": ')
    r = subprocess.run([sys.executable, str(ROOT / "tokenizer_bpe.py"), "--path", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr == f"error: {tmp_path / 'tokenizer.json'} is not valid JSON (Expecting value: line 1 column 11 " \
                       "(char 10)); download it again\n"
    # and a good file still works, with a value that fire would have turned into a tuple: HF's ids
    from tokenizers import Tokenizer as HFTokenizer
    r = subprocess.run([sys.executable, str(ROOT / "tokenizer_bpe.py"), "--path", str(need(SMOL_JSON)),
                        "--text", "yes, please"], capture_output=True, text=True, timeout=60)
    ids = HFTokenizer.from_file(str(SMOL_JSON)).encode("yes, please", add_special_tokens=False).ids
    assert r.returncode == 0 and r.stdout.splitlines()[0] == str(ids), r.stdout
