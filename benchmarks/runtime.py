"""LiteMedSAM on torch eager vs ONNX Runtime (CPU): per-slice encoder time, per-box decoder time, the first 3D
request on the real CT (liver, label 5) through `Service.score_3d`, and the Dice between the two runtimes'
answers, on the liver and (with --structures) on every structure of benchmarks/real_anatomy.py.

    PYTHONPATH=src python benchmarks/runtime.py [--slices 10] [--structures]

Each runtime gets its own Service (fresh feature caches, warm-up off); the ONNX exports are made into a
temporary folder, so the service build time of "onnx" includes exporting the encoder and decoder once.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import harness


def arguments() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__)
    parser.add_argument("--slices", type=int, default=10, help="slices timed per runtime (after one warm-up)")
    parser.add_argument("--structures", action="store_true", help="also the Dice between runtimes on every real structure")
    return parser


if __name__ == "__main__":  # --help answers before torch is imported
    ARGS = arguments().parse_args()

import numpy as np
import SimpleITK as sitk
import torch
from real_anatomy import (
    DATA,
    SOFT_TISSUE,
    STRUCTURES,
    Structure,
    answer_of,
    box_of,
    lesion_structures,
    read_scans,
    truth_of,
)

from medsam2_endpoint.base.budget import Budget
from medsam2_endpoint.core.service import Service
from medsam2_endpoint.engines.lite import LiteMedSAMEngine
from medsam2_endpoint.pipeline.window import window_to_uint8
from medsam2_endpoint.testing.metrics import dice

LIVER = Structure("ct", "liver", 5, SOFT_TISSUE)
RUNTIMES = ("torch", "onnx")


def ct_liver() -> tuple[sitk.Image, np.ndarray, np.ndarray, np.ndarray]:
    """The real CT: (image, label array, soft-tissue windowed uint8 volume, the liver's mask)."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(DATA / "ct_dicom")))
    image = reader.Execute()
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / "ct_dicom_labels.nii.gz")))
    return image, labels, window_to_uint8(sitk.GetArrayFromImage(image), SOFT_TISSUE), truth_of(labels, LIVER)


def encoder_seconds(engine: LiteMedSAMEngine, slices: np.ndarray) -> float:
    """Mean seconds per slice of the encoder alone, after one warm-up run."""
    images = [engine._image_tensor(s) for s in slices]
    engine._encode(images[0])
    started = time.perf_counter()
    for image in images:
        engine._encode(image)
    return (time.perf_counter() - started) / len(images)


def decoder_seconds(engine: LiteMedSAMEngine, slices: np.ndarray, boxes: list[list[float]]) -> float:
    """Mean seconds per box of the prompt encoder + mask decoder alone (one box per slice), after one warm-up."""
    embeddings = [engine._encode(engine._image_tensor(s)) for s in slices]
    h, w = slices.shape[1:]
    boxes_256 = [engine._box_256(np.asarray(b), h, w)[None] for b in boxes]
    engine._decode(embeddings[0], boxes_256[0])
    started = time.perf_counter()
    for embedding, box in zip(embeddings, boxes_256, strict=True):
        engine._decode(embedding, box)
    return (time.perf_counter() - started) / len(embeddings)


def structure_rows(services: dict[str, Service]) -> list[tuple[str, str, float, float, float]]:
    """(scan, structure, Dice torch-vs-onnx, Dice torch vs label, Dice onnx vs label) of every real structure."""
    scans = read_scans()
    rows = []
    for structure in [*STRUCTURES, *lesion_structures(scans)]:
        image, labels = scans[structure.scan]
        truth = truth_of(labels, structure)
        answers = {rt: answer_of(svc, "lite-medsam", image, truth, structure.window, {})[0] for rt, svc in services.items()}
        rows.append((structure.scan, structure.name, dice(answers["torch"], answers["onnx"]),
                     dice(answers["torch"], truth), dice(answers["onnx"], truth)))
    return rows


def main(args: argparse.Namespace) -> int:
    image, _, windowed, truth = ct_liver()
    zs = np.flatnonzero(truth.any(axis=(1, 2)))
    picked = np.linspace(zs[0], zs[-1], args.slices).astype(int)
    sample = windowed[picked]
    sample_boxes = [box_of(truth[z]) for z in picked]
    rows, answers, services = [], {}, {}
    with tempfile.TemporaryDirectory() as cache:
        for runtime in RUNTIMES:
            started = time.perf_counter()
            service = harness.service({"MEDSAM2_RUNTIME": runtime, "MEDSAM2_ONNX_CACHE_DIR": cache})
            build = time.perf_counter() - started
            service.budget = Budget.unlimited  # type: ignore[method-assign]  # timings here, not the server's deadline
            engine = service.registry.get("lite-medsam")
            assert isinstance(engine, LiteMedSAMEngine) and engine.runtime == runtime
            answer, seconds, processed = answer_of(service, "lite-medsam", image, truth, LIVER.window, {})
            answers[runtime] = answer
            services[runtime] = service
            per_slice = encoder_seconds(engine, sample)
            per_box = decoder_seconds(engine, sample, sample_boxes)
            rows.append((runtime, build, per_slice, per_box, seconds, processed, dice(answer, truth)))
        structures = structure_rows(services) if args.structures else []
    print(f"{harness.machine()}, torch threads {torch.get_num_threads()}, "
          f"liver {zs[0]}-{zs[-1]} of {truth.shape[0]} slices")
    print("| runtime | service build (s) | encoder per slice (s) | decoder per box (s) | first 3D request (s) | slices processed | liver Dice |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for runtime, build, per_slice, per_box, seconds, processed, d in rows:
        print(f"| {runtime} | {build:.1f} | {per_slice:.3f} | {per_box:.4f} | {seconds:.1f} | {processed} | {d:.3f} |")
    print(f"\nDice between the torch and onnx answers: {dice(answers['torch'], answers['onnx']):.4f}")
    if structures:
        print("\n| scan | structure | Dice torch vs onnx | Dice vs label (torch) | Dice vs label (onnx) |")
        print("| --- | --- | --- | --- | --- |")
        for scan, name, between, d_torch, d_onnx in structures:
            print(f"| {scan} | {name} | {between:.4f} | {d_torch:.3f} | {d_onnx:.3f} |")
        print(f"\nlowest Dice between runtimes: {min(r[2] for r in structures):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
