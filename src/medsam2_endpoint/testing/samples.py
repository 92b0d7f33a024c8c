"""Sample request files (from phantoms) and the checks each response must pass.

`write_samples(folder)` writes `<name>.json` (the request body) and `<name>.expect.json` (what the
response must satisfy); `check_response(expect, status, body)` returns a list of failures (empty = ok).
Used by `medsam2-endpoint samples`, `medsam2-endpoint check-sample` and the smoke tests.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medsam2_endpoint.io.encode import decode_mask as io_decode_mask
from medsam2_endpoint.io.encode import rle_counts, rle_decode
from medsam2_endpoint.io.limits import Limits
from medsam2_endpoint.testing.metrics import dice
from medsam2_endpoint.testing.phantoms import Phantom, ct_phantom, mri_phantom, oblique_direction

#: A sample: the request body and what its response must satisfy.
_Case = tuple[dict[str, Any], dict[str, Any]]


def _item(phantom: Phantom, lesion_index: int = 0, *, slice_offset: int = 0) -> dict[str, Any]:
    lesion = phantom.lesions[lesion_index]
    return {
        "nii_image": base64.b64encode(phantom.nifti_bytes(compressed=True)).decode("ascii"),
        "bbox": [float(v) for v in lesion.bbox],
        "key_slice_idx": lesion.key_slice + slice_offset,
        "dicom_window": list(phantom.window) if phantom.window else None,
        "slice_offset": slice_offset,
    }


def _columns(items: list[dict[str, Any]], **extra: list[Any]) -> dict[str, Any]:
    cols = {key: [item[key] for item in items] for key in items[0]}
    if all(v is None for v in cols.get("dicom_window", [])):
        cols.pop("dicom_window")
    cols.update(extra)
    return {"input_data": cols}


def _expect_ok(phantoms: list[tuple[Phantom, int]], *, min_dice: float | None, mask_format: str = "list") -> dict[str, Any]:
    items = []
    for phantom, lesion_index in phantoms:
        lesion = phantom.lesions[lesion_index]
        items.append(
            {
                "shape": list(phantom.image.GetSize()),
                "mask_shape": list(phantom.labels.shape),
                "spacing": list(phantom.image.GetSpacing()),
                "origin": list(phantom.image.GetOrigin()),
                "direction": list(phantom.image.GetDirection()),
                "ground_truth_rle": rle_counts(phantom.labels == lesion.label),
                "min_dice": min_dice,
                "mask_format": mask_format,
            }
        )
    return {"status": 200, "items": items, "min_dice_applies_to": ["lite-medsam"]}


def _builders() -> dict[str, Callable[[], _Case]]:
    def ct_liver_lesion() -> _Case:
        p = ct_phantom((20, 96, 96), spacing=(0.8, 0.8, 2.5), direction=oblique_direction(12.0), lesions=("ellipsoid",), seed=1, name="ct_liver_lesion")
        return _columns([_item(p)]), _expect_ok([(p, 0)], min_dice=0.85)

    def ct_two_items_offset() -> _Case:
        a = ct_phantom((20, 96, 96), lesions=("lobulated",), seed=2, name="a")
        b = mri_phantom((20, 96, 112), lesions=("ellipsoid",), seed=3, name="b")
        body = _columns([_item(a, slice_offset=40), _item(b)])
        return body, _expect_ok([(a, 0), (b, 0)], min_dice=0.8)

    def ct_mask_rle() -> _Case:
        p = ct_phantom((20, 96, 96), lesions=("ellipsoid",), seed=4, dtype="float32", name="rle")
        return _columns([_item(p)], mask_format=["rle"], model=["lite-medsam"]), _expect_ok([(p, 0)], min_dice=0.8, mask_format="rle")

    def ct_objects_pair() -> _Case:
        p = ct_phantom((20, 96, 96), lesions=("pair",), seed=8, name="objects")
        body = _columns([_item(p)], mask_format=["rle"])
        cols = body["input_data"]
        cols["objects"] = [[{"id": 10 * (i + 1), "bbox": [float(v) for v in les.bbox], "key_slice_idx": les.key_slice} for i, les in enumerate(p.lesions)]]
        del cols["bbox"], cols["key_slice_idx"]
        expect = _expect_ok([(p, 0)], min_dice=0.7, mask_format="rle")
        expect["items"][0]["objects"] = {str(10 * (i + 1)): rle_counts(p.labels == les.label) for i, les in enumerate(p.lesions)}
        return body, expect

    def ct_mask_nifti() -> _Case:
        p = ct_phantom((20, 96, 96), lesions=("ellipsoid",), seed=9, name="nifti")
        return _columns([_item(p)], mask_format=["nifti"]), _expect_ok([(p, 0)], min_dice=0.8, mask_format="nifti")

    def slice_png(p: Phantom, z: int) -> str:
        """The phantom's slice z, windowed as the 3D route does, as a base64 grey PNG."""
        import io

        from PIL import Image

        from medsam2_endpoint.pipeline.window import window_to_uint8

        buffer = io.BytesIO()
        Image.fromarray(window_to_uint8(p.array()[z : z + 1], p.window)[0]).save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    def image_case(**columns: Any) -> tuple[dict[str, Any], Phantom, int]:
        p = ct_phantom((12, 96, 112), lesions=("ellipsoid",), seed=10, name="slice")
        lesion = p.lesions[0]
        cols = {"image": [slice_png(p, lesion.key_slice)], **{k: [v] for k, v in columns.items()}}
        return {"input_data": cols}, p, lesion.key_slice

    def expect_2d(p: Phantom, z: int, *, min_dice: float | None, mask_format: str, requires_model: str | None = None) -> dict[str, Any]:
        truth = p.labels[z] == p.lesions[0].label
        return {"status": 200, "route": "2d", "mask_format": mask_format, "ground_truth_rle": rle_counts(truth),
                "mask_shape": list(truth.shape), "min_dice": min_dice, "requires_model": requires_model,
                "min_dice_applies_to": ["lite-medsam"]}

    def box_2d_rle() -> _Case:
        p0 = ct_phantom((12, 96, 112), lesions=("ellipsoid",), seed=10)
        body, p, z = image_case(bbox=[float(v) for v in p0.lesions[0].bbox], model="lite-medsam", mask_format="rle")
        return body, expect_2d(p, z, min_dice=0.8, mask_format="rle")

    def box_2d_polygons() -> _Case:
        p0 = ct_phantom((12, 96, 112), lesions=("ellipsoid",), seed=10)
        body, p, z = image_case(bbox=[float(v) for v in p0.lesions[0].bbox], model="lite-medsam", mask_format="polygons")
        return body, expect_2d(p, z, min_dice=None, mask_format="polygons")

    def points_2d_medsam2() -> _Case:
        p0 = ct_phantom((12, 96, 112), lesions=("ellipsoid",), seed=10)
        x0, y0, x1, y1 = p0.lesions[0].bbox
        # background point first, as the QuPath extension sends them
        body, p, z = image_case(point_coords=[[2, 2], [(x0 + x1) // 2, (y0 + y1) // 2]], point_labels=[0, 1],
                                output_type="best_quality", model="MedSAM2_latest", mask_format="rle")
        return body, expect_2d(p, z, min_dice=None, mask_format="rle", requires_model="MedSAM2_latest")

    def automask_2d() -> _Case:
        body, p, z = image_case(task="automask", model="lite-medsam", mask_format="rle",
                                automask={"points_per_side": 4, "stability_score_thresh": 0.7, "pred_iou_thresh": 0.5})
        expect = expect_2d(p, z, min_dice=None, mask_format="rle")
        expect["min_masks"] = 0
        return body, expect

    def url_form_refused() -> _Case:
        # The URL form of nii_image. A static sample cannot point at a server that exists wherever it is
        # posted, so it shows the form with a private address, which the SSRF guard refuses before any
        # connection; tests/test_service.py fetches a real volume over a loopback URL.
        p = ct_phantom((16, 64, 64), lesions=("ellipsoid",), seed=5, name="url")
        body = _columns([_item(p)])
        body["input_data"]["nii_image"] = ["https://10.1.2.3/volumes/ct.nii.gz?sv=2024&sig=SECRETSIGNATURE"]
        return body, {"status": 400, "error_contains": ["input_data.nii_image[0]", "private"], "error_excludes": ["SECRETSIGNATURE"]}

    def error_bbox_outside() -> _Case:
        p = ct_phantom((16, 64, 64), lesions=("ellipsoid",), seed=5, name="bad")
        body = _columns([_item(p)])
        body["input_data"]["bbox"] = [[10.0, 10.0, 600.0, 40.0]]
        return body, {"status": 400, "error_contains": ["input_data.bbox[0]", "600", "width 64"]}

    def error_key_slice_outside() -> _Case:
        p = ct_phantom((16, 64, 64), lesions=("ellipsoid",), seed=6, name="bad")
        body = _columns([_item(p)])
        body["input_data"]["key_slice_idx"] = [40]
        return body, {"status": 400, "error_contains": ["input_data.key_slice_idx[0]", "40", "16 slices"]}

    def correction_round() -> _Case:
        # A correction round as a reader sends it: every prompt so far (the first box, a box on a slice the
        # earlier answer missed) and the earlier answer as previous_mask. A static file cannot count on a
        # worker holding its volume, so it uploads nii_image; a client sends volume_id first (README).
        p = ct_phantom((20, 96, 96), lesions=("ellipsoid",), seed=12, name="correction")
        lesion = p.lesions[0]
        truth = p.labels == lesion.label
        lo, hi = lesion.z_range
        earlier = truth.copy()
        earlier[hi - 1 :] = False  # the earlier answer stopped two slices early
        ys, xs = np.nonzero(truth[hi - 1])
        fix = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
        body = _columns([_item(p)], mask_format=["rle"], model=["lite-medsam"],
                        previous_mask=[{"counts": rle_counts(earlier), "size": list(truth.shape), "order": "F"}])
        cols = body["input_data"]
        cols["objects"] = [[{"id": 1, "prompts": [{"slice": lesion.key_slice, "box": [float(v) for v in lesion.bbox]},
                                                  {"slice": hi - 1, "box": fix}]}]]
        del cols["bbox"], cols["key_slice_idx"]
        return body, _expect_ok([(p, 0)], min_dice=0.8, mask_format="rle")

    def volume_not_held() -> _Case:
        p = ct_phantom((16, 64, 64), lesions=("ellipsoid",), seed=5, name="held")
        body = _columns([_item(p)])
        body["input_data"].update(nii_image=[None], volume_id=["0" * 32])
        return body, {"status": 409, "error_contains": ["input_data.volume_id[0]", "does not hold volume", "send nii_image again"]}

    return {
        "3d_correction_round": correction_round,
        "3d_volume_not_held": volume_not_held,
        "3d_ct_liver_lesion": ct_liver_lesion,
        "3d_two_items_offset": ct_two_items_offset,
        "3d_mask_rle": ct_mask_rle,
        "3d_mask_nifti": ct_mask_nifti,
        "3d_objects_pair": ct_objects_pair,
        "2d_box_rle": box_2d_rle,
        "2d_box_polygons": box_2d_polygons,
        "2d_points_medsam2": points_2d_medsam2,
        "2d_automask": automask_2d,
        "3d_url_form_private_refused": url_form_refused,
        "error_bbox_outside": error_bbox_outside,
        "error_key_slice_outside": error_key_slice_outside,
    }


def write_samples(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, build in _builders().items():
        body, expect = build()
        (folder / f"{name}.json").write_text(json.dumps(body))
        (folder / f"{name}.expect.json").write_text(json.dumps(expect, indent=1))
        written.append(folder / f"{name}.json")
    return written


def decode_mask(mask: Any, mask_format: str, shape: list[int]) -> np.ndarray:
    """An answer's mask in any `mask_format`: nested lists as they are, rle and nifti by the service's own decoder."""
    if mask_format == "list":
        return np.asarray(mask, dtype=np.uint8).reshape(shape)
    # any shape: the caller compares it with the expected one and reports a difference as a failure
    return io_decode_mask(mask, None, field="mask", limits=Limits(max_file_bytes=1 << 62, max_voxels=1 << 62,
                                                                             max_slice_pixels=1 << 62))


def _ring_area(ring: list[list[float]]) -> float:
    x, y = np.asarray(ring, dtype=float).T
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def polygon_area(geometry: dict[str, Any]) -> float:
    """Area of a GeoJSON Polygon/MultiPolygon (exteriors minus holes), in pixels."""
    polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
    return sum(abs(_ring_area(rings[0])) - sum(abs(_ring_area(h)) for h in rings[1:]) for rings in polygons)


def _check_2d(expect: dict[str, Any], body: list[Any]) -> tuple[list[str], list[float]]:
    failures: list[str] = []
    dices: list[float] = []
    for i, result in enumerate(body):
        masks, meta = result["masks"], result["metadata"]
        if meta["mask_format"] != expect["mask_format"] or meta["mask_shape"] != expect["mask_shape"]:
            failures.append(f"item {i}: mask_format/mask_shape {meta['mask_format']} {meta['mask_shape']}")
        if len(masks) < expect.get("min_masks", 1):
            failures.append(f"item {i}: {len(masks)} masks")
        for m in masks:
            if not 0.0 <= m["quality"] <= 1.5:
                failures.append(f"item {i}: quality {m['quality']} out of range")
            if expect["mask_format"] == "polygons" and abs(polygon_area(m["mask"]) - m["area"]) > 1e-6:
                failures.append(f"item {i}: polygon area {polygon_area(m['mask'])} != mask area {m['area']}")
            if expect["mask_format"] == "rle":
                decoded = io_decode_mask(m["mask"], None, field="mask", limits=Limits())
                if int(decoded.sum()) != m["area"]:
                    failures.append(f"item {i}: area {m['area']} != decoded {int(decoded.sum())}")
                if expect.get("min_dice") is not None and masks:
                    score = dice(decoded, rle_decode(expect["ground_truth_rle"], tuple(expect["mask_shape"])))
                    dices.append(score)
                    if meta["model"]["name"] in expect["min_dice_applies_to"] and score < expect["min_dice"]:
                        failures.append(f"item {i}: Dice {score:.3f} below {expect['min_dice']}")
    return failures, dices


def check_response(expect: dict[str, Any], status: int, body: Any, *, models: list[str] | None = None) -> tuple[list[str], list[float]]:
    """Failures (empty when the response satisfies the expectation) and the Dice of each item.

    models: the server's available models, when known; a sample that names an absent model must then be
    refused with a 400 that lists the available ones.
    """
    failures: list[str] = []
    dices: list[float] = []
    required = expect.get("requires_model")
    if required and models is not None and required not in models:
        expect = {"status": 400, "error_contains": ["unknown model", *models]}
    if status != expect["status"]:
        return [f"status {status}, expected {expect['status']}: {str(body)[:300]}"], dices
    if status != 200:
        if not isinstance(body, dict) or body.get("status") != status:
            failures.append(f"error body must carry status {status}: {str(body)[:300]}")
        text = str(body.get("error", "")) if isinstance(body, dict) else ""
        failures += [f"error lacks {part!r}: {text}" for part in expect.get("error_contains", []) if part not in text]
        failures += [f"error must not echo {part!r}" for part in expect.get("error_excludes", []) if part in text]
        return failures, dices
    if expect.get("route") == "2d":
        return _check_2d(expect, body)
    if not isinstance(body, list) or len(body) != len(expect["items"]):
        return [f"expected a list of {len(expect['items'])} results"], dices
    for i, (want, got) in enumerate(zip(expect["items"], body, strict=True)):
        meta = got["metadata"]
        for key in ("shape", "mask_shape", "mask_format"):
            if meta[key] != want[key]:
                failures.append(f"item {i}: {key} {meta[key]} != {want[key]}")
        for key in ("spacing", "origin", "direction"):
            if not np.allclose(meta[key], want[key], atol=1e-6):
                failures.append(f"item {i}: {key} {meta[key]} != {want[key]}")
        mask = decode_mask(got["mask"], meta["mask_format"], want["mask_shape"])
        labels = {int(k): v for k, v in want.get("objects", {"1": want["ground_truth_rle"]}).items()}
        if list(mask.shape) != want["mask_shape"] or not set(np.unique(mask).tolist()) <= {0, *labels}:
            failures.append(f"item {i}: mask must hold 0 and {sorted(labels)} in shape {want['mask_shape']}")
            continue
        if int(np.count_nonzero(mask)) != meta["voxel_count"]:
            failures.append(f"item {i}: voxel_count {meta['voxel_count']} != mask count {int(np.count_nonzero(mask))}")
        applies = meta["model"]["name"] in expect.get("min_dice_applies_to", [])
        for label, truth_rle in labels.items():
            truth = rle_decode(truth_rle, tuple(want["mask_shape"]))
            score = dice(mask == label, truth)
            dices.append(score)
            if want.get("min_dice") is not None and applies and score < want["min_dice"]:
                failures.append(f"item {i} label {label}: Dice {score:.3f} below {want['min_dice']} ({meta['model']['name']})")
    return failures, dices
