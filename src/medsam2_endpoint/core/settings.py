"""Every MEDSAM2_* server setting, read once and validated at start (pydantic-settings).

One `Settings` object; the lower layers get the parameter types they define (`io.limits.Limits`,
`io.fetch.FetchPolicy`) filled from it, never the environment. A bad value fails at start with a
message naming the variable. The README's settings table is generated from this class
(`settings_table()`), and a test keeps the two equal.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from medsam2_endpoint.io.fetch import FetchPolicy, parse_networks
from medsam2_endpoint.io.limits import MB, Limits

PREFIX = "MEDSAM2_"
PLATFORM_TIMEOUT_S = 180.0  # a managed online endpoint's request_timeout_ms maximum


class SettingsError(ValueError):
    """A configuration value is invalid; raised at start, never per request."""


@dataclass(frozen=True)
class SamapiOptions:
    """The samapi server's part of the settings (see the MEDSAM2_SAMAPI_* rows)."""

    token: str | None = None
    allow_weight_registration: bool = False
    weights_dir: Path = Path(tempfile.gettempdir()) / "medsam2-weights"
    max_weight_bytes: int = 512 * MB
    max_upload_bytes: int = 64 * MB
    max_frames: int = 1000
    upload_store_bytes: int = 1024 * MB
    upload_store_files: int = 5000
    upload_ttl_s: float = 900.0


class Settings(BaseSettings):
    """Server settings. Each field is the variable `MEDSAM2_<FIELD>`; its description is the README's."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, env_ignore_empty=True, extra="ignore", frozen=True)

    model_dir: Path | None = Field(
        None, validation_alias=AliasChoices("MEDSAM2_MODEL_DIR", "AZUREML_MODEL_DIR", "model_dir"),
        description="where MedSAM2 checkpoints are searched (also `AZUREML_MODEL_DIR`); `make serve` uses `model/`")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="`auto`, `cpu` or `cuda`")
    num_threads: int = Field(0, ge=0, description="torch threads per worker; 0: CPU count / `WORKER_COUNT`")
    warmup: bool = Field(True, description="run a tiny propagation per model at start")
    enable_lite: bool = Field(True, description="serve LiteMedSAM (`lite-medsam`, the embedded default)")
    runtime: Literal["auto", "torch", "onnx", "openvino"] = Field(
        "auto", description="where LiteMedSAM runs (image encoder, prompt encoder and mask decoder): `torch`, `onnx` (ONNX Runtime, CPU only), `openvino` (its image encoder on OpenVINO, the rest on ONNX Runtime; CPU only) or `auto` (openvino when the precision is bf16, else onnx when onnxruntime is installed, else torch); MedSAM2 runs on torch")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="LiteMedSAM's image encoder arithmetic on the CPU: `fp32`, `bf16` (about twice as fast where the CPU has AVX512_BF16 or AMX; refused at start on a CPU without) or `auto` (fp32 for now: bf16 lost one real structure, BENCHMARKS.md \"bf16 on the CPU\"); CUDA runs bf16 autocast")
    onnx_cache_dir: Path | None = Field(
        None, description="where LiteMedSAM's ONNX exports (encoder, box decoder) are cached; default `~/.cache/medsam2-endpoint/onnx`")
    request_deadline_s: float = Field(
        170.0, gt=0, description="per-request time budget in seconds (below the managed endpoint's 180 s)")
    inference_slots: int = Field(0, ge=0, description="requests a model computes at once per worker; 0: CPU count / torch threads (at least 1)")
    busy_wait_s: float = Field(2.0, ge=0, description="how long a request waits for a free inference slot before a 503 `busy` with Retry-After")
    retry_after_s: float = Field(5.0, gt=0, description="the Retry-After a `busy` answer suggests, seconds")
    feature_cache_mb: int = Field(256, ge=0, description="per model per worker: 3D slice features reused across objects and requests")
    held_volumes_mb: int = Field(
        1024, ge=0, description="per worker: decoded 3D volumes kept by `volume_id` for correction rounds without re-upload (LRU); 0: none held")
    embedding_cache_mb: int = Field(256, ge=0, description="2D image embeddings shared by the 2D route and the samapi server; 0 disables")
    max_items: int = Field(16, ge=1, description="items per request")
    max_base64_mb: int = Field(256, ge=1, description="base64 text per item, MiB")
    max_file_mb: int = Field(1024, ge=1, description="NIfTI size after decompression, MiB (gzip bombs stop here)")
    max_voxels: int = Field(512 * 512 * 1200, ge=1, description="voxels per volume (512 x 512 x 1200), checked from the header")
    max_slice_pixels: int = Field(2048 * 2048, ge=1, description="pixels per slice or 2D image, checked from the header")
    max_request_voxels: int = Field(
        2 * 512 * 512 * 1200, ge=1,
        description="voxels of all items of one request together, summed from their NIfTI headers before any is decoded")
    max_request_mb: int = Field(
        1024, ge=1, description="base64 of all items of one request together, MiB; the body cap is this plus 1 MiB per item")
    fetch_allow_http: bool = Field(False, description="allow plain http URLs (development only)")
    fetch_host_allowlist: str = Field("", description="comma-separated host patterns URLs must match (e.g. `*.blob.core.windows.net`); empty: any public host")
    fetch_allow_networks: str = Field("", description="comma-separated CIDRs exempt from the non-public-address refusal (tests and development only)")
    fetch_max_mb: float = Field(1024, gt=0, description="largest download, MiB")
    fetch_connect_timeout_s: float = Field(5.0, gt=0, description="connect timeout per address, seconds")
    fetch_read_timeout_s: float = Field(30.0, gt=0, description="longest wait for the next bytes, seconds")
    fetch_total_timeout_s: float = Field(300.0, gt=0, description="whole download, seconds")
    batch_worker_process: bool = Field(
        True, description="batch endpoint: score the files in a child process, so a file that kills it (out of memory, a crash) costs that file only")
    samapi_token: SecretStr | None = Field(None, description="require `Authorization: Bearer <token>` on every samapi route")
    samapi_allow_weight_registration: bool = Field(False, description="allow *Register weights* (`POST weights/`): `sam2_t` checkpoints over https only")
    samapi_weights_dir: Path | None = Field(None, description="registered weights and their records; default `<model dir>/registered`")
    samapi_max_weight_mb: int = Field(512, ge=1, description="largest weight download, MiB")
    samapi_max_upload_mb: int = Field(64, ge=1, description="largest uploaded video frame, MiB")
    samapi_max_frames: int = Field(1000, ge=1, description="frames per video")
    samapi_upload_store_mb: int = Field(1024, ge=1, description="all uploaded frames waiting for their video request together, MiB")
    samapi_upload_store_files: int = Field(5000, ge=1, description="all uploaded frames waiting for their video request together, files")
    samapi_upload_ttl_s: float = Field(
        900.0, gt=0, description="an upload folder nobody wrote to for this long is removed, seconds (a video request removes its own at once)")

    @field_validator("fetch_allow_networks")
    @classmethod
    def _networks_parse(cls, value: str) -> str:
        parse_networks(_items(value))  # fail at start, not on the first request
        return value

    @field_validator("samapi_token")
    @classmethod
    def _blank_token_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is None or value.get_secret_value().strip() else None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, model_dir: str | Path | None = None) -> Settings:
        """From the process environment (or `environ`); `model_dir` overrides the variables."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, raw in env.items():
            if name.startswith(PREFIX) and raw.strip() != "":
                field = name[len(PREFIX):].lower()
                if field in cls.model_fields and field != "model_dir":
                    values[field] = raw.strip() if field != "samapi_token" else raw
        raw_dir = model_dir or env.get("MEDSAM2_MODEL_DIR") or env.get("AZUREML_MODEL_DIR")
        if raw_dir:
            values["model_dir"] = Path(raw_dir).expanduser().resolve()
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            field = str(first["loc"][0]) if first["loc"] else "?"
            variable = f"{PREFIX}{field.upper()}"
            shown = "***" if field == "samapi_token" else env.get(variable, values.get(field))
            raise SettingsError(f"{variable}={shown!r}: {first['msg']}") from None

    @property
    def deadline_s(self) -> float:
        """The request budget, never past the platform's own limit."""
        return min(self.request_deadline_s, PLATFORM_TIMEOUT_S)

    @property
    def limits(self) -> Limits:
        return Limits(
            max_items=self.max_items, max_base64_bytes=self.max_base64_mb * MB, max_file_bytes=self.max_file_mb * MB,
            max_voxels=self.max_voxels, max_slice_pixels=self.max_slice_pixels,
            max_request_voxels=self.max_request_voxels, max_request_base64_bytes=self.max_request_mb * MB,
        )

    @property
    def fetch(self) -> FetchPolicy:
        return FetchPolicy(
            allow_http=self.fetch_allow_http,
            host_allowlist=tuple(p.lower() for p in _items(self.fetch_host_allowlist)),
            allow_networks=_items(self.fetch_allow_networks),
            max_bytes=int(self.fetch_max_mb * MB),
            connect_timeout_s=self.fetch_connect_timeout_s,
            read_timeout_s=self.fetch_read_timeout_s,
            total_timeout_s=self.fetch_total_timeout_s,
        )

    @property
    def samapi(self) -> SamapiOptions:
        if self.samapi_weights_dir is not None:
            weights_dir = self.samapi_weights_dir.expanduser().resolve()
        elif self.model_dir is not None:
            weights_dir = self.model_dir / "registered"
        else:
            weights_dir = Path.home() / ".cache" / "medsam2-endpoint" / "weights"
        return SamapiOptions(
            token=self.samapi_token.get_secret_value().strip() if self.samapi_token else None,
            allow_weight_registration=self.samapi_allow_weight_registration,
            weights_dir=weights_dir,
            max_weight_bytes=self.samapi_max_weight_mb * MB,
            max_upload_bytes=self.samapi_max_upload_mb * MB,
            max_frames=self.samapi_max_frames,
            upload_store_bytes=self.samapi_upload_store_mb * MB,
            upload_store_files=self.samapi_upload_store_files,
            upload_ttl_s=self.samapi_upload_ttl_s,
        )


def _items(value: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in value.split(",") if p.strip())


def settings_table() -> str:
    """The README's table of settings: variable, default, meaning."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = "unset" if default is None or default == "" else str(default).lower() if isinstance(default, bool) else str(default)
        rows.append(f"| `{PREFIX}{name.upper()}` | {shown} | {field.description} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())
