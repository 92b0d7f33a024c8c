"""core/background.py on its own: the order, the cache-full stop, who gets no run. The server's runs (set_image,
a new image, the release, a box meanwhile) are in test_nninteractive.py."""

from __future__ import annotations

import copy

import numpy as np

from medsam2_endpoint.base.lru import ByteLRU
from medsam2_endpoint.core.background import FULL, BackgroundEncoder, middle_out
from medsam2_endpoint.core.slots import InferenceSlots
from medsam2_endpoint.engines.base import LITE_NAME, SliceCachingEngine
from medsam2_endpoint.engines.lite import EMBEDDING_BYTES


def test_middle_out_visits_every_slice_once_from_the_middle():
    assert middle_out(1) == [0]
    assert middle_out(4) == [1, 2, 0, 3]
    assert middle_out(5) == [2, 3, 1, 4, 0]
    assert sorted(middle_out(10)) == list(range(10))


def test_a_run_stops_when_its_own_slices_fill_the_cache(service):
    """A cache of two slices: the two middle slices stay cached, the third is not stored (nothing of the run evicted)
    and the run ends there instead of evicting its own slices."""
    engine = copy.copy(service.registry.get(LITE_NAME))  # the loaded weights, a cache of its own
    engine.features = ByteLRU(2 * EMBEDDING_BYTES)
    volume = np.random.default_rng(0).integers(0, 255, size=(5, 32, 32), dtype=np.uint8)
    encoder = BackgroundEncoder(InferenceSlots(1, 1.0, 1.0))
    run = encoder.start(LITE_NAME, engine, volume, "v", alive=lambda: True)
    assert run is not None and run.wait(120)
    assert (run.reason, run.cached) == (FULL, 2)
    assert [z for z in range(5) if ("v", z) in engine.features] == [2, 3]


def test_no_run_when_switched_off_closed_or_without_a_slice_cache(service):
    lite = service.registry.get(LITE_NAME)
    medsam2 = service.registry.get(service.default)  # the fixture's random MedSAM2 checkpoint
    assert isinstance(lite, SliceCachingEngine) and not isinstance(medsam2, SliceCachingEngine)
    volume = np.zeros((3, 16, 16), np.uint8)
    slots = InferenceSlots(1, 1.0, 1.0)
    assert BackgroundEncoder(slots).start(service.default, medsam2, volume, "m", alive=lambda: True) is None
    assert BackgroundEncoder(slots, enabled=False).start(LITE_NAME, lite, volume, "l", alive=lambda: True) is None
    closed = BackgroundEncoder(slots)
    closed.close()
    assert closed.start(LITE_NAME, lite, volume, "l", alive=lambda: True) is None

