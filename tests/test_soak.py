"""Concurrency and memory soak: the real server with WORKER_COUNT=2 under 4 concurrent clients, 100 mixed requests.

Mixed: valid 3D requests on two tiny volumes (list and rle masks), valid 2D requests when the 2D route
answers 200 to a simple one (checked first), and malformed ones (schema, base64, corpus files, JSON).
Checks: all 100 answered with the expected status (none lost, no 5xx); identical valid requests get
identical masks whichever worker answered; the resident memory (RSS) of each gunicorn worker after the
100 requests is within 10% of its RSS after the first 10 (no leak; the feature caches are bounded and
warm by then, as the valid requests reuse two volumes). Loopback only, bounded loops.
"""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests

from local_server import NO_FETCH, b64, image_request, running_server, tiny_volume, volume_request

WORKERS = 2
CLIENTS = 4
TOTAL = 100
FIRST = 10
CORPUS = Path(__file__).resolve().parent / "corpus"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = {**NO_FETCH, "MEDSAM2_WARMUP": "1", "MEDSAM2_MAX_FILE_MB": "16"}
    with running_server(tmp_path_factory.mktemp("soak-server"), env, workers=WORKERS) as srv:
        yield srv


@dataclass(frozen=True)
class Job:
    key: str  # identical keys are identical requests
    body: object
    expect: int


def worker_pids(server) -> list[int]:
    """gunicorn's workers: the children of the azmlinfsrv process (which is gunicorn's arbiter)."""
    return sorted(child.pid for child in psutil.Process(server.proc.pid).children(recursive=True))


def rss_mb(pids: list[int]) -> dict[int, float]:
    return {pid: psutil.Process(pid).memory_info().rss / 2**20 for pid in pids}


def jobs(with_2d: bool) -> list[Job]:
    """100 requests in a fixed order; the first 10 contain every valid kind twice (the caches warm up there)."""
    volume_a, volume_b = tiny_volume(4, 32, seed=1), tiny_volume(6, 48, seed=2)
    valid = [
        Job("3d-a-list", volume_request(volume_a), 200),
        Job("3d-b-rle", volume_request(volume_b, mask_format=["rle"]), 200),
        Job("3d-ab-two-items", {"input_data": {
            "nii_image": [volume_request(volume_a)["input_data"]["nii_image"][0], volume_request(volume_b)["input_data"]["nii_image"][0]],
            "bbox": [[6, 6, 26, 26], [10, 10, 38, 38]], "key_slice_idx": [1, 3], "mask_format": ["rle", "rle"]}}, 200),
    ]
    if with_2d:
        valid.append(Job("2d-png", image_request(32), 200))
    errors = [
        Job("err-schema", {"input_data": {"nii_image": ["x"], "bbox": [[1, 2, 3]], "key_slice_idx": [0]}}, 400),
        Job("err-base64", {"input_data": {"nii_image": ["@@@"], "bbox": [[1, 1, 5, 5]], "key_slice_idx": [0]}}, 400),
        Job("err-jpeg", {"input_data": {"nii_image": [b64((CORPUS / "jpeg_as_nifti.nii").read_bytes())],
                                        "bbox": [[1, 1, 5, 5]], "key_slice_idx": [0]}}, 415),
        Job("err-bomb", {"input_data": {"nii_image": [b64((CORPUS / "gzip_bomb.nii.gz").read_bytes())],
                                        "bbox": [[1, 1, 5, 5]], "key_slice_idx": [0]}}, 413),
        Job("err-key", volume_request(volume_a, key_slice_idx=[40]), 400),
        Job("err-json", "{not json", 400),
    ]
    first = valid * 2 + errors[: FIRST - 2 * len(valid)]
    rng = random.Random(6)
    rest = [rng.choice(valid) if rng.random() < 0.5 else rng.choice(errors) for _ in range(TOTAL - len(first))]
    return first + rest


def send(server, job: Job) -> tuple[Job, int, object]:
    data = job.body if isinstance(job.body, str) else json.dumps(job.body)
    response = requests.post(server.score, data=data, headers={"Content-Type": "application/json"}, timeout=600)
    return job, response.status_code, response.json()


def test_two_workers_four_clients_no_loss_no_leak(server):
    pids = worker_pids(server)
    assert len(pids) == WORKERS, pids
    probe = requests.post(server.score, json=image_request(32), timeout=600)
    with_2d = probe.status_code == 200
    plan = jobs(with_2d)
    assert len(plan) == TOTAL
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        answers = list(pool.map(lambda job: send(server, job), plan[:FIRST]))
        after_first = rss_mb(pids)
        answers += list(pool.map(lambda job: send(server, job), plan[FIRST:]))
    elapsed = time.perf_counter() - started
    after_all = rss_mb(pids)

    assert len(answers) == TOTAL  # nothing lost
    bad = [(job.key, status, body) for job, status, body in answers if status != job.expect]
    assert not bad, bad[:3]
    masks: dict[str, str] = {}
    for job, status, body in answers:
        if status == 200:
            assert isinstance(body, list) and body
            signature = json.dumps([item.get("mask", item.get("masks")) for item in body], sort_keys=True)
            assert masks.setdefault(job.key, signature) == signature, f"{job.key}: answers differ between requests"
        else:
            assert body["status"] == status and body["error"]
    assert worker_pids(server) == pids, "a worker was restarted during the soak"
    print(
        f"\nsoak: {TOTAL} requests ({sum(s == 200 for _, s, _ in answers)} answered 200, 2D route "
        f"{'included' if with_2d else 'absent: skipped'}) by {WORKERS} workers from {CLIENTS} clients in {elapsed:.1f} s; "
        + "; ".join(f"worker {pid}: RSS {after_first[pid]:.0f} MB after {FIRST}, {after_all[pid]:.0f} MB after {TOTAL}" for pid in pids)
    )
    for pid in pids:
        assert after_all[pid] <= 1.10 * after_first[pid], (pid, after_first[pid], after_all[pid])
    assert server.alive()
