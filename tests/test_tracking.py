"""The tracking rule's tests, one signal at a time, and the walk that applies it (pipeline/tracking.py)."""

from __future__ import annotations

import numpy as np
import pytest

from medsam2_endpoint.pipeline.tracking import SliceStats, TrackRule, using_rule, walk_slices

KEY = SliceStats(iou=0.9, area=400, centroid=(50.0, 50.0), mean=100.0, std=10.0)


def step(**changes: object) -> SliceStats:
    fields = {"iou": 0.9, "area": 400, "centroid": (50.0, 50.0), "mean": 100.0, "std": 10.0, **changes}
    return SliceStats(**fields)  # type: ignore[arg-type]


def test_stats_of_a_mask_measure_its_area_centroid_and_intensity():
    mask = np.zeros((10, 10), bool)
    mask[2:4, 6:10] = True
    image = np.zeros((10, 10), np.uint8)
    image[2, 6:10], image[3, 6:10] = 10, 30
    stats = SliceStats.of(mask, image, 0.7)
    assert (stats.iou, stats.area, stats.centroid) == (0.7, 8, (2.5, 7.5))
    assert (stats.mean, stats.std) == (20.0, 10.0)
    assert SliceStats.of(np.zeros((4, 4), bool), np.zeros((4, 4), np.uint8), 0.9).area == 0


def test_the_core_of_a_mask_is_its_surest_pixels():
    mask = np.zeros((10, 10), bool)
    mask[2:6, 2:6] = True  # 16 px: a 2 x 2 centre at logit 8, the ring at logit 1
    logits = np.where(mask, 1.0, -5.0).astype(np.float32)
    logits[3:5, 3:5] = 8.0
    image = np.where(mask, 40, 0).astype(np.uint8)
    image[3:5, 3:5] = 200
    assert SliceStats.of(mask, image, 0.9).core_mean == SliceStats.of(mask, image, 0.9).mean == 80.0
    # the top quarter of the mask's logits is the 2 x 2 centre (4 px); the top half ties with the ring
    assert SliceStats.of(mask, image, 0.9, logits, 0.75).core_mean == 200.0
    logits[3, 3] = 9.0  # the top 1% is one pixel: too few, the whole mask's mean
    assert SliceStats.of(mask, image, 0.9, logits, 0.99).core_mean == 80.0


def test_the_core_intensity_test_judges_the_core_against_the_keys_core():
    key = step(core_mean=100.0)
    grown = step(mean=60.0, core_mean=110.0)  # grown into a darker surround; its core is still the object's
    assert not TrackRule(min_iou=0.0, intensity_z=1.5).accepts(grown, key, key)
    assert TrackRule(min_iou=0.0, intensity_z=1.5, intensity_core=0.5).accepts(grown, key, key)
    assert not TrackRule(min_iou=0.0, intensity_z=1.5, intensity_core=0.5).accepts(step(mean=100.0, core_mean=116.0), key, key)


def test_an_empty_mask_is_never_accepted():
    assert not TrackRule(min_iou=0.0).accepts(step(area=0), KEY, KEY)


@pytest.mark.parametrize(("rule", "good", "bad"), [
    (TrackRule(min_iou=0.8), step(iou=0.8), step(iou=0.79)),
    (TrackRule(min_iou=0.0, relative_iou=0.9), step(iou=0.81), step(iou=0.80)),
    (TrackRule(min_iou=0.0, max_area_growth=1.5), step(area=600), step(area=601)),
    (TrackRule(min_iou=0.0, min_area_ratio=0.5), step(area=200), step(area=199)),
    # shift limit 0.5 x sqrt(400) = 10 px
    (TrackRule(min_iou=0.0, max_shift=0.5), step(centroid=(56.0, 58.0)), step(centroid=(56.0, 58.1))),
    # key std 10: within 15 of the key's mean
    (TrackRule(min_iou=0.0, intensity_z=1.5), step(mean=115.0), step(mean=115.1)),
    # pooled std of 10 and 50 is sqrt(1300) = 36.06: within 72.1 at z = 2
    (TrackRule(min_iou=0.0, pooled_intensity_z=2.0), step(mean=172.0, std=50.0), step(mean=172.2, std=50.0)),
])
def test_each_signal_rejects_past_its_limit_and_only_there(rule, good, bad):
    assert rule.accepts(good, KEY, KEY)
    assert not rule.accepts(bad, KEY, KEY)


def test_the_pooled_intensity_test_lets_a_textured_slice_follow_a_uniform_key():
    """The key's own spread alone would stop this walk (mean 30 off, key std 10); the pooled one does not."""
    textured = step(mean=130.0, std=30.0)
    assert not TrackRule(min_iou=0.0, intensity_z=2.0).accepts(textured, KEY, KEY)
    assert TrackRule(min_iou=0.0, pooled_intensity_z=2.0).accepts(textured, KEY, KEY)


def test_area_and_shift_are_judged_against_the_previous_accepted_slice():
    previous = step(area=100, centroid=(20.0, 20.0))
    rule = TrackRule(min_iou=0.0, max_area_growth=1.5, max_shift=0.5)
    assert rule.accepts(step(area=150, centroid=(24.0, 20.0)), KEY, previous)
    assert not rule.accepts(step(area=151, centroid=(24.0, 20.0)), KEY, previous)
    assert not rule.accepts(step(area=150, centroid=(26.0, 20.0)), KEY, previous)


def test_a_key_mask_that_fills_little_of_the_callers_box_keeps_the_box_for_the_walk():
    box = np.array([0.0, 0.0, 20.0, 10.0])  # 200 px
    rule = TrackRule(min_key_fill=0.3)
    assert rule.keeps_caller_box(step(area=59), box)
    assert not rule.keeps_caller_box(step(area=60), box)
    assert not TrackRule().keeps_caller_box(step(area=1), box)  # off by default in a bare rule


def test_a_key_mask_the_model_rates_under_the_floor_keeps_the_callers_box():
    box = np.array([0.0, 0.0, 20.0, 10.0])
    rule = TrackRule(min_key_fill=0.3, min_key_iou=0.5)
    assert rule.keeps_caller_box(step(area=150, iou=0.49), box)  # fills the box well, but the model doubts it
    assert not rule.keeps_caller_box(step(area=150, iou=0.5), box)
    assert not TrackRule(min_key_fill=0.3).keeps_caller_box(step(area=150, iou=0.1), box)  # off unless set



def test_a_shrunken_slice_rejected_by_intensity_alone_is_kept_as_the_last():
    rule = TrackRule(min_iou=0.0, intensity_z=1.5, end_area_ratio=0.75)
    tip = step(area=300, mean=150.0)  # intensity far off, mask shrank to 0.75 of the previous
    assert not rule.accepts(tip, KEY, KEY)
    assert rule.ends_at(tip, KEY, KEY)
    assert not rule.ends_at(step(area=301, mean=150.0), KEY, KEY)  # not shrunk enough: a neighbour
    assert not TrackRule(min_iou=0.5, intensity_z=1.5, end_area_ratio=0.75).ends_at(step(area=300, mean=150.0, iou=0.4), KEY, KEY)
    assert not TrackRule(min_iou=0.0, intensity_z=1.5).ends_at(tip, KEY, KEY)  # off unless set


# ---------------------------------------------------------------- the walk (walk_slices on LiteMedSAM)
# The engine's decoder is replaced by a script of masks per slice, so each signal is set exactly.

SIDE = 64


def square(side: int, at: int = 32) -> np.ndarray:
    mask = np.zeros((SIDE, SIDE), bool)
    half = side // 2
    mask[at - half : at - half + side, at - half : at - half + side] = True
    return mask


@pytest.fixture(scope="module")
def lite():
    from medsam2_endpoint.engines.lite import LiteMedSAMEngine

    return LiteMedSAMEngine()


def scripted_walk(engine, monkeypatch, masks: dict[int, np.ndarray], means: dict[int, float], box, rule, key=2):
    """Walk up from `key` through a volume whose slice z holds `masks[z]` at intensity `means[z]`
    (background 0); returns {z: mask yielded} and the prompts the walk sent, by slice."""
    volume = np.zeros((len(masks), SIDE, SIDE), np.uint8)
    noise = np.random.default_rng(0).normal(0, 4, (SIDE, SIDE))
    for z, mask in masks.items():
        volume[z][mask] = np.clip(means[z] + noise[mask], 0, 255)
    prompts: dict[int, list[float]] = {}

    def slice_logits(state, z, prompt):
        prompts[z] = [float(v) for v in prompt]
        return np.where(masks[z], 5.0, -5.0).astype(np.float32), 0.9

    monkeypatch.setattr(engine, "slice_logits", slice_logits)
    state = engine.start(volume)
    walked = {z: logits > 0 for z, logits in walk_slices(engine, state, key_index=key, box=np.array(box), reverse=False, rule=rule)}
    return walked, prompts


def test_the_walk_keeps_a_tapering_tip_and_stops_after_it(lite, monkeypatch):
    masks = {0: square(0), 1: square(0), 2: square(20), 3: square(20), 4: square(14), 5: square(14), 6: square(14)}
    means = {0: 0.0, 1: 0.0, 2: 200.0, 3: 200.0, 4: 120.0, 5: 120.0, 6: 120.0}
    rule = TrackRule(min_iou=0.0, intensity_z=1.5, end_area_ratio=0.75)
    walked, prompts = scripted_walk(lite, monkeypatch, masks, means, [22, 22, 42, 42], rule)
    assert walked[4].sum() == 14 * 14  # rejected by intensity, 0.49 of the area before: the tip, kept
    assert 5 not in prompts  # and the walk ended there
    without, prompts = scripted_walk(lite, monkeypatch, masks, means, [22, 22, 42, 42], TrackRule(min_iou=0.0, intensity_z=1.5))
    assert not without[4].any() and 5 not in prompts


def test_a_same_sized_slice_of_another_intensity_ends_the_walk_empty(lite, monkeypatch):
    masks = {0: square(0), 1: square(0), 2: square(20), 3: square(20), 4: square(20), 5: square(20)}
    means = {0: 0.0, 1: 0.0, 2: 200.0, 3: 200.0, 4: 120.0, 5: 120.0}
    walked, _ = scripted_walk(lite, monkeypatch, masks, means, [22, 22, 42, 42], TrackRule(min_iou=0.0, intensity_z=1.5, end_area_ratio=0.75))
    assert walked[3].any() and not walked[4].any()


def test_a_key_mask_that_is_a_small_part_of_the_box_hands_the_walk_the_callers_box(lite, monkeypatch):
    """The key slice's answer (a 6 x 6 bright core) fills 9% of the 20 x 20 box: the next slice gets the
    caller's box, and the object found there (darker, 20 x 20) becomes the intensity reference."""
    masks = {0: square(0), 1: square(0), 2: square(6), 3: square(20), 4: square(20), 5: square(20)}
    means = {0: 0.0, 1: 0.0, 2: 220.0, 3: 60.0, 4: 62.0, 5: 61.0}
    box = [22, 22, 42, 42]
    rule = TrackRule(min_iou=0.0, intensity_z=1.5, min_key_fill=0.3)
    walked, prompts = scripted_walk(lite, monkeypatch, masks, means, box, rule)
    assert prompts[3] == [float(v) for v in box]
    assert all(walked[z].sum() == 400 for z in (3, 4, 5))  # judged against slice 3, not the bright core
    walked, prompts = scripted_walk(lite, monkeypatch, masks, means, box, TrackRule(min_iou=0.0, intensity_z=1.5))
    assert prompts[3] != [float(v) for v in box] and not walked[3].any()  # the core's box and its intensity


def test_the_walk_follows_a_tapering_slice_by_its_core(lite, monkeypatch):
    """Slice 4's mask has grown into a dark ring around the object (a 10 x 10 object inside a 20 x 20
    mask): its whole mean is far off the key's, its core (the surest quarter) is the object's."""
    volume = np.zeros((6, SIDE, SIDE), np.uint8)
    logits = {z: np.full((SIDE, SIDE), -5.0, np.float32) for z in range(6)}
    for z in (2, 3):
        volume[z][square(20)] = 200
        logits[z][square(20)] = 5.0
    volume[4][square(20)] = 40
    volume[4][square(10)] = 200
    logits[4][square(20)] = 1.0
    logits[4][square(10)] = 6.0

    def slice_logits(state, z, prompt):
        return logits[z], 0.9

    monkeypatch.setattr(lite, "slice_logits", slice_logits)

    def walk(rule):
        state = lite.start(volume)
        with using_rule(rule):  # the served walks' rule, set for this block
            return {z: m > 0 for z, m in walk_slices(lite, state, key_index=2, box=np.array([22, 22, 42, 42]), reverse=False)}

    assert walk(TrackRule(min_iou=0.0, intensity_z=1.5, intensity_core=0.75))[4].sum() == 400
    assert not walk(TrackRule(min_iou=0.0, intensity_z=1.5))[4].any()


def test_a_box_answered_with_nothing_is_answered_again_on_a_zoomed_crop(lite, monkeypatch):
    """The model answers the 6 x 6 box on the whole 64 x 64 slice with nothing, as LiteMedSAM can for a structure
    a few pixels across; on the crop around it (upsampled to the model's input) it answers the box. The key
    slice then carries that answer, mapped back to where the box is."""
    volume = np.zeros((3, SIDE, SIDE), np.uint8)
    volume[:, 40:46, 10:16] = 200
    seen = []

    def slice_logits(state, z, prompt):
        seen.append(state.volume.shape)
        if state.volume.shape[1:] == (SIDE, SIDE):
            return np.full((SIDE, SIDE), -5.0, np.float32), 0.3
        x0, y0, x1, y1 = (int(round(v)) for v in prompt)
        logits = np.full(state.volume.shape[1:], -5.0, np.float32)
        logits[y0:y1, x0:x1] = 5.0
        return logits, 0.9

    monkeypatch.setattr(lite, "slice_logits", slice_logits)
    steps = walk_slices(lite, lite.start(volume), key_index=1, box=np.array([10, 40, 16, 46]), reverse=False)
    z, key = next(steps)
    expected = np.zeros((SIDE, SIDE), bool)
    expected[40:46, 10:16] = True
    overlap = np.logical_and(key > 0, expected).sum() / np.logical_or(key > 0, expected).sum()
    assert z == 1 and overlap >= 0.8, overlap
    assert seen == [(3, SIDE, SIDE), (1, 256, 256)]  # the crop (32 px, the smallest) was upsampled to 256


def test_with_key_zoom_the_answer_rated_higher_is_kept_and_the_walk_goes_on_zoomed(lite, monkeypatch):
    """A coronal or sagittal view's walk (`key_zoom`): the key slice answered whole (rated 0.6) and zoomed (0.9);
    the zoomed one is kept, and the next slice is answered on its own crop. Without `key_zoom` (the JSON route) a
    non-empty whole-slice answer is taken as it is and nothing is zoomed."""
    volume = np.zeros((3, SIDE, SIDE), np.uint8)
    volume[:, 20:44, 20:44] = 200
    seen = []

    def slice_logits(state, z, prompt):
        seen.append(state.volume.shape[1:])
        x0, y0, x1, y1 = (int(round(v)) for v in prompt)
        logits = np.full(state.volume.shape[1:], -5.0, np.float32)
        logits[y0:y1, x0:x1] = 5.0
        return logits, 0.9 if state.volume.shape[1:] != (SIDE, SIDE) else 0.6

    monkeypatch.setattr(lite, "slice_logits", slice_logits)
    box = np.array([20, 20, 44, 44])
    with using_rule(TrackRule(min_iou=0.5, key_zoom=True)):
        walked = dict(walk_slices(lite, lite.start(volume), key_index=0, box=box, reverse=False))
    assert sorted(walked) == [0, 1, 2] and all((walked[z] > 0)[30, 30] for z in walked)
    assert seen[:2] == [(SIDE, SIDE), (256, 256)] and (SIDE, SIDE) not in seen[2:]  # zoomed from the key on
    seen.clear()
    with using_rule(TrackRule(min_iou=0.5)):
        dict(walk_slices(lite, lite.start(volume), key_index=0, box=box, reverse=False))
    assert set(seen) == {(SIDE, SIDE)}
