"""LiteMedSAM's image encoder on OpenVINO: the CPU runtime that runs it in bf16 where the processor has bf16.

OpenVINO reads the same cached ONNX export of the encoder as ONNX Runtime (engines/lite_onnx.py: one file per
checkpoint, checked against its metadata, rebuilt when missing, corrupt or stale) and compiles it for the CPU
with an explicit `INFERENCE_PRECISION_HINT`: OpenVINO's CPU plugin would otherwise pick bf16 by itself on
such CPUs, and the precision we report must be the one that runs. The box decoder stays on ONNX Runtime in
fp32 (a small part of a slice's time).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from medsam2_endpoint.base.log import log
from medsam2_endpoint.engines.lite_onnx import (
    DEFAULT_CACHE_DIR,
    ENCODER_GRAPH,
    GRAPH_KEY,
    INPUT_NAME,
    OUTPUT_NAME,
    _expected_metadata,
    _export,
    export_path,
)

HINTS = {"fp32": "f32", "bf16": "bf16"}  # our precision names -> OpenVINO's


def _stored_metadata(path: Path) -> dict[str, str] | None:
    """The export's metadata_props, or None when the file is missing or not a readable ONNX model."""
    if not path.is_file():
        return None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # truncated or not ONNX at all
        log.warning("ONNX model %s does not load (%s); rebuilding it", path, exc)
        return None
    return {p.key: p.value for p in model.metadata_props}


def compile_encoder(path: Path, precision: str, threads: int | None = None) -> Any:
    """The export at `path` compiled by OpenVINO for the CPU in `precision` ("fp32" or "bf16")."""
    import openvino as ov  # loads only when this runtime is chosen

    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": HINTS[precision],
              "INFERENCE_NUM_THREADS": str(threads or torch.get_num_threads())}
    return ov.Core().compile_model(str(path), "CPU", config)


class CompiledEncoder:
    """One compiled encoder and its infer request: (1, 3, 256, 256) -> (1, 256, 64, 64), numpy float32."""

    def __init__(self, compiled: Any) -> None:
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self._lock = threading.Lock()  # an infer request runs one call at a time; inference slots may share it

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """A copy of the embedding: the request reuses its output buffer on the next call."""
        with self._lock:
            outputs = self.request.infer({INPUT_NAME: np.ascontiguousarray(image, dtype=np.float32)})
            return np.array(outputs[self.compiled.output(0)], dtype=np.float32, copy=True)


class OpenVinoEncoder:
    """The LiteMedSAM image encoder compiled by OpenVINO: (1, 3, 256, 256) -> (1, 256, 64, 64), numpy float32."""

    def __init__(self, encoder: nn.Module, sha256: str, cache_dir: Path | None = None, precision: str = "fp32"):
        if precision not in HINTS:
            raise ValueError(f"precision must be one of {tuple(HINTS)}, got {precision!r}")
        self.precision = precision
        self.path = export_path(Path(cache_dir or DEFAULT_CACHE_DIR).expanduser(), sha256)
        metadata = _expected_metadata(sha256, ENCODER_GRAPH)
        compiled = None
        stored = _stored_metadata(self.path)
        if stored is not None and any(stored.get(k) != v for k, v in metadata.items()):
            log.warning("ONNX model %s was built for another checkpoint, torch version or graph; rebuilding it", self.path)
        elif stored is not None:
            try:
                compiled = compile_encoder(self.path, precision)
            except Exception as exc:  # a graph OpenVINO cannot read: rebuild it once
                log.warning("OpenVINO cannot compile %s (%s); rebuilding it", self.path, exc)
        if compiled is None:
            log.info("exporting %s to %s", metadata[GRAPH_KEY], self.path)
            _export(encoder, self.path, metadata, (torch.zeros(1, 3, 256, 256),), ((INPUT_NAME,), (OUTPUT_NAME,)))
            compiled = compile_encoder(self.path, precision)
        self.run = CompiledEncoder(compiled)
        self._fp32: CompiledEncoder | None = None
        self._fp32_lock = threading.Lock()

    def fp32(self) -> CompiledEncoder:
        """This encoder in fp32 (its own run when it is fp32), compiled from the same export on first use."""
        if self.precision == "fp32":
            return self.run
        with self._fp32_lock:
            if self._fp32 is None:
                self._fp32 = CompiledEncoder(compile_encoder(self.path, "fp32"))
            return self._fp32

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """float32 (1, 3, 256, 256) image -> float32 (1, 256, 64, 64) embedding."""
        return self.run(image)
