"""Azure ML entry script (online endpoint): builds one Service in init(), answers POST /score in run().

Thin adapter: parse the body, call the Service, map domain errors to HTTP. Logic lives in src/medsam2_endpoint.
"""

from __future__ import annotations

import json
import logging
import sys
import uuid
from pathlib import Path

# On Azure the code folder is shipped as-is (not pip-installed): make the package importable.
sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from azureml_inference_server_http.api.aml_request import AMLRequest, rawhttp  # noqa: E402
from azureml_inference_server_http.api.aml_response import AMLResponse  # noqa: E402

from medsam2_endpoint.config import Settings  # noqa: E402
from medsam2_endpoint.encode import dumps  # noqa: E402
from medsam2_endpoint.errors import ServiceError  # noqa: E402
from medsam2_endpoint.service import Service  # noqa: E402

log = logging.getLogger("azmlinfsrv.medsam2")
JSON = {"Content-Type": "application/json"}
service: Service | None = None  # the entry-script contract: init() builds it, run() uses it


def init() -> None:
    global service
    logging.getLogger("azmlinfsrv.medsam2").setLevel(logging.INFO)
    service = Service.from_settings(Settings.from_env())
    log.info("ready: models %s, default %s", ", ".join(service.available_models()), service.default)


def _error(status: int, message: str) -> AMLResponse:
    return AMLResponse(json.dumps({"error": message, "status": status}), status, JSON)


@rawhttp
def run(request: AMLRequest) -> AMLResponse:
    request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
    if request.method != "POST":
        return _error(405, "use POST with a JSON body; see the README's request reference")
    if service is None:
        return _error(503, "the model is still loading; retry shortly")
    try:
        body = json.loads(request.get_data(cache=False))
    except (ValueError, UnicodeDecodeError):
        return _error(400, 'body: not valid JSON; send {"input_data": {...}} with Content-Type: application/json')
    try:
        results = service.score(body)
    except ServiceError as exc:
        log.info("request_id=%s status=%d error=%s", request_id, exc.status, exc.message)
        return _error(exc.status, exc.message)
    except Exception:
        log.exception("request_id=%s failed with an internal error", request_id)
        return _error(500, f"internal error; quote request id {request_id} when reporting it")
    return AMLResponse(dumps(results), 200, JSON)
