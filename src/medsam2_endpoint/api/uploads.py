"""Uploaded video frames (samapi `upload/`) under a private temporary root, one folder per `dirname`.

Bounded: each file (`max_bytes`), each folder (`max_files`), and the whole store, in bytes and in files;
a folder nobody wrote to for `ttl_s` is removed (frames uploaded for a request that never came or was
refused do not stay until restart), and the video route removes its folder when its request ends or fails,
refused by the schema included (`discard`).
"""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from medsam2_endpoint.base.errors import InvalidRequest, PayloadTooLarge

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


@dataclass
class _Folder:
    files: dict[str, int]  # name -> bytes (reserved while it is written)
    touched: float  # last upload into it (store clock)


class UploadStore:
    """Uploaded video frames under a private temporary root (mode 0700), one folder per `dirname`.

    Names are checked, never joined blindly: a dirname must be one plain name; a filename is reduced
    to its last path component (as browsers send it), then must be one plain name too. The store's
    accounting (bytes and files per folder) is kept under one lock, so parallel uploads (QuPath sends
    the frames of a video at once) cannot overshoot the caps.
    """

    def __init__(self, max_bytes: int, max_files: int, *, store_bytes: int = 1 << 40, store_files: int = 1 << 20,
                 ttl_s: float = float("inf"), clock: Callable[[], float] = time.monotonic) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="medsam2-samapi-uploads-")).resolve()
        self.max_bytes, self.max_files = max_bytes, max_files
        self.store_bytes, self.store_files, self.ttl_s = store_bytes, store_files, ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._folders: dict[str, _Folder] = {}

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(sum(f.files.values()) for f in self._folders.values())

    @property
    def used_files(self) -> int:
        with self._lock:
            return sum(len(f.files) for f in self._folders.values())

    def folder(self, dirname: str) -> Path:
        if not _SAFE_NAME.match(dirname or ""):
            raise InvalidRequest(f"dirname: {dirname!r} is not allowed; use one name of letters, digits, '.', '_' or '-'")
        path = (self.root / dirname).resolve()
        if path.parent != self.root:  # belt and braces: the pattern already excludes separators and ".."
            raise InvalidRequest(f"dirname: {dirname!r} is not allowed")
        return path

    def _expire(self, now: float) -> None:
        """Remove folders idle for longer than ttl_s (called with the lock held)."""
        for dirname in [d for d, f in self._folders.items() if now - f.touched > self.ttl_s]:
            del self._folders[dirname]
            shutil.rmtree(self.root / dirname, ignore_errors=True)

    def _reserve(self, dirname: str, name: str) -> None:
        """Claim a file slot in the folder and the store, or refuse naming the cap."""
        with self._lock:
            now = self._clock()
            self._expire(now)
            entry = self._folders.setdefault(dirname, _Folder({}, now))
            entry.touched = now
            if name in entry.files:
                entry.files[name] = 0  # a re-upload replaces the file
                return
            if len(entry.files) >= self.max_files:
                raise PayloadTooLarge(f"file: {dirname!r} already holds {self.max_files} frames (MEDSAM2_SAMAPI_MAX_FRAMES)")
            if sum(len(f.files) for f in self._folders.values()) >= self.store_files:
                raise PayloadTooLarge(
                    f"file: the upload store holds {self.store_files} files (MEDSAM2_SAMAPI_UPLOAD_STORE_FILES); "
                    "send the video request for the frames already uploaded, or retry later")
            entry.files[name] = 0

    def _grow(self, dirname: str, name: str, size: int) -> None:
        """Account `size` bytes written so far to the file; refuse past the file's or the store's cap."""
        if size > self.max_bytes:
            raise PayloadTooLarge(f"file: {name} exceeds {self.max_bytes} bytes (MEDSAM2_SAMAPI_MAX_UPLOAD_MB)")
        with self._lock:
            entry = self._folders.get(dirname)
            if entry is None or name not in entry.files:
                raise InvalidRequest(f"dirname: {dirname!r} was removed while {name} was uploaded; upload the frames again")
            entry.files[name] = size
            used = sum(sum(f.files.values()) for f in self._folders.values())
            if used > self.store_bytes:
                raise PayloadTooLarge(
                    f"file: the upload store is full ({self.store_bytes} bytes, MEDSAM2_SAMAPI_UPLOAD_STORE_MB); "
                    "send the video request for the frames already uploaded, or retry later")

    def _release(self, dirname: str, name: str) -> None:
        with self._lock:
            entry = self._folders.get(dirname)
            if entry is not None:
                entry.files.pop(name, None)

    def save(self, dirname: str, filename: str, stream: BinaryIO) -> str:
        name = re.split(r"[\\/]", filename or "")[-1]
        if not _SAFE_NAME.match(name):
            raise InvalidRequest(f"file: the file name {filename!r} is not allowed; use letters, digits, '.', '_' or '-'")
        folder = self.folder(dirname)
        self._reserve(dirname, name)
        size = 0
        try:
            folder.mkdir(exist_ok=True)
            with open(folder / name, "wb") as out:
                while chunk := stream.read(1 << 20):
                    size += len(chunk)
                    self._grow(dirname, name, size)
                    out.write(chunk)
        except BaseException:
            (folder / name).unlink(missing_ok=True)
            self._release(dirname, name)
            raise
        return name

    def frames(self, dirname: str) -> list[Path]:
        folder = self.folder(dirname)
        files = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
        if not files:
            raise InvalidRequest(f"dirname: nothing was uploaded under {dirname!r}; POST the frames to upload/ first")
        natural = lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]  # noqa: E731
        return sorted(files, key=natural)

    def remove(self, dirname: str) -> None:
        path = self.folder(dirname)
        with self._lock:
            self._folders.pop(dirname, None)
            shutil.rmtree(path, ignore_errors=True)

    def discard(self, dirname: object) -> bool:
        """Remove the folder a refused request named, if the name is one (a video request the schema refused
        still ends its uploaded sequence, as one that failed later does); whether one was removed."""
        if not isinstance(dirname, str) or not _SAFE_NAME.match(dirname):
            return False
        with self._lock:
            known = self._folders.pop(dirname, None) is not None
        path = self.folder(dirname)
        existed = path.is_dir()
        shutil.rmtree(path, ignore_errors=True)
        return known or existed

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
