"""Pieces of the mixed-client soak (benchmarks/soak.py, issue #24) against real servers on loopback: a tally of
answers per client kind, a 3D Slicer user driving nninteractive-client's own session (some sessions abandoned as a
crashed Slicer leaves them), /score clients, the checks that abandoned leases were reaped and none leaked, and the
servers' process-tree RSS. The QuPath clients are testing/faults.qupath_load.

Never imported by serving code.
"""

from __future__ import annotations

import base64
import gzip
import json
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, TypeVar

import httpx
import nibabel as nib
import nnInteractive.inference.remote.remote_session as remote_session
import numpy as np
import requests
from nnInteractive.inference.remote.remote_session import (
    ServerAtCapacityError,
    SessionExpiredError,
    nnInteractiveRemoteInferenceSession,
)

from medsam2_endpoint.testing.faults import LoadReport, children, rss_mb
from medsam2_endpoint.testing.phantoms import Phantom

T = TypeVar("T")

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


def count_slicer_answers(tally: Tally) -> None:
    """Make every nnInteractiveRemoteInferenceSession made from now on count each answer it gets in `tally` (its
    constructor's claim too, which no hook added afterwards could see): the session module's httpx.Client becomes
    one with a response hook. Only that module's name is replaced; httpx itself is untouched."""

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

    class Counted(httpx.Client):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.event_hooks["response"].append(hook)

    remote_session.httpx = SimpleNamespace(**{**vars(httpx), "Client": Counted})


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


# ------------------------------------------------------------------------------------------------------- RSS


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (azmlinfsrv's gunicorn workers), MiB, from /proc."""
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            total += rss_mb(current)
        except (OSError, RuntimeError):  # gone meanwhile, or a zombie
            continue
        todo += children(current)
    return total


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
