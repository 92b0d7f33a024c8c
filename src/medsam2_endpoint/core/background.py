"""Slices encoded in the background after a 3D Slicer `set_image`, so that the first box walks over cached features.

One worker per process, the latest image wins: a new run cancels the one before. A run encodes the volume's
axial slices one at a time, the middle slice first and then outwards (`middle_out`: the first box usually comes
near the middle, and a walk goes both ways from it, so a run the cache cuts short has cached the likeliest
slices), into the engine's shared per-slice feature cache under the volume's content key (core/volumes.volume_key):
the session's walks read them, and so does the JSON route on the same windowed voxels. Each slice takes an
inference slot only while no request holds or waits for one (InferenceSlots.spare), so a request arriving
meanwhile waits for that one slice at most (and is never refused as busy for it).

A run stops when every slice is cached; when the next one would evict a slice it cached (the cache is full of this
volume: it does not thrash); when `alive()` turns false (its session was released or reaped, or holds another
image); at the next run; or when the server stops (its budget is one of the Service's running budgets). Engines
without a per-slice cache (not an engines/base.SliceCachingEngine: MedSAM2) get no run. Its log says how far it
got, never anything of the volume.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from medsam2_endpoint.base.budget import Budget, RunningBudgets
from medsam2_endpoint.base.log import log
from medsam2_endpoint.core.slots import InferenceSlots
from medsam2_endpoint.engines.base import SliceCachingEngine, VolumeEngine

POLL_S = 0.05  # how often a run waiting for the requests to finish looks again, seconds
CLOSE_WAIT_S = 30.0  # how long a stopping server waits for the slice being encoded, seconds
DONE = "every slice cached"
FULL = "the feature cache holds no more of this volume's slices"
GONE = "the session ended or holds another image"


def middle_out(depth: int) -> list[int]:
    """Slice indices from the middle outwards, alternately above and below: 5 -> [2, 3, 1, 4, 0]."""
    middle = (depth - 1) // 2
    order = [middle]
    for step in range(1, depth):
        order += [z for z in (middle + step, middle - step) if 0 <= z < depth]
    return order


@dataclass
class EncodeRun:
    """One volume's background encoding: how far it got, and why it ended (`reason`, empty while it runs)."""

    model: str
    depth: int  # the volume's slices
    budget: Budget  # cancelled by the next run, the encoder's close, or the server stopping
    alive: Callable[[], bool]
    thread: threading.Thread | None = None
    cached: int = 0  # slices in the cache once this run came to them (computed, or found there)
    yielded: int = 0  # times it found a request holding or waiting for a slot, and waited
    reason: str = ""

    def cancel(self, reason: str) -> None:
        self.budget.cancel(reason)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the run to end: True once it has, False when `timeout` passed first."""
        if self.thread is not None:
            self.thread.join(timeout)
        return self.thread is None or not self.thread.is_alive()

    def stop_reason(self) -> str:
        """Why the run must stop now; empty when it may go on."""
        if self.budget.cancelled:
            return self.budget.reason
        return "" if self.alive() else GONE


class BackgroundEncoder:
    """The process's background encoder: `start` a run per new image (cancelling the one before), `close` at exit.

    enabled: MEDSAM2_NNINTERACTIVE_BACKGROUND_ENCODE; off, `start` only cancels the run before.
    running: the Service's running budgets, so a stopping server cancels the run with its requests.
    """

    def __init__(self, slots: InferenceSlots, running: RunningBudgets | None = None, *, enabled: bool = True,
                 poll_s: float = POLL_S) -> None:
        self.slots = slots
        self.running = running
        self.enabled = enabled
        self.poll_s = poll_s
        self._lock = threading.Lock()
        self._latest: EncodeRun | None = None
        self._closed = False

    @property
    def latest(self) -> EncodeRun | None:
        """The last run started (running or ended), or None when the last image got none."""
        with self._lock:
            return self._latest

    def start(self, model: str, engine: VolumeEngine, volume: np.ndarray, volume_key: str, *,
              alive: Callable[[], bool]) -> EncodeRun | None:
        """Cancel the run before; encode `volume` (uint8 (Z, Y, X), only read) under `volume_key` on `model`'s
        `engine` while `alive()`. The new run, or None: switched off, closed, or an engine without a per-slice cache."""
        run = EncodeRun(model, int(volume.shape[0]), Budget.unlimited(), alive)
        with self._lock:
            if self._latest is not None:
                self._latest.cancel("a new image")  # it stops before its next slice
            wanted = self.enabled and not self._closed and isinstance(engine, SliceCachingEngine)
            self._latest = run if wanted else None
            if wanted:
                if self.running is not None:
                    self.running.add(run.budget)
                run.thread = threading.Thread(target=self._encode, args=(run, engine, volume, volume_key),
                                              name="background-encoder", daemon=True)
                run.thread.start()
        return run if wanted else None

    def close(self, wait_s: float = CLOSE_WAIT_S) -> None:
        """No more runs; the current one stops after its slice, waited for up to `wait_s` (an engine still
        computing in a daemon thread when the interpreter exits can abort the process)."""
        with self._lock:
            self._closed = True
            run = self._latest
        if run is not None:
            run.cancel("the server is stopping")
            run.wait(wait_s)

    # ------------------------------------------------------------ the worker

    def _encode(self, run: EncodeRun, engine: SliceCachingEngine, volume: np.ndarray, volume_key: str) -> None:
        log.info("route=nninteractive background encoding started: %d slices, model %s", run.depth, run.model)
        try:
            run.reason = self._slices(run, engine, engine.start(volume, volume_key))
        except Exception:  # a bug or a broken engine: the next request meets it, the worker just ends
            run.reason = "failed"
            log.exception("route=nninteractive background encoding failed, model %s", run.model)
        log.info("route=nninteractive background encoding ended (%s): %d of %d slices cached, model %s",
                 run.reason, run.cached, run.depth, run.model)

    def _slices(self, run: EncodeRun, engine: SliceCachingEngine, state: Any) -> str:
        for z in middle_out(run.depth):
            kept = None
            while kept is None:
                reason = run.stop_reason()
                if reason:
                    return reason
                with self.slots.spare(run.model) as free:
                    kept = engine.cache_slice(state, z) if free else None
                if kept is None:
                    run.yielded += 1
                    time.sleep(self.poll_s)
            if not kept:
                return FULL
            run.cached += 1
        return DONE
