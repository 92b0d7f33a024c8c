"""The 2D route of /score: prompts, multimask selection, automatic masks, the embedding cache, clear errors.

Models: LiteMedSAM (real weights) and the random-weight MedSAM2 checkpoint (conftest `service`).
Images are phantom slices (128 x 96); the same slice is reused so the embedding cache keeps the suite fast.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import threading

import numpy as np
import pytest
from PIL import Image

from conftest import serving_bytes
from medsam2_endpoint.api.azure import score as score_body
from medsam2_endpoint.api.errors import http_status
from medsam2_endpoint.base.errors import InvalidRequest
from medsam2_endpoint.core.service import Service
from medsam2_endpoint.core.settings import Settings
from medsam2_endpoint.engines.sam2_image import MedSAM2ImagePredictor, keep_one_per_prompt
from medsam2_endpoint.io.encode import dumps, rle_decode
from medsam2_endpoint.io.polygons import geometry_area
from medsam2_endpoint.pipeline.embedding_cache import EmbeddingCache, content_key
from medsam2_endpoint.testing.phantoms import ct_phantom

MEDSAM2 = "MedSAM2_latest"
LITE = "lite-medsam"


@functools.lru_cache(maxsize=1)
def phantom_slice() -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """(uint8 (96, 128) CT slice windowed like the 3D route, its lesion mask, the lesion's box)."""
    phantom = ct_phantom((12, 96, 128), lesions=("ellipsoid",), seed=3)
    lesion = phantom.lesions[0]
    lo, hi = phantom.window
    values = np.clip(phantom.array()[lesion.key_slice].astype(np.float64), lo, hi)
    grey = np.uint8((values - values.min()) / (values.max() - values.min()) * 255.0)
    return grey, phantom.mask(lesion.label)[lesion.key_slice], lesion.bbox


def png_b64(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def score(service, **columns) -> list[dict]:
    body = {"input_data": {k: [v] for k, v in columns.items()}}
    return json.loads(dumps(score_body(service, body)))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def rle_mask(encoded: dict) -> np.ndarray:
    return rle_decode(encoded["counts"], tuple(encoded["size"])).astype(bool)


def counting(monkeypatch, engine) -> list[int]:
    calls = [0]
    original = engine.embed_image

    def embed_image(rgb):
        calls[0] += 1
        return original(rgb)

    monkeypatch.setattr(engine, "embed_image", embed_image)
    return calls


def test_box_prompt_with_litemedsam_finds_the_lesion(service):
    grey, truth, box = phantom_slice()
    (result,) = score(service, image=png_b64(grey), bbox=list(box), model=LITE, output_type="best_quality")
    (mask_entry,) = result["masks"]  # LiteMedSAM has one trained output, whatever the output type
    mask = rle_mask(mask_entry["mask"])
    assert dice(mask, truth) > 0.9
    assert mask_entry["area"] == mask.sum() and mask_entry["index"] == 0 and 0 < mask_entry["quality"] <= 1
    ys, xs = np.nonzero(mask)
    assert mask_entry["bbox"] == [xs.min(), ys.min(), xs.max(), ys.max()]
    meta = result["metadata"]
    assert meta["route"] == "2d" and meta["image_size"] == [128, 96] and meta["mask_shape"] == [96, 128]
    assert meta["model"]["name"] == LITE and meta["multimask_output"] is False and meta["low_res_size"] == 256


def test_a_second_prompt_on_the_same_image_skips_the_encoder(cold_service, monkeypatch):
    grey, _, box = phantom_slice()
    service = cold_service()  # a Service of its own: its 2D cache starts empty, whatever other tests sent
    calls = counting(monkeypatch, service.registry.get(LITE))
    first = score(service, image=png_b64(grey), bbox=list(box), model=LITE)[0]
    rgb_png = png_b64(np.repeat(grey[:, :, None], 3, axis=2))  # the same pixels as an RGB PNG
    second = score(service, image=rgb_png, bbox=[10, 10, 60, 50], model=LITE)[0]
    assert calls[0] == 1
    assert first["metadata"]["embedding_cached"] is False and second["metadata"]["embedding_cached"] is True


def test_medsam2_masks_carry_their_own_quality_and_selection_picks_among_them(service):
    grey, _, _ = phantom_slice()
    image = png_b64(grey)
    points = {"point_coords": [[5, 5], [58, 34]], "point_labels": [0, 1]}  # background first, as QuPath sends
    (all_three,) = score(service, image=image, model=MEDSAM2, output_type="all", **points)
    masks = all_three["masks"]
    assert [m["index"] for m in masks] == [0, 1, 2]
    prompter = service.prompter
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    embedding, cached = prompter.embedding(MEDSAM2, rgb)
    assert cached
    direct, ious, _ = prompter.image_engine(MEDSAM2).predict_2d(
        embedding, points=np.array(points["point_coords"], float), labels=np.array([0, 1]), multimask=True
    )
    for i, m in enumerate(masks):
        assert m["quality"] == pytest.approx(ious[i], abs=1e-6)  # mask i reports quality i (samapi: i-1)
        np.testing.assert_array_equal(rle_mask(m["mask"]), direct[i])
    areas = [m["area"] for m in masks]
    qualities = [m["quality"] for m in masks]
    picks = {
        "largest": int(np.argmax(areas)), "smallest": int(np.argmin(areas)), "best_quality": int(np.argmax(qualities)),
    }
    for output_type, expected in picks.items():
        (result,) = score(service, image=image, model=MEDSAM2, output_type=output_type, **points)
        assert [m["index"] for m in result["masks"]] == [expected]
        assert result["metadata"]["multimask_output"] is True
    (single,) = score(service, image=image, model=MEDSAM2, **points)
    assert len(single["masks"]) == 1 and single["metadata"]["output_type"] == "single"


def test_mask_formats_agree(service):
    grey, _, box = phantom_slice()
    image = png_b64(grey)
    results = {fmt: score(service, image=image, bbox=list(box), model=LITE, mask_format=fmt)[0]["masks"][0] for fmt in ("rle", "list", "polygons")}
    from_rle = rle_mask(results["rle"]["mask"])
    np.testing.assert_array_equal(np.asarray(results["list"]["mask"], dtype=bool), from_rle)
    geometry = results["polygons"]["mask"]
    assert geometry["type"] in ("Polygon", "MultiPolygon") and geometry_area(geometry) == from_rle.sum()


def test_low_res_logits_go_back_in_as_mask_input(service):
    grey, _, box = phantom_slice()
    image = png_b64(grey)
    first = score(service, image=image, bbox=list(box), model=MEDSAM2, return_low_res=True)[0]["masks"][0]
    logits = first["low_res_logits"]
    assert np.asarray(logits).shape == (128, 128)
    refined = score(service, image=image, bbox=list(box), model=MEDSAM2, mask_input=logits)[0]
    assert len(refined["masks"]) == 1


def test_automask_with_medsam2_follows_sam2_generator_parameters(service):
    grey, _, _ = phantom_slice()
    options = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "include_image_edge": True}
    (result,) = score(service, image=png_b64(grey), model=MEDSAM2, task="automask", automask=options, output_type="largest")
    masks = result["masks"]
    assert masks, "permissive thresholds keep masks even with random weights"
    for i, m in enumerate(masks):
        assert m["index"] == i and m["area"] > 0 and "stability_score" in m
        x, y = m["point_coords"]
        assert 0 <= x < 128 and 0 <= y < 96
    (inner,) = score(service, image=png_b64(grey), model=MEDSAM2, task="automask", output_type="largest",
                     automask={**options, "include_image_edge": False})
    for m in inner["masks"]:
        x0, y0, x1, y1 = m["bbox"]
        assert x0 > 0 and y0 > 0 and x1 < 127 and y1 < 95


def test_automask_with_a_box_only_model_uses_region_boxes(service):
    grey, _, _ = phantom_slice()
    options = {"points_per_side": 2, "pred_iou_thresh": 0.5, "stability_score_thresh": 0.5, "include_image_edge": True}
    (result,) = score(service, image=png_b64(grey), model=LITE, task="automask", automask=options)
    assert result["masks"] and all(m["area"] > 0 for m in result["masks"])


def _fails(service, message: str, **columns) -> None:
    body = {"input_data": {k: [v] for k, v in columns.items()}}
    with pytest.raises(InvalidRequest) as error:
        score_body(service, body)
    assert message in error.value.message, error.value.message


def test_clear_errors_name_the_field(service):
    grey, _, box = phantom_slice()
    image = png_b64(grey)
    _fails(service, "input_data.point_coords[0][1]: point (200, 5) is outside the image of 128 x 96 pixels",
           image=image, model=MEDSAM2, point_coords=[[5, 5], [200, 5]], point_labels=[0, 1])
    _fails(service, "input_data.point_labels[0]: 1 labels for 2 points", image=image, model=MEDSAM2,
           point_coords=[[5, 5], [20, 5]], point_labels=[1])
    _fails(service, "input_data.point_labels[0][0]: must be 1 (foreground) or 0 (background), got 2", image=image,
           model=MEDSAM2, point_coords=[[5, 5]], point_labels=[2])
    _fails(service, f"input_data.point_coords[0]: model lite-medsam takes box prompts only; send a bbox instead, or choose a MedSAM2 model ({MEDSAM2})",
           image=image, model=LITE, point_coords=[[5, 5]], point_labels=[1])
    _fails(service, "input_data.bbox[0]: the box [40, 30, 40, 50] is empty", image=image, model=LITE, bbox=[40, 30, 40, 50])
    _fails(service, "input_data.bbox[0]: box [0, 0, 129, 50] is outside the image", image=image, model=LITE, bbox=[0, 0, 129, 50])
    _fails(service, "input_data.bbox[0]: no prompt", image=image, model=LITE)
    _fails(service, "input_data.mask_input[0]: model MedSAM2_latest takes 128 x 128 low-resolution logits, got 4 x 4",
           image=image, model=MEDSAM2, bbox=list(box), mask_input=np.zeros((4, 4)).tolist())
    _fails(service, "input_data.point_coords[0][0]: expected 2 numbers [x, y] per point", image=image, point_coords=[[1, 2, 3]])
    _fails(service, "input_data.colour: unknown field; allowed fields are image, task", image=image, colour="red")
    _fails(service, "input_data.automask[0].points: unknown field; allowed fields are points_per_side", image=image,
           task="automask", automask={"points": 3})
    _fails(service, "input_data.bbox[0]: not used with task automask", image=image, task="automask", bbox=list(box))
    _fails(service, "input_data.automask[0].crop_n_layers: crops need a point-promptable model", image=image, model=LITE,
           task="automask", automask={"crop_n_layers": 1})
    _fails(service, "input_data.multimask_output[0]: false contradicts output_type 'largest'", image=image, bbox=list(box),
           multimask_output=False, output_type="largest")
    _fails(service, "input_data.model[0]: unknown model 'vit_h'; available models: MedSAM2_latest, lite-medsam", image=image,
           bbox=list(box), model="vit_h")
    constant = png_b64(np.full((8, 8), 4000, np.uint16))
    _fails(service, "input_data.image[0]: the image is constant", image=constant, bbox=[1, 1, 4, 4])


def test_every_item_is_validated_before_any_runs(service, monkeypatch):
    grey, _, box = phantom_slice()
    calls = counting(monkeypatch, service.registry.get(LITE))
    body = {"input_data": {"image": [png_b64(grey[:, ::-1].copy() // 2), png_b64(grey)], "bbox": [list(box), [0, 0, 500, 10]],
                           "model": [LITE, LITE]}}
    with pytest.raises(InvalidRequest, match=r"input_data.bbox\[1\]: box \[0, 0, 500, 10\] is outside"):
        score_body(service, body)
    assert calls[0] == 0


def test_url_image_through_the_fetcher(service):
    """A loopback HTTP server, allowed only by test configuration (the default policy refuses it)."""
    grey, truth, box = phantom_slice()
    data = base64.b64decode(png_b64(grey))

    with serving_bytes(data) as base:
        url = f"{base}/slice.png?sig=SECRET"
        settings = Settings.from_env({"MEDSAM2_WARMUP": "0", "MEDSAM2_FETCH_ALLOW_HTTP": "1", "MEDSAM2_FETCH_ALLOW_NETWORKS": "127.0.0.0/8"})
        allowed = Service(settings, service.registry)
        allowed.prompter = service.prompter  # share the 2D state (and its cached embeddings)
        (result,) = score(allowed, image=url, bbox=list(box), model=LITE)
        assert dice(rle_mask(result["masks"][0]["mask"]), truth) > 0.9
        with pytest.raises(Exception) as refused:
            score(service, image=url, bbox=list(box), model=LITE)
        assert http_status(refused.value) == 400 and "SECRET" not in refused.value.message


def test_backbone_feature_sizes_follow_the_image_size(service):
    model = service.registry.get(MEDSAM2).predictor
    assert model.image_size == 512
    assert MedSAM2ImagePredictor(model)._bb_feat_sizes == [(128, 128), (64, 64), (32, 32)]
    grey, _, _ = phantom_slice()
    embedding, _ = service.prompter.embedding(MEDSAM2, np.repeat(grey[:, :, None], 3, axis=2))
    assert tuple(embedding.features["image_embed"].shape) == (1, 256, 32, 32)
    assert [tuple(f.shape[-2:]) for f in embedding.features["high_res_feats"]] == [(128, 128), (64, 64)]


def test_keep_one_per_prompt():
    groups = np.array([[0, 0], [0, 0], [0, 0], [5, 5], [5, 5]])
    areas = np.array([10, 30, 20, 7, 9])
    scores = np.array([0.5, 0.1, 0.9, 0.8, 0.2])
    assert keep_one_per_prompt(groups, areas, scores, "largest").tolist() == [False, True, False, False, True]
    assert keep_one_per_prompt(groups, areas, scores, "smallest").tolist() == [True, False, False, True, False]
    assert keep_one_per_prompt(groups, areas, scores, "best_quality").tolist() == [False, False, True, True, False]
    assert keep_one_per_prompt(groups, areas, scores, "all").all()


class Blob:
    def __init__(self, nbytes):
        self.nbytes = nbytes


def test_embedding_cache_is_an_lru_bounded_by_bytes():
    cache = EmbeddingCache(max_bytes=100)
    for key in "abc":
        cache.put(key, Blob(40))
    assert cache.get("a") is None and cache.get("b") is not None  # "a" evicted; "b" now most recent
    cache.put("d", Blob(40))
    assert cache.get("c") is None and cache.get("b") is not None and cache.get("d") is not None
    cache.put("huge", Blob(500))
    assert cache.get("huge") is None and cache.size_bytes == 80


def test_embedding_cache_computes_a_key_once_under_concurrency():
    cache = EmbeddingCache(max_bytes=1 << 20)
    started = threading.Event()
    calls = []

    def compute():
        calls.append(1)
        started.wait(2)
        return Blob(10)

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_or_compute("k", compute))) for _ in range(4)]
    for t in threads:
        t.start()
    started.set()
    for t in threads:
        t.join()
    assert len(calls) == 1 and sum(hit for _, hit in results) == 3
    assert content_key(np.zeros((2, 2), np.uint8)) != content_key(np.zeros((2, 2), np.uint16))
