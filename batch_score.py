"""Azure ML batch entry script: init() once, then run(mini_batch) per mini-batch of file paths.

The logic (sidecar prompts, one row per file) is in `medsam2_endpoint.api.batch`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from medsam2_endpoint.api.batch import BatchApp  # noqa: E402

app = BatchApp()


def init() -> None:
    app.init(sys.argv[1:])


def run(mini_batch: list[str]) -> list[str]:
    return app.run(mini_batch)
