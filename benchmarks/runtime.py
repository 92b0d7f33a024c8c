"""LiteMedSAM's image encoder on torch eager vs ONNX Runtime (CPU): per-slice encoder time, the first 3D
request on the real CT (liver, label 5) through `Service.score_3d`, and the Dice between the two answers.

    PYTHONPATH=src python benchmarks/runtime.py [--slices 10]

Each runtime gets its own Service (fresh feature caches, warm-up off); the ONNX export is made into a
temporary folder, so the service build time of "onnx" includes exporting the encoder once.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from real_anatomy import DATA, SOFT_TISSUE, Structure, answer_of, truth_of  # noqa: E402

from medsam2_endpoint.core.service import Service  # noqa: E402
from medsam2_endpoint.core.settings import Settings  # noqa: E402
from medsam2_endpoint.engines.lite import LiteMedSAMEngine  # noqa: E402
from medsam2_endpoint.pipeline.window import window_to_uint8  # noqa: E402
from medsam2_endpoint.testing.metrics import dice  # noqa: E402

LIVER = Structure("ct", "liver", 5, SOFT_TISSUE)
RUNTIMES = ("torch", "onnx")


def encoder_seconds(engine: LiteMedSAMEngine, slices: np.ndarray) -> float:
    """Mean seconds per slice of the encoder alone, after one warm-up run."""
    images = [engine._image_tensor(s) for s in slices]
    engine._encode(images[0])
    started = time.perf_counter()
    for image in images:
        engine._encode(image)
    return (time.perf_counter() - started) / len(images)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=10, help="slices timed per runtime (after one warm-up)")
    args = parser.parse_args(argv)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(DATA / "ct_dicom")))
    image = reader.Execute()
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / "ct_dicom_labels.nii.gz")))
    truth = truth_of(labels, LIVER)
    windowed = window_to_uint8(sitk.GetArrayFromImage(image), SOFT_TISSUE)
    zs = np.flatnonzero(truth.any(axis=(1, 2)))
    sample = windowed[np.linspace(zs[0], zs[-1], args.slices).astype(int)]
    rows, answers = [], {}
    with tempfile.TemporaryDirectory() as cache:
        for runtime in RUNTIMES:
            env = {"MEDSAM2_WARMUP": "0", "MEDSAM2_RUNTIME": runtime, "MEDSAM2_ONNX_CACHE_DIR": cache}
            settings = Settings.from_env(env, model_dir=str(REPO / "benchmarks" / "no-models"))
            started = time.perf_counter()
            service = Service.from_settings(settings)
            build = time.perf_counter() - started
            engine = service.registry.get("lite-medsam")
            assert isinstance(engine, LiteMedSAMEngine) and engine.runtime == runtime
            answer, seconds, processed = answer_of(service, "lite-medsam", image, truth, LIVER.window, {})
            answers[runtime] = answer
            per_slice = encoder_seconds(engine, sample)
            rows.append((runtime, build, per_slice, seconds, processed, dice(answer, truth)))
    print(f"{os.cpu_count()} CPUs, torch threads {__import__('torch').get_num_threads()}, liver {zs[0]}-{zs[-1]} of {truth.shape[0]} slices")
    print("| runtime | service build (s) | encoder per slice (s) | first 3D request (s) | slices processed | liver Dice |")
    print("| --- | --- | --- | --- | --- | --- |")
    for runtime, build, per_slice, seconds, processed, d in rows:
        print(f"| {runtime} | {build:.1f} | {per_slice:.3f} | {seconds:.1f} | {processed} | {d:.3f} |")
    print(f"\nDice between the torch and onnx answers: {dice(answers['torch'], answers['onnx']):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
