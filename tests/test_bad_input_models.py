"""Bad input to the four model CLIs and loaders: each is answered by one line naming the problem and a non-zero exit,
never a traceback or a silent wrong run. (Hostile files and signals: tests/test_hostile_models.py.)

Every flag gets a wrong type, an out-of-range value and, where it takes a path, a missing file. Checkpoints are tiny
random models written to tmp_path; the real SmolLM2 checkpoint is used where a real tokenizer matters.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from conftest import asset  # noqa: E402

import cli  # noqa: E402
import download  # noqa: E402
import fast_decode  # noqa: E402
import llama31  # noqa: E402
import lm2  # noqa: E402
import meta_convert  # noqa: E402
import nanollm  # noqa: E402
import smollm2  # noqa: E402
from cli import is_chat_checkpoint  # noqa: E402

MODS = [smollm2, llama31, nanollm, lm2]
SMOLLM2_DIR, LLAMA_TOKENIZER_DIR = asset("smollm2-135m-instruct"), asset("llama3.2-tokenizer")  # fetched by conftest
MODEL = {smollm2: smollm2.SmolLM2, llama31: llama31.Llama, nanollm: nanollm.NanoLLM, lm2: lm2.LM2}


def one_line_error(mod, *argv) -> str:
    """Run mod's CLI in-process; it must exit non-zero with a single `error: ...` line."""
    with pytest.raises(SystemExit) as e:
        cli.cli(mod.main, argv=list(argv))
    msg = str(e.value.code).strip()
    assert e.value.code not in (0, None) and msg.startswith("error:") and "\n" not in msg, msg
    return msg


def tiny(mod, vocab_size=64):
    """A tiny random model of mod (fast to build, save and load)."""
    torch.manual_seed(0)
    if mod is nanollm:
        args = nanollm.ModelArgs(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=2, hidden_dim=32,
                                 moe_layers=(1,), moe_hidden_dim=16, n_routed_experts=4, q_lora_rank=16,
                                 kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    else:
        kw = dict(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=32, vocab_size=vocab_size)
        args = mod.ModelArgs(**kw, **(dict(head_dim=8, mem_slots=4, segment_len=8) if mod is lm2 else {}))
    model = MODEL[mod](args)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model.eval()


def save(model, path: Path, tokenizer_from: Path | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.args, "tie_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(model.args.to_hf_config()))
    for f in (tokenizer_from.iterdir() if tokenizer_from else []):
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, path / f.name)
    return path


# -----------------------------------------------------------------------------
# Every flag: a wrong type, an out-of-range value, a missing path


WRONG_TYPE = [("--max_new_tokens", "2.5"), ("--temperature", "hot"), ("--top_p", "most"), ("--top_k", "1.5"),
              ("--seed", "abc"), ("--chat", "maybe"), ("--interactive", "perhaps"), ("--prompt", "bad \udcff utf-8"),
              ("--ckpt_dir", "\udcff"), ("--device", "\udcff"), ("--dtype", "\udcff"), ("--int8", "perhaps")]
OUT_OF_RANGE = [("--max_new_tokens", "0"), ("--max_new_tokens", "-3"), ("--temperature", "-1"),
                ("--temperature", "nan"), ("--temperature", "inf"), ("--top_p", "0"), ("--top_p", "1.5"),
                ("--top_p", "nan"), ("--top_k", "0"), ("--seed", "-1"), ("--seed", str(2**64)),
                ("--device", "toaster"), ("--device", "cuda:99"), ("--dtype", "float8")]


@pytest.mark.parametrize("mod", MODS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("flag,value", WRONG_TYPE + OUT_OF_RANGE)
def test_bad_flag_values_get_one_line(mod, flag, value):
    # --ckpt_dir points nowhere: a flag check that were missing would end in the checkpoint error instead, which
    # does not name the flag, so the assertion below fails
    argv = ["--prompt", "hi", "--ckpt_dir", "/nonexistent/ckpt", flag, value]
    msg = one_line_error(mod, *argv)
    assert flag.strip("-") in msg or (flag == "--ckpt_dir" and "utf8" in msg), msg


@pytest.mark.parametrize("mod", MODS, ids=lambda m: m.__name__)
def test_missing_checkpoint_and_missing_prompt(mod, tmp_path):
    assert "nonexistent" in one_line_error(mod, "--prompt", "hi", "--ckpt_dir", str(tmp_path / "nonexistent"))
    assert "--prompt" in one_line_error(mod, "--ckpt_dir", str(tmp_path))
    assert "unknown flag --temprature; did you mean --temperature?" in one_line_error(mod, "--temprature", "1")


@pytest.mark.parametrize("mod", MODS, ids=lambda m: m.__name__)
def test_the_kv_cache_is_sized_to_the_request_not_the_context(mod, tmp_path):
    """A 10^12-token context (max_position_embeddings) costs nothing until used: the RoPE angles are computed for the
    positions in use and the cache holds the prompt and the new tokens, whatever the config states."""
    model = tiny(mod)
    model.args.max_seq_len = 10**12
    ckpt = save(model, tmp_path / "huge_context")
    model = MODEL[mod].from_pretrained(ckpt)
    sizes = []
    setup = model.setup_cache
    model.setup_cache = lambda b, n: sizes.append(n) or setup(b, n)
    assert len(model.generate([[1, 2, 3]], 5, stop_tokens=[])[0]) == 5 and sizes == [8]


# -----------------------------------------------------------------------------
# Strings arrive as typed (fire turned "yes, please" into a tuple and 0x10 into 16)

PROMPTS = ["yes, please", "0x10", "[1, 2]", "(3, 4)", '"quoted"', "'single'", "-5", "None", "True", "{'a': 1}",
           "x" * 100_000]


class Seen(Exception):
    pass


@pytest.mark.parametrize("mod", MODS, ids=lambda m: m.__name__)
def test_string_flags_arrive_byte_for_byte(mod, monkeypatch):
    def capture(prompt, *args, **kwargs):
        raise Seen(prompt, args)

    monkeypatch.setattr(cli, "check_generation_flags", capture)  # main's first check: the flags as parsed
    for text in PROMPTS:
        with pytest.raises(Seen) as e:
            cli.cli(mod.main, argv=["--prompt", text, "--device", text, "--dtype", text])
        prompt, rest = e.value.args
        assert prompt == text and rest[5:7] == (text, text)  # (after max_new_tokens ... seed: device, dtype)


def test_string_flags_arrive_byte_for_byte_from_a_real_command_line():
    code = ("import sys, cli, smollm2; cli.check_generation_flags = lambda p, *a, **k: sys.exit(repr(p)); "
            "cli.cli(smollm2.main)")
    for text in ["yes, please", "0x10", "[1, 2]", '"q"']:
        run = subprocess.run([sys.executable, "-c", code, "--prompt", text], cwd=ROOT, capture_output=True, text=True)
        assert run.returncode == 1 and run.stderr.strip() == repr(text), run.stderr


@pytest.mark.parametrize("mod", MODS, ids=lambda m: m.__name__)
def test_help_lists_every_flag_with_its_whole_help(mod):
    """`python X.py --help` exits 0 (before any checkpoint is read) and shows every flag's help whole, a help that
    spans two lines (--int4's) included, then its default."""
    run = subprocess.run([sys.executable, f"{mod.__name__}.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0 and not run.stderr, run.stderr
    words = " ".join(run.stdout.split())  # argparse wraps help text; compare with the line breaks undone
    helps = {**cli.MODEL_FLAGS, **cli.flag_help(mod.main.__doc__ or "")}
    for flag in ["prompt", "ckpt_dir", "max_new_tokens", "temperature", "top_p", "top_k", "device", "dtype", "seed",
                 "chat", "interactive", "int8", "int4", "compile"]:
        assert f"--{flag} " in run.stdout and f"{helps[flag]} (default: " in words, flag
    assert "benchmarks/bench_quality.py) (default: False)" in words


# -----------------------------------------------------------------------------
# Damaged checkpoints: one line naming the file


@pytest.mark.parametrize("mod", MODS, ids=lambda m: m.__name__)
def test_damaged_checkpoints_are_one_line(mod, tmp_path):
    load = MODEL[mod].from_pretrained
    good = save(tiny(mod), tmp_path / "good")
    load(good)  # the undamaged one loads
    for name, damage in [("truncated", "model"), ("not_json", "json"), ("lacks_key", "key")]:
        ckpt = shutil.copytree(good, tmp_path / name)
        if damage == "model":
            data = (ckpt / "model.safetensors").read_bytes()
            (ckpt / "model.safetensors").write_bytes(data[:len(data) // 2])
        elif damage == "json":
            (ckpt / "config.json").write_text('{"hidden_size": 32,')
        else:
            cfg = json.loads((ckpt / "config.json").read_text())
            del cfg["num_hidden_layers"]
            (ckpt / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError) as e:
            load(ckpt)
        msg = str(e.value)
        assert "\n" not in msg and str(ckpt) in msg, msg
        assert {"model": "truncated", "json": "not valid JSON", "key": "num_hidden_layers"}[damage] in msg
    ckpt = shutil.copytree(good, tmp_path / "cli")
    (ckpt / "model.safetensors").write_bytes(b"\0" * 10)
    assert "truncated or corrupt" in one_line_error(mod, "--prompt", "hi", "--ckpt_dir", str(ckpt))


def write_pickle_bomb(path: Path, marker: Path):
    """A .pth whose unpickling would call os.system to create `marker` (what a hostile download could do)."""
    import pickle
    import zipfile

    class Bomb:
        def __reduce__(self):
            import os
            return os.system, (f"touch {marker}",)

    # torch.save's zip layout with a hostile data.pkl: torch.load(weights_only=False) would run it
    torch.save({"tok_embeddings.weight": torch.zeros(2, 2)}, path)
    with zipfile.ZipFile(path) as z:
        files = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in files if n.endswith("data.pkl"))
    files[pkl] = pickle.dumps({"tok_embeddings.weight": Bomb()}, protocol=2)
    with zipfile.ZipFile(path, "w") as z:
        for n, data in files.items():
            z.writestr(n, data)


def test_meta_checkpoint_with_a_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    ckpt, marker = tmp_path / "Llama-bomb", tmp_path / "pwned"
    ckpt.mkdir()
    (ckpt / "params.json").write_text(json.dumps(dict(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, multiple_of=32,
                                                      vocab_size=64, norm_eps=1e-5, rope_theta=500000.0)))
    (ckpt / "tokenizer.model").write_text("")
    write_pickle_bomb(ckpt / "consolidated.00.pth", marker)
    with pytest.raises(ValueError, match="refused") as e:  # Meta's files are read once, by the converter
        meta_convert.meta_to_hf(ckpt, tmp_path / "out")
    assert "\n" not in str(e.value) and not marker.exists()
    assert "refused" in one_line_error(download, "--meta_dir", str(ckpt), "--out", str(tmp_path / "ckpts"))
    assert "python download.py --meta_dir" in one_line_error(llama31, "--prompt", "hi", "--ckpt_dir", str(ckpt))
    assert not marker.exists()


# -----------------------------------------------------------------------------
# Chat detection, the first interactive turn, and llama31.py on a non-Llama-3 checkpoint


def test_chat_template_jinja_marks_a_chat_model(tmp_path):
    """transformers 5 writes the template to chat_template.jinja, not into tokenizer_config.json (smollm2.py,
    nanollm.py and lm2.py decide --chat's default with tokenizer_bpe.py's is_chat_checkpoint)."""
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert not is_chat_checkpoint(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert is_chat_checkpoint(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    assert is_chat_checkpoint(tmp_path)
    assert not is_chat_checkpoint(tmp_path / "nonexistent")


@pytest.mark.parametrize("mod", MODS, ids=lambda m: m.__name__)
def test_prompt_is_the_first_interactive_turn(mod, tmp_path, monkeypatch, capsys):
    tok_dir = LLAMA_TOKENIZER_DIR if mod is llama31 else SMOLLM2_DIR
    if not (tok_dir / "tokenizer.json").is_file():
        pytest.fail(f"test asset {tok_dir} missing: run python download.py")
    vocab = 128256 if mod is llama31 else 49152
    model = tiny(mod, vocab_size=vocab)
    if mod is llama31:
        model.args.stop_tokens = (llama31.END_OF_TEXT, llama31.EOM, llama31.EOT)  # an instruct checkpoint
    ckpt = save(model, tmp_path / "chat", tokenizer_from=tok_dir)
    (ckpt / "chat_template.jinja").write_text("{{ messages }}")  # transformers 5's way of saying "chat model"
    seen, inputs = [], iter(["second turn"])

    def encode_chat(tokenizer, messages, *a, **kw):
        if messages:  # (lm2.py first checks that the tokenizer has chat tokens, with no messages)
            seen.append([m["content"] for m in messages if m["role"] == "user"])
        return [1, 2, 3]

    def fake_input(_prompt=""):
        try:
            return next(inputs)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(mod, "encode_chat", encode_chat)
    monkeypatch.setattr("builtins.input", fake_input)
    cli.cli(mod.main, argv=["--prompt", "first turn", "--interactive", "--ckpt_dir", str(ckpt), "--max_new_tokens",
                            "2", "--temperature", "0", "--dtype", "float32", "--device", "cpu"])
    assert seen == [["first turn"], ["first turn", "second turn"]]
    assert "> first turn" in capsys.readouterr().out


@pytest.mark.parametrize("mod", MODS, ids=lambda m: m.__name__)
def test_interactive_needs_a_chat_model(mod, tmp_path):
    """A base checkpoint (no chat template; for llama31, no end-of-turn stop token) cannot hold a conversation:
    --interactive is refused in one line rather than fed raw text turn after turn."""
    tok_dir = LLAMA_TOKENIZER_DIR if mod is llama31 else SMOLLM2_DIR
    if not (tok_dir / "tokenizer.json").is_file():
        pytest.fail(f"test asset {tok_dir} missing: run python download.py")
    ckpt = save(tiny(mod, vocab_size=128256 if mod is llama31 else 49152), tmp_path / "base", tokenizer_from=tok_dir)
    (ckpt / "tokenizer_config.json").unlink(missing_ok=True)  # SmolLM2-Instruct's carries its chat template
    msg = one_line_error(mod, "--interactive", "--ckpt_dir", str(ckpt), "--dtype", "float32", "--device", "cpu")
    assert "--interactive needs" in msg and "chat" in msg, msg


@pytest.mark.parametrize("flag", ["--int8", "--int4"])
@pytest.mark.parametrize("mod", MODS, ids=lambda m: m.__name__)
def test_quantized_flags_load_quantized_or_say_why_not(mod, flag, tmp_path, monkeypatch, capsys):
    """--int8 / --int4 load the model through fast_decode.load, so every linear layer is a quantized one and the float
    model is never held; the load line says which weights and where they came from. Both flags at once, either
    without fast_decode.py beside the model file (a model file copied alone), or a checkpoint with a NaN weight
    (which would quantize to NaN outputs), are refused in one line instead of silently decoding wrong."""
    tok_dir = LLAMA_TOKENIZER_DIR if mod is llama31 else SMOLLM2_DIR
    if not (tok_dir / "tokenizer.json").is_file():
        pytest.fail(f"test asset {tok_dir} missing: run python download.py")
    ckpt = save(tiny(mod, vocab_size=128256 if mod is llama31 else 49152), tmp_path / "m", tokenizer_from=tok_dir)
    argv = ["--prompt", "hi", "--ckpt_dir", str(ckpt), "--max_new_tokens", "2", "--temperature", "0",
            "--dtype", "float32", "--device", "cpu", "--chat", "false", flag]
    layers, real_load = [], fast_decode.load

    def recording_load(*args, **kw):
        model = real_load(*args, **kw)
        layers.extend(type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.Linear))
        return model

    monkeypatch.setattr(fast_decode, "load", recording_load)
    cli.cli(mod.main, argv=argv)
    weights = flag[2:]
    quantized = {"int8": {"Int8Linear"}, "int4": {"Int4Linear", "Int6Linear", "Int8Linear"}}[weights]  # (the head)
    assert layers and set(layers) <= quantized and (weights == "int8" or "Int4Linear" in layers), layers
    assert f"; {weights} weights (fast_decode.py) quantized as read" in capsys.readouterr().err
    assert "not both" in one_line_error(mod, *argv, "--int8" if flag == "--int4" else "--int4")
    broken = tiny(mod, vocab_size=128256 if mod is llama31 else 49152)
    with torch.no_grad():
        next(m for m in broken.modules() if isinstance(m, torch.nn.Linear)).weight[0, 0] = float("nan")
    argv[argv.index("--ckpt_dir") + 1] = str(save(broken, tmp_path / "nan", tokenizer_from=tok_dir))
    assert "NaN or infinite weight" in one_line_error(mod, *argv)
    find_spec = cli.importlib.util.find_spec  # a model file copied without fast_decode.py beside it
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda n: None if n == "fast_decode" else find_spec(n))
    assert "fast_decode.py" in one_line_error(mod, *argv)


@pytest.mark.parametrize("mod", MODS, ids=lambda m: m.__name__)
def test_compile_flag_compiles_the_step_or_says_why_not(mod, tmp_path, monkeypatch, capsys):
    """--compile: smollm2.py and llama31.py decode the greedy tokens they decode without it (fp32: the compiled step
    sums in another order, within 1e-5) and the load line says the step compiles; nanollm.py and lm2.py (whose step
    would compile again as lengths read from tensors change), and a model file without fast_decode.py beside it, are
    refused in one line, before any checkpoint is read."""
    tok_dir = LLAMA_TOKENIZER_DIR if mod is llama31 else SMOLLM2_DIR
    if not (tok_dir / "tokenizer.json").is_file():
        pytest.fail(f"test asset {tok_dir} missing: run python download.py")
    ckpt = save(tiny(mod, vocab_size=128256 if mod is llama31 else 49152), tmp_path / "m", tokenizer_from=tok_dir)
    argv = ["--prompt", "hi", "--ckpt_dir", str(ckpt), "--max_new_tokens", "6", "--temperature", "0",
            "--dtype", "float32", "--device", "cpu", "--chat", "false"]
    if mod in (smollm2, llama31):
        cli.cli(mod.main, argv=argv)
        plain = capsys.readouterr().out
        cli.cli(mod.main, argv=argv + ["--compile"])
        out = capsys.readouterr()
        assert out.out == plain and "the decode step compiles as it first runs" in out.err
    else:
        assert "smollm2.py's and llama31.py's models" in one_line_error(mod, *argv[:2], "--ckpt_dir", "no/such/dir",
                                                                          "--compile")
    find_spec = cli.importlib.util.find_spec  # a model file copied without fast_decode.py beside it
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda n: None if n == "fast_decode" else find_spec(n))
    assert "--compile is fast_decode.py's CPU path" in one_line_error(mod, *argv, "--compile")


def test_llama31_refuses_a_smollm2_checkpoint_in_one_line():
    if not (SMOLLM2_DIR / "config.json").is_file():
        pytest.fail(f"test asset {SMOLLM2_DIR} missing: run python download.py")
    msg = one_line_error(llama31, "--ckpt_dir", str(SMOLLM2_DIR), "--prompt", "What is 2+2?", "--dtype", "bfloat16",
                         "--device", "cpu")
    assert "not a Llama 3 checkpoint" in msg and "smollm2.py" in msg
