"""The issue's soak (#24): 3D Slicer sessions, QuPath clients and `/score` requests at once on loopback, for
--duration seconds; the target is no 5xx other than 503 busy/full (with Retry-After), no hang, abandoned sessions
reaped, and the servers' RSS drifting less than 5 % between the end of the warm-up and the end.

Starts two servers (this checkout's sources, LiteMedSAM, CPU, one torch thread each), unless URLs are given:
`medsam2-endpoint serve-samapi` (QuPath's samapi under /sam/, the nnInteractive protocol under /nninteractive)
with MEDSAM2_NNINTERACTIVE_IDLE_S and _LIVENESS_S set to --session-ttl, so reaping happens during the run, and
azmlinfsrv with score.py (one worker). Both get MEDSAM2_REQUEST_DEADLINE_S=--deadline, below the clients'
--timeout, so the server gives up before a client does. Logs: benchmarks/out/soak/.

- Slicer clients (nninteractive-client's own `nnInteractiveRemoteInferenceSession`, heartbeats included) loop:
  claim, set_image (a 16 x 96 x 96 CT phantom, the next of --volumes noise variants), then one to three objects: a box on the lesion's key slice, a
  correction (a box or a lasso on another slice of the lesion, or a negative box), sometimes an undo. Then the
  session is released, or (--abandon of the time) abandoned as a crashed Slicer leaves it: heartbeats stop, no
  release. An abandoned lease is asked for (GET lease_status) --session-ttl + 2 s later: 410 means reaped.
  A 503 (busy, or all sessions held) is retried after its Retry-After.
- QuPath clients: testing/faults.qupath_load (box prompts and small automasks on a field of view each).
- /score clients loop one-item 3D requests (a 12 x 96 x 96 CT phantom, the next of --volumes noise variants,
  a box on its lesion).

Each client cycles through its own --volumes variants (default 16) so the servers' caches reach their steady
state early, and the RSS drift shows leaks rather than caches filling: after the first pass /score's held-volume
LRU holds them all, while their slice features (16 x 8 slices) are more than the 256 MiB feature cache holds, so
every request computes. Fresh volumes on every request would grow the held-volume LRU (1 GiB cap) all run long.
QuPath clients keep one field of view each, as a user does: their later prompts reuse its embedding.

Every request has the client timeout --timeout; one that gets no answer in time counts as a hang. The servers'
RSS (process tree) is sampled every --sample-s; "warm" is the sample at --warmup (half the run when shorter).
After the clients stop and --session-ttl has passed, the script claims as many leases as the server allows:
all of them must be free (none leaked).

    PYTHONPATH=src .venv/bin/python benchmarks/soak.py [--duration 600] [--slicer 4] [--qupath 4] [--score 1]

Prints one table (requests per client kind and step), the RSS and session lines, then one JSON line. Exits 1
when a 5xx other than 503 busy came, a 503 busy lacked Retry-After, a request hung or lost its connection, an
abandoned session was not reaped, or a lease was still held at the end.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import os
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import harness


def arguments() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    parser.add_argument("--slicer", type=int, default=4, help="3D Slicer clients (default 4)")
    parser.add_argument("--qupath", type=int, default=4, help="QuPath clients (default 4)")
    parser.add_argument("--score", type=int, default=1, help="/score clients (default 1)")
    parser.add_argument("--session-ttl", type=float, default=30.0,
                        help="MEDSAM2_NNINTERACTIVE_IDLE_S and _LIVENESS_S of the started server (default 30)")
    parser.add_argument("--max-sessions", type=int, default=4,
                        help="MEDSAM2_NNINTERACTIVE_MAX_SESSIONS of the started server (default 4, the server's own)")
    parser.add_argument("--abandon", type=float, default=0.3, help="share of Slicer sessions abandoned, not released (default 0.3)")
    parser.add_argument("--volumes", type=int, default=16, help="noise variants each Slicer and /score client cycles through (default 16)")
    parser.add_argument("--timeout", type=float, default=120.0, help="client timeout per request; longer is a hang (default 120)")
    parser.add_argument("--deadline", type=float, default=60.0, help="MEDSAM2_REQUEST_DEADLINE_S of the started servers (default 60)")
    parser.add_argument("--warmup", type=float, default=120.0, help="RSS baseline after this many seconds (default 120)")
    parser.add_argument("--sample-s", type=float, default=5.0, help="RSS sampling interval (default 5)")
    parser.add_argument("--interactive-url", default=None,
                        help="a running serve-samapi server's root (http://HOST:PORT) instead of starting one")
    parser.add_argument("--score-url", default=None, help="a running azmlinfsrv's root (http://HOST:PORT) instead of starting one")
    parser.add_argument("--interactive-pid", type=int, default=None, help="its process id, for RSS (with --interactive-url)")
    parser.add_argument("--score-pid", type=int, default=None, help="its process id, for RSS (with --score-url)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


if __name__ == "__main__":  # --help answers before the package is imported
    ARGS = arguments().parse_args()

import httpx
import nibabel as nib
import nnInteractive.inference.remote.remote_session as remote_session
import numpy as np
import psutil
import requests
from nnInteractive.inference.remote.remote_session import (
    ServerAtCapacityError,
    SessionExpiredError,
    nnInteractiveRemoteInferenceSession,
)

from local_server import running_server
from medsam2_endpoint.testing.faults import LoadReport, qupath_load, samapi_server
from medsam2_endpoint.testing.phantoms import Phantom, ct_phantom

T = TypeVar("T")
LOG_DIR = harness.OUT / "soak"

# ------------------------------------------------------------------------------------------------- the tally


@dataclass
class Row:
    """What one client kind (or one step of the Slicer protocol) got."""

    requests: int = 0
    ok: int = 0
    busy: int = 0  # 503 busy (a full inference slot or all sessions held) with Retry-After
    busy_without_retry_after: int = 0
    other_503: Counter[str] = field(default_factory=Counter)  # deadline, cancelled, ...
    gone: int = 0  # 410: the lease was reaped or released
    other_4xx: Counter[str] = field(default_factory=Counter)
    server_errors: Counter[str] = field(default_factory=Counter)  # 5xx other than 503
    hangs: int = 0
    connection_errors: int = 0
    slowest_s: float = 0.0
    examples: list[str] = field(default_factory=list)  # the first few answers that fail the target

    def failures(self) -> int:
        return (self.busy_without_retry_after + sum(self.other_503.values()) + sum(self.server_errors.values())
                + self.hangs + self.connection_errors)


class Tally:
    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}
        self._lock = threading.Lock()

    def _row(self, kind: str) -> Row:
        return self.rows.setdefault(kind, Row())

    def answer(self, kind: str, status: int, code: str, retry_after: str | None, seconds: float, what: str) -> None:
        with self._lock:
            row = self._row(kind)
            row.requests += 1
            row.slowest_s = max(row.slowest_s, seconds)
            label = f"{status} {code}".strip()
            if 200 <= status < 300:
                row.ok += 1
            elif status == 503 and code == "busy":
                if (retry_after or "").isdigit():
                    row.busy += 1
                else:
                    row.busy_without_retry_after += 1
                    self._example(row, f"{what}: {label} without Retry-After")
            elif status == 503:
                row.other_503[code or "?"] += 1
                self._example(row, f"{what}: {label}")
            elif status == 410:
                row.gone += 1
            elif 400 <= status < 500:
                row.other_4xx[label] += 1
                self._example(row, f"{what}: {label}")
            else:
                row.server_errors[label] += 1
                self._example(row, f"{what}: {label}")

    def hang(self, kind: str, what: str) -> None:
        with self._lock:
            row = self._row(kind)
            row.requests += 1
            row.hangs += 1
            self._example(row, f"hang: {what}")

    def lost(self, kind: str, what: str) -> None:
        with self._lock:
            row = self._row(kind)
            row.requests += 1
            row.connection_errors += 1
            self._example(row, what)

    @staticmethod
    def _example(row: Row, text: str) -> None:
        if len(row.examples) < 5:
            row.examples.append(text[:200])


def code_of(body: bytes) -> str:
    """The error body's `code` (api/errors.py), or ''."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return ""
    return str(parsed.get("code", "")) if isinstance(parsed, dict) else ""


# ---------------------------------------------------------------------------------------------- Slicer clients

STEPS = {"claim": "claim", "capabilities": "capabilities", "set_image": "set_image", "heartbeat": "heartbeat", "release": "release"}
THREAD = threading.local()  # the last answer's Retry-After, per client thread (heartbeats run in their own)


def step_of(path: str) -> str:
    return "slicer " + STEPS.get(path.rstrip("/").rsplit("/", 1)[-1], "interactions")


def recording_client(tally: Tally) -> type[httpx.Client]:
    """httpx.Client with a response hook that counts every answer (the claim in the session's constructor too)."""

    def hook(response: httpx.Response) -> None:
        response.read()
        try:
            seconds = response.elapsed.total_seconds()
        except RuntimeError:
            seconds = 0.0
        path = response.request.url.path
        retry = response.headers.get("Retry-After")
        code = code_of(response.content) if response.status_code >= 400 else ""
        tally.answer(step_of(path), response.status_code, code, retry, seconds, path)
        THREAD.retry_after = float(retry) if (retry or "").isdigit() else 5.0

    class Recording(httpx.Client):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.event_hooks["response"].append(hook)

    return Recording


class Stopping(Exception):
    """The run ended while a client waited to retry."""


@dataclass
class Abandoned:
    token: str
    at: float


@dataclass
class Slicer:
    url: str  # .../nninteractive
    phantom: Phantom
    volumes: list[np.ndarray]  # the phantom's voxels with different noise, uploaded in turn
    tally: Tally
    stop_at: float
    timeout_s: float
    abandon: float
    rng: np.random.Generator
    abandoned: list[Abandoned]
    lock: threading.Lock

    uploads: int = 0

    def patient(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`call(*args, **kwargs)`, again after Retry-After while the server answers 503 (busy, or all sessions held)."""
        while True:
            try:
                return call(*args, **kwargs)
            except ServerAtCapacityError:
                wait = float(getattr(THREAD, "retry_after", 5.0))
                if time.monotonic() + wait >= self.stop_at:
                    raise Stopping() from None
                time.sleep(wait)

    def session(self) -> Any:
        t = self.timeout_s
        return nnInteractiveRemoteInferenceSession(self.url, connect_timeout=10.0, read_timeout=t, set_image_read_timeout=t,
                                                   write_timeout=t, pool_timeout=10.0)

    def think(self) -> None:
        time.sleep(float(self.rng.uniform(0.2, 1.5)))

    def run(self) -> None:
        while time.monotonic() < self.stop_at:
            ending = "release"
            try:
                session = self.patient(self.session)
            except Stopping:
                return
            except httpx.HTTPError as exc:
                self.failed("claim", exc)
                continue
            try:
                ending = self.cycle(session)
            except Stopping:
                pass
            except SessionExpiredError:  # the 410 is counted; nothing left to release
                session._lease_token = None
            except httpx.HTTPError as exc:
                self.failed("interaction", exc)
            finally:
                if ending == "abandon":
                    self.walk_away(session)
                else:
                    session.close()  # releases (best effort, 5 s)
            self.think()

    def run_safely(self) -> None:
        """`run`; a bug of this script (not an HTTP answer) is printed and counted, not lost with the thread."""
        try:
            self.run()
        except Exception:
            traceback.print_exc()
            self.tally.lost("slicer client crashed", traceback.format_exc(limit=1).strip().splitlines()[-1])

    def failed(self, step: str, exc: httpx.HTTPError) -> None:
        """A timeout is a hang, a transport error a lost connection; an HTTP status was counted by the hook."""
        try:
            path = exc.request.url.path
        except RuntimeError:
            path = step
        if isinstance(exc, httpx.TimeoutException):
            self.tally.hang(step_of(path), f"{path}: no answer within {self.timeout_s:g} s ({type(exc).__name__})")
        elif isinstance(exc, httpx.TransportError):
            self.tally.lost(step_of(path), f"{path}: {type(exc).__name__}: {exc}")
        if not isinstance(exc, httpx.HTTPStatusError):
            time.sleep(1.0)

    def cycle(self, session: Any) -> str:
        """One Slicer user's session on one volume; 'release' or 'abandon'."""
        image = self.volumes[self.uploads % len(self.volumes)]
        self.uploads += 1
        spacing_zyx = [float(v) for v in reversed(self.phantom.image.GetSpacing())]
        self.patient(session.set_image, image[None], {"spacing": spacing_zyx})
        for _ in range(int(self.rng.integers(1, 4))):
            if time.monotonic() >= self.stop_at:
                return "release"
            lesion = self.phantom.lesions[int(self.rng.integers(len(self.phantom.lesions)))]
            self.patient(session.reset_interactions)
            self.patient(session.set_target_buffer, np.zeros(image.shape, np.uint8))
            x0, y0, x1, y1 = lesion.bbox  # inclusive, on the key slice
            z = lesion.key_slice
            self.patient(session.add_bbox_interaction, [[z, z + 1], [y0, y1 + 1], [x0, x1 + 1]], include_interaction=True)
            self.think()
            self.correct(session, lesion.label, lesion.z_range)
            self.think()
            if self.rng.random() < 0.3:
                self.patient(session.undo)
        return "abandon" if self.rng.random() < self.abandon else "release"

    def correct(self, session: Any, label: int, z_range: tuple[int, int]) -> None:
        """A box or a lasso on another slice of the lesion, or a negative box in a corner of the key slice."""
        mask = self.phantom.labels == label
        z = int(self.rng.integers(z_range[0], z_range[1] + 1))
        kind = ["box", "lasso", "negative"][int(self.rng.integers(3))]
        if kind == "negative" or not mask[z].any():
            self.patient(session.add_bbox_interaction, [[z, z + 1], [0, 8], [0, 8]], include_interaction=False)
            return
        js, is_ = np.nonzero(mask[z])
        j0, j1, i0, i1 = int(js.min()), int(js.max()) + 1, int(is_.min()), int(is_.max()) + 1
        bbox = [[z, z + 1], [j0, j1], [i0, i1]]
        if kind == "box":
            self.patient(session.add_bbox_interaction, bbox, include_interaction=True)
        else:
            crop = mask[z, j0:j1, i0:i1].astype(np.uint8)[None]
            self.patient(session.add_lasso_interaction, crop, include_interaction=True, interaction_bbox=bbox)

    def walk_away(self, session: Any) -> None:
        """As a crashed Slicer: heartbeats stop, no release; the server must reap the lease."""
        session._stop_heartbeat.set()
        if session._heartbeat_thread is not None:
            session._heartbeat_thread.join(timeout=10.0)
        token = session._lease_token
        session._lease_token = None  # close() then skips the release
        session.close()
        with self.lock:
            self.abandoned.append(Abandoned(token, time.monotonic()))


@dataclass
class Sessions:
    """Abandoned leases asked for after the TTL: 410 reaped, 200 still held."""

    abandoned: int = 0
    reaped: int = 0
    still_held: int = 0
    unanswered: int = 0
    free_at_end: int | None = None
    max_sessions: int | None = None
    reaped_in_log: int | None = None
    claimed_in_log: int | None = None


def probe(url: str, leases: list[Abandoned], ttl_s: float, done: threading.Event, result: Sessions) -> None:
    """Ask for each abandoned lease once it is past the TTL (2 s margin), until `done` and none is left."""
    asked: set[str] = set()
    while True:
        now = time.monotonic()
        due = [a for a in list(leases) if a.token not in asked and now >= a.at + ttl_s + 2.0]
        for lease in due:
            asked.add(lease.token)
            try:
                status = requests.get(url + "/lease_status", headers={"X-Lease-Token": lease.token}, timeout=30).status_code
            except requests.RequestException:
                result.unanswered += 1
                continue
            result.reaped += status == 410
            result.still_held += status == 200
            result.unanswered += status not in (200, 410)
        if done.is_set() and len(asked) == len(leases):
            result.abandoned = len(leases)
            return
        time.sleep(0.5)


def free_leases(url: str) -> tuple[int, int]:
    """Claim leases until the server refuses or its maximum is reached; release them. (claimed, maximum)."""
    tokens: list[str] = []
    maximum = 1
    try:
        while len(tokens) < maximum:
            response = requests.post(url + "/claim", timeout=30)
            if response.status_code != 200:
                break
            body = response.json()
            tokens.append(body["lease_token"])
            maximum = int(body["max_sessions"])
    finally:
        for token in tokens:
            requests.post(url + "/release", headers={"X-Lease-Token": token}, timeout=30)
    return len(tokens), maximum


# ------------------------------------------------------------------------------------------- /score and QuPath


def variants(phantom: Phantom, n: int, seed: int) -> list[np.ndarray]:
    """The phantom's voxels with `n` different noises (+-3 HU): volumes whose content (cache keys) differ."""
    rng = np.random.default_rng(seed)
    voxels = phantom.array()
    return [(voxels + rng.integers(-3, 4, voxels.shape)).astype(voxels.dtype) for _ in range(n)]


def score_body(phantom: Phantom, voxels: np.ndarray) -> dict[str, Any]:
    """A one-item 3D /score body: `voxels` (the phantom's grid; NIfTI with its spacing), a box on its lesion."""
    lesion = phantom.lesions[0]
    affine = np.diag([*phantom.image.GetSpacing(), 1.0])
    raw = nib.Nifti1Image(np.ascontiguousarray(voxels.transpose(2, 1, 0)), affine).to_bytes()
    return {"input_data": {"nii_image": [base64.b64encode(gzip.compress(raw, mtime=0)).decode("ascii")],
                           "bbox": [[float(v) for v in lesion.bbox]], "key_slice_idx": [lesion.key_slice],
                           "dicom_window": [list(phantom.window or (-160.0, 240.0))]}}


def score_client(url: str, bodies: list[dict[str, Any]], tally: Tally, stop_at: float, timeout_s: float) -> None:
    sent = 0
    while time.monotonic() < stop_at:
        body = bodies[sent % len(bodies)]
        sent += 1
        started = time.monotonic()
        try:
            response = requests.post(url + "/score", json=body, timeout=timeout_s)
        except requests.Timeout:
            tally.hang("score", f"/score: no answer within {timeout_s:g} s")
            continue
        except requests.RequestException as exc:
            tally.lost("score", f"/score: {type(exc).__name__}")
            time.sleep(1.0)
            continue
        retry = response.headers.get("Retry-After")
        code = code_of(response.content) if response.status_code != 200 else ""
        tally.answer("score", response.status_code, code, retry, time.monotonic() - started, "/score")
        if response.status_code == 503 and (retry or "").isdigit():
            time.sleep(min(float(retry or 0), max(0.0, stop_at - time.monotonic())))


def qupath_row(report: LoadReport) -> Row:
    """faults.qupath_load's report in this script's columns."""
    row = Row(requests=report.requests, ok=report.statuses.get("200", 0), slowest_s=report.slowest_s)
    without = sum("HTTP 503 busy " in b for b in report.bad)
    row.busy = report.statuses.get("503 busy", 0) - without
    row.busy_without_retry_after = without
    for label, n in report.statuses.items():
        if label.startswith("503 ") and label != "503 busy":
            row.other_503[label.removeprefix("503 ")] += n
        elif label.startswith("410"):
            row.gone += n
        elif label.startswith("4"):
            row.other_4xx[label] += n
        elif label.startswith("5") and not label.startswith("503"):
            row.server_errors[label] += n
    row.hangs = sum(b.startswith("hang") for b in report.bad)
    row.connection_errors = sum(not b.startswith("hang") and "HTTP " not in b for b in report.bad)
    row.examples = [b for b in report.bad if "HTTP 4" not in b][:5]
    return row


# ---------------------------------------------------------------------------------------------- servers, RSS


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, MiB."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total / 2**20


def sample_rss(pids: dict[str, int], started: float, every_s: float, done: threading.Event,
               samples: dict[str, list[tuple[float, float]]]) -> None:
    """(seconds since `started`, MiB) per server every `every_s` until `done`."""
    while True:
        now = time.monotonic() - started
        for name, pid in pids.items():
            samples.setdefault(name, []).append((now, tree_rss_mb(pid)))
        if done.wait(every_s):
            return


def rss_summary(samples: list[tuple[float, float]], warm_s: float, end_s: float) -> dict[str, float]:
    """RSS at the warm-up mark, at the end of the load (drift between them), after the TTL wait, and the peak."""
    warm = next((mb for t, mb in samples if t >= warm_s), samples[-1][1])
    end = [mb for t, mb in samples if t <= end_s][-1]
    return {"warm_mb": round(warm, 1), "end_mb": round(end, 1), "after_ttl_mb": round(samples[-1][1], 1),
            "peak_mb": round(max(mb for _, mb in samples), 1), "drift_pct": round((end - warm) / warm * 100, 2) if warm else 0.0}


@contextmanager
def interactive_server(args: argparse.Namespace) -> Iterator[tuple[str, int | None, Path | None]]:
    """(root URL, pid, log) of serve-samapi: the one given, or one started here."""
    if args.interactive_url:
        yield args.interactive_url.rstrip("/"), args.interactive_pid, None
        return
    env = {"MEDSAM2_NNINTERACTIVE_IDLE_S": f"{args.session_ttl:g}", "MEDSAM2_NNINTERACTIVE_LIVENESS_S": f"{args.session_ttl:g}",
           "MEDSAM2_NNINTERACTIVE_MAX_SESSIONS": str(args.max_sessions), "MEDSAM2_REQUEST_DEADLINE_S": f"{args.deadline:g}"}
    with samapi_server(LOG_DIR / "interactive", env) as server:
        yield server.url.removesuffix("/sam/"), server.proc.pid, server.log


@contextmanager
def score_server(args: argparse.Namespace) -> Iterator[tuple[str, int | None]]:
    if args.score_url or not args.score:
        yield (args.score_url or "").rstrip("/"), args.score_pid
        return
    with running_server(LOG_DIR / "score", {"MEDSAM2_REQUEST_DEADLINE_S": f"{args.deadline:g}"}) as server:
        yield server.url, server.proc.pid


def count_in_log(log: Path, word: str) -> int:
    """Leases a serve-samapi log says were `word` ('claimed': lines; 'reaped': the numbers on its lines)."""
    total = 0
    for line in log.read_text(errors="replace").splitlines():
        if f"nnInteractive session {word}" in line:
            total += int(line.split(f"{word}: ")[1].split()[0]) if word == "reaped" else 1
    return total


# ---------------------------------------------------------------------------------------------------- the run


def run(args: argparse.Namespace, root: str, score_url: str, pids: dict[str, int]) -> tuple[Tally, Sessions, Row | None, dict[str, Any]]:
    tally = Tally()
    remote_session.httpx = SimpleNamespace(**{**vars(httpx), "Client": recording_client(tally)})  # this module's only
    slicer_phantoms = [ct_phantom((16, 96, 96), lesions=("ellipsoid", "lobulated"), seed=args.seed + k) for k in range(args.slicer)]
    slicer_volumes = [variants(p, args.volumes, args.seed + k) for k, p in enumerate(slicer_phantoms)]
    score_bodies = []
    for k in range(args.score):
        phantom = ct_phantom((12, 96, 96), seed=args.seed + 100 + k)
        score_bodies.append([score_body(phantom, v) for v in variants(phantom, args.volumes, args.seed + 100 + k)])
    nn_url = root + "/nninteractive"
    abandoned: list[Abandoned] = []
    sessions = Sessions()
    done, probes_done = threading.Event(), threading.Event()
    samples: dict[str, list[tuple[float, float]]] = {}
    lock = threading.Lock()
    started = time.monotonic()
    stop_at = started + args.duration
    clients = [threading.Thread(target=Slicer(nn_url, phantom, volumes, tally, stop_at, args.timeout, args.abandon,
                                              np.random.default_rng(args.seed + k), abandoned, lock).run_safely, daemon=True)
               for k, (phantom, volumes) in enumerate(zip(slicer_phantoms, slicer_volumes, strict=True))]
    clients += [threading.Thread(target=score_client, args=(score_url, bodies, tally, stop_at, args.timeout), daemon=True)
                for bodies in score_bodies]
    qupath: dict[str, LoadReport] = {}
    if args.qupath:
        clients.append(threading.Thread(target=lambda: qupath.update(report=qupath_load(
            root + "/sam/", clients=args.qupath, duration_s=args.duration, budget_s=args.timeout)), daemon=True))
    helpers = [threading.Thread(target=sample_rss, args=(pids, started, args.sample_s, done, samples), daemon=True),
               threading.Thread(target=probe, args=(nn_url, abandoned, args.session_ttl, probes_done, sessions), daemon=True)]
    for t in clients + helpers:
        t.start()
    stuck = 0
    for t in clients:
        t.join(max(1.0, stop_at - time.monotonic()) + args.timeout + 60)
        stuck += t.is_alive()
    end_s = time.monotonic() - started
    time.sleep(args.session_ttl + 2.0)  # what the clients left (abandoned, or a failed release) is past its TTL now
    probes_done.set()
    helpers[1].join(120)
    sessions.free_at_end, sessions.max_sessions = free_leases(nn_url)
    done.set()
    helpers[0].join(30)
    warm_s = min(args.warmup, args.duration / 2)
    rss = {name: rss_summary(s, warm_s, end_s) for name, s in samples.items() if s}
    return tally, sessions, qupath_row(qupath["report"]) if "report" in qupath else None, {"rss": rss, "warm_s": warm_s,
                                                                                        "stuck_threads": stuck,
                                                                                        "qupath": qupath.get("report")}


def main(args: argparse.Namespace) -> int:
    load_before = os.getloadavg()[0]
    print(f"# soak ({args.duration:g} s: {args.slicer} Slicer, {args.qupath} QuPath, {args.score} /score clients; "
          f"session TTL {args.session_ttl:g} s): {harness.machine()}", flush=True)
    with interactive_server(args) as (root, pid, log), score_server(args) as (score_url, score_pid):
        pids = {name: p for name, p in (("interactive", pid), ("score", score_pid)) if p is not None}
        tally, sessions, qupath, extra = run(args, root, score_url, pids)
        if log is not None:
            sessions.reaped_in_log, sessions.claimed_in_log = count_in_log(log, "reaped"), count_in_log(log, "claimed")
    rows = dict(sorted(tally.rows.items()))
    if qupath is not None:
        rows["qupath"] = qupath
    print(harness.table(
        ["client / step", "requests", "OK", "503 busy", "503 busy, no Retry-After", "503 other", "410", "other 4xx",
         "5xx (not 503)", "hangs", "lost connections", "slowest s"],
        [[kind, r.requests, r.ok, r.busy, r.busy_without_retry_after, sum(r.other_503.values()), r.gone,
          sum(r.other_4xx.values()), sum(r.server_errors.values()), r.hangs, r.connection_errors, f"{r.slowest_s:.1f}"]
         for kind, r in rows.items()]))
    for kind, r in rows.items():
        if r.examples:
            print(f"{kind}: " + "; ".join(r.examples))
    for name, s in extra["rss"].items():
        print(f"RSS {name} (process tree): {s['warm_mb']} MiB at {extra['warm_s']:g} s, {s['end_mb']} MiB when the load "
              f"ended: drift {s['drift_pct']:+.2f} %; {s['after_ttl_mb']} MiB after the TTL wait, peak {s['peak_mb']}")
    print(f"sessions: {sessions.abandoned} abandoned, {sessions.reaped} answered 410 after the TTL, {sessions.still_held} still held, "
          f"{sessions.unanswered} unanswered; server log: {sessions.claimed_in_log} claimed, {sessions.reaped_in_log} reaped; "
          f"leases free at the end: {sessions.free_at_end} of {sessions.max_sessions}")
    failures = sum(r.failures() for r in rows.values()) + extra["stuck_threads"] + sessions.still_held + sessions.unanswered
    failures += (sessions.free_at_end or 0) < (sessions.max_sessions or 0)
    report = extra["qupath"]
    print(f"# done: {harness.machine()}")
    print(json.dumps({
        "duration_s": args.duration, "clients": {"slicer": args.slicer, "qupath": args.qupath, "score": args.score},
        "session_ttl_s": args.session_ttl, "timeout_s": args.timeout, "deadline_s": args.deadline,
        "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
        "rows": {kind: {**asdict(r), "failures": r.failures()} for kind, r in rows.items()},
        "qupath_liveness": None if report is None else {"checks": report.liveness_checks, "failures": report.liveness_failures[:10],
                                                        "slowest_s": round(report.liveness_slowest_s, 3)},
        "rss": extra["rss"], "rss_warm_s": extra["warm_s"], "sessions": asdict(sessions),
        "stuck_threads": extra["stuck_threads"], "failures": failures, "passed": failures == 0}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
