"""Automatic masks at the QuPath SAM extension's settings (LiteMedSAM, the vit_t type), per runtime.

Two fields of view of 320 x 240 pixels: the disk (testing.phantoms.disk_image, one obvious bright disk on a
noisy flat background) and a real CT slice (../shared/data/real/ct_dicom, middle slice, soft-tissue window,
resized to 320 x 320 and cropped to 320 x 240). Two bodies: the extension's GUI defaults (16 points per side,
box NMS 0.2, "Multi-mask (smallest)") and its task builder's (32, 0.7, "Single mask"); all other fields
samapi's defaults, as the extension sends them. Each request goes through `Service.automask_image` with the
server's budget (MEDSAM2_REQUEST_DEADLINE_S); the embedding cache is fresh for each, so every time
includes encoding the image once.

    PYTHONPATH=src python benchmarks/automask.py [--runtimes torch,onnx,openvino:bf16] [--margins]

Reported: seconds, masks returned, grid prompts decoded / planned (and pruned before decoding), whether the
answer is partial, and for the disk the best IoU of a returned mask with it. --margins instead reports, for
disks of several sizes and contrasts, LiteMedSAM's predicted IoU, stability score (offset 1.0) and IoU with
the disk from one box around the disk grown by a fraction of its diameter on each side (why box_prompts.MARGINS).
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
import tempfile
import time

import harness


def arguments() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__)
    parser.add_argument("--runtimes", default="torch,onnx", help="comma-separated RUNTIME[:PRECISION], e.g. onnx,openvino:fp32,openvino:bf16")
    parser.add_argument("--margins", action="store_true", help="the margin sweep instead of the requests")
    return parser


if __name__ == "__main__":  # --help answers before torch is imported
    ARGS = arguments().parse_args()

import numpy as np
import SimpleITK as sitk
from PIL import Image
from real_anatomy import DATA, SOFT_TISSUE

from medsam2_endpoint.contract.samapi import SamAutomaskBody, samapi_output_type
from medsam2_endpoint.pipeline.embedding_cache import EmbeddingCache
from medsam2_endpoint.pipeline.window import window_to_uint8
from medsam2_endpoint.testing.phantoms import disk_image

BODIES = {
    "GUI defaults": {"points_per_side": 16, "box_nms_thresh": 0.2, "output_type": "Multi-mask (smallest)"},
    "builder defaults": {"points_per_side": 32, "box_nms_thresh": 0.7, "output_type": "Single mask"},
}


def png_b64(rgb: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def ct_field_of_view() -> np.ndarray:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(DATA / "ct_dicom")))
    volume = sitk.GetArrayFromImage(reader.Execute())
    grey = window_to_uint8(volume, SOFT_TISSUE)[volume.shape[0] // 2]
    grey = np.asarray(Image.fromarray(grey).resize((320, 320), Image.Resampling.BILINEAR))[40:280]
    return np.repeat(grey[:, :, None], 3, axis=2)


DISKS = [  # (radius, centre x, centre y, disk value, background)
    (45, 180, 110, 200, 40), (20, 100, 80, 200, 40), (70, 160, 120, 150, 60), (30, 200, 150, 90, 40),
]
MARGIN_FRACTIONS = (0.04, 0.08, 0.12, 0.16, 0.2, 0.25, 0.3)


def margins_table() -> None:
    from sam2.utils.amg import calculate_stability_score

    from medsam2_endpoint.engines.lite import LiteMedSAMEngine

    engine = LiteMedSAMEngine()
    print("| disk diameter (px) | disk / background | margin a side | predicted IoU | stability | IoU with the disk |")
    print("| --- | --- | --- | --- | --- | --- |")
    for radius, cx, cy, value, background in DISKS:
        rgb, disk = disk_image(centre_xy=(cx, cy), radius=radius, value=value, background=background)
        embedding = engine.embed_image(rgb)
        grow = [f * 2 * radius for f in MARGIN_FRACTIONS]
        boxes = np.clip([[cx - radius - g, cy - radius - g, cx + radius + g, cy + radius + g] for g in grow], 0, [320, 240, 320, 240])
        logits, ious, _ = engine.predict_logits_2d(embedding, np.asarray(boxes, dtype=np.float64))
        stability = calculate_stability_score(logits[:, 0], 0.0, 1.0).numpy()
        for k, fraction in enumerate(MARGIN_FRACTIONS):
            mask = logits[k, 0].numpy() > 0
            iou = (mask & disk).sum() / (mask | disk).sum()
            print(f"| {2 * radius} | {value} / {background} | {fraction:.0%} | {ious[k, 0]:.3f} | {stability[k]:.3f} | {iou:.3f} |")


def main(args: argparse.Namespace) -> int:
    if args.margins:
        margins_table()
        return 0
    disk_rgb, disk = disk_image()
    images = {"disk": (disk_rgb, disk), "real CT": (ct_field_of_view(), None)}
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for runtime in args.runtimes.split(","):
            name, _, precision = runtime.partition(":")
            service = harness.service({"MEDSAM2_RUNTIME": name, "MEDSAM2_PRECISION": precision or "auto",
                                       "MEDSAM2_ONNX_CACHE_DIR": cache})
            for image_name, (rgb, truth) in images.items():
                b64 = png_b64(rgb)
                for body_name, fields in BODIES.items():
                    body = SamAutomaskBody(type="vit_t", b64img=b64, **fields)  # type: ignore[arg-type]
                    service.prompter.cache = EmbeddingCache(256 * 1024 * 1024)  # encode each image again
                    started = time.perf_counter()
                    result = service.automask_image("lite-medsam", b64, body, samapi_output_type(body.output_type))
                    seconds = time.perf_counter() - started
                    cov = result.coverage
                    assert cov is not None
                    best = "-"
                    if truth is not None:
                        ious = [(m.mask & truth).sum() / (m.mask | truth).sum() for m in result.masks]
                        best = f"{max(ious):.3f}" if ious else "none"
                    rows.append((runtime, image_name, body_name, f"{seconds:.1f}", len(result.masks),
                                 f"{cov.decoded} / {cov.planned} ({cov.pruned})", cov.partial, best))
    print(f"{harness.machine()}, budget {service.settings.deadline_s:g} s")
    print(harness.table(["runtime", "image", "body", "seconds", "masks", "prompts decoded / planned (pruned)", "partial",
                         "best IoU with the disk"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
