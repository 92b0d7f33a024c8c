"""The issue's soak (#24): 3D Slicer sessions, QuPath clients and `/score` requests at once on loopback, for
--duration seconds; the target is no 5xx other than 503 busy/full (with Retry-After), no hang, abandoned sessions
reaped, and the servers' RSS drifting less than 5 % between the end of the warm-up and the end.

Starts two servers (this checkout's sources, LiteMedSAM, CPU, one torch thread each), unless URLs are given:
`medsam2-endpoint serve-samapi` (QuPath's samapi under /sam/, the nnInteractive protocol under /nninteractive)
with MEDSAM2_NNINTERACTIVE_IDLE_S and _LIVENESS_S set to --session-ttl, so reaping happens during the run, and
azmlinfsrv with score.py (one worker). Both get MEDSAM2_REQUEST_DEADLINE_S=--deadline, below the clients'
--timeout, so the server gives up before a client does. Logs: benchmarks/out/soak/. The clients and checks are
testing/soak.py:

- Slicer clients (nninteractive-client's own `nnInteractiveRemoteInferenceSession`, heartbeats included) loop:
  claim, set_image (a 16 x 96 x 96 CT phantom, the next of --volumes noise variants), then one to three objects:
  a box on the lesion's key slice, a correction (a box or a lasso on another slice of the lesion, or a negative
  box), sometimes an undo. Then the session is released, or (--abandon of the time) abandoned as a crashed Slicer leaves it: heartbeats stop, no
  release. An abandoned lease is asked for (GET lease_status) --session-ttl + 2 s later: 410 means reaped.
  A 503 (busy, or all sessions held) is retried after its Retry-After.
- QuPath clients: testing/faults.qupath_load (box prompts and small automasks on a field of view each).
- /score clients loop one-item 3D requests (a 12 x 96 x 96 CT phantom, the next of --volumes noise variants,
  a box on its lesion).

Each client cycles through its own --volumes variants (default 16) so the servers' caches reach their steady
state early, and the RSS drift shows leaks rather than caches filling: after the first pass /score's held-volume
LRU holds them all, while their slice features (16 x 8 slices) are more than the 256 MiB feature cache holds, so
every request computes (fresh volumes on every request would grow the held-volume LRU, 1 GiB cap, all run long).
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
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

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

import numpy as np

from local_server import running_server
from medsam2_endpoint.testing.faults import LoadReport, qupath_load, samapi_server
from medsam2_endpoint.testing.phantoms import ct_phantom
from medsam2_endpoint.testing.soak import (
    Abandoned,
    Row,
    Sessions,
    Slicer,
    Tally,
    count_slicer_answers,
    free_leases,
    probe,
    qupath_row,
    rss_summary,
    sample_rss,
    score_body,
    score_client,
    variants,
)

LOG_DIR = harness.OUT / "soak"


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
    count_slicer_answers(tally)
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
          f"{sessions.unanswered} unanswered; server log: {sessions.claimed_in_log} claimed (the end check's {sessions.free_at_end} included), "
          f"{sessions.reaped_in_log} reaped; "
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
