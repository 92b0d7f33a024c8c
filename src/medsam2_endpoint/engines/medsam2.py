"""MedSAM2: SAM 2.1 hiera-tiny at 512 px through sam2's legacy video predictor, fed with preprocessed slices.

Equivalent to bowang-lab/MedSAM2's `medsam2_infer_3D_CT.py` (REFERENCE.md B) with engineering changes
that do not alter a request's result: frames are prepared lazily (only visited slices), each slice is
encoded once per request (the key slice serves both passes), tracking outputs that memory attention can
no longer reach are dropped as the front moves, and the hole-filling step runs without the CUDA
extension `sam2._C`.

Features kept for later requests and other objects (the shared cache) are stored in bfloat16, the
precision the reference itself runs at on CUDA: half the memory per slice. A cold single-object request
never reads them back (its key slice's features are held as computed for its second pass), so its mask
is the reference's voxel for voxel; a request served from the cache computes with the rounded features.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, cast

import numpy as np
import sam2.sam2_video_predictor_legacy as legacy
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from scipy import ndimage

from medsam2_endpoint.base.lru import ByteLRU
from medsam2_endpoint.engines.base import Capabilities, ModelInfo, SlicePrompt, bf16_autocast, sha256_file
from medsam2_endpoint.engines.frames import sam2_frame
from medsam2_endpoint.engines.sam2_image import SAM2ImageEngine

CONFIG_PATH = files("medsam2_endpoint.engines") / "configs" / "sam2.1_hiera_t512.yaml"
LATEST_CHECKPOINT = "MedSAM2_latest.pt"
HOLE_FILL_AREA = 8
CACHE_DTYPE = torch.bfloat16


STAGING_PREFIX = ".staging-"  # weight registration writes here first: never a checkpoint to load


class CheckpointError(Exception):
    """A checkpoint file cannot be used (pickled code, wrong keys or shapes, unreadable)."""


def _silent(iterable: Any, **_kwargs: Any) -> Any:
    return iterable


# sam2's propagation loop draws a tqdm bar on stderr for every pass; a server's log has no use for it.
legacy.tqdm = _silent


def fill_small_holes(logits: torch.Tensor, max_area: int) -> torch.Tensor:
    """SAM 2's `fill_holes_in_mask_scores` without `sam2._C`.

    logits: (N, 1, H, W). Background components (logit <= 0, 8-connected) of at most `max_area`
    pixels get the logit 0.1, exactly as the CUDA kernel path does.
    """
    background = (logits <= 0).cpu().numpy()
    filled = np.zeros(background.shape, dtype=bool)
    eight = np.ones((3, 3), dtype=bool)
    for n in range(background.shape[0]):
        labels, count = ndimage.label(background[n, 0], structure=eight)
        if count == 0:
            continue
        areas = np.bincount(labels.ravel())
        small = areas <= max_area
        small[0] = False
        filled[n, 0] = small[labels]
    if not filled.any():
        return logits
    return torch.where(torch.from_numpy(filled).to(logits.device), torch.tensor(0.1, dtype=logits.dtype), logits)


class LazyFrames:
    """The video predictor's `images`: slice z prepared (resize + normalise) only when first asked for."""

    def __init__(self, volume_u8: np.ndarray, image_size: int) -> None:
        self.volume = volume_u8
        self.image_size = image_size

    def __len__(self) -> int:
        return int(self.volume.shape[0])

    def __getitem__(self, z: int) -> torch.Tensor:
        return torch.from_numpy(sam2_frame(self.volume[z], self.image_size))


@dataclass(frozen=True)
class CachedFeatures:
    """One frame's FPN features as the shared cache keeps them (bfloat16), with the dtypes to restore."""

    tensors: tuple[torch.Tensor, ...]
    dtypes: tuple[torch.dtype, ...]

    @classmethod
    def of(cls, fpn: list[torch.Tensor]) -> CachedFeatures:
        return cls(tuple(f.to(CACHE_DTYPE) for f in fpn), tuple(f.dtype for f in fpn))

    @property
    def nbytes(self) -> int:
        return sum(t.element_size() * t.nelement() for t in self.tensors)


class MedSAM2VideoPredictor(legacy.SAM2VideoPredictor):  # type: ignore[misc]  # sam2 is untyped
    """Legacy SAM 2 video predictor that takes prepared slices and caches per-slice features."""

    def __init__(self, fill_hole_area: int = 0, **kwargs: Any) -> None:
        # The library's own hole filling needs sam2._C and silently does nothing without it.
        super().__init__(fill_hole_area=0, **kwargs)
        self.hole_fill_area = fill_hole_area
        self._pos_enc: list[torch.Tensor] | None = None

    @torch.inference_mode()
    def init_state_from_frames(
        self, frames: LazyFrames, height: int, width: int, features: ByteLRU, volume_key: str
    ) -> dict[str, Any]:
        """Upstream `init_state`'s state, built from prepared frames instead of a JPEG folder.

        Unlike upstream, frame 0 is not encoded up front: features are computed when a frame is
        visited and kept in `features` under (volume_key, frame), which may be shared across requests.
        """
        device = self.device
        state: dict[str, Any] = {
            "images": frames,
            "num_frames": len(frames),
            "offload_video_to_cpu": False,
            "offload_state_to_cpu": False,
            "video_height": height,
            "video_width": width,
            "device": device,
            "storage_device": device,
            "point_inputs_per_obj": {},
            "mask_inputs_per_obj": {},
            "cached_features": features,
            "volume_key": volume_key,
            "used_keys": set(),  # cache keys this state has read or stored: its own stores never evict them
            "key_frame": None,  # set by the engine: the frame both passes start from
            "key_frame_features": None,  # its features as first computed, for the second pass
            "constants": {},
            "obj_id_to_idx": OrderedDict(),
            "obj_idx_to_id": OrderedDict(),
            "obj_ids": [],
            "output_dict": {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}},
            "output_dict_per_obj": {},
            "temp_output_dict_per_obj": {},
            "consolidated_frame_inds": {"cond_frame_outputs": set(), "non_cond_frame_outputs": set()},
            "tracking_has_started": False,
            "frames_already_tracked": {},
        }
        return state

    def _get_image_feature(self, inference_state: dict[str, Any], frame_idx: int, batch_size: int) -> tuple[Any, ...]:
        """As upstream, but features stay cached per frame (shared LRU, bfloat16) instead of only the last one.

        Only the FPN features are cached: the positional encodings depend on the feature sizes alone
        (identical for every frame, about 5x the features' size), so one copy serves all frames. The
        first returned item (the input image) is unused by every caller and is not kept.
        """
        fpn = self._frame_features(inference_state, frame_idx)
        expanded = {
            "backbone_fpn": [f.expand(batch_size, -1, -1, -1) for f in fpn],
            "vision_pos_enc": [p.expand(batch_size, -1, -1, -1) for p in cast("list[torch.Tensor]", self._pos_enc)],
        }
        return cast("tuple[Any, ...]", (None,) + self._prepare_backbone_features(expanded))

    def _frame_features(self, state: dict[str, Any], frame_idx: int) -> list[torch.Tensor]:
        """Frame features in the dtype the backbone computes them in: the key frame's as first computed,
        else fresh from the encoder, else restored from the cache's bfloat16 copy."""
        if frame_idx == state["key_frame"] and state["key_frame_features"] is not None:
            return cast("list[torch.Tensor]", state["key_frame_features"])
        cache: ByteLRU = state["cached_features"]
        key = (state["volume_key"], frame_idx)
        stored = cache.get(key)
        if stored is not None:
            fpn = [f.to(dtype) for f, dtype in zip(stored.tensors, stored.dtypes, strict=True)]
        else:
            image = state["images"][frame_idx].to(state["device"]).float().unsqueeze(0)
            backbone_out = self.forward_image(image)
            fpn = backbone_out["backbone_fpn"]
            cache.put(key, CachedFeatures.of(fpn), keep=state["used_keys"])
            if self._pos_enc is None:
                self._pos_enc = backbone_out["vision_pos_enc"]
        state["used_keys"].add(key)
        if frame_idx == state["key_frame"]:
            state["key_frame_features"] = fpn
        return fpn

    def forget_frame(self, state: dict[str, Any], frame_idx: int) -> None:
        """Drop one frame's tracking outputs (memory features, low-res mask, object pointer)."""
        state["output_dict"]["non_cond_frame_outputs"].pop(frame_idx, None)
        for per_object in state["output_dict_per_obj"].values():
            per_object["non_cond_frame_outputs"].pop(frame_idx, None)

    @property
    def memory_reach(self) -> int:
        """Frames behind the front that memory attention may still read: mask memories of the last
        `num_maskmem - 1` frames (every r-th frame when r > 1), object pointers of the last
        `max_obj_ptrs_in_encoder - 1`. Outputs further back are never read again in that pass."""
        return cast(int, max(self.num_maskmem * self.memory_temporal_stride_for_eval, self.max_obj_ptrs_in_encoder) + 1)

    def _run_single_frame_inference(
        self, inference_state: dict[str, Any], *args: Any, **kwargs: Any
    ) -> tuple[dict[str, Any], torch.Tensor]:
        compact_out, pred_masks_gpu = super()._run_single_frame_inference(inference_state, *args, **kwargs)
        if self.hole_fill_area > 0:
            pred_masks_gpu = fill_small_holes(pred_masks_gpu, self.hole_fill_area)
            compact_out["pred_masks"] = pred_masks_gpu.to(inference_state["storage_device"], non_blocking=True)
        return compact_out, pred_masks_gpu


def build_predictor(device: str | torch.device = "cpu") -> MedSAM2VideoPredictor:
    """The MedSAM2 architecture with random weights, configured like upstream `build_sam2_video_predictor`."""
    cfg = OmegaConf.load(str(CONFIG_PATH))
    cfg.model._target_ = f"{MedSAM2VideoPredictor.__module__}.{MedSAM2VideoPredictor.__qualname__}"
    cfg.model.sam_mask_decoder_extra_args = {
        "dynamic_multimask_via_stability": True,
        "dynamic_multimask_stability_delta": 0.05,
        "dynamic_multimask_stability_thresh": 0.98,
    }
    cfg.model.binarize_mask_from_pts_for_mem_enc = True
    cfg.model.fill_hole_area = HOLE_FILL_AREA
    OmegaConf.resolve(cfg)
    model = instantiate(cfg.model, _recursive_=True)
    return cast(MedSAM2VideoPredictor, model.to(device).eval())


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """`{"model": state_dict}` read with weights_only=True (a checkpoint carrying pickled code is refused)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for pickled code, RuntimeError/EOFError for corrupt files
        raise CheckpointError(f"{path.name}: refused, not a plain-tensor checkpoint ({type(exc).__name__})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise CheckpointError(f"{path.name}: expected a dict with a 'model' state dict, as MedSAM2's released files")
    return cast("dict[str, torch.Tensor]", checkpoint["model"])


def find_checkpoints(model_dir: Path | None, max_depth: int = 3) -> list[Path]:
    """Candidate MedSAM2 files under the model folder (Azure mounts it one or two levels down).

    Order: MedSAM2_latest.pt first, then the others by name. Whether a file really fits is decided on loading.
    """
    if model_dir is None or not model_dir.is_dir():
        return []
    found = [
        p for p in model_dir.rglob("*.pt")
        if p.is_file() and len(p.relative_to(model_dir).parts) <= max_depth
        and not any(part.startswith(STAGING_PREFIX) for part in p.relative_to(model_dir).parts)
    ]
    return sorted(found, key=lambda p: (p.name != LATEST_CHECKPOINT, p.name, str(p)))


class MedSAM2Engine:
    """VolumeEngine for one MedSAM2 checkpoint."""

    image_size = 512

    def __init__(self, checkpoint: Path, *, device: str = "cpu", name: str | None = None, feature_cache_mb: int = 256,
                 precision: str = "fp32") -> None:
        self.device = torch.device(device)
        # opt-in (MEDSAM2_PRECISION=bf16): the default CPU path stays fp32, voxel-identical to the reference
        self.cpu_bf16 = self.device.type == "cpu" and precision == "bf16"
        # Per-slice features shared by both propagation passes, all objects and later requests on the same volume.
        self.features = ByteLRU(feature_cache_mb * 1024 * 1024)
        state_dict = load_state_dict(checkpoint)
        predictor = build_predictor("cpu")
        try:
            predictor.load_state_dict(state_dict, strict=True)
        except RuntimeError as exc:
            first_line = str(exc).splitlines()[0] if str(exc) else "keys or shapes differ"
            raise CheckpointError(f"{checkpoint.name}: does not fit the MedSAM2 architecture ({first_line})") from None
        self.predictor: MedSAM2VideoPredictor = predictor.to(self.device).eval()
        self._image: SAM2ImageEngine | None = None
        self.info = ModelInfo(
            name=name or checkpoint.stem, family="medsam2", checkpoint=checkpoint.name, sha256=sha256_file(checkpoint),
            capabilities=Capabilities(points=True, negative_points=True, mask_prompts=True, multi_slice=True,
                                      precision="bf16" if self.device.type == "cuda" or self.cpu_bf16 else "fp32"),
        )


    def image_engine(self) -> SAM2ImageEngine:
        """The 2D prompt interface on this model's weights (built once)."""
        if self._image is None:
            self._image = SAM2ImageEngine(self.predictor, self.info)
        return self._image

    def start(self, volume_u8: np.ndarray, volume_key: str | None = None) -> dict[str, Any]:
        """volume_key identifies the windowed volume's content (cross-request feature reuse); None: private cache."""
        frames = LazyFrames(volume_u8, self.image_size)
        height, width = int(volume_u8.shape[1]), int(volume_u8.shape[2])
        features = self.features if volume_key is not None else ByteLRU(self.features.max_bytes)
        with bf16_autocast(self.device, self.cpu_bf16):
            return self.predictor.init_state_from_frames(frames, height, width, features, volume_key or "private")

    def _propagated(self, state: dict[str, Any], *, reverse: bool, start: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """The reference's propagation in one direction from what the state is conditioned on (from `start`, else
        from the conditioned frame): (z, float32 (H, W) logits at the original resolution) a step. A tracked frame
        out of memory attention's reach is forgotten (conditioning outputs are kept)."""
        predictor = self.predictor
        behind = predictor.memory_reach if reverse else -predictor.memory_reach
        if start is None:  # the reference's own call (the equivalence test holds it to this)
            steps = predictor.propagate_in_video(state, reverse=reverse)
        else:
            steps = predictor.propagate_in_video(state, start_frame_idx=start, reverse=reverse)
        while True:
            with bf16_autocast(self.device, self.cpu_bf16):
                step = next(steps, None)
                if step is None:
                    return
                z, _, logits = step
                logits = logits[0, 0].float().cpu().numpy()
            predictor.forget_frame(state, z + behind)
            yield int(z), logits

    def track(
        self, state: dict[str, Any], *, key_index: int, box: np.ndarray, reverse: bool
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Box on the key slice, then the reference's propagation in one direction; the state is reset afterwards.

        Yields (z, logits): float32 (H, W) mask logits at the original resolution (mask = logits > 0).
        """
        predictor = self.predictor
        if state["key_frame"] != key_index:  # a state serves several objects, each with its own key slice
            state["key_frame"], state["key_frame_features"] = key_index, None
        try:
            with bf16_autocast(self.device, self.cpu_bf16):
                predictor.add_new_points_or_box(state, frame_idx=key_index, obj_id=1, box=np.asarray(box, dtype=np.float32))
            yield from self._propagated(state, reverse=reverse)
        finally:
            predictor.reset_state(state)

    def track_mask(self, state: dict[str, Any], *, key_index: int, mask: np.ndarray, reverse: bool) -> Iterator[tuple[int, np.ndarray]]:
        """A mask given on the key slice (bool (H, W), `add_new_mask`: MedSAM2's Slicer plugin propagates the
        user's edited middle mask so), then the reference's propagation in one direction; the state is reset
        afterwards. Yields (z, logits) as `track` does, the key slice first."""
        predictor = self.predictor
        if state["key_frame"] != key_index:
            state["key_frame"], state["key_frame_features"] = key_index, None
        try:
            with bf16_autocast(self.device, self.cpu_bf16):
                predictor.add_new_mask(state, frame_idx=key_index, obj_id=1, mask=torch.from_numpy(np.asarray(mask, dtype=bool)))
            yield from self._propagated(state, reverse=reverse, start=key_index)
        finally:
            predictor.reset_state(state)

    def track_prompts(
        self, state: dict[str, Any], *, prompts: Sequence[SlicePrompt], reverse: bool, mask_prompt: bool = False
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Every prompted slice conditions the predictor (boxes and points, one call per slice), then the
        reference's propagation from the lowest prompted slice up or the highest down; the state is reset afterwards.

        mask_prompt (one prompted slice): the slice's mask from its prompt replaces the prompt as a mask
        prompt before propagating, as MedSAM2's RECIST inference does (`add_new_mask`).
        """
        predictor = self.predictor
        frames = sorted({p.z for p in prompts})
        if mask_prompt and len(frames) != 1:
            raise ValueError("mask_prompt needs prompts on exactly one slice")
        start = frames[-1] if reverse else frames[0]
        if state["key_frame"] != start:
            state["key_frame"], state["key_frame_features"] = start, None
        try:
            with bf16_autocast(self.device, self.cpu_bf16):
                masks = None
                for p in prompts:
                    _, _, masks = predictor.add_new_points_or_box(
                        state, frame_idx=p.z, obj_id=1,
                        points=None if p.points is None else np.asarray(p.points, dtype=np.float32),
                        labels=None if p.labels is None else np.asarray(p.labels, dtype=np.int32),
                        box=None if p.box is None else np.asarray(p.box, dtype=np.float32),
                    )
                if mask_prompt and masks is not None:
                    key_mask = (masks[0, 0] > 0).float().cpu()
                    predictor.reset_state(state)
                    predictor.add_new_mask(state, frame_idx=start, obj_id=1, mask=key_mask)
            yield from self._propagated(state, reverse=reverse, start=start)
        finally:
            predictor.reset_state(state)
