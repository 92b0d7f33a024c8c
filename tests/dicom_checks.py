"""David Clunie's `dciodvfy` on a DICOM file the suite wrote: every SEG written anywhere in the suite is checked
(a missing dciodvfy fails: `make test` installs it as root). Not a test module."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def iod_errors(path: Path) -> list[str]:
    """The `Error - ...` lines dciodvfy prints for `path` (IOD violations); warnings are not counted."""
    check = subprocess.run([shutil.which("dciodvfy") or "/usr/bin/dciodvfy", str(path)], capture_output=True, text=True,
                           timeout=60)
    return [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
