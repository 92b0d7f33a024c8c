"""Two requests at once on LiteMedSAM: worker processes sharing the cores, with threads from `WORKER_COUNT`
(configure_threads: cores / workers) or oversubscribed (each worker with every core), and peak RSS per worker.

Each worker is a fresh process (as a gunicorn worker of azmlinfsrv): it builds the Service (warm-up off, the ONNX
exports already cached), answers the first 3D request on the real CT liver (benchmarks/runtime.py), and reports
its request time and its peak resident memory (ru_maxrss).

    PYTHONPATH=src python benchmarks/concurrency.py [--runs torch,onnx,onnx-2,onnx-over,openvino-bf16]

Runs: one worker alone (torch and onnx); two onnx workers at once with WORKER_COUNT=2 (one thread each) and two
with MEDSAM2_NUM_THREADS set to the core count (oversubscribed). Inside one worker the inference slots
(cores / threads) already refuse a second concurrent request with 503 busy instead of sharing the threads.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker() -> int:
    sys.path.insert(0, str(REPO / "src"))
    sys.path.insert(0, str(REPO / "benchmarks"))
    import torch
    from real_anatomy import answer_of
    from runtime import LIVER, ct_liver

    from medsam2_endpoint.base.budget import Budget
    from medsam2_endpoint.core.service import Service
    from medsam2_endpoint.core.settings import Settings

    service = Service.from_settings(Settings.from_env(model_dir=str(REPO / "benchmarks" / "no-models")))
    service.budget = Budget.unlimited  # type: ignore[method-assign]  # a loaded machine must not cut a request short
    image, _, _, truth = ct_liver()
    _, seconds, _ = answer_of(service, "lite-medsam", image, truth, LIVER.window, {})
    print(json.dumps({"seconds": seconds, "threads": torch.get_num_threads(),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    return 0


def run_workers(n: int, env: dict[str, str]) -> tuple[float, list[dict[str, float]]]:
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "--worker"], env={**os.environ, **env}, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for _ in range(n)]
    results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    return time.perf_counter() - started, results


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="torch,onnx,onnx-2,onnx-over", help="comma-separated, from: " + ", ".join(
        ["torch", "onnx", "onnx-2", "onnx-over", "openvino-bf16", "openvino-fp32"]))
    wanted = parser.parse_args().runs.split(",")
    cores = os.cpu_count() or 1
    rows = []
    fp32 = {"MEDSAM2_PRECISION": "fp32"}
    with tempfile.TemporaryDirectory() as cache:
        base = {"MEDSAM2_WARMUP": "0", "MEDSAM2_ONNX_CACHE_DIR": cache, "PYTHONPATH": str(REPO / "src")}
        run_workers(1, {**base, "MEDSAM2_RUNTIME": "onnx"})  # builds the exports once, untimed
        runs = {
            "torch": ("torch, 1 worker", 1, {"MEDSAM2_RUNTIME": "torch", "WORKER_COUNT": "1", **fp32}),
            "onnx": ("onnx, 1 worker", 1, {"MEDSAM2_RUNTIME": "onnx", "WORKER_COUNT": "1", **fp32}),
            "onnx-2": ("onnx, 2 workers, WORKER_COUNT=2", 2, {"MEDSAM2_RUNTIME": "onnx", "WORKER_COUNT": "2", **fp32}),
            "onnx-over": (f"onnx, 2 workers, {cores} threads each (oversubscribed)", 2,
                          {"MEDSAM2_RUNTIME": "onnx", "WORKER_COUNT": "1", "MEDSAM2_NUM_THREADS": str(cores), **fp32}),
            "openvino-bf16": ("openvino bf16, 1 worker", 1,
                              {"MEDSAM2_RUNTIME": "openvino", "MEDSAM2_PRECISION": "bf16", "WORKER_COUNT": "1"}),
            "openvino-fp32": ("openvino fp32, 1 worker", 1, {"MEDSAM2_RUNTIME": "openvino", "WORKER_COUNT": "1", **fp32}),
        }
        for label, n, env in [runs[name] for name in wanted]:
            wall, results = run_workers(n, {**base, **env})
            rows.append((label, wall, results))
    print(f"{cores} CPUs, load {os.getloadavg()[0]:.2f}")
    print("| run | threads per worker | wall for all requests (s) | each request (s) | peak RSS per worker (MB) |")
    print("| --- | --- | --- | --- | --- |")
    for label, wall, results in rows:
        each = ", ".join(f"{r['seconds']:.1f}" for r in results)
        rss = ", ".join(f"{r['peak_rss_mb']:.0f}" for r in results)
        print(f"| {label} | {int(results[0]['threads'])} | {wall:.1f} | {each} | {rss} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(worker() if "--worker" in sys.argv else main())
