"""Fault drills on one real samapi server (uvicorn subprocess, LiteMedSAM, one torch thread) on loopback:
a client that walks away from a builder-defaults automask leaves no work behind, concurrent QuPath-shaped
clients get 200 or 503 busy with Retry-After within their budget while liveness answers, and one SIGTERM stops
the server within seconds, cancelling the running work. The load's length is a parameter: short here, the
issue's 2 minutes in benchmarks/faults.py (figures in SECURITY.md)."""

from __future__ import annotations

import signal
import threading
import time

import pytest
import requests

from medsam2_endpoint.testing.faults import (
    HEADERS,
    cpu_seconds,
    crowded_view,
    qupath_load,
    samapi_server,
    walk_away_post,
)

DEADLINE_S = 30
ENV = {"MEDSAM2_REQUEST_DEADLINE_S": str(DEADLINE_S), "MEDSAM2_BUSY_WAIT_S": "1", "MEDSAM2_RETRY_AFTER_S": "1"}
BUILDER_DEFAULTS = {"points_per_side": 32, "box_nms_thresh": 0.7, "output_type": "Single mask"}  # REFERENCE C2


@pytest.fixture(scope="module")
def samapi(tmp_path_factory):
    with samapi_server(tmp_path_factory.mktemp("samapi-faults"), ENV) as server:
        yield server



def test_a_client_gone_5_s_into_a_builder_defaults_automask_leaves_under_1_cpu_second(samapi):
    b64img = crowded_view(7)  # hundreds of region boxes: still decoding when the client leaves
    sock = walk_away_post(samapi.url + "automask/", {"type": "vit_t", "b64img": b64img, **BUILDER_DEFAULTS})
    time.sleep(5.0)
    busy = cpu_seconds(samapi.proc.pid)
    sock.close()
    time.sleep(10.0)
    after = cpu_seconds(samapi.proc.pid) - busy
    print(f"server CPU in the 10 s after the disconnect: {after:.2f} s")
    assert after < 1.0, f"the server went on computing for {after:.2f} CPU s after its client left"
    assert "cancelled (the client went away)" in samapi.log_text()
    assert requests.get(samapi.url + "version/", timeout=10).status_code == 200


@pytest.mark.parametrize("clients,duration_s", [(8, 20.0)])
def test_concurrent_qupath_clients_get_200_or_busy_with_retry_after_and_liveness_answers(samapi, clients, duration_s):
    report = qupath_load(samapi.url, clients=clients, duration_s=duration_s, budget_s=DEADLINE_S + 1 + 15)
    summary = report.summary()
    print(summary)
    assert report.requests >= clients and report.statuses["200"] > 0, summary
    assert not report.bad, summary  # no other status, no 503 without Retry-After, no hang
    assert report.liveness_checks > 0 and not report.liveness_failures, summary


def test_one_sigterm_stops_the_server_within_seconds_cancelling_running_work(samapi):
    """Last in this module: it stops the shared server."""
    b64img = crowded_view(8)
    answers: list[requests.Response] = []
    body = {"type": "vit_t", "b64img": b64img, **BUILDER_DEFAULTS}
    worker = threading.Thread(target=lambda: answers.append(
        requests.post(samapi.url + "automask/", json=body, headers=HEADERS, timeout=120)))
    worker.start()
    time.sleep(3.0)  # the automask is running (it takes minutes on 2 cores)
    sent = time.monotonic()
    samapi.proc.send_signal(signal.SIGTERM)
    samapi.proc.wait(timeout=30)  # one signal, no second Ctrl-C, no SIGKILL
    took = time.monotonic() - sent
    worker.join(30)
    print(f"exit {took:.1f} s after SIGTERM")
    assert samapi.proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled once it is done
    assert answers and answers[0].status_code == 503 and answers[0].json()["code"] == "cancelled"
    assert "the server is stopping" in answers[0].json()["error"]
