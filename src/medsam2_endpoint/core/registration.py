"""samapi weight registration: download a MedSAM2 checkpoint, check it, store it, add it to the registry.

Off unless MEDSAM2_SAMAPI_ALLOW_WEIGHT_REGISTRATION=1. When on, a `sam2_t` checkpoint is fetched over
https through the SSRF-safe fetcher (size cap MEDSAM2_SAMAPI_MAX_WEIGHT_MB), written to a staging
folder (`.staging-*`, which the registry never loads from), loaded with `weights_only=True` and strict
MedSAM2 keys, moved to `<weights dir>/<name>.pt` with a `<name>.json` record (type, name, url, sha256),
and added to the registry. The weights folder defaults to `<model dir>/registered`, so registered
weights are loaded again at the next start. Progress is reported through `progress()`; `cancel()`
abandons a running registration (the download itself stops at the fetcher's own limits).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, cast

from medsam2_endpoint.base.errors import Conflict, Forbidden, InvalidRequest, PayloadTooLarge, ServiceError
from medsam2_endpoint.base.log import log
from medsam2_endpoint.core.registry import ModelRegistry
from medsam2_endpoint.core.settings import SamapiOptions
from medsam2_endpoint.engines.medsam2 import STAGING_PREFIX, CheckpointError
from medsam2_endpoint.io.fetch import FetchPolicy, fetch_bytes, redact_url

REGISTRABLE = ("sam2_t",)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class WeightRecords:
    """The `<name>.json` records of registered weights: where each came from (URL without its query)."""

    def __init__(self, weights_dir: Path) -> None:
        self.weights_dir = weights_dir
        self._records: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()
        if weights_dir.is_dir():
            for path in sorted(weights_dir.glob("*.json")):
                try:
                    record = json.loads(path.read_text())
                    self._records[str(record["name"])] = {k: str(record[k]) for k in ("type", "name", "url", "sha256")}
                except (OSError, ValueError, KeyError, TypeError):
                    log.warning("samapi: ignored unreadable weight record %s", path.name)

    def url_of(self, name: str) -> str | None:
        with self._lock:
            record = self._records.get(name)
        return record["url"] if record else None

    def add(self, name: str, record: dict[str, str]) -> None:
        with self._lock:
            self._records[name] = record

    def known_url(self, url: str) -> str | None:
        with self._lock:
            return next((n for n, r in self._records.items() if r["url"] == url), None)

    def checkpoints(self) -> dict[str, Path]:
        """name -> stored checkpoint, for records whose file exists."""
        with self._lock:
            names = list(self._records)
        return {n: self.weights_dir / f"{n}.pt" for n in names if (self.weights_dir / f"{n}.pt").is_file()}


class WeightRegistrar:
    """One registration at a time; `progress()` and `cancel()` may be called from other threads."""

    def __init__(self, registry: ModelRegistry, records: WeightRecords, settings: SamapiOptions, fetch: FetchPolicy) -> None:
        self.registry = registry
        self.records = records
        self.settings = settings
        self.fetch = fetch
        self._state: dict[str, Any] = {"message": None, "percent": -1}
        self._cancel = threading.Event()
        self._busy = threading.Lock()
        self._lock = threading.Lock()

    def progress(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._state)

    def _report(self, message: str | None, percent: int) -> None:
        with self._lock:
            self._state = {"message": message, "percent": percent}

    def cancel(self) -> str:
        self._cancel.set()
        return "Cancel signal sent"

    def check_allowed(self) -> None:
        """Forbidden unless registration is enabled: checked before anything is downloaded or read."""
        if not self.settings.allow_weight_registration:
            raise Forbidden(
                "weight registration is disabled on this server; the administrator can enable it with "
                "MEDSAM2_SAMAPI_ALLOW_WEIGHT_REGISTRATION=1, or copy MedSAM2 checkpoints into the model folder"
            )

    def register_upload(self, name: str, data: bytes, source: str) -> str:
        """A checkpoint sent as a file (MedSAM2's Slicer plugin, `POST /upload_model`) under the same rules as
        one from a URL: only when enabled, a MedSAM2 (`sam2_t`) checkpoint within the size cap, loaded with
        weights_only and strict keys before it is stored and served. `source` is recorded as its origin."""
        self.check_allowed()
        if len(data) > self.settings.max_weight_bytes:
            raise PayloadTooLarge(f"file: {len(data)} bytes, over the {self.settings.max_weight_bytes} bytes a checkpoint may have "
                                  "(MEDSAM2_SAMAPI_MAX_WEIGHT_MB)")
        if not _NAME.match(name):
            raise InvalidRequest("file: name the checkpoint file with 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        if name in self.registry:
            return f"Model file with the name '{name}' already exists. Skip registration."
        if not self._busy.acquire(blocking=False):
            raise Conflict("another weight registration is running; wait for it and upload again")
        try:
            self._cancel.clear()
            return self._store(REGISTRABLE[0], name, data, source, f"Cancelled to register {name} ({source}).", field="file")
        finally:
            self._busy.release()

    def register(self, sam_type: str, name: str, url: str) -> str:
        """Register weights; returns samapi's text message (also for "already exists" and "cancelled")."""
        self.check_allowed()
        if sam_type not in REGISTRABLE:
            raise InvalidRequest(f"type: only {', '.join(REGISTRABLE)} (MedSAM2, SAM 2.1 hiera-tiny at 512 px) weights can be registered, not {sam_type}")
        if not _NAME.match(name):
            raise InvalidRequest("name: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        shown = redact_url(url)
        if name in self.registry:
            return f"Model file with the name '{name}' already exists. Skip registration. Choose {name} in the weights list, or register under another name."
        known = self.records.known_url(shown)
        if known:
            return f"Model file with the url '{shown}' already exists. Skip registration. Choose {known} in the weights list."
        if not self._busy.acquire(blocking=False):
            raise Conflict("another weight registration is running; wait for it or cancel it (GET weights/cancel/)")
        try:
            self._cancel.clear()
            return self._register(sam_type, name, url, shown)
        finally:
            self._busy.release()

    def _download(self, url: str) -> bytes | None:
        """Fetch in a worker thread so a cancel returns at once; None when cancelled."""
        policy = dataclasses.replace(self.fetch, allow_http=False, max_bytes=self.settings.max_weight_bytes)
        outcome: dict[str, Any] = {}
        done = threading.Event()

        def work() -> None:
            try:
                outcome["data"] = fetch_bytes(url, policy, field="url")
            except BaseException as exc:  # handed to the waiting request thread
                outcome["error"] = exc
            finally:
                done.set()

        threading.Thread(target=work, name="medsam2-weights-download", daemon=True).start()
        while not done.wait(0.1):
            if self._cancel.is_set():
                return None
        if "error" in outcome:
            raise outcome["error"]
        return cast(bytes, outcome["data"])

    def _register(self, sam_type: str, name: str, url: str, shown: str) -> str:
        cancelled = f"Cancelled to register {name} ({shown})."
        self._report(f"downloading {name} from {shown}", 0)
        try:
            data = self._download(url)
        except ServiceError as exc:
            self._report(f"failed: {exc.message}", -1)
            raise
        if data is None or self._cancel.is_set():  # the message says what happened; registering again starts over
            self._report(cancelled, -1)
            return cancelled
        return self._store(sam_type, name, data, shown, cancelled)

    def _store(self, sam_type: str, name: str, data: bytes, shown: str, cancelled: str, field: str = "url") -> str:
        """Check a downloaded or uploaded checkpoint (weights_only, strict keys), store it, add it to the registry."""
        self._report(f"checking {name} ({len(data)} bytes)", 60)
        self.settings.weights_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.settings.weights_dir))
        try:
            path = staging / f"{name}.pt"
            path.write_bytes(data)
            del data
            try:
                engine = self.registry.load_medsam2(path, name)  # weights_only load, strict keys
            except CheckpointError as exc:
                self._report(f"failed: {exc}", -1)
                raise InvalidRequest(f"{field}: {exc}") from None
            if self._cancel.is_set():
                self._report(cancelled, -1)
                return cancelled
            final = self.settings.weights_dir / f"{name}.pt"
            os.replace(path, final)
            record = {"type": sam_type, "name": name, "url": shown, "sha256": engine.info.sha256}
            (self.settings.weights_dir / f"{name}.json").write_text(json.dumps(record, indent=1))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.records.add(name, record)
        self.registry.add(name, engine)
        log.info("samapi: registered %s (%s) from %s, sha256 %s", name, sam_type, shown, record["sha256"][:12])
        message = f"{name} ({shown}) is registered. Choose it in the weights list of type {sam_type}."
        self._report(message, 100)
        return message
