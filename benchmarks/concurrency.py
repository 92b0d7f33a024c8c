"""Two requests at once on LiteMedSAM: worker processes sharing the cores, with threads from `WORKER_COUNT`
(configure_threads: cores / workers) or oversubscribed (each worker with every core), and peak RSS per worker.

Each worker is a fresh process (as a gunicorn worker of azmlinfsrv): it builds the Service (warm-up off, the ONNX
exports already cached), answers the first 3D request on the real CT liver (benchmarks/runtime.py), and reports
its request time and its peak resident memory (ru_maxrss).

    PYTHONPATH=src python benchmarks/concurrency.py [--runs torch,onnx,onnx2,oversubscribed]

Runs: one worker alone (torch and onnx); two onnx workers at once with WORKER_COUNT=2 (one thread each) and two
with MEDSAM2_NUM_THREADS set to the core count (oversubscribed). Inside one worker the inference slots
(cores / threads) already refuse a second concurrent request with 503 busy instead of sharing the threads.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import harness

RUNS = ("torch", "onnx", "onnx2", "oversubscribed", "openvino-bf16", "openvino-fp32")
DEFAULT_RUNS = RUNS[:4]


def arguments() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__)
    parser.add_argument("--runs", default=",".join(DEFAULT_RUNS), help=f"comma-separated, of: {', '.join(RUNS)}")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one worker process's request
    return parser


def worker() -> int:
    import torch
    from real_anatomy import answer_of
    from runtime import LIVER, ct_liver

    from medsam2_endpoint.base.budget import Budget

    # the environment (set by run_workers) chooses the runtime and threads, as a server worker's would
    service = harness.service(dict(os.environ))
    service.budget = Budget.unlimited  # type: ignore[method-assign]  # a loaded machine must not cut a request short
    image, _, _, truth = ct_liver()
    _, seconds, _ = answer_of(service, "lite-medsam", image, truth, LIVER.window, {})
    print(json.dumps({"seconds": seconds, "threads": torch.get_num_threads(),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    return 0


def run_workers(n: int, env: dict[str, str]) -> tuple[float, list[dict[str, float]]]:
    """n fresh worker processes at once; (wall seconds for all, each one's report)."""
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "--worker"], env={**os.environ, **env}, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for _ in range(n)]
    results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    return time.perf_counter() - started, results


def main(args: argparse.Namespace) -> int:
    cores = os.cpu_count() or 1
    fp32 = {"MEDSAM2_PRECISION": "fp32"}
    runs = {
        "torch": ("torch, 1 worker", 1, {"MEDSAM2_RUNTIME": "torch", "WORKER_COUNT": "1", **fp32}),
        "onnx": ("onnx, 1 worker", 1, {"MEDSAM2_RUNTIME": "onnx", "WORKER_COUNT": "1", **fp32}),
        "onnx2": ("onnx, 2 workers, WORKER_COUNT=2", 2, {"MEDSAM2_RUNTIME": "onnx", "WORKER_COUNT": "2", **fp32}),
        "oversubscribed": (f"onnx, 2 workers, {cores} threads each (oversubscribed)", 2,
                           {"MEDSAM2_RUNTIME": "onnx", "WORKER_COUNT": "1", "MEDSAM2_NUM_THREADS": str(cores), **fp32}),
        "openvino-bf16": ("openvino bf16, 1 worker", 1, {"MEDSAM2_RUNTIME": "openvino", "MEDSAM2_PRECISION": "bf16", "WORKER_COUNT": "1"}),
        "openvino-fp32": ("openvino fp32, 1 worker", 1, {"MEDSAM2_RUNTIME": "openvino", "WORKER_COUNT": "1", **fp32}),
    }
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        base = {"MEDSAM2_WARMUP": "0", "MEDSAM2_ONNX_CACHE_DIR": cache, "PYTHONPATH": str(harness.SRC)}
        run_workers(1, {**base, "MEDSAM2_RUNTIME": "onnx"})  # builds the exports once, untimed
        for name in args.runs.split(","):
            label, n, env = runs[name]
            wall, results = run_workers(n, {**base, **env})
            rows.append((label, f"{int(results[0]['threads'])}", f"{wall:.1f}",
                         ", ".join(f"{r['seconds']:.1f}" for r in results),
                         ", ".join(f"{r['peak_rss_mb']:.0f}" for r in results)))
    print(harness.machine())
    print(harness.table(["run", "threads per worker", "wall for all requests (s)", "each request (s)",
                         "peak RSS per worker (MB)"], rows))
    return 0


if __name__ == "__main__":
    ARGS = arguments().parse_args()
    sys.exit(worker() if ARGS.worker else main(ARGS))
