"""LiteMedSAM's image encoder on ONNX Runtime: the CPU runtime of the embedded default.

The TinyViT encoder is most of a slice's cost on CPU (BENCHMARKS.md "CPU runtime for LiteMedSAM"),
so only it is exported; the prompt encoder and mask decoder are cheap and stay on torch.

The export is made from the loaded torch module (never downloaded) and cached on disk as
`lite_encoder-<checkpoint sha256[:16]>-ort<onnxruntime version>.onnx`. The checkpoint's full sha256
and the torch version go into the model's metadata_props; a cached file that fails to load or whose
metadata does not match is rebuilt, never used stale.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import cast

import numpy as np
import onnx
import onnxruntime as ort
import torch

log = logging.getLogger("azmlinfsrv.medsam2")

OPSET = 17
INPUT_NAME = "image"  # float32 (1, 3, 256, 256)
OUTPUT_NAME = "embedding"  # float32 (1, 256, 64, 64)
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "medsam2-endpoint" / "onnx"
SHA_KEY = "checkpoint_sha256"
TORCH_KEY = "torch_version"


def export_path(cache_dir: Path, sha256: str) -> Path:
    """Where the export for this checkpoint and onnxruntime version lives."""
    return cache_dir / f"lite_encoder-{sha256[:16]}-ort{ort.__version__}.onnx"


def _expected_metadata(sha256: str) -> dict[str, str]:
    return {SHA_KEY: sha256, TORCH_KEY: torch.__version__}


def _export(encoder: torch.nn.Module, path: Path, sha256: str) -> None:
    """Export `encoder` to `path` atomically: a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        example = torch.zeros(1, 3, 256, 256)
        with torch.inference_mode(False), torch.no_grad():
            # the legacy (TorchScript) exporter: it handles TinyViT without onnxscript
            torch.onnx.export(
                encoder, (example,), str(tmp), opset_version=OPSET, dynamo=False,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            )
        model = onnx.load(str(tmp))
        onnx.helper.set_model_props(model, _expected_metadata(sha256))
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # as many threads as torch (configure_threads shares the cores among workers); one op at a time
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _load_valid(path: Path, sha256: str) -> ort.InferenceSession | None:
    """A session on the cached export, or None when it is missing, unreadable or stale."""
    if not path.is_file():
        return None
    try:
        session = _session(path)
    except Exception as exc:  # corrupt or truncated file: rebuild it
        log.warning("ONNX encoder %s does not load (%s); rebuilding it", path, exc)
        return None
    stored = session.get_modelmeta().custom_metadata_map
    if any(stored.get(k) != v for k, v in _expected_metadata(sha256).items()):
        log.warning("ONNX encoder %s was built for another checkpoint or torch version; rebuilding it", path)
        return None
    return session


class OnnxEncoder:
    """The LiteMedSAM image encoder as an ORT session: (1, 3, 256, 256) -> (1, 256, 64, 64), numpy."""

    def __init__(self, encoder: torch.nn.Module, sha256: str, cache_dir: Path | None = None):
        self.path = export_path(Path(cache_dir or DEFAULT_CACHE_DIR).expanduser(), sha256)
        session = _load_valid(self.path, sha256)
        if session is None:
            log.info("exporting the LiteMedSAM encoder to %s", self.path)
            _export(encoder, self.path, sha256)
            session = _session(self.path)
        self.session = session

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """float32 (1, 3, 256, 256) image -> float32 (1, 256, 64, 64) embedding."""
        outputs = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(image, dtype=np.float32)})
        return cast(np.ndarray, outputs[0])
