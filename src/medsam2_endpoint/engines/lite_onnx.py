"""LiteMedSAM on ONNX Runtime: the CPU runtime of the embedded default.

Two graphs, both exported from the loaded torch modules (never downloaded):

- the TinyViT image encoder, float32 (1, 3, 256, 256) -> (1, 256, 64, 64), most of a slice's cost;
- the box decoder: the prompt encoder (box corners, optional low-res mask input) and the mask decoder,
  for a batch of B boxes on one image. It returns all four of the decoder's masks and predicted IoUs;
  the caller picks the single-mask output (index 0) or the three multimask ones, as the torch decoder does.

Each is cached on disk as `<graph>-<checkpoint sha256[:16]>-ort<onnxruntime version>.onnx`. The checkpoint's
full sha256, the torch version and the graph's version go into the model's metadata_props; a cached file that
fails to load or whose metadata does not match is rebuilt, never used stale.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from medsam2_endpoint.base.log import log

OPSET = 17
INPUT_NAME = "image"  # float32 (1, 3, 256, 256)
OUTPUT_NAME = "embedding"  # float32 (1, 256, 64, 64)
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "medsam2-endpoint" / "onnx"
SHA_KEY = "checkpoint_sha256"
TORCH_KEY = "torch_version"
GRAPH_KEY = "graph"  # which of our graphs, and its version: bumped whenever the exported wrapper changes
ENCODER_GRAPH = "lite_encoder/1"
DECODER_GRAPH = "lite_decoder/1"
DECODER_INPUTS = ("image_embedding", "boxes", "mask_input", "has_mask")
DECODER_OUTPUTS = ("low_res_masks", "iou_predictions")


def graph_path(cache_dir: Path, graph: str, sha256: str) -> Path:
    """Where the export of `graph` for this checkpoint and onnxruntime version lives."""
    return cache_dir / f"{graph.split('/')[0]}-{sha256[:16]}-ort{ort.__version__}.onnx"


def export_path(cache_dir: Path, sha256: str) -> Path:
    """The encoder's export."""
    return graph_path(cache_dir, ENCODER_GRAPH, sha256)


def _expected_metadata(sha256: str, graph: str) -> dict[str, str]:
    return {SHA_KEY: sha256, TORCH_KEY: torch.__version__, GRAPH_KEY: graph}


def _export(module: nn.Module, path: Path, metadata: dict[str, str], example: tuple[torch.Tensor, ...],
            names: tuple[tuple[str, ...], tuple[str, ...]], dynamic_axes: dict[str, dict[int, str]] | None = None) -> None:
    """Export `module` to `path` atomically: a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with torch.inference_mode(False), torch.no_grad():
            # the legacy (TorchScript) exporter: it handles TinyViT and SAM's decoder without onnxscript
            torch.onnx.export(
                module, example, str(tmp), opset_version=OPSET, dynamo=False,
                input_names=list(names[0]), output_names=list(names[1]), dynamic_axes=dynamic_axes,
            )
        model = onnx.load(str(tmp))
        onnx.helper.set_model_props(model, metadata)
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


def _load_valid(path: Path, metadata: dict[str, str]) -> ort.InferenceSession | None:
    """A session on the cached export, or None when it is missing, unreadable or stale."""
    if not path.is_file():
        return None
    try:
        session = _session(path)
    except Exception as exc:  # corrupt or truncated file: rebuild it
        log.warning("ONNX model %s does not load (%s); rebuilding it", path, exc)
        return None
    stored = session.get_modelmeta().custom_metadata_map
    if any(stored.get(k) != v for k, v in metadata.items()):
        log.warning("ONNX model %s was built for another checkpoint, torch version or graph; rebuilding it", path)
        return None
    return session


def cached_session(path: Path, metadata: dict[str, str], export: Callable[[Path], None]) -> ort.InferenceSession:
    """A session on a valid cached export, exporting it first when missing, corrupt or stale."""
    session = _load_valid(path, metadata)
    if session is None:
        log.info("exporting %s to %s", metadata[GRAPH_KEY], path)
        export(path)
        session = _session(path)
    return session


class OnnxEncoder:
    """The LiteMedSAM image encoder as an ORT session: (1, 3, 256, 256) -> (1, 256, 64, 64), numpy."""

    def __init__(self, encoder: nn.Module, sha256: str, cache_dir: Path | None = None):
        self.path = export_path(Path(cache_dir or DEFAULT_CACHE_DIR).expanduser(), sha256)
        metadata = _expected_metadata(sha256, ENCODER_GRAPH)
        example = (torch.zeros(1, 3, 256, 256),)
        self.session = cached_session(self.path, metadata, lambda path: _export(
            encoder, path, metadata, example, ((INPUT_NAME,), (OUTPUT_NAME,))))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """float32 (1, 3, 256, 256) image -> float32 (1, 256, 64, 64) embedding."""
        outputs = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(image, dtype=np.float32)})
        return cast(np.ndarray, outputs[0])

    def fp32(self) -> OnnxEncoder:
        """This encoder in fp32: itself (ONNX Runtime runs it in fp32 only)."""
        return self


class BoxDecoder(nn.Module):
    """Prompt encoder + mask decoder for B boxes on one image, in one graph (exported, never served on torch).

    Inputs: image_embedding (1, 256, 64, 64); boxes (B, 4) in the 256-px model frame; mask_input
    (1, 1, 256, 256) low-res logits, used where has_mask (1,) is 1 (else the learned no-mask embedding).
    Outputs: low-res masks (B, 4, 256, 256) and predicted IoU (B, 4), every mask token's.
    """

    def __init__(self, net: Any) -> None:
        super().__init__()
        self.prompt_encoder = net.prompt_encoder
        self.mask_decoder = net.mask_decoder

    def forward(self, image_embedding: torch.Tensor, boxes: torch.Tensor, mask_input: torch.Tensor,
                has_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pe = self.prompt_encoder
        sparse, _ = pe(points=None, boxes=boxes[:, None, :], masks=None)
        no_mask = pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
        dense = has_mask.reshape(1, 1, 1, 1) * pe._embed_masks(mask_input) + (1 - has_mask.reshape(1, 1, 1, 1)) * no_mask
        masks, iou = self.mask_decoder.predict_masks(
            image_embeddings=image_embedding, image_pe=pe.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
        )
        return masks, iou


class OnnxDecoder:
    """LiteMedSAM's box decoder as an ORT session (see `BoxDecoder`), numpy in and out."""

    def __init__(self, net: Any, sha256: str, cache_dir: Path | None = None):
        self.path = graph_path(Path(cache_dir or DEFAULT_CACHE_DIR).expanduser(), DECODER_GRAPH, sha256)
        metadata = _expected_metadata(sha256, DECODER_GRAPH)
        # two boxes in the example: the decoder's per-box copy of the image embedding must be traced
        example = (torch.zeros(1, 256, 64, 64), torch.tensor([[10.0, 10.0, 100.0, 100.0], [5.0, 20.0, 60.0, 90.0]]),
                   torch.zeros(1, 1, 256, 256), torch.zeros(1))
        self.session = cached_session(self.path, metadata, lambda path: _export(
            BoxDecoder(net).eval(), path, metadata, example, (DECODER_INPUTS, DECODER_OUTPUTS),
            dynamic_axes={"boxes": {0: "B"}, "low_res_masks": {0: "B"}, "iou_predictions": {0: "B"}}))

    def __call__(self, embedding: np.ndarray, boxes_256: np.ndarray, mask_input: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(low-res masks float32 (B, 4, 256, 256), predicted IoU (B, 4)) for boxes (B, 4) in the model frame."""
        feeds = {
            "image_embedding": np.ascontiguousarray(embedding, dtype=np.float32),
            "boxes": np.ascontiguousarray(boxes_256, dtype=np.float32).reshape(-1, 4),
            "mask_input": np.zeros((1, 1, 256, 256), np.float32) if mask_input is None
            else np.ascontiguousarray(mask_input, dtype=np.float32).reshape(1, 1, 256, 256),
            "has_mask": np.array([0.0 if mask_input is None else 1.0], np.float32),
        }
        masks, iou = self.session.run(list(DECODER_OUTPUTS), feeds)
        return cast(np.ndarray, masks), cast(np.ndarray, iou)
