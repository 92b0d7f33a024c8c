"""Dice per interaction through the 3D Slicer nnInteractive protocol, in the style of the CVPR 2025 interactive
challenge (REFERENCE E): one box, then corrections on the largest remaining error, Dice and NSD after each.

Starts the interactive server (`medsam2-endpoint serve-samapi`, this checkout's sources, LiteMedSAM unless
--model-dir holds MedSAM2 weights) on a loopback port, or uses --url. Each scan of ../shared/data/real (the CT
DICOM series, the MR, the three CT lesions) is sent once as the plugin sends it (`set_image`: raw voxels in their
own dtype, spacing only; the server chooses the window), through nninteractive-client's own
`nnInteractiveRemoteInferenceSession`. Per structure (reset, fresh target buffer):

- step 0: an axial box around the label on its largest slice;
- steps 1..--steps: the slice with the most wrong voxels (false negatives + false positives) not yet prompted gets
  a box around the label there (`--corrections lasso`: the label's filled outline on that slice, as a lasso),
  or, where the label is empty on that slice, a negative box around the false positives. LiteMedSAM takes boxes
  and lassos only, so no clicks. A slice already prompted is skipped: the same prompt again changes nothing. When
  no slice is wrong the remaining steps keep the last figures (the challenge's AUC counts them so).

After each step: Dice and NSD (2 mm) of the client's target buffer against the label; "mean" is over steps 0..N
(the challenge's AUC idea); each interaction's latency is the client's wall time for the call (`*`: the server's
walk stopped at MEDSAM2_NNINTERACTIVE_PREDICTION_S and answered partial).

    .venv/bin/python benchmarks/interactions.py [--structures ct-stomach,lesion] [--steps 5] [--corrections lasso]

Structure names: ct-liver, ct-stomach, ct-pancreas, ct-aorta, ct-vertebra-T12, ct-colon, mr-liver, mr-spleen,
mr-kidney-right, mr-kidney-left, mr-vertebra, mr-iliopsoas-left, lesion-000001, lesion-000002, lesion-000009;
or a group: ct, mr, lesion.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import harness


def arguments() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__)
    parser.add_argument("--structures", default=None, help="comma-separated names or groups (ct, mr, lesion); default: all 15")
    parser.add_argument("--steps", type=int, default=5, help="corrections after the first box (default 5)")
    parser.add_argument("--corrections", default="box", choices=["box", "lasso"], help="what a positive correction is")
    parser.add_argument("--url", default=None, help="a running server's nnInteractive URL (http://HOST:PORT/nninteractive) instead of starting one")
    parser.add_argument("--model-dir", default=None, help="the started server's model folder (default: empty, LiteMedSAM only)")
    parser.add_argument("--prediction-s", type=float, default=None, help="MEDSAM2_NNINTERACTIVE_PREDICTION_S for the started server (default: its own)")
    parser.add_argument("--json", default=None, help="write every step here too")
    return parser


if __name__ == "__main__":  # --help answers before torch is imported
    ARGS = arguments().parse_args()

import httpx
import numpy as np
import SimpleITK as sitk
from nnInteractive.inference.remote import nnInteractiveRemoteInferenceSession
from real_anatomy import STRUCTURES, Structure, lesion_structures, read_scans, truth_of
from scipy import ndimage

from medsam2_endpoint.testing.metrics import dice, nsd
from medsam2_endpoint.testing.processes import answers, stop_group, wait_ready

Box = list[list[int]]  # half-open [[k0, k1], [j0, j1], [i0, i1]], the protocol's


def key_of(s: Structure) -> str:
    if s.scan.startswith("CT_Lesion"):
        return s.name.replace(" ", "-")
    return f"{s.scan}-{s.name.replace(' ', '-')}"


def group_of(s: Structure) -> str:
    return "lesion" if s.scan.startswith("CT_Lesion") else s.scan


def chosen(structures: list[Structure], wanted: str | None) -> list[Structure]:
    if not wanted:
        return structures
    names = [w.strip() for w in wanted.split(",") if w.strip()]
    known = {key_of(s) for s in structures} | {"ct", "mr", "lesion"}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"--structures: unknown {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return [s for s in structures if key_of(s) in names or group_of(s) in names]


# ------------------------------------------------------------------------------------------------ the server


@contextmanager
def served(model_dir: str | None, prediction_s: float | None) -> Iterator[str]:
    """`medsam2-endpoint serve-samapi` (this checkout's sources) on a free loopback port; yields its nnInteractive
    URL once /healthz answers. Its log goes to benchmarks/out/interactions-server.log."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    harness.OUT.mkdir(parents=True, exist_ok=True)
    log_path = harness.OUT / "interactions-server.log"
    with tempfile.TemporaryDirectory() as empty:
        env = {k: v for k, v in os.environ.items() if k not in ("MEDSAM2_MODEL_DIR", "AZUREML_MODEL_DIR")}
        env.update({"PYTHONPATH": str(harness.SRC), "MEDSAM2_WARMUP": "0", "MEDSAM2_DEVICE": "cpu"})
        if prediction_s is not None:
            env["MEDSAM2_NNINTERACTIVE_PREDICTION_S"] = str(prediction_s)
        # the console script `medsam2-endpoint` is this module's main(); -m makes PYTHONPATH's sources win
        command = [sys.executable, "-m", "medsam2_endpoint.api.cli", "serve-samapi", "--host", "127.0.0.1",
                   "--port", str(port), "--model-dir", model_dir or empty]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}/nninteractive"
        try:
            wait_ready(proc, lambda: answers(url + "/healthz"), what="the server",
                       log=lambda: log_path.read_text(errors="replace"), timeout_s=300)
            yield url
        finally:
            stop_group(proc)


# ----------------------------------------------------------------------------------------------- interactions


@dataclass
class Step:
    kind: str  # "box", "lasso", "negative box", "none" (nothing left to correct)
    slice: int
    dice: float
    nsd: float
    seconds: float
    partial: bool = False


@dataclass
class Run:
    scan: str
    structure: str
    steps: list[Step] = field(default_factory=list)
    error: str | None = None


def bounds(mask2d: np.ndarray) -> tuple[int, int, int, int]:
    """Half-open (j0, j1, i0, i1) of a non-empty 2D mask."""
    js, is_ = np.nonzero(mask2d)
    return int(js.min()), int(js.max()) + 1, int(is_.min()), int(is_.max()) + 1


def scores(pred: np.ndarray, truth: np.ndarray, spacing_zyx: tuple[float, float, float]) -> tuple[float, float]:
    """Dice and NSD at 2 mm, NSD on the two masks' joint bounding box (padded: same surfaces, far less work)."""
    both = pred | truth
    if not both.any():
        return 1.0, 1.0
    lo = np.argwhere(both).min(axis=0)
    hi = np.argwhere(both).max(axis=0) + 1
    crop = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    p = np.pad(pred[crop], 2)
    t = np.pad(truth[crop], 2)
    return dice(pred, truth), nsd(p, t, spacing_zyx)


def worst_slice(pred: np.ndarray, truth: np.ndarray, prompted: set[int]) -> int | None:
    """The slice with the most wrong voxels, not yet prompted (None when no such slice is wrong)."""
    errors = (pred != truth).sum(axis=(1, 2))
    errors[sorted(prompted)] = 0
    z = int(np.argmax(errors))
    return None if errors[z] == 0 else z


class Recorder:
    """Keeps the X-Meta of the last answer (whether the walk was cut: `partial`)."""

    def __init__(self) -> None:
        self.meta: dict[str, Any] = {}

    def __call__(self, response: httpx.Response) -> None:
        raw = response.headers.get("X-Meta")
        self.meta = json.loads(raw) if raw else {}


def correct(session: Any, pred: np.ndarray, truth: np.ndarray, z: int, how: str) -> str:
    """One correction on slice z (see the module's docstring); returns its kind."""
    if truth[z].any():
        j0, j1, i0, i1 = bounds(truth[z])
        if how == "lasso":
            # the label's outline, filled, as the plugin's lasso sends it: a tight uint8 crop, one slice thick
            crop = ndimage.binary_fill_holes(truth[z, j0:j1, i0:i1]).astype(np.uint8)[None]
            session.add_lasso_interaction(crop, include_interaction=True, interaction_bbox=[[z, z + 1], [j0, j1], [i0, i1]])
            return "lasso"
        session.add_bbox_interaction([[z, z + 1], [j0, j1], [i0, i1]], include_interaction=True)
        return "box"
    j0, j1, i0, i1 = bounds(pred[z] & ~truth[z])
    session.add_bbox_interaction([[z, z + 1], [j0, j1], [i0, i1]], include_interaction=False)
    return "negative box"


def run_structure(session: Any, recorder: Recorder, s: Structure, truth: np.ndarray,
                  spacing_zyx: tuple[float, float, float], steps: int, how: str) -> Run:
    lesion = s.scan.startswith("CT_Lesion")
    run = Run("ct lesion" if lesion else s.scan, s.name.removeprefix("lesion ") if lesion else s.name)
    session.reset_interactions()
    session.set_target_buffer(np.zeros(truth.shape, np.uint8))
    z = int(np.argmax(truth.sum(axis=(1, 2))))
    prompted = {z}
    j0, j1, i0, i1 = bounds(truth[z])
    try:
        started = time.perf_counter()
        session.add_bbox_interaction([[z, z + 1], [j0, j1], [i0, i1]], include_interaction=True)
        seconds = time.perf_counter() - started
        pred = session.target_buffer > 0
        run.steps.append(Step("box", z, *scores(pred, truth, spacing_zyx), seconds, bool(recorder.meta.get("partial"))))
        for _ in range(steps):
            worst = worst_slice(pred, truth, prompted)
            if worst is None:
                last = run.steps[-1]
                run.steps.append(Step("none", -1, last.dice, last.nsd, 0.0))
                continue
            prompted.add(worst)
            started = time.perf_counter()
            kind = correct(session, pred, truth, worst, how)
            seconds = time.perf_counter() - started
            pred = session.target_buffer > 0
            run.steps.append(Step(kind, worst, *scores(pred, truth, spacing_zyx), seconds, bool(recorder.meta.get("partial"))))
    except (httpx.HTTPError, RuntimeError) as err:  # a timeout or a 4xx/5xx: reported, the next structure goes on
        run.error = f"{type(err).__name__}: {err}"[:200]
    return run


def measure(url: str, wanted: list[Structure], scans: dict[str, tuple[sitk.Image, np.ndarray]],
            steps: int, how: str) -> tuple[list[Run], dict[str, float]]:
    runs: list[Run] = []
    uploads: dict[str, float] = {}
    for scan in dict.fromkeys(s.scan for s in wanted):
        image, labels = scans[scan]
        voxels = sitk.GetArrayFromImage(image)  # (K, J, I) in the file's own dtype: int16 HU, uint8
        spacing_zyx = tuple(float(v) for v in reversed(image.GetSpacing()))
        assert len(spacing_zyx) == 3
        session = nnInteractiveRemoteInferenceSession(url)
        recorder = Recorder()
        session._http.event_hooks["response"].append(recorder)  # the client keeps no X-Meta but the bbox
        try:
            started = time.perf_counter()
            session.set_image(voxels[None], {"spacing": list(spacing_zyx)})
            uploads[scan] = time.perf_counter() - started
            for s in (s for s in wanted if s.scan == scan):
                run = run_structure(session, recorder, s, truth_of(labels, s), (spacing_zyx[0], spacing_zyx[1], spacing_zyx[2]), steps, how)
                runs.append(run)
                print(f"{run.scan} {run.structure}: " + " ".join(f"{x.dice:.3f}" for x in run.steps)
                      + (f" ERROR {run.error}" if run.error else ""), file=sys.stderr, flush=True)
        finally:
            session.close()
    return runs, uploads


# ------------------------------------------------------------------------------------------------------ report


def report(runs: list[Run], steps: int) -> str:
    def dice_cells(run: Run) -> list[str]:
        cells = [f"{x.dice:.3f}" for x in run.steps]
        return cells + ["-"] * (steps + 1 - len(cells))

    def mean(values: list[float]) -> str:
        return f"{np.mean(values):.3f}" if values else "-"

    complete = [r for r in runs if len(r.steps) == steps + 1]
    rows: list[list[object]] = []
    for r in runs:
        rows.append([r.scan, r.structure, *dice_cells(r), mean([x.dice for x in r.steps]), mean([x.nsd for x in r.steps]),
                     f"{r.steps[-1].nsd:.3f}" if r.steps else "-"])
    rows.append([f"**mean ({len(complete)})**", "", *(mean([r.steps[i].dice for r in complete]) for i in range(steps + 1)),
                 mean([float(np.mean([x.dice for x in r.steps])) for r in complete]),
                 mean([float(np.mean([x.nsd for x in r.steps])) for r in complete]),
                 mean([r.steps[-1].nsd for r in complete])])
    quality = harness.table(["scan", "structure", *(f"Dice {i}" for i in range(steps + 1)), "mean Dice", "mean NSD",
                             f"NSD {steps}"], rows)

    def latency(x: Step) -> str:
        return "-" if x.kind == "none" else f"{x.seconds:.1f}{'*' if x.partial else ''}"

    lat_rows: list[list[object]] = []
    for r in runs:
        lat_rows.append([r.scan, r.structure, *(latency(x) for x in r.steps),
                         ", ".join(f"{x.kind} k={x.slice}" for x in r.steps[1:] if x.kind != "none") or "-",
                         r.error or ""])
    corrections = [x.seconds for r in runs for x in r.steps[1:] if x.kind != "none"]
    firsts = [r.steps[0].seconds for r in runs if r.steps]
    timing = harness.table(["scan", "structure", *(f"s {i}" for i in range(steps + 1)), "corrections", "error"], lat_rows)
    summary = (f"latency (client wall time per call): first box median {np.median(firsts):.1f} s"
               f" ({len(firsts)}), corrections median {np.median(corrections):.1f} s ({len(corrections)})"
               if firsts and corrections else "")
    return f"{quality}\n\n{timing}\n\n{summary}"


def main() -> None:
    args = ARGS
    scans = read_scans()
    wanted = chosen([*STRUCTURES, *lesion_structures(scans)], args.structures)
    print(f"# interactions ({args.corrections} corrections, {args.steps} steps): {harness.machine()}", flush=True)
    if args.url:
        runs, uploads = measure(args.url, wanted, scans, args.steps, args.corrections)
    else:
        with served(args.model_dir, args.prediction_s) as url:
            runs, uploads = measure(url, wanted, scans, args.steps, args.corrections)
    print(report(runs, args.steps))
    print("set_image (s): " + ", ".join(f"{k} {v:.1f}" for k, v in uploads.items()))
    print(f"# done: {harness.machine()}")
    if args.json:
        Path(args.json).write_text(json.dumps([{"scan": r.scan, "structure": r.structure, "error": r.error,
                                                "steps": [x.__dict__ for x in r.steps]} for r in runs], indent=1))


if __name__ == "__main__":
    main()
