"""Quality on real scans (../shared/data/real): the served 3D answer against its per-slice ceiling.

For each structure: one box (the label's bounding box) on its largest slice, sent through the Service
as a user's request would be (LiteMedSAM unless --model). Reported per structure: Dice and NSD (2 mm)
of the 3D answer; the per-slice ceiling (every labelled slice segmented alone with its own box); the
key slice alone (2D Dice there); the label's and the answer's slice ranges; the time of the 3D answer.

    .venv/bin/python benchmarks/real_anatomy.py [--only ct,mr,lesion] [--runtime onnx --precision fp32] [--json benchmarks/out/real.json]
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harness

# LiteMedSAM tracking rules tried (pipeline/tracking.TrackRule fields); "default" is the engine's own
RULES: dict[str, dict[str, Any]] = {
    "iou0.8": {"min_iou": 0.8},  # the rule before this benchmark existed
    "iou0.5": {"min_iou": 0.5},
    "iou0.8+la1": {"min_iou": 0.8, "lookahead": 1},
    "iou0.8+la2": {"min_iou": 0.8, "lookahead": 2},
    "rel0.85": {"min_iou": 0.5, "relative_iou": 0.85},
    "rel0.85+la1": {"min_iou": 0.5, "relative_iou": 0.85, "lookahead": 1},
    "iou0.5+area": {"min_iou": 0.5, "max_area_growth": 1.5, "min_area_ratio": 0.3},
    "iou0.5+int": {"min_iou": 0.5, "intensity_z": 1.5},
    "iou0.5+shift": {"min_iou": 0.5, "max_shift": 0.5},
    "iou0.5+int1.0": {"min_iou": 0.5, "intensity_z": 1.0},
    "iou0.5+int2.0": {"min_iou": 0.5, "intensity_z": 2.0},
    "iou0.6+int": {"min_iou": 0.6, "intensity_z": 1.5},
    "iou0.7+int": {"min_iou": 0.7, "intensity_z": 1.5},
    "rel0.85+int": {"min_iou": 0.5, "relative_iou": 0.85, "intensity_z": 1.5},
    "iou0.5+int+la1": {"min_iou": 0.5, "intensity_z": 1.5, "lookahead": 1},
    "pooled1.5": {"min_iou": 0.5, "pooled_intensity_z": 1.5},
    "pooled2.0": {"min_iou": 0.5, "pooled_intensity_z": 2.0},
    "pooled2.5": {"min_iou": 0.5, "pooled_intensity_z": 2.5},
    "int+fill0.3": {"min_iou": 0.5, "intensity_z": 1.5, "min_key_fill": 0.3},
    "pooled2.0+fill0.3": {"min_iou": 0.5, "pooled_intensity_z": 2.0, "min_key_fill": 0.3},
    "pooled1.5+fill0.3": {"min_iou": 0.5, "pooled_intensity_z": 1.5, "min_key_fill": 0.3},
    "int+fill0.3+end0.75": {"min_iou": 0.5, "intensity_z": 1.5, "min_key_fill": 0.3, "end_area_ratio": 0.75},
    "pooled1.5+fill0.3+end0.75": {"min_iou": 0.5, "pooled_intensity_z": 1.5, "min_key_fill": 0.3, "end_area_ratio": 0.75},
    "pooled2.0+fill0.3+end0.75": {"min_iou": 0.5, "pooled_intensity_z": 2.0, "min_key_fill": 0.3, "end_area_ratio": 0.75},
    "int+fill0.3+core0.5": {"min_iou": 0.5, "intensity_z": 1.5, "min_key_fill": 0.3, "intensity_core": 0.5},
    "int+fill0.3+core0.75": {"min_iou": 0.5, "intensity_z": 1.5, "min_key_fill": 0.3, "intensity_core": 0.75},
    "pooled2.0+boxfirst": {"min_iou": 0.5, "pooled_intensity_z": 2.0, "min_key_fill": 2.0},
    "combo": {"min_iou": 0.6, "relative_iou": 0.8, "max_area_growth": 1.6, "intensity_z": 2.0, "max_shift": 0.5, "lookahead": 1},
}


def arguments() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__)
    parser.add_argument("--model", default="lite-medsam")
    parser.add_argument("--only", default="ct,mr,lesion", help="comma-separated: ct, mr, lesion")
    parser.add_argument("--model-dir", default=None, help="MedSAM2 checkpoints (default: none, LiteMedSAM only)")
    parser.add_argument("--rules", default="default", help=f"comma-separated LiteMedSAM tracking rules: default, {', '.join(RULES)}")
    parser.add_argument("--stop-after-empty", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the rows here too")
    parser.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnx", "openvino"], help="MEDSAM2_RUNTIME for LiteMedSAM")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="MEDSAM2_PRECISION for LiteMedSAM (benchmarks/bf16.py compares fp32 and bf16 side by side)")
    return parser


if __name__ == "__main__":  # --help answers before torch is imported
    ARGS = arguments().parse_args()

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from medsam2_endpoint.contract.score3d import parse_request
from medsam2_endpoint.core import volumes
from medsam2_endpoint.core.service import Service
from medsam2_endpoint.io.encode import rle_decode
from medsam2_endpoint.io.volume import Volume, write_nifti
from medsam2_endpoint.pipeline.tracking import DEFAULT_RULE, TrackRule, using_rule
from medsam2_endpoint.testing.metrics import dice, nsd

DATA = harness.DATA
SOFT_TISSUE = (-160.0, 240.0)
BONE = (-500.0, 1300.0)


@dataclass(frozen=True)
class Structure:
    scan: str  # "ct", "mr" or a lesion file stem
    name: str
    label: int
    window: tuple[float, float] | None  # None: sent as modality MR without a window (the server's percentile window)
    one_component: bool = False  # the label holds several separate objects (vertebrae): take the key slice's one


STRUCTURES = [
    Structure("ct", "liver", 5, SOFT_TISSUE),
    Structure("ct", "stomach", 6, SOFT_TISSUE),
    Structure("ct", "pancreas", 7, SOFT_TISSUE),
    Structure("ct", "aorta", 52, SOFT_TISSUE),
    Structure("ct", "vertebra T12", 32, BONE),
    Structure("ct", "colon", 20, SOFT_TISSUE),
    Structure("mr", "liver", 5, None),
    Structure("mr", "spleen", 1, None),
    Structure("mr", "kidney right", 2, None),
    Structure("mr", "kidney left", 3, None),
    Structure("mr", "vertebra", 19, None, one_component=True),
    Structure("mr", "iliopsoas left", 48, None),
]


def read_scans() -> dict[str, tuple[sitk.Image, np.ndarray]]:
    """scan name -> (image, label array (Z, Y, X))."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(DATA / "ct_dicom")))
    scans = {
        "ct": (reader.Execute(), sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / "ct_dicom_labels.nii.gz")))),
        "mr": (sitk.ReadImage(str(DATA / "mr.nii.gz")), sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / "mr_labels.nii.gz")))),
    }
    for path in sorted((DATA / "lesions").glob("CT_Lesion_*_label.nii.gz")):
        stem = path.name[: -len("_label.nii.gz")]
        image = sitk.ReadImage(str(path.with_name(stem + ".nii.gz")))
        scans[stem] = (image, sitk.GetArrayFromImage(sitk.ReadImage(str(path))))
    return scans


def lesion_structures(scans: dict[str, tuple[sitk.Image, np.ndarray]]) -> list[Structure]:
    return [Structure(name, f"lesion {name.split('_')[2]}", 1, (0.0, 255.0)) for name in scans if name.startswith("CT_Lesion")]


def truth_of(labels: np.ndarray, s: Structure) -> np.ndarray:
    truth: np.ndarray = labels == s.label
    if s.one_component:  # the connected object through the largest slice's largest region
        key = int(np.argmax(truth.sum(axis=(1, 2))))
        parts, _ = ndimage.label(truth, structure=np.ones((3, 3, 3)))
        ids, counts = np.unique(parts[key][parts[key] > 0], return_counts=True)
        truth = np.asarray(parts == ids[np.argmax(counts)])
    return truth


def box_of(mask2d: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask2d)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def largest_in_view(truth: np.ndarray, axis: int) -> int:
    """The index along `axis` (0 axial, 1 coronal, 2 sagittal) of the label's largest slice in that view."""
    return int(np.argmax(truth.sum(axis=tuple(a for a in range(3) if a != axis))))


def view_box(truth: np.ndarray, axis: int, at: int) -> list[list[int]]:
    """The label's box on slice `at` of view `axis` as a 3D Slicer box: half-open [[k0, k1], [j0, j1], [i0, i1]],
    one voxel thick along `axis`."""
    rows, cols = np.nonzero(np.take(truth, at, axis=axis))
    box = [[at, at + 1]] * 3
    first, second = (a for a in range(3) if a != axis)
    box[first], box[second] = [int(rows.min()), int(rows.max()) + 1], [int(cols.min()), int(cols.max()) + 1]
    return box


def span(mask: np.ndarray) -> str:
    zs = np.flatnonzero(mask.any(axis=(1, 2)))
    return "-" if zs.size == 0 else f"{zs[0]}-{zs[-1]}"


def span_ends(mask: np.ndarray) -> tuple[int, int] | None:
    zs = np.flatnonzero(mask.any(axis=(1, 2)))
    return None if zs.size == 0 else (int(zs[0]), int(zs[-1]))


def request_of(model: str, image: sitk.Image, truth: np.ndarray, window: tuple[float, float] | None,
               extra: dict[str, object]) -> dict[str, Any]:
    """The /score body a user sends for one structure: the label's box on its largest slice."""
    key = int(np.argmax(truth.sum(axis=(1, 2))))
    return {"input_data": {
        "nii_image": [base64.b64encode(write_nifti(image)).decode()], "bbox": [box_of(truth[key])], "key_slice_idx": [key],
        **({"dicom_window": [list(window)]} if window is not None else {"modality": ["MR"]}),
        "model": [model], "mask_format": ["rle"],
        **{k: [v] for k, v in extra.items()},
    }}


def prepared_of(model: str, image: sitk.Image, truth: np.ndarray, window: tuple[float, float] | None) -> volumes.PreparedItem:
    """The structure's request as the Service prepares it (core/volumes.prepare): its windowed volume and the
    content key its embeddings are cached under, so work on its slices reuses (and feeds) the answer's cache."""
    (item,) = parse_request(request_of(model, image, truth, window, {}), max_items=1)
    return volumes.prepare(item, Volume.from_sitk(image), model)


def ceiling_of(service: Service, model: str, image: sitk.Image, truth: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    """Every labelled slice segmented alone with the label's own box there (windowed as the server does)."""
    engine: Any = service.registry.get(model)  # segment_slice: both engines have it, the protocol does not
    prepared = prepared_of(model, image, truth, window)
    state = engine.start(prepared.windowed.array, prepared.volume_key)
    ceiling = np.zeros_like(truth)
    for z in np.flatnonzero(truth.any(axis=(1, 2))):
        ceiling[z] = engine.segment_slice(state, int(z), box_of(truth[z]))[0]
    return ceiling


def answer_of(service: Service, model: str, image: sitk.Image, truth: np.ndarray, window: tuple[float, float] | None,
              extra: dict[str, object]) -> tuple[np.ndarray, float, int]:
    """The served 3D answer to one box on the label's largest slice: (mask, seconds, slices processed)."""
    items = parse_request(request_of(model, image, truth, window, extra), max_items=1)
    started = time.perf_counter()
    (result,) = service.score_3d(items)
    seconds = time.perf_counter() - started
    answer = rle_decode(result["mask"]["counts"], tuple(result["mask"]["size"])).astype(bool)
    return answer, seconds, int(result["metadata"]["slices_processed"])


def _ends_within(answer: np.ndarray, truth: np.ndarray, tolerance: int) -> bool:
    a, t = span_ends(answer), span_ends(truth)
    return a is not None and t is not None and abs(a[0] - t[0]) <= tolerance and abs(a[1] - t[1]) <= tolerance




def main(args: argparse.Namespace) -> int:
    service = harness.service({"MEDSAM2_RUNTIME": args.runtime, "MEDSAM2_PRECISION": args.precision}, args.model_dir)
    scans = read_scans()
    wanted = set(args.only.split(","))
    structures = [s for s in STRUCTURES if s.scan in wanted] + (lesion_structures(scans) if "lesion" in wanted else [])
    extra: dict[str, object] = {} if args.stop_after_empty is None else {"stop_after_empty": args.stop_after_empty}
    rules = args.rules.split(",")
    rows: list[dict[str, Any]] = []
    print(harness.header(["rule", "scan", "structure", "3D Dice", "NSD 2 mm", "ceiling Dice", "key slice alone",
                          "label slices", "answer slices", "time (s)"]))
    for s in structures:
        image, labels = scans[s.scan]
        truth = truth_of(labels, s)
        window = s.window
        sx, sy, sz = image.GetSpacing()
        spacing_zyx = (float(sz), float(sy), float(sx))
        answers = {}
        for rule in rules:  # the first rule's answer on a scan's first structure is a cold (first) request
            with using_rule(DEFAULT_RULE if rule == "default" else TrackRule(**RULES[rule])):
                answers[rule] = answer_of(service, args.model, image, truth, window, extra)
        ceiling = ceiling_of(service, args.model, image, truth, window)
        key = int(np.argmax(truth.sum(axis=(1, 2))))
        for rule in rules:
            answer, seconds, processed = answers[rule]
            row = {"rule": rule, "scan": "ct lesion" if s.scan.startswith("CT_Lesion") else s.scan, "structure": s.name,
                   "dice": dice(answer, truth), "nsd": nsd(answer, truth, spacing_zyx), "ceiling": dice(ceiling, truth),
                   "key_alone": dice(ceiling[key], truth[key]), "label_slices": span(truth), "answer_slices": span(answer),
                   "ends_within_1": _ends_within(answer, truth, 1), "seconds": seconds, "slices_processed": processed}
            rows.append(row)
            print(f"| {rule} | {row['scan']} | {s.name} | {row['dice']:.3f} | {row['nsd']:.3f} | {row['ceiling']:.3f} "
                  f"| {row['key_alone']:.3f} | {row['label_slices']} | {row['answer_slices']} | {seconds:.1f} |", flush=True)
    print()
    for rule in rules:
        mine = [r for r in rows if r["rule"] == rule]
        mean = float(np.mean([r["dice"] for r in mine]))
        ceiling_mean = float(np.mean([r["ceiling"] for r in mine]))
        worst = max(mine, key=lambda r: float(r["ceiling"]) - float(r["dice"]))
        ends = sum(bool(r["ends_within_1"]) for r in mine)
        print(f"{rule}: mean 3D Dice {mean:.3f}, NSD {float(np.mean([r['nsd'] for r in mine])):.3f}, mean ceiling "
              f"{ceiling_mean:.3f} (gap {ceiling_mean - mean:.3f}); largest gap {float(worst['ceiling']) - float(worst['dice']):.3f} "
              f"({worst['scan']} {worst['structure']}); ends within 1 slice: {ends}/{len(mine)}; "
              f"3D time {sum(float(r['seconds']) for r in mine):.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
