"""Automatic masks at the QuPath SAM extension's settings (LiteMedSAM, the vit_t type), per runtime.

Two fields of view of 320 x 240 pixels: the disk (testing.phantoms.disk_image, one obvious bright disk on a
noisy flat background) and a real CT slice (../shared/data/real/ct_dicom, middle slice, soft-tissue window,
resized to 320 x 320 and cropped to 320 x 240). Two bodies: the extension's GUI defaults (16 points per side,
box NMS 0.2, "Multi-mask (smallest)") and its task builder's (32, 0.7, "Single mask"); all other fields
samapi's defaults, as the extension sends them. Each request goes through `Service.automask_image` with the
server's budget (MEDSAM2_REQUEST_DEADLINE_S); the embedding cache is fresh for each, so every time
includes encoding the image once.

    PYTHONPATH=src python benchmarks/automask.py [--runtimes torch,onnx]

Reported: seconds, masks returned, grid prompts decoded / planned (and pruned before decoding), whether the
answer is partial, and for the disk the best IoU of a returned mask with it.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from real_anatomy import DATA, SOFT_TISSUE  # noqa: E402

from medsam2_endpoint.contract.samapi import SamAutomaskBody, samapi_output_type  # noqa: E402
from medsam2_endpoint.core.service import Service  # noqa: E402
from medsam2_endpoint.core.settings import Settings  # noqa: E402
from medsam2_endpoint.pipeline.embedding_cache import EmbeddingCache  # noqa: E402
from medsam2_endpoint.pipeline.window import window_to_uint8  # noqa: E402
from medsam2_endpoint.testing.phantoms import disk_image  # noqa: E402

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtimes", default="torch,onnx")
    args = parser.parse_args(argv)
    disk_rgb, disk = disk_image()
    images = {"disk": (disk_rgb, disk), "real CT": (ct_field_of_view(), None)}
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for runtime in args.runtimes.split(","):
            env = {"MEDSAM2_WARMUP": "0", "MEDSAM2_RUNTIME": runtime, "MEDSAM2_ONNX_CACHE_DIR": cache}
            service = Service.from_settings(Settings.from_env(env, model_dir=str(REPO / "benchmarks" / "no-models")))
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
                    rows.append((runtime, image_name, body_name, seconds, len(result.masks),
                                 f"{cov.decoded} / {cov.planned} ({cov.pruned})", cov.partial, best))
    print(f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, budget {service.settings.deadline_s:g} s")
    print("| runtime | image | body | seconds | masks | prompts decoded / planned (pruned) | partial | best IoU with the disk |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for runtime, image_name, body_name, seconds, n, prompts, partial, best in rows:
        print(f"| {runtime} | {image_name} | {body_name} | {seconds:.1f} | {n} | {prompts} | {partial} | {best} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
