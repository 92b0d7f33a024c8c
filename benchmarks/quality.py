"""Segmentation quality on phantoms with known ground truth, through the endpoint's Service.

    .venv/bin/python benchmarks/quality.py                      # quality set, every available model
    .venv/bin/python benchmarks/quality.py --set tiny --lite-modes pad,stretch
    .venv/bin/python benchmarks/quality.py --model-dir model    # include MedSAM2 checkpoints found there
    .venv/bin/python benchmarks/quality.py --stop-after-empty 0,1,2,3 --lite-min-iou 0   # the stop rule alone

Prints a Markdown table (Dice, 95th-percentile Hausdorff distance in mm, slices covered, time) and the
mean Dice per model. Every lesion of every phantom is one request (box on its key slice, phantom window).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import harness


def arguments() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__)
    parser.add_argument("--set", default="quality", help="phantom set: tiny, quality")
    parser.add_argument("--model-dir", type=Path, default=None, help="folder with MedSAM2 checkpoints (optional)")
    parser.add_argument("--lite-modes", default="pad", help="LiteMedSAM preprocessing modes to run: pad, stretch or both")
    parser.add_argument("--stop-after-empty", default="2", help="stop rule values to compare, e.g. 0,2 (0: off; default 2, the service's)")
    parser.add_argument("--lite-min-iou", type=float, help="LiteMedSAM's IoU floor while tracking (0 turns it off; default 0.5)")
    parser.add_argument("--lite-intensity-z", type=float,
                        help="LiteMedSAM's intensity rule (0 turns it off; default 1.5). --lite-min-iou 0.8 --lite-intensity-z 0: the old rule")
    parser.add_argument("--lite-key-fill", type=float, help="LiteMedSAM's key-fill rule (0 turns it off; default 0.3)")
    parser.add_argument("--lite-end-area", type=float, help="LiteMedSAM's tapering-tip rule, e.g. 0.75 (default off)")
    parser.add_argument("--lite-core", type=float, help="LiteMedSAM's intensity test on the mask's core: the logit quantile (0 turns it off)")
    return parser


if __name__ == "__main__":  # --help answers before torch is imported
    ARGS = arguments().parse_args()

import numpy as np

from medsam2_endpoint.api.azure import score as score_body
from medsam2_endpoint.core.registry import ModelRegistry, configure_threads
from medsam2_endpoint.core.service import Service
from medsam2_endpoint.core.settings import Settings
from medsam2_endpoint.engines.base import VolumeEngine
from medsam2_endpoint.engines.lite import LiteMedSAMEngine
from medsam2_endpoint.engines.medsam2 import MedSAM2Engine, find_checkpoints
from medsam2_endpoint.io.encode import dumps, rle_decode
from medsam2_endpoint.pipeline.tracking import DEFAULT_RULE, TrackRule, using_rule
from medsam2_endpoint.testing.metrics import dice, hd95
from medsam2_endpoint.testing.phantoms import phantom_set


def lite_rule(min_iou: float | None = None, intensity_z: float | None = None, key_fill: float | None = None,
              end_area: float | None = None, core: float | None = None) -> TrackRule:
    """The served rule with the options given (0 turns a test off)."""
    rule = DEFAULT_RULE if min_iou is None else dataclasses.replace(DEFAULT_RULE, min_iou=min_iou)
    if intensity_z is not None:
        rule = dataclasses.replace(rule, intensity_z=intensity_z or None)
    if key_fill is not None:
        rule = dataclasses.replace(rule, min_key_fill=key_fill or None)
    if end_area is not None:
        rule = dataclasses.replace(rule, end_area_ratio=end_area or None)
    if core is not None:
        rule = dataclasses.replace(rule, intensity_core=core or None)
    return rule


def build_service(model_dir: Path | None, lite_modes: list[str]) -> Service:
    engines: dict[str, VolumeEngine] = {}
    for path in find_checkpoints(model_dir):
        engines[path.stem] = MedSAM2Engine(path)
    for mode in lite_modes:
        name = "lite-medsam" if len(lite_modes) == 1 else f"lite-medsam[{mode}]"
        engines[name] = LiteMedSAMEngine(resize_mode=mode)
    settings = Settings.from_env({"MEDSAM2_WARMUP": "0", "MEDSAM2_REQUEST_DEADLINE_S": "3600"})
    return Service(settings, ModelRegistry(engines, next(iter(engines))))


def evaluate(service: Service, set_name: str, stops: Sequence[int] = (2,)) -> list[dict[str, Any]]:
    """One request per lesion, model and `stop_after_empty` value (0: the rule off)."""
    rows: list[dict[str, Any]] = []
    for phantom in phantom_set(set_name):
        data = base64.b64encode(phantom.nifti_bytes()).decode()
        spacing_zyx = tuple(reversed(phantom.image.GetSpacing()))
        for lesion, model, stop in ((les, m, st) for les in phantom.lesions for m in service.available_models() for st in stops):
            label = model if len(stops) == 1 else f"{model}, stop_after_empty {stop}"
            cols = {
                "nii_image": [data], "bbox": [list(lesion.bbox)], "key_slice_idx": [lesion.key_slice], "model": [model],
                "mask_format": ["rle"], "stop_after_empty": [stop],
            }
            if phantom.window:
                cols["dicom_window"] = [list(phantom.window)]
            started = time.perf_counter()
            (result,) = json.loads(dumps(score_body(service, {"input_data": cols})))
            seconds = time.perf_counter() - started
            mask = rle_decode(result["mask"]["counts"], tuple(result["mask"]["size"])).astype(bool)
            truth = phantom.mask(lesion.label)
            covered = np.flatnonzero(mask.any(axis=(1, 2)))
            rows.append(
                {
                    "phantom": phantom.name, "lesion": lesion.name, "model": label,
                    "dice": dice(mask, truth), "hd95_mm": hd95(mask, truth, spacing_zyx),
                    "slices": f"{covered.min()}-{covered.max()}" if covered.size else "-",
                    "truth_slices": f"{lesion.z_range[0]}-{lesion.z_range[1]}",
                    "slices_processed": result["metadata"]["slices_processed"], "seconds": seconds,
                }
            )
            print(f"  {phantom.name:26s} {lesion.name:15s} {label:22s} Dice {rows[-1]['dice']:.3f}", file=sys.stderr)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| phantom | lesion | model | Dice | HD95 (mm) | slices (pred / truth) | slices processed | time (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['phantom']} | {r['lesion']} | {r['model']} | {r['dice']:.3f} | {r['hd95_mm']:.1f} | "
            f"{r['slices']} / {r['truth_slices']} | {r['slices_processed']} | {r['seconds']:.1f} |"
        )
    lines.append("")
    lines.append("| model | mean Dice | min Dice | mean HD95 (mm) | mean time (s) |")
    lines.append("| --- | --- | --- | --- | --- |")
    for model in dict.fromkeys(r["model"] for r in rows):
        sel = [r for r in rows if r["model"] == model]
        finite = [r["hd95_mm"] for r in sel if np.isfinite(r["hd95_mm"])]
        lines.append(
            f"| {model} | {np.mean([r['dice'] for r in sel]):.3f} | {min(r['dice'] for r in sel):.3f} | "
            f"{np.mean(finite) if finite else float('inf'):.1f} | {np.mean([r['seconds'] for r in sel]):.1f} |"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    configure_threads(0)
    service = build_service(args.model_dir, [m for m in args.lite_modes.split(",") if m])
    rule = lite_rule(args.lite_min_iou, args.lite_intensity_z, args.lite_key_fill, args.lite_end_area, args.lite_core)
    with using_rule(rule):  # every LiteMedSAM walk of this run
        print(markdown(evaluate(service, args.set, [int(v) for v in args.stop_after_empty.split(",")])))
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
