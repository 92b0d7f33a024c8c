"""core/slots.py: background work's slot (`spare`) against a request's (`hold`)."""

from __future__ import annotations

import threading
import time

from medsam2_endpoint.core.slots import InferenceSlots


def test_a_request_waits_out_a_background_step_and_is_never_busy_for_it():
    """A step longer than the request's busy wait: the request waits for it, then runs; meanwhile background work
    gets no slot."""
    slots = InferenceSlots(1, wait_s=0.05, retry_after_s=1.0)
    stepping, finish = threading.Event(), threading.Event()

    def step() -> None:
        with slots.spare("m") as free:
            assert free
            stepping.set()
            finish.wait(30)

    background = threading.Thread(target=step)
    background.start()
    assert stepping.wait(30)
    answered: list[str] = []

    def request() -> None:
        with slots.hold("m"):
            answered.append("ran")

    client = threading.Thread(target=request)
    client.start()
    while slots.requests == 0:
        time.sleep(0.01)
    with slots.spare("m") as free:
        assert not free  # a request is waiting: no slot for background work
    time.sleep(0.2)  # several of the request's busy waits pass while the step runs
    finish.set()
    client.join(30)
    background.join(30)
    assert answered == ["ran"]
