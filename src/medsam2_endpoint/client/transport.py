"""HTTP to a scoring endpoint for the client: progress bars, retries with back-off, 424 unwrapping.

The only client code that talks to the network. A key is sent as `Authorization: Bearer` and never
printed, logged or put in an error; URLs in messages lose their query strings (they can carry tokens).
"""

from __future__ import annotations

import ipaddress
import json
import random
import threading
import time
import urllib.parse
from typing import Any

import requests
from tqdm import tqdm

from medsam2_endpoint.base.log import log

AZURE_STATUS_HEADER = "ms-azureml-model-error-statuscode"
RETRY_STATUSES = (429, 503)
KEY_ENV = "MEDSAM2_ENDPOINT_KEY"


class ClientError(Exception):
    """A problem with the client's inputs (bad file, box, window, objects file); exit code 2."""


class EndpointError(ClientError):
    """The endpoint answered with an error. `status` is the service's own code (a 424's header unwrapped)."""

    def __init__(self, status: int, message: str, *, http_status: int, body: Any = None) -> None:
        super().__init__(message)
        self.status, self.message, self.http_status, self.body = status, message, http_status, body
        # the service's machine-readable kind of error (README: Errors), when the body carries one
        self.code = str(body["code"]) if isinstance(body, dict) and body.get("code") else None

    def __str__(self) -> str:
        via = f" (reported by Azure as HTTP {self.http_status})" if self.http_status != self.status else ""
        return f"HTTP {self.status}{via}: {self.message}"


class _Progress:
    """On stderr: an upload bar, then an elapsed-time ticker while the endpoint computes."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total = enabled, total
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="upload", disable=not enabled, leave=False)

    def sent(self, count: int) -> None:
        self.bar.update(count)
        if self.bar.n >= self.total and self._ticker is None and self.enabled:
            self.bar.close()
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        with tqdm(desc="waiting for the endpoint", bar_format="{desc}: {elapsed}", leave=False) as wait:
            while not self._stop.wait(0.5):
                wait.refresh()

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        self.bar.close()


class _Upload:
    """A file-like request body that reports what http.client has read from it."""

    def __init__(self, data: bytes, progress: _Progress) -> None:
        self._view, self._pos, self._progress = memoryview(data), 0, progress

    def __len__(self) -> int:  # requests sets Content-Length from this
        return len(self._view)

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else min(self._pos + size, len(self._view))
        chunk = bytes(self._view[self._pos : end])
        self._pos = end
        self._progress.sent(len(chunk))
        return chunk


def _check_transport(endpoint: str, key: str | None) -> None:
    url = urllib.parse.urlsplit(endpoint)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ClientError("endpoint must be an http(s) URL such as http://127.0.0.1:5001/score")
    if key and url.scheme == "http":
        host = url.hostname
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:  # a bearer key over plain HTTP can be read by anyone on the path
            raise ClientError(f"refusing to send the endpoint key over plain http to {host}; use https")


NOT_RETRIED = ("deadline", "cancelled")


def _error_of(response: requests.Response) -> EndpointError:
    original = response.headers.get(AZURE_STATUS_HEADER)
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text[:500]
    status = response.status_code
    if original and original.isdigit():
        status = int(original)
    elif status == 424 and isinstance(body, dict) and isinstance(body.get("status"), int):
        status = body["status"]  # a 424 that lost its header: the body carries the service's status too
    message = body.get("error") or body.get("message") if isinstance(body, dict) else None
    if status in (401, 403) and not message:
        message = f"the endpoint refused the request; check the key in {KEY_ENV}"
    return EndpointError(status, str(message or body or response.reason), http_status=response.status_code, body=body)


def post_request(
    endpoint: str, body: dict[str, Any], *, key: str | None = None, deployment: str | None = None, timeout: float = 600.0,
    retries: int = 4, backoff_s: float = 2.0, max_backoff_s: float = 60.0, progress: bool = False,
) -> Any:
    """POST a request body; the parsed JSON answer. Retries 429/503 (also when wrapped in a 424) with back-off.

    Waits `backoff_s * 2**attempt` (or the server's Retry-After), capped at `max_backoff_s`, at most `retries`
    times. A 503 whose `code` is `deadline` or `cancelled` is not retried: the same request would run out again.
    """
    _check_transport(endpoint, key)
    data = json.dumps(body, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    if deployment:
        headers["azureml-model-deployment"] = deployment
    for attempt in range(retries + 1):
        bar = _Progress(progress, len(data))
        try:
            response = requests.post(endpoint, data=_Upload(data, bar), headers=headers, timeout=(10, timeout))
        except requests.ConnectionError:
            raise ClientError(f"cannot connect to {_public(endpoint)}; is the server running?") from None
        except requests.Timeout:
            raise ClientError(f"no answer from {_public(endpoint)} within {timeout:.0f} s (--timeout)") from None
        finally:
            bar.close()
        if response.status_code == 200:
            try:
                return response.json()
            except ValueError:
                raise EndpointError(200, "the answer is not JSON", http_status=200, body=response.text[:500]) from None
        error = _error_of(response)
        if error.status not in RETRY_STATUSES or attempt == retries or error.code in NOT_RETRIED:
            raise error
        retry_after = response.headers.get("Retry-After", "")
        delay = float(retry_after) if retry_after.isdigit() else backoff_s * 2**attempt * random.uniform(0.8, 1.2)
        delay = min(delay, max_backoff_s)
        log.warning("HTTP %d: %s; retry %d/%d in %.1f s", error.status, error.message, attempt + 1, retries, delay)
        time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _public(url: str) -> str:
    """scheme://host/path: query strings can carry tokens."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}"
