"""The benchmark scripts stay runnable: each imports (names it uses still exist in the package) and answers
`--help` at once, before torch is imported (benchmarks/harness.py: arguments first, then the heavy imports)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem != "harness")


def test_there_are_scripts_to_check() -> None:
    assert len(SCRIPTS) >= 10 and "box_decode" in SCRIPTS


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_benchmark_imports(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Importing runs no benchmark (the work is behind `__main__`) but binds every name the script imports
    from the package and from the other scripts: a renamed function fails here, not months later."""
    monkeypatch.setattr(sys, "path", [str(BENCHMARKS), *sys.path])  # harness adds its paths: undone after the test
    module = importlib.import_module(name)
    assert callable(module.main)
    assert module.arguments().format_help().startswith("usage:")


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_benchmark_answers_help_before_importing_torch(name: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(BENCHMARKS.parent / "src")}
    proc = subprocess.run([sys.executable, "-X", "importtime", str(BENCHMARKS / f"{name}.py"), "--help"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:"), proc.stdout[:500]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and "medsam2_endpoint" not in imported, f"{name} --help imported the package or torch"
