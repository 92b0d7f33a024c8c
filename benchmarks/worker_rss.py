"""Peak resident memory of one real azmlinfsrv worker (score.py, LiteMedSAM) answering the first 3D request on the
real CT's liver, per runtime; the request is sent over HTTP from this process, so the figure is the worker's own
(unlike benchmarks/concurrency.py, whose worker process also reads the scan and builds the request).

    PYTHONPATH=src .venv/bin/python benchmarks/worker_rss.py [--runs onnx,openvino]

Each run starts a fresh server (WORKER_COUNT 1, the default threads), sends the request once, and reads the worker's
VmHWM (its peak RSS since it started) and VmRSS from /proc after the answer.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import harness

RUNS = ("torch", "onnx", "openvino", "openvino-bf16")


def arguments() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__)
    parser.add_argument("--runs", default="onnx,openvino", help=f"comma-separated, of: {', '.join(RUNS)}")
    return parser


if __name__ == "__main__":  # --help answers before the package is imported
    ARGS = arguments().parse_args()

import requests
from real_anatomy import request_of
from runtime import LIVER, ct_liver

from local_server import running_server
from medsam2_endpoint.testing.faults import children, memory_mb

ENVS = {
    "torch": {"MEDSAM2_RUNTIME": "torch", "MEDSAM2_PRECISION": "fp32"},
    "onnx": {"MEDSAM2_RUNTIME": "onnx", "MEDSAM2_PRECISION": "fp32"},
    "openvino": {"MEDSAM2_RUNTIME": "openvino", "MEDSAM2_PRECISION": "fp32"},
    "openvino-bf16": {"MEDSAM2_RUNTIME": "openvino", "MEDSAM2_PRECISION": "bf16"},
}


def main(args: argparse.Namespace) -> int:
    image, _, _, truth = ct_liver()
    body = request_of("lite-medsam", image, truth, LIVER.window, {})
    rows = []
    for run in args.runs.split(","):
        env = {**ENVS[run], "MEDSAM2_NUM_THREADS": "0", "MEDSAM2_REQUEST_DEADLINE_S": "600"}
        with tempfile.TemporaryDirectory() as tmp, running_server(Path(tmp), env) as server:
            (worker,) = children(server.proc.pid)
            ready = memory_mb(worker)
            started = time.perf_counter()
            answer = requests.post(server.score, json=body, timeout=900)
            seconds = time.perf_counter() - started
            answer.raise_for_status()
            after = memory_mb(worker)
        rows.append([run, f"{ready['VmRSS']:.0f}", f"{seconds:.1f}", f"{after['VmRSS']:.0f}", f"**{after['VmHWM']:.0f}**"])
    print(harness.machine())
    print(harness.table(["runtime", "worker RSS when ready (MB)", "first request (s)", "RSS after (MB)",
                         "peak RSS (MB)"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
