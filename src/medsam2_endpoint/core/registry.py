"""samapi model types mapped onto this server's model registry; weight listing and registration.

samapi names models by SAM architecture (`vit_h vit_l vit_b vit_t sam2_l sam2_bp sam2_s sam2_t`).
Here: `sam2_t` = every MedSAM2 checkpoint (SAM 2.1 hiera-tiny at 512 px, the only size MedSAM2
exists in), `vit_t` = LiteMedSAM (TinyViT, the embedded default). The other types have no medical
weights, so they are never available; asking for one is a 404 that names the available types.

Each available model is listed by `GET weights/` as `{"type", "name", "url"}`; the client sends that
`url` back as `checkpoint_url` to pick it. Built-in models have `local://<name>`; registered ones the
URL they were registered from (scheme, host and path only: query strings carry secrets).

Registration (`POST weights/`) is off unless MEDSAM2_SAMAPI_ALLOW_WEIGHT_REGISTRATION=1. When on, a
`sam2_t` checkpoint is fetched over https through the SSRF-safe fetcher (size cap
MEDSAM2_SAMAPI_MAX_WEIGHT_MB), loaded with `weights_only=True` and strict MedSAM2 keys, stored as
`<weights dir>/<name>.pt` with a `<name>.json` record (type, name, url, sha256), and added to the
registry. The weights directory defaults to `<model dir>/registered`, so registered weights are
loaded again at the next start. Progress is reported through `progress/`; `weights/cancel/` abandons
a running registration (the download itself stops at the fetcher's own limits).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medsam2_endpoint.core.settings import SettingsError
from medsam2_endpoint.engines.medsam2 import CheckpointError, MedSAM2Engine
from medsam2_endpoint.base.errors import InvalidRequest, ServiceError
from medsam2_endpoint.io.fetch import fetch_bytes, redact_url

log = logging.getLogger("azmlinfsrv.medsam2")
MB = 1024 * 1024
SAM_TYPES = ("vit_h", "vit_l", "vit_b", "vit_t", "sam2_l", "sam2_bp", "sam2_s", "sam2_t")
FAMILY_TYPE = {"medsam2": "sam2_t", "lite-medsam": "vit_t"}
REGISTRABLE = ("sam2_t",)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class TypeNotAvailable(ServiceError):
    """A samapi model type or checkpoint this server does not have (404, as samapi)."""

    status = 404


class RegistrationDisabled(ServiceError):
    status = 403


class RegistrationBusy(ServiceError):
    status = 409


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise SettingsError(f"{name}={raw!r} must be true or false")


def _mb(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default * MB
    if not raw.isdigit() or int(raw) < 1:
        raise SettingsError(f"{name}={raw!r} must be a positive whole number of MiB")
    return int(raw) * MB


@dataclass(frozen=True)
class SamapiSettings:
    """samapi server settings, read once at start.

    token: MEDSAM2_SAMAPI_TOKEN, bearer token required on every route when set (off by default).
    allow_weight_registration: MEDSAM2_SAMAPI_ALLOW_WEIGHT_REGISTRATION (off by default).
    weights_dir: MEDSAM2_SAMAPI_WEIGHTS_DIR (default <model dir>/registered, else ~/.cache/medsam2-endpoint/weights).
    max_weight_bytes: MEDSAM2_SAMAPI_MAX_WEIGHT_MB (default 512). max_upload_bytes: MEDSAM2_SAMAPI_MAX_UPLOAD_MB
    (per uploaded frame, default 64). max_frames: MEDSAM2_SAMAPI_MAX_FRAMES (per video, default 1000).
    """

    token: str | None = None
    allow_weight_registration: bool = False
    weights_dir: Path = Path(tempfile.gettempdir()) / "medsam2-weights"
    max_weight_bytes: int = 512 * MB
    max_upload_bytes: int = 64 * MB
    max_frames: int = 1000

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, model_dir: Path | None = None) -> SamapiSettings:
        env = os.environ if environ is None else environ
        raw_dir = env.get("MEDSAM2_SAMAPI_WEIGHTS_DIR", "").strip()
        if raw_dir:
            weights_dir = Path(raw_dir).expanduser().resolve()
        elif model_dir is not None:
            weights_dir = Path(model_dir) / "registered"
        else:
            weights_dir = Path.home() / ".cache" / "medsam2-endpoint" / "weights"
        frames = env.get("MEDSAM2_SAMAPI_MAX_FRAMES", "").strip() or "1000"
        if not frames.isdigit() or int(frames) < 1:
            raise SettingsError(f"MEDSAM2_SAMAPI_MAX_FRAMES={frames!r} must be a positive whole number")
        return cls(
            token=env.get("MEDSAM2_SAMAPI_TOKEN", "").strip() or None,
            allow_weight_registration=_flag(env, "MEDSAM2_SAMAPI_ALLOW_WEIGHT_REGISTRATION"),
            weights_dir=weights_dir,
            max_weight_bytes=_mb(env, "MEDSAM2_SAMAPI_MAX_WEIGHT_MB", 512),
            max_upload_bytes=_mb(env, "MEDSAM2_SAMAPI_MAX_UPLOAD_MB", 64),
            max_frames=int(frames),
        )


class ModelTypes:
    """samapi types <-> registry names, over a Service's (growing) registry."""

    def __init__(self, service: Any, weights_dir: Path) -> None:
        self.service = service
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

    def type_of(self, name: str) -> str | None:
        engine = self.service.engines.get(name)
        return None if engine is None else FAMILY_TYPE.get(engine.info.family)

    def names(self, sam_type: str) -> list[str]:
        """Registry names of this type, the service's default model first."""
        names = [n for n in list(self.service.engines) if self.type_of(n) == sam_type]
        return sorted(names, key=lambda n: n != self.service.default)

    def available(self) -> list[str]:
        return [t for t in SAM_TYPES if self.names(t)]

    def url_of(self, name: str) -> str:
        with self._lock:
            record = self._records.get(name)
        return record["url"] if record else f"local://{name}"

    def weights(self, sam_type: str | None) -> list[dict[str, str]]:
        types = [sam_type] if sam_type else list(SAM_TYPES)
        if sam_type and not self.names(sam_type):
            raise self._not_available(sam_type)
        return [{"type": t, "name": n, "url": self.url_of(n)} for t in types for n in self.names(t)]

    def _not_available(self, sam_type: str) -> TypeNotAvailable:
        offered = "; ".join(f"{t} ({', '.join(self.names(t))})" for t in self.available()) or "none"
        return TypeNotAvailable(f"type: {sam_type} is not available on this server; available types: {offered}")

    def resolve(self, sam_type: str | None, checkpoint_url: str | None) -> tuple[str, str]:
        """(samapi type, registry name) for a request's type and checkpoint_url (None: the type's default)."""
        chosen = sam_type or self.type_of(self.service.default) or "vit_t"
        names = self.names(chosen)
        if not names:
            raise self._not_available(chosen)
        if not checkpoint_url:
            return chosen, names[0]
        wanted = redact_url(checkpoint_url)
        for name in names:
            if self.url_of(name) in (checkpoint_url, wanted):
                return chosen, name
        listed = ", ".join(self.url_of(n) for n in names)
        raise TypeNotAvailable(
            f"checkpoint_url: {wanted} is not a registered {chosen} checkpoint; use one GET weights/ lists ({listed})"
        )

    def record(self, name: str, record: dict[str, str]) -> None:
        with self._lock:
            self._records[name] = record

    def known_url(self, url: str) -> str | None:
        with self._lock:
            return next((n for n, r in self._records.items() if r["url"] == url), None)

    def recorded(self) -> list[str]:
        with self._lock:
            return list(self._records)


class WeightRegistrar:
    """One registration at a time; `progress()` and `cancel()` may be called from other threads."""

    def __init__(self, service: Any, types: ModelTypes, settings: SamapiSettings, device: str) -> None:
        self.service = service
        self.types = types
        self.settings = settings
        self.device = device
        self._state: dict[str, Any] = {"message": None, "percent": -1}
        self._cancel = threading.Event()
        self._busy = threading.Lock()
        self._lock = threading.Lock()

    def load_recorded(self) -> None:
        """Load registered weights the registry lacks (a weights folder outside the model folder)."""
        for name in self.types.recorded():
            path = self.settings.weights_dir / f"{name}.pt"
            if name in self.service.engines or not path.is_file():
                continue
            try:
                self.service.engines[name] = MedSAM2Engine(path, device=self.device, name=name)
            except CheckpointError as exc:
                log.warning("samapi: registered weights skipped: %s", exc)

    def progress(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._state)

    def _report(self, message: str | None, percent: int) -> None:
        with self._lock:
            self._state = {"message": message, "percent": percent}

    def cancel(self) -> str:
        self._cancel.set()
        return "Cancel signal sent"

    def register(self, sam_type: str, name: str, url: str) -> str:
        """Register weights; returns samapi's text message (also for "already exists" and "cancelled")."""
        if not self.settings.allow_weight_registration:
            raise RegistrationDisabled(
                "weight registration is disabled on this server; the administrator can enable it with "
                "MEDSAM2_SAMAPI_ALLOW_WEIGHT_REGISTRATION=1, or copy MedSAM2 checkpoints into the model folder"
            )
        if sam_type not in REGISTRABLE:
            raise InvalidRequest(f"type: only {', '.join(REGISTRABLE)} (MedSAM2, SAM 2.1 hiera-tiny at 512 px) weights can be registered, not {sam_type}")
        if not _NAME.match(name):
            raise InvalidRequest("name: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        shown = redact_url(url)
        if name in self.service.engines:
            return f"Model file with the name '{name}' already exists. Skip registration."
        if self.types.known_url(shown):
            return f"Model file with the url '{shown}' already exists. Skip registration."
        if not self._busy.acquire(blocking=False):
            raise RegistrationBusy("another weight registration is running; wait for it or cancel it (GET weights/cancel/)")
        try:
            self._cancel.clear()
            return self._register(sam_type, name, url, shown)
        finally:
            self._busy.release()

    def _download(self, url: str) -> bytes | None:
        """Fetch in a worker thread so a cancel returns at once; None when cancelled."""
        policy = dataclasses.replace(self.service.settings.fetch, allow_http=False, max_bytes=self.settings.max_weight_bytes)
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
        return outcome["data"]

    def _register(self, sam_type: str, name: str, url: str, shown: str) -> str:
        cancelled = f"Cancelled to register {name} ({shown})."
        self._report(f"downloading {name} from {shown}", 0)
        try:
            data = self._download(url)
        except ServiceError as exc:
            self._report(f"failed: {exc.message}", -1)
            raise
        if data is None or self._cancel.is_set():
            self._report(cancelled, -1)
            return cancelled
        self._report(f"checking {name} ({len(data)} bytes)", 60)
        self.settings.weights_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.settings.weights_dir))
        try:
            path = staging / f"{name}.pt"
            path.write_bytes(data)
            del data
            try:
                engine = MedSAM2Engine(path, device=self.device, name=name)  # weights_only load, strict keys
            except CheckpointError as exc:
                self._report(f"failed: {exc}", -1)
                raise InvalidRequest(f"url: {exc}") from None
            if self._cancel.is_set():
                self._report(cancelled, -1)
                return cancelled
            final = self.settings.weights_dir / f"{name}.pt"
            os.replace(path, final)
            record = {"type": sam_type, "name": name, "url": shown, "sha256": engine.info.sha256}
            (self.settings.weights_dir / f"{name}.json").write_text(json.dumps(record, indent=1))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.types.record(name, record)
        self.service.engines[name] = engine
        log.info("samapi: registered %s (%s) from %s, sha256 %s", name, sam_type, shown, record["sha256"][:12])
        message = f"{name} ({shown}) is registered."
        self._report(message, 100)
        return message
