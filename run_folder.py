"""
What a training run (finetune.py, grpo.py) keeps in its --out_dir, and how it writes there safely.

- The folder is checked before any work starts (not a file, not one of the run's inputs, writable) and held with an
  OS lock (flock on out_dir/.lock) for the run's whole life: a second run into it is refused at once, naming the
  process that holds it. A marker (out_dir/.run.json) says which script's run the folder holds and what its export
  wrote, so --overwrite replaces an earlier run of the same script only, never a folder of someone's own files.
- Every file is written under a temporary name and renamed into place (`save_atomic`): a kill, a full disk or Ctrl-C
  during a save leaves the previous file whole, and a failed write names its cause (the errno).
- ckpt.pt holds what an exact resume needs (trainable weights, optimizer, scheduler, RNG states, the data position
  and the flags), read with torch.load(weights_only=True), so a crafted file cannot run code.
- metrics.jsonl holds one JSON record per step; Ctrl-C prints the last checkpoint and the command that resumes it.
"""

import contextlib
import errno
import fcntl
import functools
import json
import math
import os
import re
import shlex
import shutil
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

# transformers 5 writes the chat template to chat_template.jinja instead of inside tokenizer_config.json
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "tokenizer.model",
                   "special_tokens_map.json", "vocab.json", "merges.txt")
LOCK, MARKER = ".lock", ".run.json"  # the lock file holds the pid of the run that holds the folder
# what to do about a failed write, by its errno (torch.save and safetensors report them wrapped)
WRITE_FIXES = {errno.ENOSPC: "free disk space", errno.EDQUOT: "free disk space (a quota is full)",
               errno.EFBIG: "raise the file size limit (ulimit -f) or free disk space",
               errno.EROFS: "the file system is read-only: remount it writable or choose another --out_dir",
               errno.EACCES: "make the folder writable", errno.EPERM: "make the folder writable"}


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


# -----------------------------------------------------------------------------
# The folder: checked, held, marked


def read_marker(out: Path) -> dict:
    """{"script": the script whose run the folder holds, "files": what its export wrote}; {} for no run's folder."""
    with contextlib.suppress(OSError, ValueError, RecursionError):
        marker = json.loads((out / MARKER).read_text())
        if isinstance(marker, dict) and isinstance(marker.get("files"), list):
            return marker
    return {}


def lock(out: Path):
    """An exclusive flock on out/.lock, released when the file is closed (or the process ends, however)."""
    f = open(out / LOCK, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = ""
        for _ in range(20):  # the holder writes its pid right after taking the lock
            f.seek(0)
            pid = f.read(20).strip()
            if pid:
                break
            time.sleep(0.05)
        f.close()
        raise SystemExit(f"error: --out_dir {out} is in use by another run (pid {pid or 'unknown'}); wait for it to "
                         f"end, or choose another --out_dir") from None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


class RunFolder:
    """`with RunFolder(...) as folder:` around a whole run. On entry: cfg.out_dir must not be (or hold) one of the
    run's inputs, which the export would overwrite; a new run needs it empty, or --overwrite and an earlier run of
    this same script there (its marker); what the run writes (outputs) must be regular files or absent; the folder
    must be writable; then it is locked (under torchrun by rank 0, the one process that writes). On Ctrl-C: one line
    naming the last checkpoint (`folder.saved(path, step)` records it) and the command that resumes from it, exit
    status 130. Out of memory: one line naming memory_fix."""

    def __init__(self, cfg, script: str, inputs: list[str], outputs: tuple[str, ...], memory_fix: str,
                 master: bool = True):
        self.cfg, self.script, self.master, self.out = cfg, script, master, Path(cfg.out_dir)
        self.inputs, self.outputs, self.memory_fix = [p for p in inputs if p], outputs, memory_fix
        self.held, self.bar = None, None
        self.checkpoint, self.checkpoint_step = None, 0  # the last checkpoint saved (or resumed from)

    def __enter__(self):
        out, cfg, script = self.out, self.cfg, self.script
        if out.exists() and not out.is_dir():
            raise SystemExit(f"error: --out_dir {out} is a file; give a folder")
        for path in self.inputs:
            p = Path(path).resolve()
            if p == out.resolve() or out.resolve() in p.parents:
                raise SystemExit(f"error: --out_dir {out} holds the input {path}, which this run's files would "
                                 f"overwrite; choose another --out_dir")
        # what the run writes must be a regular file or nothing: never a link out of the folder, a FIFO, a folder
        ours = {LOCK, MARKER, *self.outputs, *(name + ".tmp" for name in (MARKER, *self.outputs))}
        odd = [p.name for p in out.iterdir() if p.name in ours and (p.is_symlink() or not p.is_file())] \
            if out.is_dir() else []
        if odd:
            raise SystemExit(f"error: --out_dir {out} holds {odd[0]}, which is not a regular file, where this run "
                             f"writes one; remove it or choose another --out_dir")
        self.held = lock(out) if self.master and (out / LOCK).is_file() else None  # a live run there: refused first
        try:
            marker = read_marker(out)
            files = sorted(p.name for p in out.iterdir() if p.name not in (LOCK, MARKER)) if out.is_dir() else []
            if marker and marker.get("script") != script and (cfg.resume or cfg.overwrite):
                raise SystemExit(f"error: --out_dir {out} holds a {marker.get('script')} run, which {script} does "
                                 f"not continue or replace; choose another --out_dir")
            if cfg.resume and not (out / "ckpt.pt").is_file():
                raise SystemExit(f"error: --resume but no checkpoint at {out / 'ckpt.pt'}")
            if files and not cfg.resume and not cfg.overwrite:
                raise SystemExit(f"error: --out_dir {out} already holds files (another run?); pass --resume to "
                                 f"continue that run, --overwrite to replace it, or choose another --out_dir")
            if files and not cfg.resume and not marker:
                raise SystemExit(f"error: --overwrite replaces only an earlier {script} run, and --out_dir {out} "
                                 f"holds files no run wrote ({', '.join(files[:3])}); choose another --out_dir")
            if self.master:
                try:
                    out.mkdir(parents=True, exist_ok=True)
                    self.held = self.held or lock(out)
                    if not marker:
                        (out / MARKER).write_text(json.dumps({"script": script, "files": []}) + "\n")
                except OSError as e:  # a read-only mount, no permission, a file where a parent folder should be
                    raise SystemExit(f"error: cannot write in --out_dir {out} ({e.strerror}); choose another "
                                     f"--out_dir") from None
        except BaseException:
            self.release()
            raise
        return self

    def saved(self, path: str, step: int):
        self.checkpoint, self.checkpoint_step = path, step

    def progress(self, **kw) -> tqdm:
        """The run's progress bar, closed when the run ends however: a last line (an error) gets a line of its own."""
        self.bar = tqdm(**kw)
        return self.bar

    def release(self):
        if self.held:
            self.held.close()
            self.held = None

    def __exit__(self, kind, exc, tb):
        self.release()
        if self.bar is not None:
            self.bar.close()
        # CUDA's OutOfMemoryError is a RuntimeError; the CPU allocator raises a plain one
        if kind is not None and issubclass(kind, RuntimeError) and ("out of memory" in str(exc)
                                                                   or "can't allocate memory" in str(exc)):
            raise SystemExit(f"error: the run does not fit in memory ({one_line(exc)[:120]}); {self.memory_fix}") \
                from None
        if kind is KeyboardInterrupt:
            if self.master and self.checkpoint:
                tqdm.write(f"interrupted; the last checkpoint is {self.checkpoint} (step {self.checkpoint_step}); "
                           f"continue with: {self.command('--resume')}", file=sys.stderr)  # (below the progress bar)
            elif self.master:
                tqdm.write(f"interrupted before the first checkpoint; start again with: "
                           f"{self.command('--overwrite')}", file=sys.stderr)
            raise SystemExit(130) from None

    def command(self, flag: str) -> str:
        """This run's command: the flags that differ from their defaults, then flag (--resume or --overwrite)."""
        cfg, world = self.cfg, int(os.environ.get("WORLD_SIZE", 1))
        argv = [f"--{f.name}={getattr(cfg, f.name)}" for f in fields(cfg)
                if getattr(cfg, f.name) != f.default and f.name not in ("resume", "overwrite")]
        launch = ["torchrun", f"--nproc_per_node={world}"] if world > 1 else ["python"]
        return shlex.join([*launch, self.script, *argv, flag])

    def mark_written(self, written: list[str]):
        """Record what the run exported; remove what an earlier run of the script exported and this one did not
        (e.g. a tokenizer file of another layout, a generation config that is not this model's)."""
        for name in set(read_marker(self.out).get("files", [])) - set(written):
            if name in self.outputs:
                with contextlib.suppress(FileNotFoundError):
                    (self.out / name).unlink()
        marker = json.dumps({"script": self.script, "files": sorted(written)}) + "\n"
        save_atomic(str(self.out / MARKER), lambda tmp: Path(tmp).write_text(marker))


# -----------------------------------------------------------------------------
# Writing files


def save_atomic(path: str, write):
    """write(temporary path), then rename it over path, as a regular file (0644 under the usual umask). A failed
    write removes the temporary file and ends the run in one line naming its cause; Ctrl-C during it does the same
    and goes on as Ctrl-C. Either way the old file is untouched."""
    tmp = path + ".tmp"
    try:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)  # a link left there is replaced, never written through
        write(tmp)
        umask = os.umask(0)  # (reading the umask means setting it)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        cause = e
        while cause.__context__ is not None and not isinstance(cause, (OSError, KeyboardInterrupt)):
            cause = cause.__context__  # torch.save turns what its write raised into "unexpected pos"
        if isinstance(cause, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        if not isinstance(e, Exception):
            raise
        code = getattr(cause, "errno", None) or int((re.findall(r"os error (\d+)", str(e)) or [0])[0])
        reason = one_line(e)
        if code:
            reason = os.strerror(code) + (f"; {WRITE_FIXES[code]}" if code in WRITE_FIXES else "")
        raise SystemExit(f"error: could not write {path} ({reason}); the previous file, if any, is unchanged. "
                         f"--resume continues from the last checkpoint") from None


def export_sources(tokenizer_path: str, ckpt_dir: str = "") -> dict[str, Path]:
    """The files an export copies, name -> source: the TOKENIZER_FILES of the folder tokenizer_path, or of the
    folder of a file of one of those names; a renamed file alone, as tokenizer.json if .json, else as a
    tiktoken tokenizer.model; ckpt_dir's generation_config.json (end-of-turn ids, sampling defaults). Each must be a
    regular file that resolves inside its folder: a link out of a checkpoint (a cloned repo can carry one) would
    publish what it points to. HF's cache links snapshots/REV/NAME to ../../blobs/HASH: that blobs/ is inside."""
    src = Path(tokenizer_path)
    folder, layout = (src, True) if src.is_dir() else (src.parent, src.name in TOKENIZER_FILES)
    files = {n: folder / n for n in TOKENIZER_FILES if layout and (folder / n).exists()}
    if not layout:
        files["tokenizer.json" if src.suffix == ".json" else "tokenizer.model"] = src
    if ckpt_dir and Path(ckpt_dir, "generation_config.json").exists():
        files["generation_config.json"] = Path(ckpt_dir, "generation_config.json")
    for path in files.values():
        home = path.parent.resolve()
        homes = [home, home.parent.parent / "blobs"] if home.parent.name == "snapshots" else [home]
        real = path.resolve()
        if not real.is_file() or not any(real.is_relative_to(h) for h in homes):
            what = f"a link to {real}, not" if path.is_symlink() else "not"
            raise SystemExit(f"error: {path} is {what} a regular file inside {path.parent}, and the run copies "
                             f"only such files into --out_dir; replace it with the file itself")
    return files


def merge_lora_state_dict(state: dict, scale: float) -> dict:
    """Fold adapters into their weights: W + scale * B @ A, and drop lora_A/lora_B (the HF layout again)."""
    for key in [k for k in state if k.endswith(".lora_A")]:
        prefix = key[:-len("lora_A")]
        a, b = state.pop(key), state.pop(prefix + "lora_B")  # fp32 sum: a bf16 weight would round the update away
        state[prefix + "weight"] = state[prefix + "weight"].float() + scale * (b.float() @ a.float())
    return state


def export_hf(model, out_dir: str, hf_config: dict, tokenizer_path: str, lora_scale: float, save_dtype: str,
              ckpt_dir: str = "") -> list[str]:
    """model.safetensors (adapters merged, tied head dropped) + config.json + export_sources, HF layout; -> the
    names written."""
    import torch.distributed.checkpoint.state_dict as dcp
    from safetensors.torch import save_file
    state = dcp.get_model_state_dict(model, options=dcp.StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.is_initialized() and dist.get_rank() != 0:
        return []
    files = export_sources(tokenizer_path, ckpt_dir)
    state = merge_lora_state_dict(dict(state), lora_scale)
    if hf_config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # the same tensor as model.embed_tokens.weight
    dtype = getattr(torch, save_dtype)
    save_atomic(os.path.join(out_dir, "model.safetensors"),  # transformers requires the "format" metadata
                lambda tmp: save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, tmp,
                                      metadata={"format": "pt"}))
    config = json.dumps({**hf_config, "torch_dtype": save_dtype}, indent=2)
    save_atomic(os.path.join(out_dir, "config.json"), lambda tmp: Path(tmp).write_text(config))
    for name, path in files.items():
        save_atomic(os.path.join(out_dir, name), functools.partial(shutil.copyfile, path))
    return ["model.safetensors", "config.json", *files]


class MetricsLog:
    """metrics.jsonl, one JSON record per line. A resumed run keeps the records up to its checkpoint's step (the
    later ones are redone); a run that replaces another (--overwrite) starts empty. Either way the file already
    there stays whole until this run saves a checkpoint (`commit`): until then records go to metrics.jsonl.tmp."""

    def __init__(self, path: str, keep_until: int | None = None, enabled: bool = True):
        self.path, self.enabled = path, enabled
        self.staged = os.path.exists(path)
        self.file = path + ".tmp" if self.staged else path
        if not enabled:
            return
        old = []
        if keep_until is not None and self.staged:  # a killed run can leave a half-written last line: skipped
            with open(path) as f:
                for n, line in enumerate(f, 1):
                    try:
                        old += [json.loads(line)] if line.endswith("\n") else []
                    except (json.JSONDecodeError, RecursionError):
                        raise SystemExit(f"error: {path}:{n} is not valid JSON; repair or delete that line") from None
        self.append([r for r in old if isinstance(r, dict) and r.get("step", math.inf) <= keep_until], mode="w")

    def append(self, records: list[dict], mode: str = "a"):
        try:
            with open(self.file, mode) as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
        except OSError as e:
            fix = f"; {WRITE_FIXES[e.errno]}" if e.errno in WRITE_FIXES else ""
            raise SystemExit(f"error: could not write {self.file} ({e.strerror}{fix}); run again with --resume once "
                             f"it can be written") from None

    def write(self, record: dict):
        if self.enabled:
            self.append([record])

    def commit(self):
        if self.enabled and self.staged:
            os.replace(self.file, self.path)
            self.file, self.staged = self.path, False


def plot(metrics_path: str, png_path: str, series: dict[str, str]) -> bool:
    """png_path from metrics.jsonl, series: record key -> line style; -> whether it was written (matplotlib is
    optional, and a plot that cannot be written does not fail a run whose model is saved)."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = [json.loads(line) for line in open(metrics_path)]
    plt.figure(figsize=(7, 4))
    for key, style in series.items():
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            plt.plot(*zip(*points), style, label=key)
    plt.xlabel("step"), plt.legend(), plt.grid(alpha=0.3)
    try:
        plt.savefig(png_path, dpi=120, bbox_inches="tight")
        return True
    except OSError as e:
        print(f"warning: could not write {png_path} ({e}); the curves are in {metrics_path}", file=sys.stderr)
        return False
    finally:
        plt.close()


# -----------------------------------------------------------------------------
# Checkpoints: full (unsharded) state dicts keyed by parameter name, so a plain, DDP or FSDP run writes the same
# file and a run can resume on another number of processes (DCP's state_dict helpers hide the wrappers)


def checkpoint_keys(model, everything: bool) -> set[str]:
    """Model entries a checkpoint needs: trainable parameters and persistent buffers (e.g. MoE router biases),
    or everything (from scratch: no pretrained checkpoint to rebuild the frozen rest from)."""
    param_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return {n for n, p in model.named_parameters() if p.requires_grad or everything} \
        | {n for n in model.state_dict() if n not in param_names}


def nonfinite_count(raw) -> int:
    """Non-finite values in the trainable weights, summed over processes (FSDP shards are DTensors): a run saves
    only weights without any."""
    bad = torch.tensor(sum(int((~torch.isfinite(p.to_local() if hasattr(p, "to_local") else p)).sum())
                           for p in raw.parameters() if p.requires_grad), device=next(raw.parameters()).device)
    if dist.is_initialized():
        dist.all_reduce(bad)
    return int(bad.item())


def save_checkpoint(path: str, model, optimizer, scheduler, keys: set[str], **meta):
    """Every process must call this (FSDP gathers shards); rank 0 writes model[keys], optimizer, scheduler,
    every process's RNG state and `meta` (step, data position, config...)."""
    import torch.distributed.checkpoint.state_dict as dcp  # here, not at the top: 0.8 s that --help need not wait
    opts = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = {k: v for k, v in dcp.get_model_state_dict(model, options=opts).items() if k in keys}
    optim_state = dcp.get_optimizer_state_dict(model, optimizer, options=opts)
    # torch's generators drive LoRA dropout (and any dropout of a model file); the data order needs none
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    rngs = [None] * dist.get_world_size() if dist.is_initialized() else [rng]
    if dist.is_initialized():
        dist.all_gather_object(rngs, rng)  # each process has its own dropout stream
    if not dist.is_initialized() or dist.get_rank() == 0:
        def write(tmp):
            with open(tmp, "wb") as f:
                torch.save({"model": model_state, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                            "rng": rngs, "meta": meta}, f)
                f.flush()
                os.fsync(f.fileno())
        save_atomic(path, write)
    if dist.is_initialized():
        dist.barrier()


def load_checkpoint(path: str, model, optimizer, scheduler, keys: set[str], config: dict,
                    may_change: set[str]) -> dict:
    """Restore what save_checkpoint wrote, RNG included; -> its meta dict. A resume continues the same run: refused
    if a flag outside may_change differs from the checkpoint's (its data position would index other rows, and the
    saved optimizer and schedule would ignore a new --lr)."""
    import torch.distributed.checkpoint.state_dict as dcp
    try:  # weights_only: a full unpickler would call whatever the file names (e.g. os.system)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a refused pickle, a truncated zip, ...: torch raises several kinds
        raise SystemExit(f"error: {path} is not a checkpoint this script wrote ({type(e).__name__}: "
                         f"{one_line(e)})") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "scheduler", "rng", "meta"} <= set(state) \
            or not isinstance(state["meta"], dict):
        raise SystemExit(f"error: {path} is not a checkpoint this script wrote (missing entries)")
    saved = state["meta"].get("config", {})
    changed = [k for k in config if k not in may_change and k in saved and saved[k] != config[k]]
    if changed:
        k = changed[0]
        raise SystemExit(f"error: --resume with --{k} {config[k]!r}, but {path} was saved with {saved[k]!r}; resume "
                         f"with the same flags, or start a new run in another --out_dir")
    if set(state["model"]) != keys:  # e.g. a LoRA checkpoint given to a full run
        raise SystemExit(f"error: {path} was saved with another model or --mode; resume with the same flags")
    opts = dcp.StateDictOptions(full_state_dict=True, strict=False)  # strictness: the key check above
    try:
        dcp.set_model_state_dict(model, state["model"], options=opts)
        dcp.set_optimizer_state_dict(model, optimizer, state["optimizer"], options=opts)
    except (RuntimeError, KeyError, ValueError) as e:  # e.g. another model size under the same names
        raise SystemExit(f"error: {path} does not fit this model ({one_line(e)}); resume with the same flags") \
            from None
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"][(dist.get_rank() if dist.is_initialized() else 0) % len(state["rng"])]
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state["meta"]
