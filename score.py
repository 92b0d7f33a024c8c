"""Azure ML entry script (online endpoint): azmlinfsrv calls init() once per worker, then run() per request.

The logic is in `medsam2_endpoint.api` (azure.py, score_entry.py); this file stays where Azure expects it.
"""

import sys
from pathlib import Path

# On Azure the code folder is shipped as-is (not pip-installed): make the package importable.
sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from medsam2_endpoint.api.score_entry import app, init, run  # noqa: E402

__all__ = ["app", "init", "run"]
