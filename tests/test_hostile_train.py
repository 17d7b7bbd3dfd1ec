"""Hostile input to finetune.py and grpo.py, by class of input. Each is answered by one line `error: ...` and a
non-zero exit (or works correctly), with no file outside the run's own folder created or changed and nothing a
user wrote deleted:

- two runs on one --out_dir, as real concurrent processes: the second is refused at once, naming the first's pid;
- checkpoint files that are links out of their folder, or not regular files: never copied into the run's folder;
- --overwrite on a folder of a user's own files, or of another script's run: refused; on an earlier run of the
  same script it replaces only what that script writes;
- an --out_dir that cannot be written (read-only, a file, under a file, an output name taken by a folder or a
  link): refused before the model loads; a save that fails names its errno, not always "free disk space";
- SIGINT during training and during a save (real signals to real processes): one line naming the last checkpoint
  and the exact --resume command, exit 130, that checkpoint intact, and the command continues the run exactly;
- malformed config.json (a seeded fuzz, deep nesting, not an object): one line from both scripts, never a traceback.

    python -m pytest tests/test_hostile_train.py -q
"""

import errno
import fcntl
import json
import os
import random
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import finetune as ft  # noqa: E402
import grpo  # noqa: E402
from test_bad_input_train import one_line_error, snapshot  # noqa: E402
from test_finetune import assets, flags, losses  # noqa: E402,F401  (the fixture: a tiny model and data)

pytestmark = pytest.mark.usefixtures("one_thread")

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

# Runs finetune.main(argv) in a process of its own (once the file HOSTILE_START exists, if that is set: the process
# can import torch while an earlier one gets ready), after one of these changes (HOSTILE names it):
#   hold            the run waits, holding its folder, until the file HOSTILE_GO exists
#   sigint_writer   during the second checkpoint's torch.save, its file writer sends SIGINT to the process
#   sigint_rename   after the second checkpoint is written and synced, before its rename, the same
DRIVER = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
import torch, finetune
while not os.path.exists(os.environ.get("HOSTILE_START", "/")):
    time.sleep(0.02)

def interrupt():
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)  # the KeyboardInterrupt is raised here, inside the save

mode, calls = os.environ["HOSTILE"], []
if mode == "hold":
    load_data = finetune.load_data
    def held(*args, **kw):
        while not os.path.exists(os.environ["HOSTILE_GO"]):
            time.sleep(0.02)
        return load_data(*args, **kw)
    finetune.load_data = held
if mode == "sigint_writer":
    save = torch.save
    class Writer:
        def __init__(self, f):
            self.f, self.n = f, 0
        def write(self, data):
            self.n += 1
            if self.n == 3:
                interrupt()
            return self.f.write(data)
        def flush(self):
            self.f.flush()
    def interrupted_save(obj, f, *args, **kw):
        calls.append(1)
        return save(obj, Writer(f) if len(calls) == 2 else f, *args, **kw)
    torch.save = interrupted_save
if mode == "sigint_rename":
    fsync = os.fsync
    def interrupted_fsync(fd):
        fsync(fd)
        calls.append(1)
        if len(calls) == 2:
            interrupt()
    os.fsync = interrupted_fsync
finetune.main(sys.argv[1:])
"""


def start(tmp_path, *args, hostile: str | None = None, **kw) -> subprocess.Popen:
    """finetune.py (or the driver above with HOSTILE=hostile) with args, as its own process."""
    script = ["finetune.py"]
    if hostile:
        (tmp_path / "driver.py").write_text(DRIVER.format(root=str(ROOT)))
        script, kw["env"] = [str(tmp_path / "driver.py")], {**ENV, "HOSTILE": hostile, **kw.get("env", {})}
    return subprocess.Popen([sys.executable, *script, *map(str, args)], cwd=ROOT, env=kw.pop("env", ENV),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def lines(stderr: str) -> list[str]:
    """stderr's lines, the progress bars' carriage returns counted as line ends."""
    return [line for line in re.split(r"[\r\n]+", stderr) if line.strip()]


def steps_logged(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    text = metrics.read_text() if metrics.exists() else ""
    return sum('"loss"' in line for line in text.splitlines(keepends=True) if line.endswith("\n"))


def copy_checkpoint(assets, tmp_path, name="ckpt") -> Path:
    ckpt = tmp_path / name
    shutil.copytree(assets / "base", ckpt)
    return ckpt


@pytest.fixture(scope="module")
def grpo_ckpt(tmp_path_factory, smollm2_dir) -> Path:
    """A tiny random SmolLM2 with the real tokenizer, as test_grpo's end-to-end runs use."""
    from test_grpo import write_tiny_checkpoint
    return write_tiny_checkpoint(tmp_path_factory.mktemp("grpo"), smollm2_dir)


def grpo_argv(ckpt, out, *extra):
    return ["--ckpt_dir", str(ckpt), "--out_dir", str(out), "--steps", "1", "--prompts_per_step", "2",
            "--num_generations", "2", "--max_new_tokens", "2", "--eval_n", "1", "--threads", "1", *extra]


# -----------------------------------------------------------------------------
# Two runs on one folder


def test_a_second_run_on_a_held_folder_is_refused_naming_the_holder(assets, tmp_path):
    out, go, ready = tmp_path / "run", tmp_path / "go", tmp_path / "ready"
    args = flags(assets, out, "--mode", "full", "--max_steps", "6", "--ckpt_every", "3", "--eval_every", "100")
    first = start(tmp_path, *args, hostile="hold", env={"HOSTILE_GO": str(go)})
    second = start(tmp_path, *args, hostile="none", env={"HOSTILE_START": str(ready)})  # a plain run, once told
    lock = out / ".lock"
    while not (lock.is_file() and lock.read_text().strip() == str(first.pid)):  # the first holds the folder
        assert first.poll() is None, first.communicate()
        time.sleep(0.05)
    ready.touch()
    _, err = second.communicate(timeout=120)
    assert first.poll() is None  # still running: the second was refused while the first held the folder
    assert second.returncode == 1 and err.strip() == (f"error: --out_dir {out} is in use by another run (pid "
                                                      f"{first.pid}); wait for it to end, or choose another --out_dir")
    go.touch()
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [0, 1, 2, 3, 3, 4, 5, 6, 6]
    assert torch.load(out / "ckpt.pt", weights_only=True)["meta"]["step"] == 6
    assert not list(out.glob("*.tmp"))
    # the lock ended with the process: the same command now runs (into a finished run's folder: --resume)
    ft.main([*args, "--resume"])


def test_grpo_refuses_a_folder_another_process_holds(grpo_ckpt, tmp_path):
    """The lock is an OS lock: a second open of the lock file, here in this process, holds it as well."""
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write(f"{os.getpid()}\n")
        held.flush()
        one_line_error(grpo.main, grpo_argv(grpo_ckpt, out),
                       f"is in use by another run (pid {os.getpid()})", tmp_path, tmp_path / "nothing")
        one_line_error(ft.main, ["--ckpt_dir", str(grpo_ckpt), "--data", str(grpo_ckpt / "config.json"),
                                 "--out_dir", str(out)], f"(pid {os.getpid()})", tmp_path, tmp_path / "nothing")


# -----------------------------------------------------------------------------
# Files that must not be copied into the run's folder


@pytest.mark.parametrize("name, kind", [("merges.txt", "link_out"), ("tokenizer.json", "link_out"),
                                        ("generation_config.json", "link_out"), ("tokenizer_config.json", "fifo"),
                                        ("special_tokens_map.json", "folder")])
def test_checkpoint_files_that_are_not_regular_files_inside_it_are_refused(assets, tmp_path, name, kind):
    """A cloned model repo can carry a link to any file (a secret): the export would publish it. A FIFO would hang
    the copy. Both scripts refuse before any work, naming the file; no folder is created."""
    ckpt = copy_checkpoint(assets, tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("password\n")
    (ckpt / name).unlink(missing_ok=True)
    if kind == "link_out":
        (ckpt / name).symlink_to(secret)
    elif kind == "fifo":
        os.mkfifo(ckpt / name)
    else:
        (ckpt / name).mkdir()
    words = f"{ckpt / name} is a link to {secret}, not" if kind == "link_out" else f"{ckpt / name} is not"
    one_line_error(ft.main, flags(assets, tmp_path / "run", "--ckpt_dir", str(ckpt)), words, tmp_path,
                   tmp_path / "nothing")
    if name != "tokenizer.json":  # (grpo needs a chat tokenizer: the tiny one has no <|im_end|>)
        one_line_error(grpo.main, grpo_argv(ckpt, tmp_path / "run"), words, tmp_path, tmp_path / "nothing")
    assert not (tmp_path / "run").exists()


def test_a_tokenizer_named_directly_that_links_out_is_refused(assets, tmp_path):
    secret, link = tmp_path / "secret.json", tmp_path / "tok" / "mine.json"
    shutil.copy(assets / "base" / "tokenizer.json", secret)  # a tokenizer, even: its place is the point
    link.parent.mkdir()
    link.symlink_to(secret)
    one_line_error(ft.main, flags(assets, tmp_path / "run", "--tokenizer", str(link)), f"{link} is a link to {secret}",
                   tmp_path, tmp_path / "nothing")
    assert not (tmp_path / "run").exists()


def test_links_that_stay_inside_the_checkpoint_are_copied_as_files(assets, tmp_path):
    """A link to a file in the same folder, and HF's cache layout (snapshots/REV/NAME -> ../../blobs/HASH): the
    export holds the files themselves."""
    repo = tmp_path / "models--tiny"
    snapshot_dir = repo / "snapshots" / "abc123"
    shutil.copytree(assets / "base", snapshot_dir)
    (repo / "blobs").mkdir()
    shutil.move(snapshot_dir / "tokenizer.json", repo / "blobs" / "f00d")
    (snapshot_dir / "tokenizer.json").symlink_to(Path("..", "..", "blobs", "f00d"))
    (snapshot_dir / "generation_config.json").write_text('{"eos_token_id": 0}')
    (snapshot_dir / "special_tokens_map.json").symlink_to("generation_config.json")  # inside the folder
    out = tmp_path / "run"
    ft.main(flags(assets, out, "--ckpt_dir", str(snapshot_dir), "--max_steps", "1"))
    for name in ("tokenizer.json", "special_tokens_map.json", "generation_config.json"):
        assert (out / name).is_file() and not (out / name).is_symlink()
    assert (out / "tokenizer.json").read_bytes() == (repo / "blobs" / "f00d").read_bytes()


# -----------------------------------------------------------------------------
# --overwrite


def test_overwrite_refuses_a_folder_no_run_of_the_script_wrote(assets, grpo_ckpt, tmp_path):
    """A user's own config.json and metrics.jsonl (no marker), or a grpo.py run given to finetune.py: refused, and
    nothing is created in the folder either."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "settings"}\n')
    (mine / "metrics.jsonl").write_text('{"step": 1, "accuracy": 0.9}\n')
    for main, argv in ((ft.main, flags(assets, mine)), (grpo.main, grpo_argv(grpo_ckpt, mine))):
        script = "finetune.py" if main is ft.main else "grpo.py"
        one_line_error(main, argv + ["--overwrite"], f"--overwrite replaces only an earlier {script} run",
                       tmp_path, tmp_path / "nothing")
    assert sorted(p.name for p in mine.iterdir()) == ["config.json", "metrics.jsonl"]
    theirs = tmp_path / "theirs"
    grpo.main(grpo_argv(grpo_ckpt, theirs, "--steps", "0"))  # an evaluation: metrics.jsonl and the marker
    for extra in (["--overwrite"], ["--resume"]):
        one_line_error(ft.main, flags(assets, theirs) + extra, "holds a grpo.py run, which finetune.py does not",
                       tmp_path, tmp_path / "nothing")


def test_overwrite_replaces_only_what_the_script_writes(assets, tmp_path):
    """An earlier finetune.py run, plus a user's notes: --overwrite replaces the run, removes the tokenizer file the
    earlier export wrote and this one does not, and leaves the user's files alone."""
    first = copy_checkpoint(assets, tmp_path, "first")
    (first / "special_tokens_map.json").write_text("{}")
    out = tmp_path / "run"
    ft.main(flags(assets, out, "--ckpt_dir", str(first), "--max_steps", "1"))
    assert (out / "special_tokens_map.json").is_file()
    (out / "notes.txt").write_text("lr 2e-4 was too high\n")
    (out / "vocab.json").write_text('{"mine": 1}')  # a name the export writes, but this run's export did not
    saved = snapshot(tmp_path, out)
    ft.main(flags(assets, out, "--ckpt_dir", str(assets / "base"), "--max_steps", "2", "--overwrite"))
    assert snapshot(tmp_path, out) == saved
    assert (out / "notes.txt").read_text() == "lr 2e-4 was too high\n" and (out / "vocab.json").is_file()
    assert not (out / "special_tokens_map.json").exists() and len(losses(out)) == 2
    assert json.loads((out / ".run.json").read_text())["script"] == "finetune.py"


# -----------------------------------------------------------------------------
# Output paths that cannot be written: refused before the model loads


@pytest.fixture
def read_only(tmp_path):
    """-> make(path): path becomes a folder nobody can write into (chmod; as root, chattr +i), undone afterwards."""
    made = []

    def make(path: Path) -> Path:
        path.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)]).returncode:
                pytest.skip("running as root without chattr +i: no way to make a folder read-only here")
        else:
            path.chmod(0o555)
        made.append(path)
        try:
            (path / "probe").touch()
            pytest.skip("this file system lets a read-only folder be written")
        except OSError:
            return path

    yield make
    for path in made:
        subprocess.run(["chattr", "-i", str(path)]) if os.geteuid() == 0 else path.chmod(0o755)


@pytest.mark.parametrize("script", ["finetune", "grpo"])
@pytest.mark.parametrize("case", ["read_only", "inside_read_only", "a_file", "under_a_file", "ckpt_is_a_folder",
                                  "metrics_is_a_link"])
def test_unwritable_out_dir_is_refused_before_the_model_loads(assets, grpo_ckpt, tmp_path, read_only, monkeypatch,
                                                              script, case):
    def never(*args, **kw):
        raise AssertionError("the model loaded before the output folder was checked")
    monkeypatch.setattr(ft, "open_model", never)
    monkeypatch.setattr(grpo, "open_model", never)
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "outside.jsonl").write_text("mine\n")
    out, extra, words = {
        "read_only": (tmp_path / "ro", [], "cannot write in --out_dir"),
        "inside_read_only": (tmp_path / "ro" / "run", [], "cannot write in --out_dir"),
        "a_file": (tmp_path / "a_file", [], "is a file; give a folder"),
        "under_a_file": (tmp_path / "a_file" / "run", [], "cannot write in --out_dir"),
        "ckpt_is_a_folder": (tmp_path / "run", ["--overwrite"], "holds ckpt.pt, which is not a regular file"),
        "metrics_is_a_link": (tmp_path / "run", ["--overwrite"], "holds metrics.jsonl, which is not a regular file"),
    }[case]
    if case in ("read_only", "inside_read_only"):
        read_only(tmp_path / "ro")
    if case in ("ckpt_is_a_folder", "metrics_is_a_link"):  # an earlier run's folder, with a trap in it
        out.mkdir()
        (out / ".run.json").write_text(json.dumps({"script": f"{script}.py", "files": []}))
        (out / "ckpt.pt").mkdir() if case == "ckpt_is_a_folder" else (out / "metrics.jsonl").symlink_to(
            tmp_path / "outside.jsonl")
    argv = flags(assets, out) if script == "finetune" else grpo_argv(grpo_ckpt, out)
    one_line_error(ft.main if script == "finetune" else grpo.main, argv + extra, words, tmp_path,
                   tmp_path / "nothing")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT])
def test_a_failed_save_names_its_cause(assets, tmp_path, monkeypatch, code):
    """The second checkpoint's write fails with errno `code` inside torch.save's writer (which reports it as
    "unexpected pos"): the line names the cause, and the first checkpoint is intact."""
    real_save, calls = torch.save, []

    class Failing:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(code, os.strerror(code))

    def save(obj, f, *args, **kw):
        calls.append(1)
        return real_save(obj, Failing(f) if len(calls) == 2 else f, *args, **kw)
    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    message = one_line_error(ft.main, flags(assets, out, "--max_steps", "3", "--ckpt_every", "1"), "could not write",
                             tmp_path, out)
    assert f"ckpt.pt ({os.strerror(code)};" in message
    assert ("free disk space" in message) == (code in (errno.ENOSPC, errno.EDQUOT))
    monkeypatch.undo()
    assert torch.load(out / "ckpt.pt", weights_only=True)["meta"]["step"] == 1 and not list(out.glob("*.tmp"))


def test_a_file_size_limit_during_a_save_is_named(assets, tmp_path):
    """A real failed write: under `ulimit -f 64` (SIGXFSZ ignored, as a shell may) the checkpoint's write gets
    EFBIG: the line says so, and no partial ckpt.pt is left."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
    out = tmp_path / "run"
    p = start(tmp_path, *flags(assets, out, "--mode", "full", "--max_steps", "1"), preexec_fn=limit)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1 and "Traceback" not in err, err
    assert lines(err)[-1].startswith(f"error: could not write {out / 'ckpt.pt'} (File too large; raise the file "
                                     f"size limit (ulimit -f)"), err
    assert not (out / "ckpt.pt").exists() and not (out / "ckpt.pt.tmp").exists()


# -----------------------------------------------------------------------------
# Ctrl-C


def test_ctrl_c_in_training_names_the_checkpoint_and_the_exact_resume_command(assets, tmp_path):
    out = tmp_path / "run"
    args = flags(assets, out, "--mode", "lora", "--lora_rank", "4", "--lora_dropout", "0.2", "--lr", "1e-2",
                 "--max_steps", "30", "--ckpt_every", "5", "--eval_every", "1000")
    p = start(tmp_path, *args)
    while steps_logged(out) < 7:
        assert p.poll() is None, p.communicate()
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err, err
    said = [line for line in lines(err) if "interrupt" in line]
    step = torch.load(out / "ckpt.pt", weights_only=True)["meta"]["step"]
    assert len(said) == 1 and said[0].startswith(f"interrupted; the last checkpoint is {out / 'ckpt.pt'} (step "
                                                 f"{step}); continue with: python finetune.py ")
    assert step >= 5 and step % 5 == 0
    command = shlex.split(said[0].split("continue with: ")[1])
    assert command[-1] == "--resume"
    resumed = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, env=ENV, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    ft.main(flags(assets, tmp_path / "ref", *args[len(flags(assets, out)):]))  # the same run, uninterrupted
    assert losses(out) == losses(tmp_path / "ref") and len(losses(out)) == 30


def test_ctrl_c_during_a_save_keeps_the_previous_checkpoint(assets, tmp_path):
    """SIGINT inside torch.save's writer (which turns what a write raises into "unexpected pos"), or after the new
    file is written and before it replaces the old one: the step-5 checkpoint stays, whole, and is named."""
    runs = {where: start(tmp_path, *flags(assets, tmp_path / where, "--mode", "full", "--max_steps", "20",
                                          "--ckpt_every", "5", "--eval_every", "1000"), hostile=where)
            for where in ("sigint_writer", "sigint_rename")}  # the two processes at once
    for where, p in runs.items():
        out = tmp_path / where
        _, err = p.communicate(timeout=120)
        assert p.returncode == 130 and "Traceback" not in err, err
        said = [line for line in lines(err) if "interrupt" in line]
        assert len(said) == 1 and said[0].startswith(f"interrupted; the last checkpoint is {out / 'ckpt.pt'} (step 5)")
        assert torch.load(out / "ckpt.pt", weights_only=True)["meta"]["step"] == 5
        assert not list(out.glob("*.tmp")) and sorted(p.name for p in out.iterdir()) == [
            ".lock", ".run.json", "ckpt.pt", "metrics.jsonl"]


@pytest.mark.parametrize("at_step", [1, 2])
def test_ctrl_c_in_grpo_names_the_checkpoint(grpo_ckpt, tmp_path, monkeypatch, capsys, at_step):
    """A real SIGINT to this process during grpo's step at_step (each step is checkpointed): before the first
    checkpoint the line gives the command that starts again, after it the one that resumes."""
    sample_batch, calls = grpo.sample_batch, []

    def interrupted(*args, **kw):
        calls.append(1)
        if len(calls) == at_step:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the KeyboardInterrupt is raised here
        return sample_batch(*args, **kw)
    monkeypatch.setattr(grpo, "sample_batch", interrupted)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        grpo.main(grpo_argv(grpo_ckpt, out, "--steps", "3", "--ckpt_every", "1"))
    assert e.value.code == 130
    said = [line for line in lines(capsys.readouterr().err) if "interrupt" in line]
    command = (f"python grpo.py --ckpt_dir={grpo_ckpt} --out_dir={out} --eval_n=1 --steps=3 --prompts_per_step=2 "
               f"--num_generations=2 --max_new_tokens=2 --ckpt_every=1 --threads=1")
    if at_step == 1:
        assert said == [f"interrupted before the first checkpoint; start again with: {command} --overwrite"]
    else:
        assert said == [f"interrupted; the last checkpoint is {out / 'ckpt.pt'} (step 1); continue with: {command} "
                        f"--resume"]


# -----------------------------------------------------------------------------
# Malformed config.json: a seeded fuzz


BAD_VALUES = [0, -1, -64, 2.5, "64", "x", "", [], [2], {}, {"a": 1}, None, True, False, float("nan"), float("inf")]
# the instances a user met, each of its own class: a zero that divides, a number as a string, a fraction of a layer, an
# empty list where an id is read, a word where a number is, a document that is not an object, one nested too deep
NAMED = [{"num_attention_heads": 0}, {"hidden_size": "64"}, {"num_hidden_layers": 2.5}, {"eos_token_id": []},
         {"rms_norm_eps": "x"}, {"rope_theta": float("nan")}, "[1, 2, 3]", "null", "[" * 200_000 + "]" * 200_000]


def fuzzed(config: dict, rng: random.Random) -> str:
    """config.json's text after one random kind of damage: values of the wrong type or range, keys dropped, a
    nesting too deep to parse, a document that is not an object, or broken JSON. Never a huge size: what a config
    may ask of memory is the model files' check."""
    kind = rng.choice(["values"] * 6 + ["drop", "drop", "nest", "document", "broken"])
    config = dict(config)
    keys = sorted(config)
    if kind == "values":
        for key in rng.sample(keys, rng.randint(1, 3)):
            config[key] = rng.choice(BAD_VALUES)
    elif kind == "drop":
        for key in rng.sample(keys, rng.randint(1, 3)):
            del config[key]
    elif kind == "nest":
        config[rng.choice(keys)] = "NEST"
        return json.dumps(config).replace('"NEST"', "[" * 200_000 + "]" * 200_000)
    elif kind == "document":
        return rng.choice(["[1, 2, 3]", "null", '"config"', "42", "{}", "[" * 200_000 + "]" * 200_000])
    else:
        text = json.dumps(config)
        return rng.choice([text[:rng.randint(0, len(text) - 1)], text.replace(":", "=", 1), "\ufeff" + text[5:]])
    return json.dumps(config)


def run_or_one_line(main, argv, root: Path, out: Path):
    """main(argv) either works or ends in one line `error: ...`; never another exception (a traceback)."""
    before = snapshot(root, out)
    try:
        main(argv)
    except SystemExit as e:
        assert isinstance(e.code, str) and e.code.startswith("error: ") and "\n" not in e.code, e.code
    assert snapshot(root, out) == before


def damaged(config: dict, n: int, seed: int) -> list[str]:
    """The NAMED damage, then n seeded random ones."""
    rng = random.Random(seed)
    named = [case if isinstance(case, str) else json.dumps({**config, **case}) for case in NAMED]
    return named + [fuzzed(config, rng) for _ in range(n)]


def test_fuzzed_configs_in_finetune(assets, tmp_path):
    ckpt = copy_checkpoint(assets, tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    for i, text in enumerate(damaged(config, 32, seed=24)):
        (ckpt / "config.json").write_text(text)
        out = tmp_path / f"run{i}"
        run_or_one_line(ft.main, flags(assets, out, "--ckpt_dir", str(ckpt), "--max_steps", "1"), tmp_path, out)
    # from scratch, a damaged --preset config.json
    for i, text in enumerate(damaged(config, 8, seed=124)):
        (tmp_path / "preset.json").write_text(text)
        out = tmp_path / f"scratch{i}"
        argv = flags(assets, out, "--max_steps", "1")
        argv[argv.index("--ckpt_dir"):argv.index("--ckpt_dir") + 2] = ["--preset", str(tmp_path / "preset.json"),
                                                                       "--tokenizer", str(assets / "base")]
        run_or_one_line(ft.main, argv, tmp_path, out)


def test_fuzzed_configs_in_grpo(grpo_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(grpo_ckpt, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    for i, text in enumerate(damaged(config, 12, seed=25)):
        (ckpt / "config.json").write_text(text)
        out = tmp_path / f"run{i}"
        run_or_one_line(grpo.main, grpo_argv(ckpt, out, "--steps", "0"), tmp_path, out)


@pytest.mark.parametrize("script, config", [("finetune.py", "DEEP"), ("grpo.py", {"num_attention_heads": 0})])
def test_a_malformed_config_is_one_line_on_stderr(assets, grpo_ckpt, tmp_path, script, config):
    """The same as a user sees it: the script's process prints one line and exits 1, no traceback."""
    ckpt = copy_checkpoint(assets, tmp_path) if script == "finetune.py" else shutil.copytree(grpo_ckpt,
                                                                                            tmp_path / "ckpt")
    text = "[" * 200_000 + "]" * 200_000 if config == "DEEP" else json.dumps(
        {**json.loads((ckpt / "config.json").read_text()), **config})
    (ckpt / "config.json").write_text(text)
    out = tmp_path / "run"
    argv = flags(assets, out, "--ckpt_dir", ckpt) if script == "finetune.py" else grpo_argv(ckpt, out)
    p = subprocess.run([sys.executable, script, *map(str, argv)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and p.stderr.startswith("error: "), p.stderr
    assert str(ckpt / "config.json") in p.stderr
