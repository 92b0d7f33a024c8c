"""MedSAM2 on the CPU in bf16 (torch autocast, `MEDSAM2_PRECISION=bf16`) against fp32 (the default, the reference's
arithmetic): the served 3D answer on each lesion of the "quality" phantoms (testing/phantoms.py), its time, and the
Dice between the two answers.

    PYTHONPATH=src .venv/bin/python benchmarks/medsam2_bf16.py [--model-dir DIR] [--lesions 4]

Without --model-dir the model is the random-weight MedSAM2 checkpoint the tests use (harness.random_checkpoint): its
masks are not segmentations, so only the agreement between the precisions and the time mean anything; with real
MedSAM2 weights (MedSAM2_latest.pt in DIR) the Dice against the phantoms' truth does too. Each precision gets its
own Service (fresh caches); the lesions alternate between them.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import harness


def arguments() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__)
    parser.add_argument("--model-dir", default=None, help="a folder with MedSAM2 checkpoints (default: the random-weight one)")
    parser.add_argument("--lesions", type=int, default=4, help="how many phantom lesions (default 4)")
    return parser


if __name__ == "__main__":  # --help answers before torch is imported
    ARGS = arguments().parse_args()

import numpy as np
from real_anatomy import answer_of

from medsam2_endpoint.engines.precision import cpu_has_bf16
from medsam2_endpoint.testing.metrics import dice
from medsam2_endpoint.testing.phantoms import phantom_set


def main(args: argparse.Namespace) -> int:
    if not cpu_has_bf16():
        print("this CPU has no native bf16 (avx512_bf16 or amx_bf16): bf16 would be emulated; nothing to measure")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model_dir) if args.model_dir else Path(tmp)
        if not args.model_dir:
            shutil.copy(harness.random_checkpoint(), model_dir / "MedSAM2_latest.pt")
        services = {p: harness.service({"MEDSAM2_PRECISION": p, "MEDSAM2_ENABLE_LITE": "0"}, model_dir) for p in ("fp32", "bf16")}
        model = services["fp32"].default
        print(f"{harness.machine()}; model {model} ({'given' if args.model_dir else 'random weights'}), "
              f"precision {services['bf16'].registry.get(model).info.capabilities.precision} vs "
              f"{services['fp32'].registry.get(model).info.capabilities.precision}")
        cases = [(p, lesion) for p in phantom_set("quality") for lesion in p.lesions][: args.lesions]
        rows: list[list[object]] = []
        between: list[float] = []
        times = {"fp32": 0.0, "bf16": 0.0}
        for phantom, lesion in cases:
            truth = phantom.mask(lesion.label)
            got = {p: answer_of(s, model, phantom.image, truth, phantom.window, {}) for p, s in services.items()}
            for p in times:
                times[p] += got[p][1]
            between.append(dice(got["fp32"][0], got["bf16"][0]))
            rows.append([phantom.name, lesion.name, f"{dice(got['fp32'][0], truth):.3f}", f"{dice(got['bf16'][0], truth):.3f}",
                         f"{between[-1]:.4f}", int(got["fp32"][0].sum()), f"{got['fp32'][1]:.1f}",
                         f"{got['bf16'][1]:.1f}"])
    print(harness.table(["phantom", "lesion", "Dice vs truth fp32", "bf16", "Dice bf16 vs fp32", "voxels fp32",
                         "time fp32 (s)", "bf16 (s)"], rows))
    print(f"\nDice bf16 vs fp32: mean {np.mean(between):.4f}, min {min(between):.4f}; 3D time fp32 {times['fp32']:.0f} s, "
          f"bf16 {times['bf16']:.0f} s ({times['fp32'] / max(times['bf16'], 1e-9):.2f}x); {harness.machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
