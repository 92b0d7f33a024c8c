"""The issue's full-length samapi drills (the tests run them short): one real samapi server (uvicorn subprocess,
LiteMedSAM, one torch thread); a client that disconnects 5 s into a builder-defaults automask (server CPU seconds
over the next 10 s), then N QuPath-shaped clients for D seconds (answers, 503 busy, hangs, liveness).

    PYTHONPATH=src .venv/bin/python benchmarks/faults.py --clients 8 --duration 120

Prints one JSON object; SECURITY.md quotes it with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import harness


def arguments() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=120.0)
    parser.add_argument("--deadline", type=float, default=30.0)
    return parser


if __name__ == "__main__":  # --help answers before the package is imported
    ARGS = arguments().parse_args()

from medsam2_endpoint.testing.faults import cpu_seconds, crowded_view, qupath_load, samapi_server


def walk_away(url: str, body: dict[str, object]) -> socket.socket:
    host, rest = url.removeprefix("http://").split(":", 1)
    port, path = rest.split("/", 1)
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(f"POST /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def main(args: argparse.Namespace) -> int:
    env = {"MEDSAM2_REQUEST_DEADLINE_S": str(args.deadline), "MEDSAM2_BUSY_WAIT_S": "1", "MEDSAM2_RETRY_AFTER_S": "1"}
    result: dict[str, object] = {"load_average_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp, samapi_server(Path(tmp), env) as server:
        b64img = crowded_view(7)
        body = {"type": "vit_t", "b64img": b64img, "points_per_side": 32, "box_nms_thresh": 0.7, "output_type": "Single mask"}
        sock = walk_away(server.url + "automask/", body)
        time.sleep(5.0)
        during = cpu_seconds(server.proc.pid)
        time.sleep(0.001)
        sock.close()
        time.sleep(10.0)
        result["cpu_s_in_10_s_after_disconnect"] = round(cpu_seconds(server.proc.pid) - during, 2)
        report = qupath_load(server.url, clients=args.clients, duration_s=args.duration, budget_s=args.deadline + 16)
        result["load"] = {"clients": args.clients, "duration_s": args.duration, **report.summary()}
    result["load_average_after"] = os.getloadavg()[0]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
