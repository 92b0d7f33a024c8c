"""Settings read once from the environment and validated at start (fail fast, clear messages)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from medsam2_endpoint.io.fetch import FetchPolicy

MB = 1024 * 1024


class SettingsError(ValueError):
    """A configuration value is invalid; raised at start, never per request."""


def _int(environ: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise SettingsError(f"{name}={value} must be at least {minimum}")
    return value


def _float(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if value <= 0:
        raise SettingsError(f"{name}={value} must be positive")
    return value


def _bool(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}={raw!r} must be true or false")


@dataclass(frozen=True)
class Limits:
    """Request limits, checked before allocating; each error message quotes the limit."""

    max_items: int = 16
    max_base64_bytes: int = 256 * MB
    max_file_bytes: int = 1024 * MB  # decompressed NIfTI
    max_voxels: int = 512 * 512 * 1200
    max_slice_pixels: int = 2048 * 2048


@dataclass(frozen=True)
class Settings:
    model_dir: Path | None
    device: str  # "auto", "cpu" or "cuda"
    num_threads: int  # 0 = choose from the CPU count and WORKER_COUNT
    warmup: bool
    enable_lite: bool
    request_deadline_s: float
    feature_cache_mb: int = 256  # per model per worker: slice features reused across objects and requests
    limits: Limits = field(default_factory=Limits)
    fetch: FetchPolicy = field(default_factory=FetchPolicy)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, model_dir: str | None = None) -> Settings:
        env = os.environ if environ is None else environ
        raw_dir = model_dir or env.get("MEDSAM2_MODEL_DIR") or env.get("AZUREML_MODEL_DIR")
        device = env.get("MEDSAM2_DEVICE", "auto").lower()
        if device not in ("auto", "cpu", "cuda"):
            raise SettingsError(f"MEDSAM2_DEVICE={device!r} must be auto, cpu or cuda")
        limits = Limits(
            max_items=_int(env, "MEDSAM2_MAX_ITEMS", Limits.max_items, 1),
            max_base64_bytes=_int(env, "MEDSAM2_MAX_BASE64_MB", Limits.max_base64_bytes // MB, 1) * MB,
            max_file_bytes=_int(env, "MEDSAM2_MAX_FILE_MB", Limits.max_file_bytes // MB, 1) * MB,
            max_voxels=_int(env, "MEDSAM2_MAX_VOXELS", Limits.max_voxels, 1),
            max_slice_pixels=_int(env, "MEDSAM2_MAX_SLICE_PIXELS", Limits.max_slice_pixels, 1),
        )
        return cls(
            model_dir=Path(raw_dir).resolve() if raw_dir else None,
            device=device,
            num_threads=_int(env, "MEDSAM2_NUM_THREADS", 0),
            warmup=_bool(env, "MEDSAM2_WARMUP", True),
            enable_lite=_bool(env, "MEDSAM2_ENABLE_LITE", True),
            request_deadline_s=_float(env, "MEDSAM2_REQUEST_DEADLINE_S", 170.0),
            feature_cache_mb=_int(env, "MEDSAM2_FEATURE_CACHE_MB", 256),
            limits=limits,
            fetch=FetchPolicy.from_env(env),
        )
