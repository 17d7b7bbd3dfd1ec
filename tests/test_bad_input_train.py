"""Bad input to finetune.py and grpo.py: every flag gets a wrong type, an out-of-range value and (where it takes a
path) a missing file, and each is answered by one line `error: ...` and a non-zero exit, with no file outside the
new run's own folder changed. Also: checkpoints cannot run code, a run cannot destroy another run's files or its own
inputs, diverged weights are never saved, resumes refuse changed data or schedules, malformed files are named.

Most cases fail before any training (flags are checked first), in-process through `main(argv)`; a few end-to-end
cases run the scripts as subprocesses.
    python -m pytest tests/test_bad_input_train.py -q
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import finetune as ft  # noqa: E402
import grpo  # noqa: E402
from test_finetune import assets, flags, losses  # noqa: E402,F401  (fixtures: a tiny model and data)

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(root: Path, skip: Path) -> dict:
    """Every file under root but those under skip (the new run's folder) -> its bytes' hash and mtime. A run
    folder's .lock is not compared: it holds the pid of the last process that held the folder, which every run
    (even one refused after taking the lock, e.g. a resume with changed flags) writes."""
    return {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and skip not in p.parents and p.name != ".lock"}


def one_line_error(run, argv, match: str, root: Path, out: Path):
    """run(argv) must end in SystemExit('error: ...'), one line matching `match`, changing nothing outside out."""
    before = snapshot(root, out)
    with pytest.raises(SystemExit) as e:
        run(argv)
    message = e.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    assert match in message, message
    assert snapshot(root, out) == before  # a string code exits with status 1
    return message


# -----------------------------------------------------------------------------
# finetune.py: every flag


# flag -> (a wrong type, the words the error must hold)
WRONG_TYPE = {int: ("1.5", "invalid int value"), float: ("fast", "invalid float value"),
              bool: ("maybe", "expected true or false")}
# flag -> [(out-of-range value, the words the error must hold), ...]; "MISSING" is a path that does not exist,
# DIR/FILE name fixtures made by the test
FT_RANGE = {
    "model": [("gpt5", "unknown --model")],
    "ckpt_dir": [("MISSING", "not found"), ("EMPTY_DIR", "no checkpoint at")],
    "preset": [("no-such-preset", "--preset"), ("MISSING.json", "not found"), ("BAD_JSON", "cannot read")],
    "tokenizer": [("MISSING", "not found"), ("NOT_TOKENIZER", "cannot read the tokenizer")],
    "data": [("MISSING", "data file not found"), ("EMPTY_FILE", "empty dataset"), ("EMPTY_DIR", "needs *train*")],
    "out_dir": [("A_FILE", "is a file"), ("NON_EMPTY", "already holds files"), ("CKPT_DIR", "holds the input")],
    "mode": [("bogus", "--mode must be one of")],
    "lora_rank": [("0", "--lora_rank must be >= 1")],
    "lora_alpha": [("0", "--lora_alpha must be > 0"), ("nan", "--lora_alpha")],
    "lora_dropout": [("1.0", "--lora_dropout must be in [0, 1)")],
    "lora_targets": [("q_proj,,v_proj", "comma-separated names"), ("nope_proj", "no linear layer named")],
    "seq_len": [("0", "--seq_len must be >= 1"), ("1024", "exceeds the model's context")],
    "batch_size": [("0", "--batch_size must be >= 1"), ("1000", "does not fit")],
    "grad_accum": [("0", "--grad_accum must be >= 1")],
    "max_steps": [("-1", "--max_steps must be >= 0")],
    "lr": [("nan", "--lr must be > 0"), ("0", "--lr must be > 0"), ("inf", "--lr")],
    "min_lr_frac": [("2", "--min_lr_frac must be in [0, 1]")],
    "warmup_steps": [("-1", "--warmup_steps must be >= 0")],
    "weight_decay": [("-0.1", "--weight_decay must be >= 0")],
    "grad_clip": [("-1", "--grad_clip must be >= 0"), ("inf", "--grad_clip")],
    "val_frac": [("0", "--val_frac must be in (0, 1)"), ("1", "--val_frac")],
    "eval_every": [("0", "--eval_every must be >= 1")],
    "eval_rows": [("0", "--eval_rows must be >= 1")],
    "ckpt_every": [("0", "--ckpt_every must be >= 1")],
    "resume": [("true", "no checkpoint at")],  # nothing to resume in a fresh folder
    "device": [("tpu", "--device must be cpu, cuda or cuda:N")]
    + ([] if torch.cuda.is_available() else [("cuda", "no CUDA device")]),
    "dtype": [("foo", "--dtype must be one of")],
    "fsdp": [("true", "torchrun")],  # one process: nothing to shard over
    "save_dtype": [("int8", "--save_dtype must be one of")],
    "router_bias_rate": [("-1", "--router_bias_rate must be >= 0")],
    "seed": [("-1", "--seed must be in")],
}
FT_NO_RANGE = {"overwrite", "grad_checkpointing"}  # booleans whose every value is valid


def test_every_finetune_flag_has_bad_input_cases():
    assert set(FT_RANGE) | FT_NO_RANGE == {f.name for f in fields(ft.TrainConfig)}


@pytest.fixture
def ft_case(assets, tmp_path):
    """-> (argv of a valid run into tmp_path/run, a function to place a named bad value, tmp_path)."""
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "non_empty").mkdir()
    (tmp_path / "non_empty" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "not_tokenizer.json").write_text('{"version": "1.0"}')
    ckpt = tmp_path / "base"
    shutil.copytree(assets / "base", ckpt)
    names = {"MISSING": tmp_path / "missing", "MISSING.json": tmp_path / "missing.json",
             "EMPTY_DIR": tmp_path / "empty_dir", "EMPTY_FILE": tmp_path / "empty.jsonl",
             "A_FILE": tmp_path / "a_file", "NON_EMPTY": tmp_path / "non_empty", "CKPT_DIR": ckpt,
             "BAD_JSON": tmp_path / "bad.json", "NOT_TOKENIZER": tmp_path / "not_tokenizer.json"}
    argv = ["--ckpt_dir", str(ckpt), "--data", str(assets / "text.jsonl"), "--out_dir", str(tmp_path / "run"),
            "--seq_len", "32", "--batch_size", "4", "--max_steps", "1", "--eval_rows", "4"]
    return argv, lambda v: str(names.get(v, v)), tmp_path


def with_flag(argv, name, value):
    """argv with --name set to value (replaced if present); --preset runs from scratch: no --ckpt_dir."""
    argv = list(argv)
    if f"--{name}" in argv:
        i = argv.index(f"--{name}")
        del argv[i:i + 2]
    if name == "preset":
        i = argv.index("--ckpt_dir")
        argv[i:i + 2] = ["--tokenizer", argv[i + 1]]
    return argv + [f"--{name}", value]


@pytest.mark.parametrize("name, value, match", [(n, v, m) for n, cases in FT_RANGE.items() for v, m in cases])
def test_finetune_out_of_range(ft_case, name, value, match):
    argv, place, root = ft_case
    one_line_error(ft.main, with_flag(argv, name, place(value)), match, root, root / "run")


@pytest.mark.parametrize("name", [f.name for f in fields(ft.TrainConfig) if f.type in (int, float, bool)])
def test_finetune_wrong_type(ft_case, name):
    argv, _, root = ft_case
    value, match = WRONG_TYPE[next(f.type for f in fields(ft.TrainConfig) if f.name == name)]
    one_line_error(ft.main, with_flag(argv, name, value), match, root, root / "run")


def test_finetune_string_flags_refuse_undecodable_bytes(ft_case):
    """A str flag's wrong type: argv bytes that are not UTF-8 (they arrive as lone surrogates)."""
    argv, _, root = ft_case
    for name in [f.name for f in fields(ft.TrainConfig) if f.type is str]:
        one_line_error(ft.main, with_flag(argv, name, "caf\udce9"), "invalid utf8 value", root, root / "run")


@pytest.mark.parametrize("extra, match", [
    (["--tokenizer", "MISSING"], "not found"), (["--tokenizer", "A_FILE"], "cannot read the tokenizer"),
    (["--out_dir", "A_FILE"], "is a file"), (["--val_frac", "1"], "--val_frac"), (["--val_frac", "x"], "invalid float"),
    (["--shard_tokens", "0"], "--shard_tokens"), (["--shard_tokens", "1e3"], "invalid int"),
    (["MISSING"], "not found"), (["EMPTY_FILE"], "empty dataset"), (["A_FILE", "--files", "x"], "unknown flag"),
])
def test_prepare_flags(ft_case, extra, match):
    """`finetune.py prepare FILES... --tokenizer T --out_dir D`: each flag wrong, one line, nothing written."""
    _, place, root = ft_case
    base = {"--tokenizer": str(root / "base"), "--out_dir": str(root / "run")}
    words = [place(w) for w in extra]
    for flag, value in base.items():
        if flag not in words:
            words += [flag, value]
    files = [] if not extra[0].startswith("--") else [str(root / "base" / "x.txt")]  # else extra names the file
    (root / "base" / "x.txt").write_text("the cat sat on a mat.")
    one_line_error(ft.main, ["prepare", *files, *words], match, root, root / "run")


def test_finetune_typo_and_prepare_flags(ft_case):
    argv, _, root = ft_case
    one_line_error(ft.main, argv + ["--lerning_rate", "1"], "unknown flag --lerning_rate", root, root / "run")
    one_line_error(ft.main, argv + ["--sed", "1"], "did you mean --seed?", root, root / "run")
    one_line_error(ft.main, ["prepare", str(root / "missing.txt"), "--tokenizer", str(root / "base"), "--out_dir",
                             str(root / "run")], "not found", root, root / "run")
    one_line_error(ft.main, ["prepare", "--tokenizer", str(root / "base"), "--out_dir", str(root / "run")],
                   "usage: finetune.py prepare", root, root / "run")
    one_line_error(ft.main, ["prepare", str(root / "empty.jsonl"), "--tokenizer", str(root / "base"), "--out_dir",
                             str(root / "run"), "--val_frac", "nan"], "--val_frac", root, root / "run")


# -----------------------------------------------------------------------------
# finetune.py: malformed files get one line naming the file (and line)


@pytest.mark.parametrize("content, match", [
    ('{"text": "a"}\n{"text": "b"\n', "bad.jsonl:2: not valid JSON"),
    ('{"text": "a"}\n\n{"messages": [{"content": "hi"}]}\n', "bad.jsonl:3 needs"),
    ('{"messages": "hi"}\n', "bad.jsonl:1 needs"),
    ('{"prompt": "hi"}\n', "bad.jsonl:1 needs"),
    ('[1, 2]\n', "bad.jsonl:1 needs"),
    pytest.param('{"text": "a"}\n' + "[" * 100_000 + "\n", "bad.jsonl:2: not valid JSON (nested too deep)",
                 id="nested-too-deep"),
])
def test_malformed_jsonl_names_the_line(ft_case, content, match):
    argv, _, root = ft_case
    (root / "bad.jsonl").write_text(content)
    one_line_error(ft.main, with_flag(argv, "data", str(root / "bad.jsonl")), match, root, root / "run")


def test_non_utf8_data(ft_case):
    argv, _, root = ft_case
    (root / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50)
    one_line_error(ft.main, with_flag(argv, "data", str(root / "latin1.txt")), "is not UTF-8", root, root / "run")


@pytest.mark.parametrize("damage, match", [
    (lambda base: (base / "config.json").write_text("{oops"), "config.json"),
    (lambda base: (base / "config.json").write_text('{"model_type": "llama"}'), "config.json"),
    (lambda base: (base / "tokenizer.json").write_text("[1, 2"), "tokenizer"),
    (lambda base: (base / "tokenizer.json").write_text('{"model": {}}'), "tokenizer"),
    (lambda base: (base / "model.safetensors").write_bytes((base / "model.safetensors").read_bytes()[:5000]),
     "cannot load"),
    (lambda base: (base / "model.safetensors").write_bytes(b"\0" * 10), "cannot load"),
])
def test_broken_checkpoint_files(ft_case, damage, match):
    argv, _, root = ft_case
    damage(root / "base")
    one_line_error(ft.main, argv, match, root, root / "run")


def test_broken_shards(ft_case, assets):
    argv, _, root = ft_case
    ft.prepare(str(assets / "text.jsonl"), tokenizer=str(assets / "base"), out_dir=str(root / "shards"),
               val_frac=0.2)
    shard = root / "shards" / "train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:2000])
    one_line_error(ft.main, with_flag(argv, "data", str(root / "shards")), "is truncated", root, root / "run")
    shard.write_bytes(b"\0" * 2000)
    one_line_error(ft.main, with_flag(argv, "data", str(root / "shards")), "is not a token shard", root, root / "run")


# -----------------------------------------------------------------------------
# finetune.py: runs that would destroy files


class Boom:
    """A pickle that runs a command when loaded by a full unpickler (torch.load(weights_only=False))."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_checkpoint_does_not_run_on_resume(ft_case):
    argv, _, root = ft_case
    run = root / "run"
    run.mkdir()
    marker = root / "pwned"
    torch.save({"model": {}, "optimizer": Boom(marker), "scheduler": {}, "rng": [], "meta": {}}, run / "ckpt.pt")
    one_line_error(ft.main, argv + ["--resume"], "is not a checkpoint this script wrote", root, run)
    assert not marker.exists()


def test_out_dir_equal_to_ckpt_dir_keeps_the_weights(ft_case):
    argv, _, root = ft_case
    for extra in ([], ["--overwrite"], ["--mode", "lora", "--overwrite"]):
        one_line_error(ft.main, with_flag(argv, "out_dir", str(root / "base")) + extra, "holds the input", root,
                       root / "run")  # nothing under base/ may change


def finished_run(argv, root):
    """A tiny finished run in root/done: 2 steps, a checkpoint after each."""
    done = root / "done"
    ft.main(with_flag(with_flag(argv, "out_dir", str(done)), "max_steps", "2") + ["--ckpt_every", "1"])
    return done


def test_a_failed_run_cannot_replace_another_runs_files(ft_case):
    argv, _, root = ft_case
    done = finished_run(argv, root)
    saved = snapshot(done, root / "nothing")
    # without --overwrite a new run does not start in another run's folder
    one_line_error(ft.main, with_flag(argv, "out_dir", str(done)), "already holds files", root, root / "run")
    # with --overwrite, a run that fails (diverges at its first step) leaves every file of the old run as it was
    with pytest.raises(SystemExit, match="weights became unusable at step 1.*none yet"):
        ft.main(with_flag(with_flag(argv, "out_dir", str(done)), "lr", "1e9")
                + ["--overwrite", "--mode", "full", "--warmup_steps", "1", "--ckpt_every", "1"])
    after = snapshot(done, root / "nothing")
    assert {p: after[p] for p in saved} == saved and set(after) - set(saved) == {done / "metrics.jsonl.tmp"}
    # ... and one that succeeds replaces the run
    ft.main(with_flag(argv, "out_dir", str(done)) + ["--overwrite"])
    assert [r["step"] for r in map(json.loads, open(done / "metrics.jsonl")) if "loss" in r] == [1]


def test_diverged_weights_are_never_saved_or_exported(ft_case):
    """lr 1e9: the first update gives finite weights whose loss is NaN. They are neither saved nor exported."""
    argv, _, root = ft_case
    run = root / "run"
    for extra in (["--ckpt_every", "1", "--max_steps", "4"], ["--max_steps", "1"]):
        with pytest.raises(SystemExit, match=r"^error: weights became unusable at step 1 .*validation loss nan"):
            ft.main(with_flag(argv, "lr", "1e9") + ["--mode", "full", "--warmup_steps", "1", "--overwrite", *extra])
        assert not (run / "ckpt.pt").exists() and not (run / "model.safetensors").exists()


def test_disk_full_during_a_save_removes_the_temp_file(ft_case, monkeypatch):
    argv, _, root = ft_case
    run = root / "run"
    real_save, calls = torch.save, []

    def full_disk(obj, f, *args, **kw):  # the second checkpoint: half written, then the disk is full
        calls.append(1)
        if len(calls) == 2:
            f.write(b"x" * 1000)
            raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing "
                               "file data/3: file write failed\nunexpected pos 1000 vs 1024")
        return real_save(obj, f, *args, **kw)
    monkeypatch.setattr(ft.torch, "save", full_disk)
    message = one_line_error(ft.main, with_flag(argv, "max_steps", "3") + ["--ckpt_every", "1"],
                             "could not write", root, run)
    assert "unexpected pos" in message and not (run / "ckpt.pt.tmp").exists()
    monkeypatch.undo()
    assert torch.load(run / "ckpt.pt", weights_only=True)["meta"]["step"] == 1  # the previous one survived


def test_resume_refuses_changed_data_and_schedule(ft_case, assets, capsys):
    argv, _, root = ft_case
    data = root / "data.jsonl"
    shutil.copy(assets / "text.jsonl", data)
    argv = with_flag(argv, "data", str(data))
    done = finished_run(argv, root)
    resume = with_flag(with_flag(argv, "out_dir", str(done)), "max_steps", "2") + ["--ckpt_every", "1", "--resume"]
    for name, value in (("data", str(assets / "chat.jsonl")), ("seed", "7"), ("lr", "1e-3"), ("seq_len", "16"),
                        ("warmup_steps", "3"), ("mode", "full"), ("lora_rank", "4"), ("model", "llama31")):
        one_line_error(ft.main, with_flag(resume, name, value), f"--resume with --{name}", root, root / "nothing")
    text = data.read_text()
    data.write_text(text + text)  # the same path, other content
    with pytest.raises(SystemExit, match="the data changed"):
        ft.main(resume)
    data.write_text(text)
    # a longer run is a change a resume may make: it is said, and the run continues from step 2 (here in a copy of
    # the run's folder: a moved folder resumes too)
    shutil.copytree(done, root / "moved")
    ft.main(with_flag(with_flag(resume, "max_steps", "3"), "out_dir", str(root / "moved")))
    assert "note: --max_steps 3 (the checkpoint's run had 2)" in capsys.readouterr().out
    assert len(losses(root / "moved")) == 3


def test_export_copies_chat_template_jinja(assets, tmp_path):
    """transformers 5 keeps the chat template in chat_template.jinja: the export must carry it."""
    tok = tmp_path / "tok"
    shutil.copytree(assets / "base", tok)
    (tok / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    out = tmp_path / "out"
    out.mkdir()
    model = ft.open_model("smollm2", torch.device("cpu"), ckpt_dir=str(assets / "base"))[1]
    ft.export_hf(model, str(out), json.loads((assets / "base/config.json").read_text()), str(tok), 1.0, "float32")
    assert (out / "chat_template.jinja").read_text() == (tok / "chat_template.jinja").read_text()


# -----------------------------------------------------------------------------
# grpo.py: every flag

GRPO_RANGE = {
    "model": [("nanollm", "--model must be one of")],
    "ckpt_dir": [("MISSING", "no checkpoint at"), ("EMPTY_DIR", "no checkpoint at")],
    "out_dir": [("A_FILE", "is a file"), ("NON_EMPTY", "already holds files"), ("CKPT_DIR", "holds the input")],
    "task": [("MISSING", "neither a built-in task"), ("mult", "neither a built-in task")],
    "eval_file": [("MISSING", "not found")],
    "eval_n": [("0", "--eval_n must be >= 1")],
    "steps": [("-1", "--steps must be >= 0")],
    "time_limit": [("-1", "--time_limit must be >= 0"), ("nan", "--time_limit")],
    "prompts_per_step": [("0", "--prompts_per_step must be >= 1")],
    "num_generations": [("1", "--num_generations must be >= 2")],
    "max_new_tokens": [("0", "--max_new_tokens must be >= 1")],
    "temperature": [("0", "--temperature must be > 0"), ("inf", "--temperature")],
    "loss_type": [("ppo", "--loss_type must be one of")],
    "epsilon": [("1", "--epsilon must be in [0, 1)")],
    "epsilon_high": [("-0.1", "--epsilon_high must be >= 0")],
    "beta": [("-1", "--beta must be >= 0"), ("nan", "--beta")],
    "scale_rewards": [("std", "--scale_rewards must be one of")],
    "num_iterations": [("0", "--num_iterations must be >= 1")],
    "reward_weights": [("1.0", "--reward_weights needs 2"), ("1,x", "--reward_weights"), ("1,nan", "--reward_w")],
    "mode": [("norm", "--mode must be one of")],
    "lora_rank": [("0", "--lora_rank must be >= 1")],
    "lora_alpha": [("-1", "--lora_alpha must be > 0")],
    "lr": [("nan", "--lr must be > 0"), ("-1", "--lr must be > 0")],
    "warmup_steps": [("-2", "--warmup_steps must be >= 0")],
    "min_lr_frac": [("1.5", "--min_lr_frac must be in [0, 1]")],
    "weight_decay": [("-1", "--weight_decay must be >= 0")],
    "grad_clip": [("-1", "--grad_clip must be >= 0")],
    "micro_batch": [("0", "--micro_batch must be >= 1")],
    "eval_every": [("-1", "--eval_every must be >= 0")],
    "ckpt_every": [("0", "--ckpt_every must be >= 1")],
    "resume": [("true", "no checkpoint at")],
    "device": [("gpu", "--device must be cpu, cuda or cuda:N")]
    + ([] if torch.cuda.is_available() else [("cuda", "no CUDA device")]),
    "save_dtype": [("int8", "--save_dtype must be one of")],
    "threads": [("-1", "--threads must be >= 0")],
    "seed": [("-5", "--seed must be in")],
}
GRPO_NO_RANGE = {"overwrite"}


def test_every_grpo_flag_has_bad_input_cases():
    assert set(GRPO_RANGE) | GRPO_NO_RANGE == {f.name for f in fields(grpo.GRPOConfig)}


@pytest.fixture
def grpo_case(tmp_path):
    """A config.json is all the flag checks look at: they come before any loading."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    for name in ("empty_dir", "non_empty"):
        (tmp_path / name).mkdir()
    (tmp_path / "non_empty" / "metrics.jsonl").write_text('{"step": 0, "eval_accuracy": 0.2}\n')
    (tmp_path / "a_file").write_text("x")
    names = {"MISSING": tmp_path / "missing", "EMPTY_DIR": tmp_path / "empty_dir", "A_FILE": tmp_path / "a_file",
             "NON_EMPTY": tmp_path / "non_empty", "CKPT_DIR": ckpt}
    argv = ["--ckpt_dir", str(ckpt), "--out_dir", str(tmp_path / "run")]
    return argv, lambda v: str(names.get(v, v)), tmp_path


@pytest.mark.parametrize("name, value, match", [(n, v, m) for n, cases in GRPO_RANGE.items() for v, m in cases])
def test_grpo_out_of_range(grpo_case, name, value, match):
    argv, place, root = grpo_case
    one_line_error(grpo.main, with_flag(argv, name, place(value)), match, root, root / "run")


@pytest.mark.parametrize("name", [f.name for f in fields(grpo.GRPOConfig) if f.type in (int, float, bool)])
def test_grpo_wrong_type(grpo_case, name):
    argv, _, root = grpo_case
    value, match = WRONG_TYPE[next(f.type for f in fields(grpo.GRPOConfig) if f.name == name)]
    one_line_error(grpo.main, with_flag(argv, name, value), match, root, root / "run")


def test_grpo_string_flags(grpo_case):
    """Undecodable bytes are refused; any other string arrives exactly as typed (fire made "0x10" 16)."""
    argv, _, root = grpo_case
    for name in [f.name for f in fields(grpo.GRPOConfig) if f.type is str]:
        one_line_error(grpo.main, with_flag(argv, name, "caf\udce9"), "invalid utf8 value", root, root / "run")
    for value in ("0x10", "yes, please", "1e3", "[1, 2]"):
        assert grpo.cli(grpo.GRPOConfig, ["--task", value]).task == value
        one_line_error(grpo.main, with_flag(argv, "task", value), f"--task {value!r} is neither", root, root / "run")
    one_line_error(grpo.main, argv + ["--temprature", "1"], "did you mean --temperature?", root, root / "run")


@pytest.mark.parametrize("content, match", [
    ('{"question": "q", "answer": "#### 4"}\n{"question": "q"\n', "task.jsonl:2: not valid JSON"),
    ('{"question": "q", "answer": "four"}\n', "task.jsonl:1: the answer has no number"),
    ('{"question": "q"}\n', "task.jsonl:1 needs 'question' and 'answer'"),
    ('\n\n', "holds no problems"),
    pytest.param("[" * 100_000 + "\n", r"task.jsonl:1: not valid JSON \(nested too deep\)", id="nested-too-deep"),
])
def test_grpo_malformed_task_file(tmp_path, content, match):
    (tmp_path / "task.jsonl").write_text(content)
    with pytest.raises(SystemExit, match=match):
        grpo.task_data(grpo.GRPOConfig(task=str(tmp_path / "task.jsonl"), eval_n=1))


def test_grpo_reward_functions_named_alike_or_like_a_logged_value(grpo_case):
    _, _, root = grpo_case
    cfg = grpo.GRPOConfig(ckpt_dir=str(root / "ckpt"), out_dir=str(root / "run"))

    def loss(prompt, completion, **_):
        return 0.0
    for fns, name in (([grpo.correct_reward, grpo.correct_reward], "correct_reward"),
                      ([grpo.correct_reward, loss], "loss")):
        with pytest.raises(SystemExit, match=f"named '{name}'"):
            grpo.train(cfg, fns)


def test_reward_function_raising_on_a_whole_batch_stops():
    per_fn = torch.tensor([[1.0, float("nan")], [0.0, float("nan")]])
    grpo.check_rewards(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), [grpo.correct_reward, grpo.format_reward], 1)
    with pytest.raises(SystemExit, match="format_reward raised on all 2 completions of step 3"):
        grpo.check_rewards(per_fn, [grpo.correct_reward, grpo.format_reward], 3)


def test_grpo_runs_refuse_to_destroy_files_and_run_no_pickle(tmp_path, smollm2_dir):
    from test_grpo import length_reward, write_tiny_checkpoint
    ckpt = write_tiny_checkpoint(tmp_path, smollm2_dir)
    common = dict(ckpt_dir=str(ckpt), task="add", prompts_per_step=2, num_generations=3, max_new_tokens=4,
                  eval_n=2, micro_batch=4, threads=1)
    done = tmp_path / "done"
    grpo.train(grpo.GRPOConfig(out_dir=str(done), steps=1, **common), [length_reward, grpo.format_reward])
    saved = snapshot(tmp_path, tmp_path / "nothing")
    # an evaluation-only run into the trained run's folder would have cut its log: refused
    with pytest.raises(SystemExit, match="already holds files"):
        grpo.train(grpo.GRPOConfig(out_dir=str(done), steps=0, **common))
    for change in (dict(lr=1e-3), dict(seed=1), dict(task="arith"), dict(num_generations=4)):  # resume, changed
        with pytest.raises(SystemExit, match=f"--resume with --{next(iter(change))}"):
            grpo.train(grpo.GRPOConfig(out_dir=str(done), steps=1, resume=True, **{**common, **change}))
    with pytest.raises(SystemExit, match="holds the input"):
        grpo.train(grpo.GRPOConfig(out_dir=str(ckpt), steps=1, overwrite=True, **common))
    assert snapshot(tmp_path, tmp_path / "nothing") == saved

    def broken_a(prompt, completion, **_):
        raise ValueError("no")

    def broken_b(prompt, completion, **_):
        return 1 / 0
    # every reward function raising: not a reward of 0, a stop
    with pytest.raises(SystemExit, match="broken_a raised on all 6 completions of step 1"):
        grpo.train(grpo.GRPOConfig(out_dir=str(tmp_path / "b"), steps=1, **common), [broken_a, broken_b])
    # a checkpoint that would run code on --resume is refused, and runs nothing
    marker = tmp_path / "pwned"
    state = torch.load(done / "ckpt.pt", weights_only=True)
    state["optimizer"] = Boom(marker)
    torch.save(state, done / "ckpt.pt")
    with pytest.raises(SystemExit, match="is not a checkpoint this script wrote"):
        grpo.train(grpo.GRPOConfig(out_dir=str(done), steps=2, resume=True, **common),
                   [length_reward, grpo.format_reward])
    assert not marker.exists()


def test_grpo_loss_nan_stops_before_the_update(tmp_path, monkeypatch, smollm2_dir):
    from test_grpo import length_reward, write_tiny_checkpoint
    ckpt = write_tiny_checkpoint(tmp_path, smollm2_dir)
    monkeypatch.setattr(grpo, "aggregate", lambda per_token, *a: per_token.sum() * float("nan"))
    cfg = grpo.GRPOConfig(ckpt_dir=str(ckpt), out_dir=str(tmp_path / "run"), task="add", steps=1, prompts_per_step=2,
                          num_generations=3, max_new_tokens=4, eval_n=2, threads=1)
    with pytest.raises(SystemExit, match="loss is nan at step 1; stopped without updating. Last good checkpoint: "
                                         "none yet"):
        grpo.train(cfg, [length_reward, grpo.format_reward])
    assert not (tmp_path / "run" / "ckpt.pt").exists() and not (tmp_path / "run" / "model.safetensors").exists()


# -----------------------------------------------------------------------------
# End to end: the scripts as a user runs them


def run_script(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return p, time.time() - t0


def flag_help(doc: str) -> dict[str, str]:
    """name -> its whole help in a docstring's `name: text` entries, continuation lines (indented deeper) included."""
    helps, name, indent = {}, None, 0
    for line in doc.splitlines():
        entry = re.match(r"^( *)(\w+): (.+)$", line)
        if name and line.strip() and len(line) - len(line.lstrip()) > indent:
            helps[name] += " " + line.strip()
        elif entry:
            name, indent = entry.group(2), len(entry.group(1))
            helps[name] = entry.group(3)
        else:
            name = None
    return helps


@pytest.mark.parametrize("script, config", [("finetune.py", ft.TrainConfig), ("grpo.py", grpo.GRPOConfig)])
def test_help_lists_every_flag_with_its_default(script, config):
    """Exit 0, every flag with its default and its whole help (a help of several lines is not cut to its first)."""
    for flag in ("--help", "-h"):
        p, _ = run_script(script, flag)
        assert p.returncode == 0 and not p.stderr
        text = "".join(p.stdout.split())  # argparse wraps lines (and a long default)
        helps = flag_help(config.__doc__)
        for f in fields(config):
            assert f"--{f.name}" in text and f"(default:{f.default!r})".replace(" ", "") in text, f.name
            assert "".join(helps[f.name].split()) in text, f.name
    if script == "finetune.py":
        assert "finetune.pypreparefiles..." in text.lower()
        p, _ = run_script(script, "prepare", "--help")
        text = "".join(p.stdout.split())
        assert p.returncode == 0 and "--shard_tokens" in p.stdout
        for name, help_text in flag_help(ft.prepare.__doc__).items():
            assert "".join(help_text.split()) in text, name


def test_cli_errors_are_one_line_on_stderr(tmp_path):
    for args, match in ((["grpo.py", "--reward_weights", "1.0"], "--reward_weights needs 2"),
                        (["grpo.py", "--max_new_tokens", "0"], "--max_new_tokens must be >= 1"),
                        (["finetune.py", "--data", "x.txt", "--seq_len", "0"], "--seq_len must be >= 1"),
                        (["finetune.py", "--data", "x.txt", "--dtype", "foo"], "--dtype must be one of")):
        p, _ = run_script(*args, "--out_dir", str(tmp_path / "run"))
        assert p.returncode == 1 and p.stderr.count("\n") == 1 and p.stderr.startswith("error: ") and \
            match in p.stderr, p.stderr
        assert not (tmp_path / "run").exists()


def test_metrics_log_errors_are_one_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(SystemExit, match=r"metrics.jsonl:2 is not valid JSON"):
        ft.MetricsLog(str(path), keep_until=3)
    (tmp_path / "metrics.jsonl.tmp").mkdir()  # the file cannot be written (as on a full disk: an OSError)
    with pytest.raises(SystemExit, match=r"^error: could not write .*metrics.jsonl.tmp"):
        ft.MetricsLog(str(path))
    assert path.read_text().startswith('{"step": 1')  # the old log is untouched
