"""Fault and load drills against real servers on loopback, shared by tests/test_faults_*.py (short runs) and
benchmarks/faults.py (the issue's full-length runs): a samapi server as a subprocess, a process's CPU time from
/proc, and QuPath-shaped clients (one field-of-view PNG each, box prompts, small automasks) hammering one worker.

Never imported by serving code.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests
from PIL import Image

from medsam2_endpoint.testing.phantoms import ct_phantom
from medsam2_endpoint.testing.processes import answers, wait_ready

HEADERS = {"accept": "application/json", "Content-Type": "application/json; charset=utf-8"}  # as the extension


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (azmlinfsrv's gunicorn workers), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return sorted(found)


def memory_mb(pid: int) -> dict[str, float]:
    """A process's memory lines from /proc/<pid>/status in MB: VmRSS (now), VmHWM (its peak RSS so far), ..."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name.startswith("Vm") and value.strip().endswith("kB"):
            found[name] = int(value.split()[0]) / 1024
    return found


def rss_mb(pid: int) -> float:
    rss = memory_mb(pid).get("VmRSS")
    if rss is None:
        raise RuntimeError(f"no VmRSS for {pid}")
    return rss


@dataclass
class SamapiProcess:
    url: str  # the base URL QuPath uses: http://127.0.0.1:PORT/sam/
    proc: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def samapi_server(folder: Path, env: dict[str, str] | None = None, *, ready_timeout: float = 300) -> Iterator[SamapiProcess]:
    """`medsam2-endpoint serve-samapi` on a free loopback port (LiteMedSAM, CPU, one torch thread), as a user runs it."""
    model_dir = folder / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = folder / "samapi.log"
    full_env = {**{k: v for k, v in os.environ.items() if not k.startswith("MEDSAM2_")},
                "MEDSAM2_NUM_THREADS": "1", "MEDSAM2_WARMUP": "0", "MEDSAM2_DEVICE": "cpu", **(env or {})}
    command = [sys.executable, "-m", "medsam2_endpoint.api.cli", "serve-samapi", "--port", str(port), "--model-dir", str(model_dir)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = SamapiProcess(f"http://127.0.0.1:{port}/sam/", proc, log_path)
    try:
        wait_ready(proc, lambda: answers(server.url + "version/"), what="the samapi server", log=server.log_text,
                   timeout_s=ready_timeout, interval_s=0.3)
        yield server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def field_of_view(seed: int, size: tuple[int, int] = (256, 192)) -> tuple[str, list[int]]:
    """A QuPath-like field of view (8-bit RGB PNG of a CT-like slice) as base64, and a box around its lesion."""
    phantom = ct_phantom((8, size[1], size[0]), lesions=("ellipsoid",), seed=seed)
    lesion = phantom.lesions[0]
    lo, hi = phantom.window or (-160.0, 240.0)
    values = np.clip(phantom.array()[lesion.key_slice].astype(np.float64), lo, hi)
    grey = ((values - values.min()) / (values.max() - values.min()) * 255.0).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode(), [int(v) for v in lesion.bbox]


def crowded_view(seed: int, size: tuple[int, int] = (512, 384), spacing: int = 32) -> str:
    """A field of view crowded with small blobs of different brightness (cells on a slide, say), as base64 PNG:
    every grid point of an automask seeds a region of its own, so a builder-defaults automask has hundreds of
    region boxes to decode and runs for tens of seconds, long enough to walk away from or to stop."""
    rng = np.random.default_rng(seed)
    width, height = size
    yy, xx = np.mgrid[:height, :width]
    grey = np.full((height, width), 30.0)
    for cy in range(spacing // 2, height, spacing):
        for cx in range(spacing // 2, width, spacing):
            radius = rng.uniform(0.2, 0.4) * spacing
            grey[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = rng.uniform(90, 250)
    grey = np.clip(grey + rng.normal(0, 4, grey.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@dataclass
class LoadReport:
    requests: int = 0
    statuses: Counter[str] = field(default_factory=Counter)  # "200", "503 busy", "503 deadline", ...
    bad: list[str] = field(default_factory=list)  # answers outside 200 / 503-busy-with-Retry-After, and hangs
    slowest_s: float = 0.0
    liveness_checks: int = 0
    liveness_failures: list[str] = field(default_factory=list)
    liveness_slowest_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {"requests": self.requests, "statuses": dict(self.statuses), "bad": self.bad[:10], "hangs": sum("hang" in b for b in self.bad),
                "slowest_s": round(self.slowest_s, 2), "liveness_checks": self.liveness_checks,
                "liveness_failures": self.liveness_failures[:10], "liveness_slowest_s": round(self.liveness_slowest_s, 3)}


def qupath_load(url: str, *, clients: int, duration_s: float, budget_s: float, automask_every: int = 4,
                automask_points: int = 2) -> LoadReport:
    """`clients` threads, each a QuPath user on its own field of view: box prompts, and every `automask_every`-th
    request a small automask (`automask_points` per side: LiteMedSAM decodes about 3 boxes a second on one
    thread, so a bigger grid would answer `deadline` under load, which is not what this drill measures), until `duration_s` has passed; a liveness probe (`version/`)
    every 0.5 s meanwhile. An answer is good when it is 200, or 503 `busy` with Retry-After (the client then
    waits that long, as a well-behaved client does); each must come within `budget_s` (the request deadline plus
    the busy wait, plus a margin) or it counts as a hang."""
    report, lock = LoadReport(), threading.Lock()
    stop_at = time.monotonic() + duration_s
    views = [field_of_view(seed) for seed in range(clients)]

    def client(k: int) -> None:
        b64img, box = views[k]
        n = 0
        while time.monotonic() < stop_at:
            n += 1
            body: dict[str, Any]
            if n % automask_every == 0:
                path, body = "automask/", {"type": "vit_t", "b64img": b64img, "points_per_side": automask_points,
                                      "output_type": "Single Mask"}
            else:
                path, body = "", {"type": "vit_t", "b64img": b64img, "bbox": box}
            started = time.monotonic()
            try:
                response = requests.post(url + path, json=body, headers=HEADERS, timeout=budget_s)
            except requests.Timeout:
                with lock:
                    report.requests += 1
                    report.bad.append(f"hang: {path or 'prompt'} gave no answer within {budget_s:g} s")
                continue
            except requests.RequestException as exc:
                with lock:
                    report.requests += 1
                    report.bad.append(f"{path or 'prompt'}: {type(exc).__name__}")
                continue
            elapsed = time.monotonic() - started
            code = response.json().get("code", "") if response.status_code != 200 else ""
            retry = response.headers.get("Retry-After", "")
            with lock:
                report.requests += 1
                report.slowest_s = max(report.slowest_s, elapsed)
                report.statuses[f"{response.status_code} {code}".strip()] += 1
                if not (response.status_code == 200 or (response.status_code == 503 and code == "busy" and retry.isdigit())):
                    report.bad.append(f"{path or 'prompt'}: HTTP {response.status_code} {code} Retry-After={retry!r}")
            if response.status_code == 503 and retry.isdigit():
                time.sleep(min(float(retry), max(0.0, stop_at - time.monotonic())))

    def liveness() -> None:
        while time.monotonic() < stop_at:
            started = time.monotonic()
            try:
                ok = requests.get(url + "version/", timeout=5).status_code == 200
                problem = "" if ok else "not 200"
            except requests.RequestException as exc:
                problem = type(exc).__name__
            elapsed = time.monotonic() - started
            with lock:
                report.liveness_checks += 1
                report.liveness_slowest_s = max(report.liveness_slowest_s, elapsed)
                if problem:
                    report.liveness_failures.append(problem)
            time.sleep(0.5)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    threads.append(threading.Thread(target=liveness, daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration_s + budget_s + 30)
        if t.is_alive():
            report.bad.append("hang: a client thread did not finish")
    return report


def walk_away_post(url: str, body: dict[str, Any]) -> socket.socket:
    """POST and keep the socket open without reading: a client that will give up (QuPath's read timeout)."""
    host, rest = url.removeprefix("http://").split(":", 1)
    port, path = rest.split("/", 1)
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    head = f"POST /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    sock.sendall(head.encode() + data)
    return sock
