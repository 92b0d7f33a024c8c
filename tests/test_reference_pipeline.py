"""Tests of the independent MedSAM2 reference pipeline (tests/reference_pipeline.py)."""

from __future__ import annotations

import importlib.util
import os
import time
from collections import OrderedDict, deque

import numpy as np
import pytest
import sam2.utils.misc
import SimpleITK as sitk
import torch
from PIL import Image
from sam2.sam2_video_predictor_legacy import SAM2VideoPredictor

try:  # tests/ may or may not be a package
    from . import reference_pipeline as ref_module
    from .reference_pipeline import (
        IMAGE_SIZE,
        build_reference_predictor,
        connected_components_patched,
        make_random_checkpoint,
        opencv_connected_components,
        preprocess_frames,
        reference_segment,
        sam2_512_config,
        window_volume,
    )
except ImportError:
    import reference_pipeline as ref_module  # type: ignore[no-redef]
    from reference_pipeline import (  # type: ignore[no-redef]
        IMAGE_SIZE,
        build_reference_predictor,
        connected_components_patched,
        make_random_checkpoint,
        opencv_connected_components,
        preprocess_frames,
        reference_segment,
        sam2_512_config,
        window_volume,
    )

HAS_SAM2_C = importlib.util.find_spec("sam2._C") is not None


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "medsam2_random.pt", seed=0)


@pytest.fixture(scope="module")
def predictor(checkpoint):
    return build_reference_predictor(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def tiny_volume(tmp_path_factory) -> str:
    """5 x 48 x 48 int16 CT-like phantom: air, a soft-tissue body, a brighter ellipsoid lesion."""
    rng = np.random.default_rng(7)
    z, y, x = np.mgrid[0:5, 0:48, 0:48]
    arr = np.full((5, 48, 48), -1000.0)
    arr[(y - 24) ** 2 + (x - 24) ** 2 < 20**2] = 40.0
    lesion = ((z - 2) * 5.0 / 8.0) ** 2 + ((y - 22) * 0.8 / 7.0) ** 2 + ((x - 26) * 0.8 / 8.0) ** 2 < 1
    arr[lesion] = 150.0
    arr += rng.normal(0, 10, arr.shape)
    img = sitk.GetImageFromArray(arr.astype(np.int16))
    img.SetSpacing((0.8, 0.8, 5.0))
    img.SetOrigin((-19.2, -19.2, 100.0))
    path = tmp_path_factory.mktemp("vol") / "tiny.nii.gz"
    sitk.WriteImage(img, str(path))
    return str(path)


# --------------------------------------------------------------------------- connected components


def _flood_fill_components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force 8-connected labelling of a 2D boolean mask: (labels, areas)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int64)
    areas = np.zeros((h, w), dtype=np.int64)
    current = 0
    for sy in range(h):
        for sx in range(w):
            if not mask[sy, sx] or labels[sy, sx]:
                continue
            current += 1
            members = []
            queue = deque([(sy, sx)])
            labels[sy, sx] = current
            while queue:
                cy, cx = queue.popleft()
                members.append((cy, cx))
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = cy + dy, cx + dx
                        if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                            labels[ny, nx] = current
                            queue.append((ny, nx))
            for m in members:
                areas[m] = len(members)
    return labels, areas


@pytest.mark.parametrize("density", [0.3, 0.5, 0.7])
def test_connected_components_match_flood_fill(density):
    rng = np.random.default_rng(int(density * 10))
    mask = torch.from_numpy(rng.random((4, 1, 13, 17)) < density)
    labels, areas = opencv_connected_components(mask)
    assert labels.shape == areas.shape == mask.shape
    assert labels.dtype == areas.dtype == torch.int32
    for n in range(mask.shape[0]):
        m = mask[n, 0].numpy()
        got_labels, got_areas = labels[n, 0].numpy(), areas[n, 0].numpy()
        want_labels, want_areas = _flood_fill_components(m)
        np.testing.assert_array_equal(got_labels > 0, m)
        np.testing.assert_array_equal(got_areas, want_areas)
        # same partition: a one-to-one mapping between the two labellings on foreground
        pairs = set(zip(got_labels[m].tolist(), want_labels[m].tolist(), strict=True))
        assert len(pairs) == len({p[0] for p in pairs}) == len({p[1] for p in pairs})


def _logits_with_two_holes() -> torch.Tensor:
    logits = torch.full((1, 1, 20, 20), 2.0)
    logits[0, 0, 3, 3:6] = -1.5  # 3-pixel hole: filled
    logits[0, 0, 10:13, 10:13] = -1.5  # 9-pixel hole: kept (area > 8)
    return logits


def test_hole_fill_changes_small_holes_only():
    logits = _logits_with_two_holes()
    with connected_components_patched():
        filled = sam2.utils.misc.fill_holes_in_mask_scores(logits.clone(), 8)
    expected = logits.clone()
    expected[0, 0, 3, 3:6] = 0.1
    torch.testing.assert_close(filled, expected, rtol=0, atol=0)
    assert (filled[0, 0, 10:13, 10:13] == -1.5).all()


def test_patch_is_restored():
    original = sam2.utils.misc.get_connected_components
    with connected_components_patched():
        assert sam2.utils.misc.get_connected_components is opencv_connected_components
    assert sam2.utils.misc.get_connected_components is original
    with pytest.raises(RuntimeError), connected_components_patched():
        raise RuntimeError("boom")
    assert sam2.utils.misc.get_connected_components is original


@pytest.mark.skipif(HAS_SAM2_C, reason="sam2._C present: upstream fills holes itself")
def test_upstream_skips_hole_fill_without_extension():
    logits = _logits_with_two_holes()
    with pytest.warns(UserWarning):
        out = sam2.utils.misc.fill_holes_in_mask_scores(logits.clone(), 8)
    torch.testing.assert_close(out, logits, rtol=0, atol=0)


# --------------------------------------------------------------------------- windowing


def test_window_int16_hand_computed():
    vol = np.array([[[-1000, 0, 40, 500]]], dtype=np.int16)
    # clip -> [-160, 0, 40, 240] (float64); (v + 160) / 400 * 255 -> [0, 102, 127.5, 255]
    out = window_volume(vol, (-160, 240))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[[0, 102, 127, 255]]])
    np.testing.assert_array_equal(window_volume(vol, "-160,240"), out)


def test_window_float32_arithmetic_stays_float32():
    # 227.45097f: (v + 160) / 400 * 255 is exactly 247.0 in float32, 246.9999956 in float64
    vol32 = np.array([[[-160.0, 240.0, 227.45097]]], dtype=np.float32)
    np.testing.assert_array_equal(window_volume(vol32, (-160, 240)), [[[0, 255, 247]]])
    np.testing.assert_array_equal(window_volume(vol32.astype(np.float64), (-160, 240)), [[[0, 255, 246]]])


def test_window_uses_clipped_min_max_not_window_bounds():
    vol = np.array([[[0, 50, 100]]], dtype=np.int16)
    # window (-1000, 1000) clips nothing: scaled by the data's own 0..100
    np.testing.assert_array_equal(window_volume(vol, (-1000, 1000)), [[[0, 127, 255]]])


def test_window_none_is_min_max_without_overflow():
    vol = np.array([[[-32000, 0, 32000]]], dtype=np.int16)
    np.testing.assert_array_equal(window_volume(vol, None), [[[0, 127, 255]]])


def test_window_constant_volume_raises():
    with pytest.raises(ValueError, match="constant"):
        window_volume(np.zeros((2, 3, 3), dtype=np.int16), (-160, 240))


def test_preprocess_frames_arithmetic():
    img = (np.arange(2 * 8 * 8) % 256).astype(np.uint8).reshape(2, 8, 8)
    frames = preprocess_frames(img)
    assert frames.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert frames.dtype == torch.float64
    rgb = np.array(Image.fromarray(img[1]).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE)))
    mean = torch.tensor((0.485, 0.456, 0.406), dtype=torch.float32).double()
    std = torch.tensor((0.229, 0.224, 0.225), dtype=torch.float32).double()
    want = (torch.from_numpy(rgb.transpose(2, 0, 1) / 255.0) - mean[:, None, None]) / std[:, None, None]
    torch.testing.assert_close(frames[1], want, rtol=0, atol=0)


# --------------------------------------------------------------------------- model


def test_config_has_medsam2_changes():
    cfg = sam2_512_config().model
    assert cfg.image_size == 512
    assert list(cfg.memory_attention.layer.self_attention.feat_sizes) == [32, 32]
    assert list(cfg.memory_attention.layer.cross_attention.feat_sizes) == [32, 32]
    assert cfg.sam_mask_decoder_extra_args.dynamic_multimask_via_stability is True
    assert cfg.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta == 0.05
    assert cfg.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh == 0.98
    assert cfg.binarize_mask_from_pts_for_mem_enc is True
    assert cfg.fill_hole_area == 8
    assert cfg._target_.endswith("ReferenceVideoPredictor")


def test_checkpoint_round_trip(checkpoint, predictor):
    assert isinstance(predictor, SAM2VideoPredictor)
    assert not predictor.training
    assert predictor.image_size == 512 and predictor.fill_hole_area == 8
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert list(saved) == ["model"]
    state = predictor.state_dict()
    assert list(saved["model"]) == list(state)
    for name, tensor in saved["model"].items():
        assert torch.equal(tensor, state[name]), name
    # strict: an unexpected key must fail
    bad = OrderedDict(saved["model"])
    bad["unexpected.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError):
        predictor.load_state_dict(bad, strict=True)
    with torch.inference_mode():
        out = predictor.forward_image(torch.zeros(1, 3, 512, 512))
    assert out["vision_features"].shape == (1, 256, 32, 32)
    assert [tuple(f.shape) for f in out["backbone_fpn"]] == [
        (1, 32, 128, 128),
        (1, 64, 64, 64),
        (1, 256, 32, 32),
    ]


def test_init_state_matches_upstream_structure(predictor, tmp_path):
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    for i in range(2):
        Image.fromarray(np.full((24, 32, 3), 60 * i, dtype=np.uint8)).save(frames_dir / f"{i}.jpg")
    upstream = SAM2VideoPredictor.init_state(predictor, video_path=str(frames_dir))
    ours = predictor.init_state(upstream["images"], 24, 32)
    assert list(ours) == list(upstream)
    for key, value in upstream.items():
        if key in ("images", "cached_features"):
            continue
        assert ours[key] == value, key
        assert type(ours[key]) is type(value), key
    assert list(ours["cached_features"]) == [0]
    image, backbone_out = ours["cached_features"][0]
    assert image.dtype == torch.float32 and image.shape == (1, 3, 512, 512)
    torch.testing.assert_close(
        backbone_out["vision_features"], upstream["cached_features"][0][1]["vision_features"]
    )


# --------------------------------------------------------------------------- pipeline


@pytest.mark.slow
def test_reference_segment_shape_values_and_determinism(predictor, tiny_volume, monkeypatch):
    calls = []

    def counting_components(mask):
        calls.append(tuple(mask.shape))
        return opencv_connected_components(mask)

    monkeypatch.setattr(ref_module, "opencv_connected_components", counting_components)
    bbox = ["17.9", 14.2, 35, 31]  # strings and floats are truncated like upstream
    start, cpu_start = time.perf_counter(), time.process_time()
    mask1 = reference_segment(tiny_volume, bbox, 2, (-160, 240), predictor=predictor)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    # hole filling ran on the low-res logits: two box adds on the key slice + 4 propagated slices
    assert calls == [(1, 1, 128, 128)] * 6
    monkeypatch.undo()
    mask2 = reference_segment(tiny_volume, bbox, 2, (-160, 240), predictor=predictor)
    print(f"reference_segment on 5x48x48: {elapsed:.2f} s wall, {cpu:.2f} s CPU")
    assert mask1.dtype == np.uint8
    assert mask1.shape == (5, 48, 48)
    assert set(np.unique(mask1).tolist()) <= {0, 1}
    np.testing.assert_array_equal(mask1, mask2)
    # the patch does not leak out of reference_segment
    assert sam2.utils.misc.get_connected_components is not opencv_connected_components


def test_reference_segment_rejects_bad_key_slice(predictor, tiny_volume):
    with pytest.raises(ValueError, match="key slice"):
        reference_segment(tiny_volume, [10, 10, 30, 30], 5, (-160, 240), predictor=predictor)


def test_volume_file_is_anisotropic_int16(tiny_volume):
    img = sitk.ReadImage(tiny_volume)
    assert sitk.GetArrayFromImage(img).dtype == np.int16
    assert img.GetSpacing() == pytest.approx((0.8, 0.8, 5.0))
    assert os.path.getsize(tiny_volume) > 0


def test_reference_segment_fails_loudly_if_hole_fill_fails(predictor, tiny_volume, monkeypatch):
    def broken_components(mask):
        raise RuntimeError("connected components unavailable")

    monkeypatch.setattr(ref_module, "opencv_connected_components", broken_components)
    # key slice 0: the box is added on the frame init_state already encoded (one encoding)
    with pytest.raises(UserWarning, match="connected components unavailable"):
        reference_segment(tiny_volume, [10, 10, 30, 30], 0, (-160, 240), predictor=predictor)
    assert sam2.utils.misc.get_connected_components is not broken_components
