"""Limits, time limits and logs through the real server, plus score.py's run() in-process.

One azmlinfsrv + score.py server for the module: LiteMedSAM, one worker, MEDSAM2_REQUEST_DEADLINE_S=0.5
(a volume of 48 slices cannot finish: the answer must be a JSON 503 naming slices_processed, not a killed
worker), MEDSAM2_MAX_FILE_MB=16 (the corpus's gzip bomb stays small), MEDSAM2_MAX_REQUEST_MB=2 (bodies capped at
18 MiB: 2 MiB + 1 MiB per item, for the chunked-body test), default fetch policy (URLs in these
tests name IP literals only, so nothing is resolved or contacted). Every file of tests/corpus/ is posted
and must get the status in tests/corpus/expected.json. A second server (SCORING_TIMEOUT_MS=1000) runs for
the one test of azmlinfsrv's own alarm.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import flask
import pytest
import requests
import yaml

from local_server import REPO, assert_error_body, b64, running_server, tiny_volume, volume_request

CORPUS = Path(__file__).resolve().parent / "corpus"
EXPECTED = json.loads((CORPUS / "expected.json").read_text())
DEADLINE_S = 0.5
SERVER_ENV = {"MEDSAM2_REQUEST_DEADLINE_S": str(DEADLINE_S), "MEDSAM2_MAX_FILE_MB": "16", "MEDSAM2_MAX_REQUEST_MB": "2"}
BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{200,}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("limits-server"), SERVER_ENV) as srv:
        yield srv


def post(server, body, **headers) -> requests.Response:
    return requests.post(server.score, json=body, headers=headers, timeout=300)


def summary_lines(log: str, request_id: str) -> list[str]:
    """The per-request summary lines (route=..., status=...) of one request id."""
    return [line for line in log.splitlines() if f"request_id={request_id} route=" in line and " status=" in line]


# ------------------------------------------------------------------------------------------------- corpus


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_corpus_file_gets_its_4xx(server, name):
    expected = EXPECTED[name]
    assert not expected["known_bug"], "no corpus file may be a known 500"
    data = (CORPUS / name).read_bytes()
    assert len(data) == expected["bytes"], "corpus out of date: run tests/corpus/make_corpus.py"
    response = post(server, {"input_data": {"nii_image": [b64(data)], "bbox": [[0, 0, 1, 1]], "key_slice_idx": [0]}})
    body = assert_error_body(response)
    assert response.status_code == expected["status"], body
    assert expected["contains"] in body["error"] and body["error"].startswith("input_data."), body


# ------------------------------------------------------------------------------------------------- deadline


def test_request_deadline_answers_503_with_slices_processed(server):
    post(server, volume_request(tiny_volume(2, 32)))  # first use initialises the model lazily (MEDSAM2_WARMUP=0)
    volume = tiny_volume(48, 64, seed=7)  # the bright square runs through every slice: nothing stops early
    response = post(server, volume_request(volume, stop_after_empty=[0]), **{"x-request-id": "deadline-1"})
    body = assert_error_body(response)
    assert response.status_code == 503, body
    done = re.search(r"slices_processed=(\d+)", body["error"])
    assert done and 1 <= int(done.group(1)) < 2 * 48, body
    assert "MEDSAM2_REQUEST_DEADLINE_S" in body["error"]
    # The worker answered (it was not killed) and goes on serving.
    assert server.alive()
    assert post(server, {"input_data": {}}).status_code == 400
    log = server.log_text()
    assert any("status=503" in line for line in summary_lines(log, "deadline-1")), log[-2000:]
    assert "WORKER TIMEOUT" not in log and "Booting worker" in log and log.count("Booting worker") == 1


@pytest.fixture()
def alarm_server(tmp_path_factory):
    """A second server, for one test: SCORING_TIMEOUT_MS=1000 and the default 170 s deadline."""
    with running_server(tmp_path_factory.mktemp("alarm-server"), {"SCORING_TIMEOUT_MS": "1000"}) as srv:
        yield srv


def test_scoring_timeout_alarm_answers_503_json_through_the_server(alarm_server):
    """azmlinfsrv's SIGALRM lands inside the Service: score.py answers a JSON 503 (was: internal-error 500)."""
    response = post(alarm_server, volume_request(tiny_volume(64, 64, seed=7), stop_after_empty=[0]))
    body = assert_error_body(response)
    assert response.status_code == 503 and "SCORING_TIMEOUT_MS" in body["error"], body
    assert alarm_server.alive() and post(alarm_server, {"input_data": {}}).status_code == 400
    assert "failed with an internal error" not in alarm_server.log_text()


def test_chunked_body_stops_at_the_cap_as_it_arrives(server):
    """No Content-Length (Transfer-Encoding: chunked): the body is read in pieces and refused once past its cap,
    while the client is still sending (a server reading it whole would wait for an end that never comes)."""
    from test_streamed_limits import chunked_post, refusal

    limit = (2 + 16) * 1024 * 1024  # MEDSAM2_MAX_REQUEST_MB + 1 MiB x MEDSAM2_MAX_ITEMS
    answer = chunked_post(int(server.url.rsplit(":", 1)[1]), "/score", content_type="application/json",
                          prefix=b'{"input_data": {"nii_image": ["', total=limit + 256 * 1024)
    body = refusal(answer)
    assert f"more than {limit} bytes" in body["error"] and "MEDSAM2_MAX_REQUEST_MB" in body["error"], body
    assert server.alive()


# ------------------------------------------------------------------------------------------------- logs


def test_request_id_is_echoed_and_logged_once(server):
    response = post(server, {"input_data": {"nii_image": ["AAAA"], "bbox": [[1, 1, 5, 5]], "key_slice_idx": [0]}},
                    **{"x-request-id": "hardening-test-42"})
    assert response.status_code == 415 and response.headers["x-request-id"] == "hardening-test-42"
    lines = summary_lines(server.log_text(), "hardening-test-42")
    assert len(lines) == 1, lines
    assert re.search(r"request_id=hardening-test-42 route=3d status=415 items=1 ms=\d+ error=\"", lines[0]), lines[0]


def test_generated_request_id_is_the_echoed_one(server):
    response = post(server, {"input_data": {"nii_image": [], "bbox": [], "key_slice_idx": []}})
    assert response.status_code == 400
    request_id = response.headers["x-request-id"]
    assert len(request_id) >= 32
    assert len(summary_lines(server.log_text(), request_id)) == 1


def test_request_id_is_sanitised_in_the_log(server):
    response = post(server, [], **{"x-request-id": "evil id%s=1"})
    assert response.status_code == 400
    log = server.log_text()
    assert len(summary_lines(log, "evil?id?s?1")) == 1
    assert "evil id%s" not in log


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/volume.nii.gz?sv=2024&sig=SECRET-SIG-1",
        "https://169.254.169.254/latest/meta-data?sig=SECRET-SIG-2",
        "http://10.1.2.3/a.nii?sig=SECRET-SIG-3",
        "https://[::ffff:127.0.0.1]/b.nii?sig=SECRET-SIG-4#SECRET-FRAGMENT",
        "https://user:SECRET-PASSWORD@8.8.8.8/c.nii",
    ],
)
def test_refused_urls_never_echo_secrets(server, url):
    request_id = "url-" + re.sub(r"[^a-z0-9]", "", url)[-20:]
    response = post(server, {"input_data": {"nii_image": [url], "bbox": [[1, 1, 5, 5]], "key_slice_idx": [0]}},
                    **{"x-request-id": request_id})
    body = assert_error_body(response)
    assert response.status_code == 400, body
    assert "SECRET" not in response.text and "sig=" not in response.text
    log = server.log_text()
    assert summary_lines(log, request_id)
    assert "SECRET" not in log and "sig=" not in log


def test_logs_hold_no_image_data(server):
    """After the corpus, the deadline volume and the URL tests: no base64 and no voxels in the log."""
    volume_b64 = volume_request(tiny_volume(48, 64, seed=7))["input_data"]["nii_image"][0]
    samples = [volume_b64] + [b64((CORPUS / n).read_bytes()) for n in EXPECTED if (CORPUS / n).stat().st_size > 64]
    log = server.log_text()
    for text in samples:
        for start in range(0, max(1, len(text) - 48), max(1, len(text) // 4)):
            assert text[start : start + 48] not in log
    assert not BASE64_RUN.search(log), BASE64_RUN.search(log)


# ------------------------------------------------------------------------------------------------- run() in-process


@pytest.fixture(scope="module")
def entry():
    """score.py loaded as a module (no init(): tests set `service` themselves)."""
    spec = importlib.util.spec_from_file_location("score_entry_under_test", REPO / "score.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeService:
    def __init__(self, outcome):
        from medsam2_endpoint.core.settings import Settings

        self.outcome = outcome
        self.settings = Settings.from_env({"MEDSAM2_MAX_ITEMS": "1", "MEDSAM2_MAX_BASE64_MB": "1"})

    def score_3d(self, items):
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


VALID = b'{"input_data": {"nii_image": ["x"], "bbox": [[0, 0, 1, 1]], "key_slice_idx": [0]}}'


def call(entry, service, data: bytes = VALID, method="POST", headers=None):
    entry.app.service = service
    app = flask.Flask("score-under-test")
    with app.test_request_context("/score", method=method, data=data, headers=headers or {}):
        return entry.run(flask.request)


def test_scoring_timeout_signal_becomes_a_json_503(entry):
    """azmlinfsrv's SCORING_TIMEOUT_MS raises TimeoutError inside run(): a JSON 503, not an internal-error 500."""
    response = call(entry, FakeService(TimeoutError()))
    assert response.status_code == 503
    assert "SCORING_TIMEOUT_MS" in json.loads(response.get_data())["error"]


def test_body_over_what_the_limits_could_accept_is_refused_unread(entry):
    limit = 1 * (1024 * 1024 + (1 << 20))  # MEDSAM2_MAX_ITEMS=1 x (1 MiB base64 + 1 MiB)
    response = call(entry, FakeService([]), data=b"x" * (limit + 1))
    assert response.status_code == 413 and "MEDSAM2_MAX_ITEMS" in json.loads(response.get_data())["error"]
    assert call(entry, FakeService([]), data=b"[" * 100_000).status_code == 400  # too deep for json: not a 500


def test_internal_errors_carry_the_request_id(entry):
    response = call(entry, FakeService(KeyError("boom")), headers={"x-request-id": "rid-500"})
    assert response.status_code == 500 and response.headers["x-request-id"] == "rid-500"
    assert "rid-500" in json.loads(response.get_data())["error"]
    assert call(entry, FakeService([]), method="GET").status_code == 405
    assert call(entry, None).status_code == 503


# ------------------------------------------------------------------------------------------------- deployment


@pytest.mark.parametrize("name", ["deployment.yml", "deployment-cpu.yml"])
def test_deadline_leaves_time_to_answer_before_the_scoring_alarm(name):
    """The deadline is checked between slices; the last slice, the largest component and the encoding of the
    mask still run after it, so SCORING_TIMEOUT_MS must leave them a few seconds (5 s)."""
    env = yaml.safe_load((REPO / "deployment" / name).read_text())["environment_variables"]
    deadline_s = float(env["MEDSAM2_REQUEST_DEADLINE_S"])
    assert int(env["SCORING_TIMEOUT_MS"]) / 1000 - deadline_s >= 5
    assert int(env["WORKER_TIMEOUT"]) > int(env["SCORING_TIMEOUT_MS"]) / 1000


def test_default_deadline_is_below_the_managed_endpoint_maximum():
    from medsam2_endpoint.core.settings import Settings

    assert Settings.from_env({}).request_deadline_s < 180  # request_timeout_ms cannot exceed 180,000


# ------------------------------------------------------------------------------------------------- validation fixes (in-process)


def test_header_and_geometry_checks_refuse_before_reading_voxels():
    from medsam2_endpoint.base.errors import InvalidRequest
    from medsam2_endpoint.io.limits import Limits
    from medsam2_endpoint.io.volume import read_nifti

    for name in ("vox_offset_nan.nii", "nan_geometry.nii"):
        with pytest.raises(InvalidRequest, match=EXPECTED[name]["contains"]):
            read_nifti((CORPUS / name).read_bytes(), field="f", limits=Limits())


@pytest.mark.parametrize("value", [1e300, -1e300, 2.0**63, 1e9 + 1])
def test_box_coordinates_beyond_any_slice_are_refused_by_the_schema(value):
    from medsam2_endpoint.base.errors import InvalidRequest
    from medsam2_endpoint.contract.score3d import parse_request

    body = {"input_data": {"nii_image": ["x"], "bbox": [[0, 0, value, 5]], "key_slice_idx": [0]}}
    with pytest.raises(InvalidRequest, match=r"input_data.bbox\[0\]\[2\]"):
        parse_request(body, max_items=1)
