"""Independent, literal implementation of MedSAM2's reference 3D pipeline.

This is the baseline the endpoint is checked against (voxel-for-voxel mask
equality) and the baseline for benchmarks. It follows REFERENCE.md section B,
i.e. ``medsam2_infer_3D_CT.py`` of bowang-lab/MedSAM2, step by step, and uses
nothing from ``medsam2_endpoint`` on purpose.

Deliberate differences from the upstream script (all documented in REFERENCE.md):

- CPU, float32, no autocast (upstream runs bf16 autocast on CUDA).
- A fresh mask buffer per call (upstream never clears it between lesions).
- The ``fill_hole_area=8`` step runs without the CUDA extension ``sam2._C``:
  ``sam2.utils.misc.get_connected_components`` is replaced, for the duration of
  one :func:`reference_segment` call only, by an OpenCV implementation.
- Largest 3D component via ``scipy.ndimage.label`` with a full 3x3x3 structure
  (26-connectivity), which is what ``skimage.measure.label`` does for 3D input.
- A constant volume raises ``ValueError`` (upstream divides by zero).
- ``dicom_window=None`` means "no clip": the volume is clipped to (-inf, inf),
  so its dtype follows the same numpy rules as a real window (integers become
  float64, float32 stays float32) and integer min-max cannot overflow.

Array order is SimpleITK's (Z, Y, X); a box is [x_min, y_min, x_max, y_max]
in the original slice's pixels.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import cv2
import numpy as np
import sam2
import sam2.utils.misc
import SimpleITK as sitk
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from sam2.sam2_video_predictor_legacy import SAM2VideoPredictor
from scipy import ndimage

IMAGE_SIZE = 512
IMG_MEAN = (0.485, 0.456, 0.406)
IMG_STD = (0.229, 0.224, 0.225)
# start of the warning sam2.utils.misc.fill_holes_in_mask_scores gives when it skips the step
_HOLE_FILL_SKIPPED = r"(?s).*Skipping the post-processing step"


class ReferenceVideoPredictor(SAM2VideoPredictor):
    """sam2 1.1.0's legacy video predictor whose ``init_state`` takes a frame tensor.

    Everything except ``init_state`` is upstream's code.
    """

    @torch.inference_mode()
    def init_state(
        self,
        images: torch.Tensor,
        video_height: int,
        video_width: int,
        offload_video_to_cpu: bool = False,
        offload_state_to_cpu: bool = False,
    ) -> dict:
        """Build upstream legacy ``init_state``'s dict from preprocessed frames.

        images: (D, 3, image_size, image_size) already normalised (any float
        dtype; the model casts each frame to float32 when it encodes it).
        video_height, video_width: the original slice size (Y, X).
        """
        compute_device = self.device
        inference_state: dict = {}
        inference_state["images"] = images
        inference_state["num_frames"] = len(images)
        inference_state["offload_video_to_cpu"] = offload_video_to_cpu
        inference_state["offload_state_to_cpu"] = offload_state_to_cpu
        inference_state["video_height"] = video_height
        inference_state["video_width"] = video_width
        inference_state["device"] = compute_device
        if offload_state_to_cpu:
            inference_state["storage_device"] = torch.device("cpu")
        else:
            inference_state["storage_device"] = compute_device
        inference_state["point_inputs_per_obj"] = {}
        inference_state["mask_inputs_per_obj"] = {}
        inference_state["cached_features"] = {}
        inference_state["constants"] = {}
        inference_state["obj_id_to_idx"] = OrderedDict()
        inference_state["obj_idx_to_id"] = OrderedDict()
        inference_state["obj_ids"] = []
        inference_state["output_dict"] = {
            "cond_frame_outputs": {},
            "non_cond_frame_outputs": {},
        }
        inference_state["output_dict_per_obj"] = {}
        inference_state["temp_output_dict_per_obj"] = {}
        inference_state["consolidated_frame_inds"] = {
            "cond_frame_outputs": set(),
            "non_cond_frame_outputs": set(),
        }
        inference_state["tracking_has_started"] = False
        inference_state["frames_already_tracked"] = {}
        # Warm up the visual backbone and cache the image feature on frame 0 (as upstream).
        self._get_image_feature(inference_state, frame_idx=0, batch_size=1)
        return inference_state


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def sam2_512_config() -> DictConfig:
    """The MedSAM2 model config: sam2's packaged sam2.1 hiera-tiny at 512 px.

    Returns the whole (resolved) config, model under ``cfg.model``, as hydra's
    ``compose`` would give it.
    """
    path = os.path.join(sam2.__path__[0], "configs", "sam2.1", "sam2.1_hiera_t.yaml")
    cfg = OmegaConf.load(path)
    model = cfg.model
    model._target_ = _qualified_name(ReferenceVideoPredictor)
    model.image_size = IMAGE_SIZE
    model.memory_attention.layer.self_attention.feat_sizes = [32, 32]
    model.memory_attention.layer.cross_attention.feat_sizes = [32, 32]
    # overrides of upstream build_sam2_video_predictor (apply_postprocessing=True)
    model.sam_mask_decoder_extra_args = {
        "dynamic_multimask_via_stability": True,
        "dynamic_multimask_stability_delta": 0.05,
        "dynamic_multimask_stability_thresh": 0.98,
    }
    model.binarize_mask_from_pts_for_mem_enc = True
    model.fill_hole_area = 8
    OmegaConf.resolve(cfg)
    return cfg


def _instantiate_model() -> ReferenceVideoPredictor:
    return instantiate(sam2_512_config().model, _recursive_=True)


def make_random_checkpoint(path: str | os.PathLike, seed: int = 0) -> str:
    """Save a randomly initialised MedSAM2-architecture checkpoint ({"model": state_dict})."""
    torch.manual_seed(seed)
    model = _instantiate_model()
    torch.save({"model": model.state_dict()}, path)
    return str(path)


def build_reference_predictor(
    checkpoint_path: str | os.PathLike, device: str | torch.device = "cpu"
) -> ReferenceVideoPredictor:
    """Instantiate the predictor and load a checkpoint strictly, in eval mode."""
    model = _instantiate_model()
    state_dict = torch.load(checkpoint_path, map_location="cpu", weights_only=True)["model"]
    model.load_state_dict(state_dict, strict=True)
    model = model.to(device)
    model.eval()
    return model


# --------------------------------------------------------------------------- hole filling


def opencv_connected_components(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for ``sam2.utils.misc.get_connected_components`` (no CUDA extension).

    mask: (N, 1, H, W), nonzero = foreground. Returns (labels, areas), both int32
    (N, 1, H, W) on mask's device: labels > 0 on foreground (8-connected
    components), 0 on background; areas = the pixel count of each pixel's
    component, 0 on background.
    """
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"expected a (N, 1, H, W) mask, got shape {tuple(mask.shape)}")
    binary = mask.to(torch.uint8).cpu().numpy()
    labels = np.zeros(binary.shape, dtype=np.int32)
    areas = np.zeros(binary.shape, dtype=np.int32)
    for n in range(binary.shape[0]):
        img = np.ascontiguousarray((binary[n, 0] != 0).astype(np.uint8))
        _, lab, stats, _ = cv2.connectedComponentsWithStats(img, connectivity=8, ltype=cv2.CV_32S)
        area = stats[:, cv2.CC_STAT_AREA].astype(np.int32)
        area[0] = 0  # label 0 is the background of the input
        labels[n, 0] = lab
        areas[n, 0] = area[lab]
    return torch.from_numpy(labels).to(mask.device), torch.from_numpy(areas).to(mask.device)


@contextlib.contextmanager
def connected_components_patched() -> Iterator[None]:
    """Make sam2's ``fill_holes_in_mask_scores`` work without ``sam2._C``, then restore.

    ``fill_holes_in_mask_scores`` looks ``get_connected_components`` up as a
    global of ``sam2.utils.misc`` at call time, so replacing the module
    attribute is enough.
    """
    original = sam2.utils.misc.get_connected_components
    sam2.utils.misc.get_connected_components = opencv_connected_components
    try:
        yield
    finally:
        sam2.utils.misc.get_connected_components = original


# --------------------------------------------------------------------------- preprocessing


def window_volume(arr: np.ndarray, dicom_window: Sequence[float] | str | None = None) -> np.ndarray:
    """Clip to the window, min-max scale with the clipped volume's own min/max, np.uint8.

    numpy semantics throughout: ``np.clip`` with Python float bounds gives
    float64 for integer volumes and keeps float32 for float32 volumes; the
    scaling runs in that dtype; ``np.uint8`` truncates.
    """
    if dicom_window is None:
        lower_bound, upper_bound = -np.inf, np.inf
    else:
        if isinstance(dicom_window, str):
            dicom_window = dicom_window.split(",")
        lower_bound, upper_bound = (float(v) for v in dicom_window)
    clipped = np.clip(arr, lower_bound, upper_bound)
    vmin, vmax = np.min(clipped), np.max(clipped)
    if vmax == vmin:
        raise ValueError(f"constant volume after windowing (all voxels {vmin}): cannot min-max scale")
    scaled = (clipped - vmin) / (vmax - vmin) * 255.0
    return np.uint8(scaled)


def resize_grayscale_to_rgb_and_resize(array: np.ndarray, image_size: int) -> np.ndarray:
    """(D, H, W) uint8 -> (D, 3, image_size, image_size) float64, via PIL RGB + default resize."""
    d = array.shape[0]
    resized_array = np.zeros((d, 3, image_size, image_size))  # float64, as upstream
    for i in range(d):
        img_rgb = Image.fromarray(array[i].astype(np.uint8)).convert("RGB")
        img_resized = img_rgb.resize((image_size, image_size))
        resized_array[i] = np.array(img_resized).transpose(2, 0, 1)
    return resized_array


def preprocess_frames(img_3d: np.ndarray) -> torch.Tensor:
    """(D, H, W) uint8 -> (D, 3, 512, 512) float64 tensor, normalised as upstream.

    /255 in float64; mean and std are float32 tensors broadcast into the
    float64 tensor in place (so the constants are float32-rounded, the
    arithmetic is float64).
    """
    img_resized = resize_grayscale_to_rgb_and_resize(img_3d, IMAGE_SIZE)
    img_resized = img_resized / 255.0
    frames = torch.from_numpy(img_resized)
    img_mean = torch.tensor(IMG_MEAN, dtype=torch.float32)[:, None, None]
    img_std = torch.tensor(IMG_STD, dtype=torch.float32)[:, None, None]
    frames -= img_mean
    frames /= img_std
    return frames


def largest_component_3d(segmentation: np.ndarray) -> np.ndarray:
    """Boolean mask of the largest 26-connected component (ties: lowest label)."""
    labels, _ = ndimage.label(segmentation, structure=np.ones((3, 3, 3), dtype=bool))
    return labels == np.argmax(np.bincount(labels.flat)[1:]) + 1


# --------------------------------------------------------------------------- pipeline


def reference_segment(
    image_path: str | os.PathLike,
    bbox: Sequence[float | str],
    key_slice_idx: int,
    dicom_window: Sequence[float] | str | None = None,
    *,
    predictor: ReferenceVideoPredictor,
) -> np.ndarray:
    """Segment one lesion like MedSAM2's reference script; returns a (Z, Y, X) uint8 mask.

    image_path: a volume SimpleITK can read. bbox: [x_min, y_min, x_max, y_max]
    on the key slice (values truncated with int(float(v))). key_slice_idx: index
    into this volume's Z axis. dicom_window: (lo, hi), "lo,hi" or None (no clip).
    """
    nii_image = sitk.ReadImage(str(image_path))
    nii_image_data = sitk.GetArrayFromImage(nii_image)
    if nii_image_data.ndim != 3:
        raise ValueError(f"expected a 3D volume, got array shape {nii_image_data.shape}")
    num_slices = nii_image_data.shape[0]
    key_slice_idx = int(key_slice_idx)
    if not 0 <= key_slice_idx < num_slices:
        raise ValueError(f"key slice {key_slice_idx} outside the volume's {num_slices} slices")

    img_3d = window_volume(nii_image_data, dicom_window)
    bbox = np.array([int(float(v)) for v in bbox])
    if bbox.shape != (4,):
        raise ValueError(f"bbox must have 4 values [x_min, y_min, x_max, y_max], got {bbox.tolist()}")

    key_slice_img = img_3d[key_slice_idx, :, :]
    video_height = key_slice_img.shape[0]
    video_width = key_slice_img.shape[1]
    frames = preprocess_frames(img_3d).to(predictor.device)

    segs_3d = np.zeros(img_3d.shape, dtype=np.uint8)
    with connected_components_patched(), torch.inference_mode(), warnings.catch_warnings():
        # upstream swallows any error in the hole filling and only warns; the reference
        # environment fills holes, so a skipped fill must fail loudly here
        warnings.filterwarnings("error", message=_HOLE_FILL_SKIPPED, category=UserWarning)
        inference_state = predictor.init_state(frames, video_height, video_width)
        for reverse in (False, True):
            predictor.add_new_points_or_box(
                inference_state=inference_state,
                frame_idx=key_slice_idx,
                obj_id=1,
                box=bbox,
            )
            for out_frame_idx, _, out_mask_logits in predictor.propagate_in_video(
                inference_state, reverse=reverse
            ):
                segs_3d[out_frame_idx, (out_mask_logits[0] > 0.0).cpu().numpy()[0]] = 1
            predictor.reset_state(inference_state)

    if np.max(segs_3d) > 0:
        segs_3d = np.uint8(largest_component_3d(segs_3d))
    return segs_3d
