"""Bounded work on the samapi server (real uvicorn on loopback): work stops when its client leaves, a model
whose slots are taken answers 503 busy with Retry-After, and cheap routes answer meanwhile."""

from __future__ import annotations

import threading
import time

import pytest
import requests

from medsam2_endpoint.api.samapi import create_app
from medsam2_endpoint.base.budget import Budget, Cancelled
from medsam2_endpoint.contract.score2d import AutomaskOptions
from medsam2_endpoint.testing.faults import walk_away_post
from test_prompt2d import LITE, phantom_slice
from test_samapi import HEADERS, live, post, rgb_png, with_settings


class SlowDecoder:
    """Wraps LiteMedSAM's batched decoder: counts calls and sleeps in each, so a grid takes long."""

    def __init__(self, original, delay_s: float) -> None:
        self.original, self.delay_s, self.calls = original, delay_s, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        time.sleep(self.delay_s)
        return self.original(*args, **kwargs)



def test_automask_stops_soon_after_its_client_disconnects(service, monkeypatch, tmp_path):
    engine = service.registry.get(LITE)
    slow = SlowDecoder(engine.predict_logits_2d, 0.3)
    monkeypatch.setattr(engine, "predict_logits_2d", slow)
    grey, _, _ = phantom_slice()
    body = {"type": "vit_t", "b64img": rgb_png(grey), "points_per_side": 16, "points_per_batch": 1, "output_type": "Single Mask"}
    with live(create_app(with_settings(service, samapi_weights_dir=tmp_path))) as url:
        sock = walk_away_post(url + "automask/", body)
        deadline = time.monotonic() + 60
        while slow.calls < 3 and time.monotonic() < deadline:  # the grid is being decoded
            time.sleep(0.05)
        assert slow.calls >= 3
        sock.close()  # the client gives up (QuPath's read timeout)
        time.sleep(2.0)  # polling every 0.25 s, the work stops at its next batch
        stopped_at = slow.calls
        time.sleep(2.0)
        assert slow.calls == stopped_at, "work went on after the client left"
        assert stopped_at < 15, "the whole grid (23 region boxes, one a batch) ran"
        assert requests.get(url + "version/", timeout=10).status_code == 200


def test_a_model_with_every_slot_taken_answers_busy_with_retry_after(service, monkeypatch, tmp_path):
    engine = service.registry.get(LITE)
    entered, release = threading.Event(), threading.Event()
    original = engine.predict_2d

    def held(*args, **kwargs):
        entered.set()
        release.wait(60)
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "predict_2d", held)
    busy = with_settings(service, samapi_weights_dir=tmp_path, inference_slots=1, busy_wait_s=0.2, retry_after_s=3)
    grey, _, box = phantom_slice()
    with live(create_app(busy)) as url:
        first: list[requests.Response] = []
        worker = threading.Thread(target=lambda: first.append(post(url, type="vit_t", bbox=list(box), b64img=rgb_png(grey))))
        worker.start()
        try:
            assert entered.wait(60)
            second = post(url, type="vit_t", bbox=list(box), b64img=rgb_png(grey))
            assert second.status_code == 503 and second.headers["Retry-After"] == "3"
            assert second.json()["code"] == "busy" and "lite-medsam is busy" in second.json()["error"]
            assert requests.get(url + "weights/", timeout=10, headers=HEADERS).status_code == 200  # cheap routes answer
        finally:
            release.set()
            worker.join(60)
        assert first[0].status_code == 200


def test_a_cancelled_budget_stops_the_box_prompts_between_batches(service):
    grey, _, _ = phantom_slice()
    budget = Budget(None)
    budget.cancel()
    with pytest.raises(Cancelled) as caught:
        service.automask_image(LITE, rgb_png(grey), AutomaskOptions(points_per_side=4), "single", budget=budget)
    assert caught.value.detail == {"grid_boxes": 0}
