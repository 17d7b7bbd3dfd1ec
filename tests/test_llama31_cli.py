"""
llama31.py's command line and loader, and the conversion of Meta's checkpoints (meta_convert.py): what a user
sees, and what loading and converting cost in memory.

    python -m pytest tests/test_llama31_cli.py -q

- The CLI on tiny random checkpoints with the real Llama 3 tokenizer: base prompts verbatim, instruct prompts
  through the chat template, --interactive, streamed output equal to generate()'s tokens.
- Meta's consolidated.*.pth, converted by `download.py --meta_dir`, generates what the same weights saved by HF do.
- Every user error ends in one line starting "error:" that names the fix, never a traceback: a missing or
  partial checkpoint (which download to run, which shard is missing), Meta's format given to llama31.py, a
  truncated shard, weights whose shapes do not match the config, a prompt beyond the context, bad sampling
  arguments, CUDA without a GPU.
- Peak CPU memory while loading a ~300 MB bf16 checkpoint, measured in a fresh process from /proc/self/status
  (VmHWM counts memory-mapped file pages too, which tracemalloc would miss): within 1.2x the weight bytes for
  HF safetensors (sharded), and while converting a single Meta shard; (1 + 1/n) x + 0.1 while converting n
  Meta shards, which must be merged.
"""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import download  # noqa: E402
import llama31  # noqa: E402
import meta_convert  # noqa: E402
from conftest import write_meta  # noqa: E402
from tokenizer_bpe import Tokenizer  # noqa: E402

TOKENIZER_MODEL = ROOT / "checkpoints" / "Llama-3.2-tokenizer" / "tokenizer.model"


pytestmark = pytest.mark.usefixtures("one_thread")


def save_hf(args: llama31.ModelArgs, path: Path, seed=0, dtype=torch.float32, n_files=1):
    """Random weights in the HF layout (config.json + safetensors, sharded with an index if n_files > 1)."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = llama31.Llama(args).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    state = {k: v for k, v in model.state_dict().items() if not (args.tie_embeddings and k == "lm_head.weight")}
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(args.to_hf_config()))
    names = list(state)
    if n_files == 1:
        save_file(state, path / "model.safetensors")
        return model
    weight_map = {}
    for i in range(n_files):
        file = f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"
        part = names[i::n_files]
        save_file({k: state[k] for k in part}, path / file)
        weight_map.update({k: file for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return model


def save_meta(model: llama31.Llama, path: Path, n_shards: int):
    """The same weights in Meta's layout (conftest.write_meta), with the params.json that sizes them back."""
    a = model.args
    write_meta(model.state_dict(), a.head_dim, path, n_shards, dict(
        dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads, vocab_size=a.vocab_size,
        multiple_of=a.hidden_dim, ffn_dim_multiplier=None, norm_eps=a.norm_eps, rope_theta=a.rope_theta,
        use_scaled_rope=True))


# Real vocabulary size, so the real tokenizer's ids fit; tiny otherwise. With multiple_of = hidden_dim >= 8 dim / 3
# in params.json, Meta's sizing rule gives hidden_dim back exactly.
TINY = llama31.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=4096)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Tiny base and instruct checkpoints named like download.py's folders, with Meta's tokenizer.model."""
    if not TOKENIZER_MODEL.is_file():
        pytest.fail(f"{TOKENIZER_MODEL} is missing: run `python download.py llama3.2-tokenizer`")
    root = tmp_path_factory.mktemp("ckpts")
    save_hf(TINY, root / "Llama-3.2-1B")
    instruct = llama31.ModelArgs(**{**TINY.__dict__, "stop_tokens": (128001, 128008, 128009)})
    save_hf(instruct, root / "Llama-3.2-1B-Instruct", seed=1)
    for d in ("Llama-3.2-1B", "Llama-3.2-1B-Instruct"):  # tokenizer.model alone: the quick tiktoken path
        shutil.copy(TOKENIZER_MODEL, root / d / "tokenizer.model")
    return root


def run_main(capsys, **kwargs) -> str:
    llama31.main(**{"device": "cpu", "max_new_tokens": 6, "temperature": 0.0, **kwargs})
    return capsys.readouterr().out


# -----------------------------------------------------------------------------
# the CLI works


def test_base_prompt_is_sent_verbatim_and_streamed(ckpts, capsys):
    d = ckpts / "Llama-3.2-1B"
    out = run_main(capsys, prompt="The capital of France is", ckpt_dir=str(d))
    model, tok = llama31.Llama.from_pretrained(d), Tokenizer.from_file(str(d))
    ids = [llama31.BOS] + tok.encode("The capital of France is")  # no space appended
    assert out.rstrip("\n") == tok.decode(model.generate([ids], 6)[0])


def test_instruct_prompt_goes_through_the_chat_template(ckpts, capsys):
    d = ckpts / "Llama-3.2-1B-Instruct"
    out = run_main(capsys, prompt="Hi there", ckpt_dir=str(d))
    model, tok = llama31.Llama.from_pretrained(d), Tokenizer.from_file(str(d))
    ids = llama31.encode_chat(tok, [{"role": "user", "content": "Hi there"}])
    assert out.rstrip("\n") == tok.decode(model.generate([ids], 6)[0])


def test_interactive_keeps_the_conversation(ckpts, capsys, monkeypatch):
    lines = iter(["Hello", "And again?"])

    def fake_input(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError

    monkeypatch.setattr("builtins.input", fake_input)
    d = ckpts / "Llama-3.2-1B-Instruct"
    out = run_main(capsys, interactive=True, ckpt_dir=str(d))
    model, tok = llama31.Llama.from_pretrained(d), Tokenizer.from_file(str(d))
    msgs = [{"role": "user", "content": "Hello"}]
    first = tok.decode(model.generate([llama31.encode_chat(tok, msgs)], 6)[0])
    msgs += [{"role": "assistant", "content": first}, {"role": "user", "content": "And again?"}]
    second = tok.decode(model.generate([llama31.encode_chat(tok, msgs)], 6)[0])
    assert out == first + "\n" + second + "\n\n"


def test_meta_checkpoint_converted_by_download_generates_as_hf(ckpts, tmp_path, capsys, monkeypatch):
    hf_dir, meta_dir = ckpts / "Llama-3.2-1B-Instruct", tmp_path / "meta" / "Llama3.2-1B-Instruct"
    model = llama31.Llama.from_pretrained(hf_dir)
    save_meta(model, meta_dir, 2)
    shutil.copy(TOKENIZER_MODEL, meta_dir / "tokenizer.model")
    monkeypatch.setattr(meta_convert, "SHARD_BYTES", 4 << 20)  # ~17 MB of weights: several files and an index
    download.main(meta_dir=str(meta_dir), out=str(tmp_path / "ckpts"))
    assert len(list((tmp_path / "ckpts" / meta_dir.name).glob("model-*-of-*.safetensors"))) > 1
    converted = llama31.Llama.from_pretrained(tmp_path / "ckpts" / meta_dir.name)
    # params.json has no context length: Llama 3's 128k. The rest, instruct stop tokens included, as HF's config
    assert dataclasses.replace(converted.args, max_seq_len=4096) == model.args
    tokens = torch.randint(0, TINY.vocab_size, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(converted(tokens), model(tokens), rtol=0, atol=0)
    capsys.readouterr()
    assert run_main(capsys, prompt="Hi", ckpt_dir=str(tmp_path / "ckpts" / meta_dir.name)) == \
        run_main(capsys, prompt="Hi", ckpt_dir=str(hf_dir))


def test_command_line_entry_point(ckpts):
    cmd = [sys.executable, str(ROOT / "llama31.py"), "--ckpt_dir", str(ckpts / "Llama-3.2-1B"), "--prompt", "Hi",
           "--max_new_tokens", "3", "--temperature", "0", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "3 new tokens" in r.stderr


# -----------------------------------------------------------------------------
# user errors: one line each


def expect_error(capsys, match: str, **kwargs):
    with pytest.raises(SystemExit) as e:
        run_main(capsys, **{"prompt": "Hi", **kwargs})
    msg = str(e.value.code)
    assert msg.strip().startswith("error: ") and "\n" not in msg.strip() and match in msg, msg


def test_missing_checkpoint_names_the_1b_and_the_offline_routes_first(tmp_path, capsys):
    """The line names the ungated-size download and the two offline conversions before the gated 8B."""
    with pytest.raises(SystemExit) as e:
        run_main(capsys, prompt="Hi", ckpt_dir=str(tmp_path / "Llama-3.1-8B-Instruct"))
    msg = str(e.value.code)
    where = [msg.find(s) for s in ("download.py llama3.2-1b-instruct", "--gguf", "--meta_dir", "llama3.1-8b-instruct")]
    assert -1 not in where and where == sorted(where), msg
    file = tmp_path / "config.json"
    file.write_text("{}")
    expect_error(capsys, "is a file: give the checkpoint's folder", ckpt_dir=str(file))


def test_missing_or_truncated_hf_shard(tmp_path, capsys):
    d = tmp_path / "Llama-3.2-1B"
    save_hf(TINY, d, n_files=3)
    (d / "model-00002-of-00003.safetensors").unlink()
    expect_error(capsys, "model-00002-of-00003.safetensors is missing", ckpt_dir=str(d))
    save_hf(TINY, tmp_path / "t")
    data = (tmp_path / "t" / "model.safetensors").read_bytes()
    (tmp_path / "t" / "model.safetensors").write_bytes(data[: len(data) // 2])
    expect_error(capsys, "truncated or corrupt", ckpt_dir=str(tmp_path / "t"))


@pytest.mark.parametrize("drop", ["consolidated.00.pth", "consolidated.01.pth"])
def test_missing_meta_shard(tmp_path, drop):
    d = tmp_path / "Llama3.2-1B"
    save_meta(llama31.Llama(TINY), d, 2)
    (d / "tokenizer.model").write_text("")
    (d / drop).unlink()
    with pytest.raises(SystemExit) as e:
        download.main(meta_dir=str(d), out=str(tmp_path / "ckpts"))
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    assert ("consolidated.00.pth is missing" if drop.endswith("00.pth") else "has 1 of 2 shards") in msg, msg
    assert not (tmp_path / "ckpts" / d.name).exists()


def test_meta_folder_given_to_llama31_names_the_conversion(tmp_path, capsys):
    d = tmp_path / "Llama3.2-1B"
    save_meta(llama31.Llama(TINY), d, 1)
    expect_error(capsys, f"convert it once with `python download.py --meta_dir {d}`", ckpt_dir=str(d))


def test_shapes_that_do_not_match_the_config(tmp_path, capsys):
    d = tmp_path / "m"
    save_hf(TINY, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    expect_error(capsys, "gate_proj.weight has shape (96, 32) but the config gives (128, 32)", ckpt_dir=str(d))


def test_prompt_beyond_the_context(ckpts, capsys):
    expect_error(capsys, "exceeds max_seq_len 4096", ckpt_dir=str(ckpts / "Llama-3.2-1B"), prompt="word " * 4100)


@pytest.mark.parametrize("bad,match", [(dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"),
                                       (dict(top_p=2.0), "top_p"), (dict(top_k=0), "top_k"),
                                       (dict(max_new_tokens=0), "max_new_tokens"), (dict(dtype="int8"), "--dtype"),
                                       (dict(prompt=None), "--prompt")])
def test_bad_arguments(ckpts, capsys, bad, match):
    expect_error(capsys, match, ckpt_dir=str(ckpts / "Llama-3.2-1B"), **bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(ckpts, capsys):
    expect_error(capsys, "no CUDA device", ckpt_dir=str(ckpts / "Llama-3.2-1B"), device="cuda")


def test_error_exit_from_the_shell_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "llama31.py"), "--ckpt_dir", str(tmp_path / "Llama-3.2-1B"),
                        "--prompt", "Hi"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: no checkpoint at {tmp_path / 'Llama-3.2-1B'} (no config.json): "
                                             + llama31.FETCH]


# -----------------------------------------------------------------------------
# one copy of the weights: peak memory while loading

MEASURE = """
import pathlib, sys, torch, safetensors.torch
sys.path.insert(0, {root!r})
import llama31, meta_convert
with torch.device("meta"):  # the first meta-device build imports torch's Python meta kernels (~80 MB of modules):
    llama31.Llama(llama31.ModelArgs(dim=64, n_layers=1, n_heads=4, hidden_dim=64, vocab_size=64))  # not loading
def status(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = status("VmRSS")
if {convert!r}:  # Meta's shards -> safetensors; the output file's pages are page cache, not this process's
    meta_convert.meta_to_hf({path!r}, {path!r} + "-hf")
else:
    model = llama31.Llama.from_pretrained({path!r})
    for p in model.parameters():  # memory-mapped weights are read on first use: use them all, as a forward would
        p.sum()
peak = status("VmHWM") - before
weights = sum(t.numel() * t.element_size() for f in sorted(pathlib.Path({hf!r}).glob("*.safetensors"))
              for t in safetensors.torch.load_file(f).values())
print(peak / weights, weights)
"""


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """~290 MB of bf16 weights: large next to the few MB the loader and allocator add."""
    args = llama31.ModelArgs(dim=1024, n_layers=6, n_heads=16, n_kv_heads=4, hidden_dim=4096, vocab_size=32000)
    root = tmp_path_factory.mktemp("medium")
    model = save_hf(args, root / "hf", dtype=torch.bfloat16, n_files=3)
    save_meta(model, root / "meta1", 1)
    save_meta(model, root / "meta4", 4)
    for d in ("meta1", "meta4"):
        (root / d / "tokenizer.model").write_text("")
    return root


@pytest.mark.parametrize("fmt,bound", [("hf", 1.2), ("meta1", 1.2), ("meta4", 1 + 1 / 4 + 0.1)])
def test_peak_memory_while_loading_or_converting(medium, fmt, bound):
    code = MEASURE.format(root=str(ROOT), path=str(medium / fmt), convert=fmt != "hf",
                          hf=str(medium / "hf"))
    ratio, weights = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                    check=True).stdout.splitlines()[-1].split()  # after the converter's log
    assert int(weights) > 250e6
    print(f"{fmt}: peak RSS while loading or converting = {float(ratio):.3f} x the weights")
    assert float(ratio) <= bound, f"{fmt}: peak RSS while loading or converting = {float(ratio):.2f} x the weights"
