"""Every MEDSAM2_* server setting, read once and validated at start (pydantic-settings).

One `Settings` object; the lower layers get the parameter types they define (`io.limits.Limits`,
`io.fetch.FetchPolicy`) filled from it, never the environment. A bad value fails at start with a
message naming the variable. The README's settings table is generated from this class
(`settings_table()`), and a test keeps the two equal.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from medsam2_endpoint.io.dicomweb import DicomwebPolicy, normalise, parse_basic, parse_credentials
from medsam2_endpoint.io.fetch import FetchPolicy, parse_networks
from medsam2_endpoint.io.limits import MB, Limits

PREFIX = "MEDSAM2_"
PLATFORM_TIMEOUT_S = 180.0  # a managed online endpoint's request_timeout_ms maximum
# The lower layers' own defaults: every default lives once, in the parameter type that uses it.
_LIMITS, _FETCH = Limits(), FetchPolicy()
# An environment other than the process's (tests, `from_env(mapping)`), read by the environment source below.
_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("medsam2_settings_environ", default=None)


def default_weights_dir(model_dir: Path | None) -> Path:
    """Where registered weights live unless MEDSAM2_SAMAPI_WEIGHTS_DIR says: beside the model folder's
    checkpoints, or under the user's cache without one."""
    return model_dir / "registered" if model_dir is not None else Path.home() / ".cache" / "medsam2-endpoint" / "weights"


class SettingsError(ValueError):
    """A configuration value is invalid; raised at start, never per request."""


@dataclass(frozen=True)
class SamapiOptions:
    """The samapi server's part of the settings (see the MEDSAM2_SAMAPI_* rows)."""

    token: str | None = None
    allow_weight_registration: bool = False
    weights_dir: Path = default_weights_dir(None)
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
        "auto", description="where LiteMedSAM runs (image encoder, prompt encoder and mask decoder): `torch`, `onnx` (ONNX Runtime, CPU only), `openvino` (its image encoder on OpenVINO, the rest on ONNX Runtime; CPU only) or `auto` (openvino when installed, else onnx when onnxruntime is installed, else torch); MedSAM2 runs on torch")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="LiteMedSAM's image encoder arithmetic on the CPU: `fp32`, `bf16` (about twice as fast where the CPU has AVX512_BF16 or AMX; refused at start on a CPU without) or `auto` (bf16 on OpenVINO where the CPU has it, else fp32; BENCHMARKS.md \"bf16 on the CPU\"); `bf16` also runs MedSAM2 under torch's CPU bf16 autocast (`auto` keeps it in the reference's fp32); CUDA runs bf16 autocast")
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
    max_items: int = Field(_LIMITS.max_items, ge=1, description="items per request")
    max_base64_mb: int = Field(_LIMITS.max_base64_bytes // MB, ge=1, description="base64 text per item, MiB")
    max_file_mb: int = Field(_LIMITS.max_file_bytes // MB, ge=1, description="NIfTI size after decompression, MiB (gzip bombs stop here)")
    max_voxels: int = Field(_LIMITS.max_voxels, ge=1, description="voxels per volume (512 x 512 x 1200), checked from the header")
    max_slice_pixels: int = Field(_LIMITS.max_slice_pixels, ge=1, description="pixels per slice or 2D image, checked from the header")
    max_request_voxels: int = Field(
        _LIMITS.max_request_voxels, ge=1,
        description="voxels of all items of one request together, summed from their NIfTI headers before any is decoded")
    max_request_mb: int = Field(
        _LIMITS.max_request_base64_bytes // MB, ge=1, description="base64 of all items of one request together, MiB; the body cap is this plus 1 MiB per item")
    fetch_allow_http: bool = Field(_FETCH.allow_http, description="allow plain http URLs (development only)")
    fetch_host_allowlist: str = Field("", description="comma-separated host patterns URLs must match (e.g. `*.blob.core.windows.net`); empty: any public host")
    fetch_allow_networks: str = Field("", description="comma-separated CIDRs exempt from the non-public-address refusal (tests and development only)")
    fetch_max_mb: float = Field(_FETCH.max_bytes // MB, gt=0, description="largest download, MiB")
    fetch_connect_timeout_s: float = Field(_FETCH.connect_timeout_s, gt=0, description="connect timeout per address, seconds")
    fetch_read_timeout_s: float = Field(_FETCH.read_timeout_s, gt=0, description="longest wait for the next bytes, seconds")
    fetch_total_timeout_s: float = Field(_FETCH.total_timeout_s, gt=0, description="whole download, seconds")
    batch_worker_process: bool = Field(
        True, description="batch endpoint: score the files in a child process, so a file that kills it (out of memory, a crash) costs that file only")
    dicomweb_urls: str = Field(
        "", description="comma-separated DICOMweb base URLs `/score` may read series from and store SEGs into (e.g. `https://<workspace>-<service>.dicom.azurehealthcareapis.com/v2`); empty: none. A listed URL whose host is a literal loopback or private IP may use that address")
    dicomweb_tokens: SecretStr | None = Field(
        None, description="bearer tokens per DICOMweb server: `<base URL>=<token>` pairs separated by commas, or a JSON object")
    dicomweb_basic_auth: SecretStr | None = Field(
        None, description="basic auth per DICOMweb server: `<base URL>=<user>:<password>` pairs separated by commas, or a JSON object (Orthanc, tests)")
    dicomweb_managed_identity: str = Field(
        "", description="`system` or a user-assigned identity's client id: servers without a token get one for Azure's DICOM service (audience `https://dicom.healthcareapis.azure.com`) from the deployment's managed identity; empty: none")
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
    plugin_state_mb: int = Field(
        1024, ge=1, description="MedSAM2's Slicer plugin: volumes, masks and results held for all client addresses together, MiB (least recently used dropped)")
    plugin_ttl_s: float = Field(1800.0, gt=0, description="MedSAM2's Slicer plugin: a client address's volume and result are dropped after this long unused, seconds")

    nninteractive_token: SecretStr | None = Field(
        None, description="require `Authorization: Bearer <token>` on the 3D Slicer nnInteractive routes (`/nninteractive/...`, the plugin's *API key*); unset: `MEDSAM2_SAMAPI_TOKEN` applies to them too")
    nninteractive_max_sessions: int = Field(4, ge=1, description="3D Slicer sessions (leases) held at once; a claim beyond them gets 503 with Retry-After")
    nninteractive_max_mb: int = Field(2048, ge=1, description="memory all 3D Slicer sessions together may hold (voxels, label maps, undo), MiB")
    nninteractive_idle_s: float = Field(600.0, gt=0, description="a 3D Slicer session with no upload or interaction for this long is ended, seconds")
    nninteractive_liveness_s: float = Field(60.0, gt=0, description="a 3D Slicer session with no request at all (heartbeats count) for this long is ended, seconds")
    nninteractive_prediction_s: float = Field(
        30.0, gt=0, description="a 3D Slicer interaction's walk stops after the slice that ends past this many seconds and answers what it reached (the plugin waits 60 s; a slice can take seconds on a busy CPU)")
    nninteractive_background_encode: bool = Field(
        True, description="after a 3D Slicer `set_image`, encode the volume's axial slices into the feature cache in the background (middle slice outwards, one at a time, only while no request is computing), so the first box walks over cached slices; it stops at the next image, at the session's end, or when the cache is full of that volume's slices. LiteMedSAM only (MedSAM2 has no per-slice encoding)")

    @field_validator("fetch_allow_networks")
    @classmethod
    def _networks_parse(cls, value: str) -> str:
        parse_networks(_items(value))  # fail at start, not on the first request
        return value

    @field_validator("dicomweb_tokens", "dicomweb_basic_auth")
    @classmethod
    def _credentials_parse(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is not None:  # fail at start; the message never quotes the secret
            parse_credentials(value.get_secret_value(), setting=f"{PREFIX}{str(info.field_name).upper()}",
                              parse=parse_basic if info.field_name == "dicomweb_basic_auth" else str)
        return value

    @field_validator("samapi_token", "nninteractive_token")
    @classmethod
    def _blank_token_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is None or value.get_secret_value().strip() else None

    @field_validator("model_dir")
    @classmethod
    def _absolute_model_dir(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser().resolve()

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments first, then the environment (pydantic-settings' own parsing: prefix, aliases, empty = unset)."""
        return init_settings, _Environment(settings_cls)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, model_dir: str | Path | None = None) -> Settings:
        """From the process environment (or `environ`); `model_dir` overrides the variables. A bad value raises
        SettingsError naming the variable (a secret's value is never shown)."""
        overrides: dict[str, Any] = {"model_dir": Path(model_dir)} if model_dir else {}
        try:
            with _environment(environ):
                return cls(**overrides)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            name = str(first["loc"][0]) if first["loc"] else "?"
            variable = name if name.isupper() else f"{PREFIX}{name.upper()}"
            field = cls.model_fields.get(name)
            secret = field is not None and field.annotation is not None and "SecretStr" in str(field.annotation)
            env = environ if environ is not None else os.environ
            shown = "***" if secret else env.get(variable, first.get("input"))
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
    def dicomweb(self) -> DicomwebPolicy:
        tokens, basic = self.dicomweb_tokens, self.dicomweb_basic_auth
        return DicomwebPolicy(
            urls=tuple(normalise(u) for u in _items(self.dicomweb_urls)),
            tokens=parse_credentials(tokens.get_secret_value(), setting="MEDSAM2_DICOMWEB_TOKENS") if tokens else {},
            basic=parse_credentials(basic.get_secret_value(), setting="MEDSAM2_DICOMWEB_BASIC_AUTH", parse=parse_basic) if basic else {},
            managed_identity=self.dicomweb_managed_identity.strip(),
            fetch=self.fetch,
        )

    @property
    def samapi(self) -> SamapiOptions:
        if self.samapi_weights_dir is not None:
            weights_dir = self.samapi_weights_dir.expanduser().resolve()
        else:
            weights_dir = default_weights_dir(self.model_dir)
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


class _Environment(EnvSettingsSource):
    """pydantic-settings' environment source over the process environment, or over the mapping given to
    `Settings.from_env` (set for the duration of that call only)."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        given = _ENVIRON.get()
        if given is not None:  # the same normalisation the source applies to os.environ: case-insensitive, empty unset
            self.env_vars = {k.lower(): v for k, v in given.items() if v != ""}


@contextmanager
def _environment(environ: Mapping[str, str] | None) -> Iterator[None]:
    token = _ENVIRON.set(environ)
    try:
        yield
    finally:
        _ENVIRON.reset(token)


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
