"""Back-pressure: inference on a model runs under that model's semaphore; a request that cannot get a slot
within a short wait is refused (Busy, answered 503 with Retry-After) instead of queueing without bound."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from medsam2_endpoint.base.errors import Busy


class InferenceSlots:
    def __init__(self, slots: int, wait_s: float, retry_after_s: float) -> None:
        self.slots = max(1, slots)
        self.wait_s = wait_s
        self.retry_after_s = retry_after_s
        self._semaphores: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()

    def _semaphore(self, model: str) -> threading.BoundedSemaphore:
        with self._lock:
            if model not in self._semaphores:
                self._semaphores[model] = threading.BoundedSemaphore(self.slots)
            return self._semaphores[model]

    @contextmanager
    def hold(self, model: str) -> Iterator[None]:
        semaphore = self._semaphore(model)
        if not semaphore.acquire(timeout=self.wait_s):
            retry = max(1, math.ceil(self.retry_after_s))
            raise Busy(
                f"model {model} is busy ({self.slots} request(s) running, none finished within {self.wait_s:g} s); retry in {retry} s",
                detail={"retry_after_s": retry},
            )
        try:
            yield
        finally:
            semaphore.release()
