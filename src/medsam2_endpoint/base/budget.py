"""A request's budget: one deadline and one cancel flag, checked by every loop that can run long.

Core makes one per request (its deadline from settings, capped by the platform's limit); the loops
below it (slices, grid batches, frames, fetch reads) call `check` between steps. Defined here, at the
bottom layer, because the pipeline and io layers check it and may not import core.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable

from medsam2_endpoint.base.errors import DeadlineExceeded


class Cancelled(DeadlineExceeded):
    """The client went away (or the server is stopping): the work stops, nobody waits for the answer."""

    code = "cancelled"


class Budget:
    def __init__(self, seconds: float | None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.deadline = None if seconds is None else clock() + seconds
        self.seconds = seconds
        self._cancel = threading.Event()
        self.reason = ""

    @classmethod
    def unlimited(cls) -> Budget:
        return cls(None)

    def cancel(self, reason: str = "the client went away") -> None:
        self.reason = self.reason or reason
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - self._clock()

    def expired(self) -> bool:
        return self.deadline is not None and self._clock() > self.deadline

    def check_cancelled(self, done: int, unit: str) -> None:
        """Raise Cancelled when the client went away; a spent deadline is left to the caller (see `Pace`)."""
        if self._cancel.is_set():
            raise Cancelled(f"the request was cancelled ({self.reason}) after {done} {unit}", detail={unit: done})

    def check(self, done: int, unit: str, *, advice: str = "") -> None:
        """Raise when the budget is spent or cancelled; `done` and `unit` say how far the work got."""
        self.check_cancelled(done, unit)
        if self.expired():
            hint = f"; {advice}" if advice else ""
            raise DeadlineExceeded(
                f"the request's time budget of {self.seconds:g} s ran out after {done} {unit} ({unit}={done}){hint}",
                detail={unit: done},
            )


class RunningBudgets:
    """The budgets of the requests running now (held weakly: a finished request's budget just disappears), so
    that a server told to stop can cancel them all and exit within seconds instead of finishing them."""

    def __init__(self) -> None:
        self._budgets: weakref.WeakSet[Budget] = weakref.WeakSet()
        self._lock = threading.Lock()

    def add(self, budget: Budget) -> Budget:
        with self._lock:
            self._budgets.add(budget)
        return budget

    def cancel_all(self, reason: str = "the server is stopping") -> int:
        with self._lock:
            budgets = list(self._budgets)
        for budget in budgets:
            budget.cancel(reason)
        return len(budgets)


class Pace:
    """Batched work that answers with what it has when the budget runs low, instead of failing.

    Before each batch, `fits(n)` says whether n more items (at the mean cost so far) still end before the
    deadline with `reserve_s` to spare for the work after the loop (filters, polygons, the answer). The
    first batch always runs unless the budget is already spent (then DeadlineExceeded: nothing to answer);
    a cancelled budget raises Cancelled at any batch.
    """

    def __init__(self, budget: Budget | None, unit: str, *, reserve_fraction: float = 0.05, min_reserve_s: float = 1.0,
                 advice: str = "", clock: Callable[[], float] = time.perf_counter) -> None:
        self.budget = budget
        self.unit = unit
        self.advice = advice
        self.reserve_s = 0.0 if budget is None or budget.seconds is None else max(min_reserve_s, reserve_fraction * budget.seconds)
        self.done = 0
        self.seconds = 0.0
        self.stopped = False  # True once a batch was refused: the answer is partial
        self._clock = clock
        self._started: float | None = None

    def fits(self, n: int) -> bool:
        budget = self.budget
        if budget is None:
            return True
        budget.check_cancelled(self.done, self.unit)
        if self.stopped:
            return False
        if self.done == 0:
            budget.check(0, self.unit, advice=self.advice)  # spent before anything ran: a deadline error
            return True
        remaining = budget.remaining()
        if remaining is not None and remaining < n * self.seconds / self.done + self.reserve_s:
            self.stopped = True
            return False
        return True

    def start(self) -> None:
        self._started = self._clock()

    def finish(self, n: int) -> None:
        """n items were done since `start`."""
        if self._started is not None:
            self.seconds += self._clock() - self._started
            self._started = None
        self.done += n
