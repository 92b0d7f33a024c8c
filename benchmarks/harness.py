"""What the benchmark scripts share: paths, the argument parser, the served Service they measure, and the
markdown tables they print. Imports only the standard library, so a script can parse its arguments (and answer
`--help`) before it imports torch: each script parses first, then imports the package.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medsam2_endpoint.core.service import Service

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
SRC = REPO / "src"
TESTS = REPO / "tests"
#: An empty model folder: the Service serves the bundled LiteMedSAM only.
NO_MODELS = BENCHMARKS / "no-models"
#: Real CT/MR scans with labels, beside the main checkout (../shared/data/real); not in git. BENCHMARK_DATA
#: names it for a checkout elsewhere (a git worktree).
DATA = Path(os.environ.get("BENCHMARK_DATA", REPO.parent / "shared" / "data" / "real"))
#: Where scripts that record leave their files by default (git-ignored).
OUT = BENCHMARKS / "out"

# The working tree's sources win over an installed copy; the scripts import each other and the test helpers
# (tests/reference_pipeline.py, tests/local_server.py).
for _path in (SRC, BENCHMARKS, TESTS):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser whose --help prints the script's docstring as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def service(env: Mapping[str, str] | None = None, model_dir: str | Path | None = None) -> Service:
    """The Service the servers build (warm-up off unless `env` says otherwise), from `model_dir` (default: no
    checkpoints, LiteMedSAM only) and MEDSAM2_* settings in `env`."""
    from medsam2_endpoint.core.service import Service
    from medsam2_endpoint.core.settings import Settings

    settings = Settings.from_env({"MEDSAM2_WARMUP": "0", **(env or {})}, model_dir=str(model_dir or NO_MODELS))
    return Service.from_settings(settings)


def machine() -> str:
    """The line every result table starts with: cores and load (the figures depend on both)."""
    return f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}"


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A markdown table; floats as given (format them first when the digits matter)."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def header(columns: Sequence[str]) -> str:
    """A markdown table's first two lines, for scripts that print rows as they are measured."""
    return table(columns, [])


def random_checkpoint() -> Path:
    """The random-weight MedSAM2 checkpoint (released layout, as the tests' fixture) under OUT, made once."""
    checkpoint = OUT / "MedSAM2_latest.pt"
    if not checkpoint.exists():
        from reference_pipeline import make_random_checkpoint

        OUT.mkdir(parents=True, exist_ok=True)
        make_random_checkpoint(checkpoint, seed=0)
    return checkpoint
