"""Uploaded video frames (samapi `upload/`) under a private temporary root, one folder per `dirname`."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

from medsam2_endpoint.base.errors import InvalidRequest, PayloadTooLarge

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


class UploadStore:
    """Uploaded video frames under a private temporary root (mode 0700), one folder per `dirname`.

    Names are checked, never joined blindly: a dirname must be one plain name; a filename is reduced
    to its last path component (as browsers send it), then must be one plain name too.
    """

    def __init__(self, max_bytes: int, max_files: int) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="medsam2-samapi-uploads-")).resolve()
        self.max_bytes = max_bytes
        self.max_files = max_files

    def folder(self, dirname: str) -> Path:
        if not _SAFE_NAME.match(dirname or ""):
            raise InvalidRequest(f"dirname: {dirname!r} is not allowed; use one name of letters, digits, '.', '_' or '-'")
        path = (self.root / dirname).resolve()
        if path.parent != self.root:  # belt and braces: the pattern already excludes separators and ".."
            raise InvalidRequest(f"dirname: {dirname!r} is not allowed")
        return path

    def save(self, dirname: str, filename: str, stream: BinaryIO) -> str:
        name = re.split(r"[\\/]", filename or "")[-1]
        if not _SAFE_NAME.match(name):
            raise InvalidRequest(f"file: the file name {filename!r} is not allowed; use letters, digits, '.', '_' or '-'")
        folder = self.folder(dirname)
        folder.mkdir(exist_ok=True)
        if len(list(folder.iterdir())) >= self.max_files and not (folder / name).exists():
            raise PayloadTooLarge(f"file: {dirname!r} already holds {self.max_files} frames (MEDSAM2_SAMAPI_MAX_FRAMES)")
        size = 0
        with open(folder / name, "wb") as out:
            while chunk := stream.read(1 << 20):
                size += len(chunk)
                if size > self.max_bytes:
                    out.close()
                    (folder / name).unlink(missing_ok=True)
                    raise PayloadTooLarge(f"file: {name} exceeds {self.max_bytes} bytes (MEDSAM2_SAMAPI_MAX_UPLOAD_MB)")
                out.write(chunk)
        return name

    def frames(self, dirname: str) -> list[Path]:
        folder = self.folder(dirname)
        files = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
        if not files:
            raise InvalidRequest(f"dirname: nothing was uploaded under {dirname!r}; POST the frames to upload/ first")
        natural = lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]  # noqa: E731
        return sorted(files, key=natural)

    def remove(self, dirname: str) -> None:
        shutil.rmtree(self.folder(dirname), ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
