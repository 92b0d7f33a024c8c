"""LiteMedSAM's answer to one box, whole-slice against a zoomed crop (pipeline/zoom.py), on real slices.

Two measurements behind pipeline/zoom.CONTEXT and pipeline/tracking.TrackRule.key_zoom / ZOOM_MARGIN:

- `small`: every labelled axial slice whose box is at most `--max-box` px, answered from the label's box on
  the whole slice and on crops of `--contexts` box sides;
- `views`: each structure's largest axial, coronal and sagittal slice (the view at its physical aspect, as
  the 3D Slicer session makes it), answered whole, zoomed (`CONTEXT`), and by the model's choice: the zoomed
  answer where its predicted IoU is higher than the whole-slice one's by more than 0 and by `ZOOM_MARGIN`.

2D Dice against the label on that slice; means per column. LiteMedSAM served, through a 3D Slicer session.

    BENCHMARK_DATA=../shared/data/real PYTHONPATH=src .venv/bin/python benchmarks/zoom_keys.py --steps small,views
"""

from __future__ import annotations

import argparse
from typing import Any

import harness


def arguments() -> argparse.ArgumentParser:
    ap = harness.parser(__doc__)
    ap.add_argument("--steps", default="small,views", help="comma-separated: small, views")
    ap.add_argument("--contexts", default="1.5,2,3,4,6", help="crop sides, in box sides, for `small`")
    ap.add_argument("--max-box", type=int, default=40, help="the largest box side (px) `small` measures")
    return ap


def main() -> int:
    args = arguments().parse_args()
    import numpy as np
    import SimpleITK as sitk
    from real_anatomy import STRUCTURES, largest_in_view, lesion_structures, read_scans, truth_of, view_box

    from medsam2_endpoint.core.slicer import SlicerSessions
    from medsam2_endpoint.engines.base import SliceEngine
    from medsam2_endpoint.pipeline import zoom
    from medsam2_endpoint.pipeline.tracking import ZOOM_MARGIN
    from medsam2_endpoint.pipeline.views import box_in_view, shrink_rows, stretch_box
    from medsam2_endpoint.testing.metrics import dice

    steps = set(args.steps.split(","))
    contexts = [float(c) for c in args.contexts.split(",")]
    sessions = SlicerSessions(harness.service({"MEDSAM2_NNINTERACTIVE_BACKGROUND_ENCODE": "0"}))
    _, served = sessions.engine()
    assert isinstance(served, SliceEngine), "LiteMedSAM (a SliceEngine) must be served"
    engine = served
    scans = read_scans()
    served_context = zoom.CONTEXT

    def zoomed(state: Any, z: int, box: np.ndarray, context: float) -> tuple[np.ndarray, float]:
        zoom.CONTEXT = context
        try:
            return zoom.zoomed_logits(engine, state, z, box)
        finally:
            zoom.CONTEXT = served_context

    small: list[list[Any]] = []
    views: list[list[Any]] = []
    for s in STRUCTURES + lesion_structures(scans):
        image, labels = scans[s.scan]
        truth = truth_of(labels, s)
        lease = sessions.store.claim()
        session = lease.payload
        sessions.set_image(session, sitk.GetArrayFromImage(image)[None], list(image.GetSpacing())[::-1])
        for axis in (0, 1, 2):
            at = largest_in_view(truth, axis)
            plane = np.take(truth, at, axis=axis)
            box = view_box(truth, axis, at)
            if axis == 0:
                session.settle_window(tuple(slice(a, b) for a, b in box))  # the object's window, as its first box picks
            state = session.state(engine, axis)
            depth = truth.shape[0]

            def back(logits: np.ndarray, axis: int = axis, depth: int = depth) -> np.ndarray:
                mask = logits > 0
                return mask if axis == 0 else np.asarray(shrink_rows(mask[None], depth)[0])

            if axis == 0 and "small" in steps:
                for z in range(depth):
                    if not truth[z].any():
                        continue
                    ys, xs = np.nonzero(truth[z])
                    flat = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)
                    side = max(flat[2] - flat[0], flat[3] - flat[1])
                    if side > args.max_box:
                        continue
                    row: list[Any] = [s.name, z, int(side), dice(back(engine.slice_logits(state, z, flat)[0]), truth[z])]
                    row += [dice(back(zoomed(state, z, flat, c)[0]), truth[z]) for c in contexts]
                    small.append(row)
            if "views" in steps:
                z, in_view = box_in_view(box, axis)
                if axis:
                    in_view = stretch_box(in_view, session.rows(axis) / depth)
                flat = in_view.astype(np.float64)
                whole, whole_iou = engine.slice_logits(state, z, flat)
                near, near_iou = zoomed(state, z, flat, served_context)
                d_whole, d_zoom = dice(back(whole), plane), dice(back(near), plane)
                views.append([s.name, axis, d_whole, d_zoom, d_zoom if near_iou > whole_iou else d_whole,
                              d_zoom if near_iou > whole_iou + ZOOM_MARGIN else d_whole, whole_iou, near_iou])
        sessions.store.release(lease.token)
    if small:
        header = ["structure", "slice", "box side (px)", "whole", *[f"zoom x{c:g}" for c in contexts]]
        print(harness.table(header, [[*r[:3], *(f"{v:.3f}" for v in r[3:])] for r in small]))
        means = np.mean(np.array([r[3:] for r in small], dtype=np.float64), axis=0)
        print(f"\nsmall slices ({len(small)}): whole {means[0]:.3f}; " +
              ", ".join(f"x{c:g} {m:.3f}" for c, m in zip(contexts, means[1:], strict=True)) + "\n")
    if views:
        names = {0: "axial", 1: "coronal", 2: "sagittal"}
        header = ["structure", "view", "whole", f"zoom x{served_context:g}", "chosen (IoU higher)",
                  f"chosen (IoU {ZOOM_MARGIN:g} higher)", "IoU whole", "IoU zoom"]
        print(harness.table(header, [[r[0], names[r[1]], *(f"{v:.3f}" for v in r[2:6]), *(f"{v:.2f}" for v in r[6:])]
                                     for r in views]))
        for axis, name in names.items():
            got = np.array([r[2:6] for r in views if r[1] == axis], dtype=np.float64)
            print(f"{name} ({len(got)}): " + ", ".join(f"{v:.3f}" for v in got.mean(axis=0)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
