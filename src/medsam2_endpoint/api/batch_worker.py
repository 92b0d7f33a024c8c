"""The batch endpoint's files scored in one child process, so a file that kills its process (out of memory,
a crash in native code, a SIGKILL) costs that file only: it gets an error row (`code: "worker_died"`) and a
new child, started for the next file, scores the rest of the mini-batch.

The child is spawned (not forked: the parent's torch threads and locks must not be copied), builds its own
Service from the same environment and keeps it between files; the parent holds no model.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from medsam2_endpoint.api.batch_files import FileScorer

_CHILD: FileScorer | None = None  # the child process's own scorer (module state of the child only)
DIED = ("the worker process died while scoring this file (killed, out of memory, or crashed); the other files "
        "are scored by a new worker. A file that needs more memory than the instance has: split it, or use a larger instance")


def _child_init(output_dir: str) -> None:
    global _CHILD
    _CHILD = FileScorer(Path(output_dir))


def _child_score(path: str) -> dict[str, Any]:
    assert _CHILD is not None  # the pool's initializer ran
    return _CHILD.score_one(Path(path))


class IsolatedScorer:
    """score(path) -> the file's row, computed in the child; a dead child becomes that file's error row."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        self._pool: ProcessPoolExecutor | None = None
        self.worker_pid: int | None = None
        self.current: str | None = None  # the file being scored now (for logs and the fault drill)

    def _start(self) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_child_init,
                                   initargs=(str(self.output_dir),))
        self.worker_pid = pool.submit(os.getpid).result()  # also waits for the child's init()
        self._pool = pool
        return pool

    def score(self, path: Path, empty_row: dict[str, Any]) -> dict[str, Any]:
        self.current = path.name
        try:
            pool = self._pool or self._start()
            return dict(pool.submit(_child_score, str(path)).result())
        except BrokenProcessPool:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool, self.worker_pid = None, None
            return {**empty_row, "status": "error", "error": f"{path.name}: {DIED}", "code": "worker_died"}
        finally:
            self.current = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
