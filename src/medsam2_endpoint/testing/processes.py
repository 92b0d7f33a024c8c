"""Server processes started by tests and benchmarks: wait until one answers, stop its process group.

Used by tests/local_server.py (azmlinfsrv), testing/faults.py (the samapi server), tests/orthanc.py (Orthanc) and
benchmarks/interactions.py (the interactive server)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable

import requests


def answers(url: str, **kwargs: object) -> bool:
    """Whether GET `url` answers 200 now (a refused or timed-out connection is a no)."""
    try:
        return requests.get(url, timeout=2, **kwargs).status_code == 200  # type: ignore[arg-type]
    except requests.RequestException:
        return False


def wait_ready(proc: subprocess.Popen[bytes], ready: Callable[[], bool], *, what: str, log: Callable[[], str],
               timeout_s: float, interval_s: float = 0.5) -> None:
    """Poll `ready()` until it holds; RuntimeError with the log's tail when the process exits first or
    `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited early:\n{log()[-3000:]}")
        if ready():
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout_s:.0f} s:\n{log()[-3000:]}")
        time.sleep(interval_s)


def stop_group(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """SIGTERM to the process group (started with start_new_session), SIGKILL if it has not exited in time."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout_s)
    except ProcessLookupError:  # already gone (a test stopped it itself)
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout_s)
