"""The 3D algorithm with a scripted engine (random weights never give empty slices, so stop rules need this)."""

import time

import numpy as np
import pytest
from scipy import ndimage

from medsam2_endpoint.base.budget import Budget, Cancelled
from medsam2_endpoint.base.errors import DeadlineExceeded
from medsam2_endpoint.engines.base import ModelInfo
from medsam2_endpoint.pipeline.propagate import PropagationOptions, keep_largest_component, segment_object


class ScriptedEngine:
    """Object present on slices [first, last]; records visited slices and whether each pass was closed."""

    info = ModelInfo("scripted", "test", "none", "0" * 64)

    def __init__(self, first, last, shape, delay=0.0):
        self.first, self.last, self.shape, self.delay = first, last, shape, delay
        self.visited = []
        self.closed = 0

    def start(self, volume):
        return {}

    def track(self, state, *, key_index, box, reverse):
        step = -1 if reverse else 1
        z = key_index
        try:
            while 0 <= z < self.shape[0]:
                self.visited.append(z)
                time.sleep(self.delay)
                mask = np.zeros(self.shape[1:], bool)
                if self.first <= z <= self.last:
                    mask[box[1] : box[3], box[0] : box[2]] = True
                yield z, mask
                z += step
        finally:
            self.closed += 1


BOX = np.array([2, 3, 6, 7])


def run(engine, key=10, **options):
    return segment_object(engine, None, key_index=key, box=BOX, shape=engine.shape, options=PropagationOptions(**options))


def test_without_stop_rules_every_slice_is_visited_once_per_direction():
    engine = ScriptedEngine(8, 12, (30, 10, 10))
    result = run(engine)
    assert result.slices_processed == 31  # 20 up (10..29) + 11 down (10..0)
    assert sorted(set(engine.visited)) == list(range(30))
    assert np.flatnonzero(result.mask.any(axis=(1, 2))).tolist() == list(range(8, 13))
    assert engine.closed == 2


def test_stop_after_empty_ends_each_direction_early():
    engine = ScriptedEngine(8, 12, (30, 10, 10))
    result = run(engine, stop_after_empty=2)
    assert engine.visited == [10, 11, 12, 13, 14, 10, 9, 8, 7, 6]
    assert result.slices_processed == 10
    assert engine.closed == 2  # generators closed, so engines can reset their state
    assert np.flatnonzero(result.mask.any(axis=(1, 2))).tolist() == list(range(8, 13))


def test_max_slices_and_single_direction():
    engine = ScriptedEngine(0, 29, (30, 10, 10))
    result = run(engine, direction="up", max_slices=4)
    assert engine.visited == [10, 11, 12, 13]
    assert np.flatnonzero(result.mask.any(axis=(1, 2))).tolist() == [10, 11, 12, 13]
    engine = ScriptedEngine(0, 29, (30, 10, 10))
    run(engine, direction="down", max_slices=3)
    assert engine.visited == [10, 9, 8]


def test_deadline_raises_with_progress():
    engine = ScriptedEngine(0, 29, (30, 10, 10), delay=0.01)
    with pytest.raises(DeadlineExceeded, match=r"slices_processed=\d+"):
        segment_object(engine, None, key_index=10, box=BOX, shape=engine.shape, budget=Budget(0.05))
    assert engine.closed == 1


def test_cancel_stops_propagation_and_says_how_far():
    engine = ScriptedEngine(0, 29, (30, 10, 10))
    budget = Budget(None)
    budget.cancel()
    with pytest.raises(Cancelled, match=r"cancelled \(the client went away\) after 1 slices_processed") as caught:
        segment_object(engine, None, key_index=10, box=BOX, shape=engine.shape, budget=budget)
    assert caught.value.code == "cancelled" and caught.value.detail == {"slices_processed": 1}


def test_largest_component_uses_26_connectivity():
    mask = np.zeros((5, 5, 5), np.uint8)
    mask[0, 0, 0] = mask[1, 1, 1] = mask[2, 2, 2] = 1  # diagonal chain: one component in 26-connectivity
    mask[4, 4, 0] = mask[4, 4, 1] = 1  # 2 voxels, separate
    kept = keep_largest_component(mask)
    assert kept.sum() == 3 and kept[2, 2, 2] == 1 and kept[4, 4, 0] == 0
    assert keep_largest_component(np.zeros((2, 2, 2), np.uint8)).sum() == 0


def test_largest_component_inside_a_large_volume_keeps_coordinates():
    mask = np.zeros((30, 40, 50), np.uint8)
    mask[10:13, 5:9, 20:25] = 1  # 60 voxels
    mask[20, 30, 40] = 1  # a stray voxel far away
    kept = keep_largest_component(mask)
    assert kept.dtype == np.uint8 and kept.sum() == 60 and kept[10:13, 5:9, 20:25].all() and kept[20, 30, 40] == 0


def test_logits_are_kept_only_when_asked():
    kept = run(ScriptedEngine(8, 12, (30, 10, 10)))
    assert sorted(kept.logits) == list(range(8, 13))  # slices with foreground, for merging objects
    dropped = run(ScriptedEngine(8, 12, (30, 10, 10)), keep_logits=False)
    assert dropped.logits == {}
    np.testing.assert_array_equal(dropped.mask, kept.mask)


def _largest_whole(mask: np.ndarray) -> np.ndarray:
    """The definition: label the whole mask at once, keep the first of the largest components."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count == 0:
        return mask
    return (labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1).astype(np.uint8)


@pytest.mark.parametrize("density", [0.05, 0.2, 0.35, 0.6])
@pytest.mark.parametrize("slab_slices", [1, 2, 3, 7])
def test_largest_component_by_slabs_matches_labelling_at_once(density, slab_slices):
    """Slab-wise labelling (bounded memory) keeps exactly the voxels whole-mask labelling keeps, ties included."""
    rng = np.random.default_rng(int(density * 100) + slab_slices)
    for _ in range(5):
        mask = (rng.random((11, 9, 13)) < density).astype(np.uint8)
        kept = keep_largest_component(mask, slab_voxels=slab_slices * 9 * 13)
        assert kept.dtype == np.uint8
        np.testing.assert_array_equal(kept, _largest_whole(mask))


def test_largest_component_by_slabs_joins_a_component_crossing_slabs_diagonally():
    mask = np.zeros((6, 6, 6), np.uint8)
    for z in range(6):
        mask[z, z, z] = 1  # a diagonal: each voxel touches the next through a corner only
    mask[0, 5, 0] = mask[1, 5, 0] = 1  # two voxels apart from it
    kept = keep_largest_component(mask, slab_voxels=36)  # one slice per slab
    assert kept.sum() == 6 and kept[0, 5, 0] == 0


def test_largest_component_tie_goes_to_the_first_component():
    mask = np.zeros((6, 4, 4), np.uint8)
    mask[4:6, 0, 0] = 1  # two voxels, met second in (z, y, x) order
    mask[0:2, 3, 3] = 1  # two voxels, met first
    for slab in (16, 32, 96):
        kept = keep_largest_component(mask, slab_voxels=slab)
        assert kept[0, 3, 3] == 1 and kept[4, 0, 0] == 0
