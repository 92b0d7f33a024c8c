"""The 3D Slicer plugin harness's steps replayed in process, for quick comparisons on every real structure.

`../shared/tools/slicer_client/run.sh` is the measure that counts (the plugin's own code over HTTP); this
replays two of its steps through the same session code (core/slicer.SlicerSessions) without a server, so a
change can be compared in a minute or two:

- `correction`: an axial box on the label's largest slice, then, when the worst-answered labelled slice has
  Dice under 0.9, a box on that slice (run.sh's "axial box" and "+ correction").
- `views`: a box on the label's largest coronal slice, then (after a reset) on its largest sagittal slice
  (run.sh's "coronal" and "sagittal").

Each structure gets its own session (raw voxels and spacing, as the plugin sends them), LiteMedSAM served, the
background encoding off, the walk bound `--prediction-s` (the server's default 30 s).

    BENCHMARK_DATA=../shared/data/real PYTHONPATH=src .venv/bin/python benchmarks/slicer_replay.py --steps correction,views
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import harness


def arguments() -> argparse.ArgumentParser:
    ap = harness.parser(__doc__)
    ap.add_argument("--steps", default="correction,views", help="comma-separated: correction, views")
    ap.add_argument("--only", default="", help="comma-separated substrings of 'scan structure' to keep")
    ap.add_argument("--prediction-s", type=float, default=30.0, help="the walk's time bound (MEDSAM2_NNINTERACTIVE_PREDICTION_S)")
    return ap


def main() -> int:
    args = arguments().parse_args()
    import numpy as np
    import SimpleITK as sitk
    from real_anatomy import STRUCTURES, largest_in_view, lesion_structures, read_scans, truth_of, view_box

    from medsam2_endpoint.base.budget import Budget
    from medsam2_endpoint.core.slicer import SlicerSessions
    from medsam2_endpoint.testing.metrics import dice

    steps = set(args.steps.split(","))
    sessions = SlicerSessions(harness.service({"MEDSAM2_NNINTERACTIVE_BACKGROUND_ENCODE": "0",
                                               "MEDSAM2_NNINTERACTIVE_PREDICTION_S": str(args.prediction_s)}))
    scans = read_scans()

    table: list[list[Any]] = []
    groups: dict[str, list[list[float]]] = {}
    only = [o for o in args.only.split(",") if o]
    for s in STRUCTURES + lesion_structures(scans):
        if only and not any(o in f"{s.scan} {s.name}" for o in only):
            continue
        image, labels = scans[s.scan]
        truth = truth_of(labels, s)
        lease = sessions.store.claim()
        session = lease.payload
        sessions.set_image(session, sitk.GetArrayFromImage(image)[None], list(image.GetSpacing())[::-1])
        _, answer = session.require_image()  # the session's label map, updated in place by each interaction
        row: list[Any] = [s.scan if s.scan in ("ct", "mr") else "ct lesion", s.name]
        figures: list[float] = []
        if "correction" in steps:
            started = time.perf_counter()
            sessions.box(session, view_box(truth, 0, largest_in_view(truth, 0)), True, Budget.unlimited())
            first_s = time.perf_counter() - started
            first = dice(answer > 0, truth)
            zs = [z for z in range(truth.shape[0]) if truth[z].any()]
            worst = min(zs, key=lambda z: dice(answer[z] > 0, truth[z]))
            corrected, where = first, "none"
            if dice(answer[worst] > 0, truth[worst]) < 0.9:
                sessions.box(session, view_box(truth, 0, worst), True, Budget.unlimited())
                corrected, where = dice(answer > 0, truth), f"k={worst}"
            row += [f"{first:.3f}", f"{corrected:.3f}", f"{corrected - first:+.3f}", where, f"{first_s:.1f}"]
            figures += [first, corrected]
        if "views" in steps:
            for axis in (1, 2):
                session.reset()
                started = time.perf_counter()
                sessions.box(session, view_box(truth, axis, largest_in_view(truth, axis)), True, Budget.unlimited())
                figures.append(dice(answer > 0, truth))
                row += [f"{figures[-1]:.3f}", f"{time.perf_counter() - started:.1f}"]
            row.append(f"{session.rows(1)} / {session.rows(2)} of {truth.shape[0]}")
        sessions.store.release(lease.token)
        table.append(row)
        groups.setdefault(row[0], []).append(figures)
        print(" | ".join(str(v) for v in row), flush=True)
    header = ["scan", "structure"]
    if "correction" in steps:
        header += ["axial box", "+ correction", "gain", "corrected slice", "first (s)"]
    if "views" in steps:
        header += ["coronal", "coronal (s)", "sagittal", "sagittal (s)", "view rows (coronal / sagittal)"]
    print(harness.table(header, table))
    for group, values in groups.items():
        means = np.mean(np.array(values), axis=0)
        print(f"{group} ({len(values)}): " + ", ".join(f"{v:.3f}" for v in means))
    everything = np.mean(np.array([v for values in groups.values() for v in values]), axis=0)
    print(f"all ({sum(len(v) for v in groups.values())}): " + ", ".join(f"{v:.3f}" for v in everything))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
