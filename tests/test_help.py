"""Every script a user can run answers --help with its usage and exit status 0, before it reads any checkpoint or
data: the first thing a new user types must work, for the benchmarks as for the model files."""

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def scripts() -> list[Path]:
    """The repository's files with a `__main__` block: top level and benchmarks/ (not the tests)."""
    found = [*ROOT.glob("*.py"), *ROOT.glob("benchmarks/*.py")]
    return sorted(p for p in found if 'if __name__ == "__main__"' in p.read_text(encoding="utf-8"))


def help_of(path: Path) -> tuple[str, int, str]:
    run = subprocess.run([sys.executable, str(path), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    return str(path.relative_to(ROOT)), run.returncode, (run.stderr.strip().splitlines() or [""])[-1]


def test_every_script_answers_help_with_exit_0():
    paths = scripts()
    assert len(paths) >= 20 and ROOT / "smollm2.py" in paths and ROOT / "benchmarks" / "bench_llamacpp.py" in paths
    with ThreadPoolExecutor(2) as pool:  # (each run is mostly `import torch`: two at a time on two cores)
        results = list(pool.map(help_of, paths))
    failed = [f"{name}: exit {code}, {last}" for name, code, last in results if code != 0]
    assert not failed, failed
