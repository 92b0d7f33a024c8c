"""Intensity windows the client sends as `dicom_window`: named CT presets, the "mri" percentiles, or explicit."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from medsam2_endpoint.client.transport import ClientError

__all__ = ["MRI_PERCENTILES", "PRESETS", "describe_presets", "resolve_window"]
#: CT windows [lower, upper] in HU, from the usual radiology (width, level) pairs.
PRESETS: dict[str, tuple[float, float]] = {
    "ct-soft-tissue": (-160.0, 240.0),  # W 400, L 40 (MedSAM2's abdominal default)
    "ct-lung": (-1350.0, 150.0),  # W 1500, L -600
    "ct-bone": (-500.0, 1300.0),  # W 1800, L 400
}
MRI_PERCENTILES = (0.5, 99.5)  # "mri": of the nonzero voxels, as MedSAM2's MRI script
PRESET_NAMES = (*PRESETS, "mri")


def describe_presets() -> str:
    """One line for --help."""
    named = ", ".join(f"{k} {list(v)}" for k, v in PRESETS.items())
    return f"Presets: {named}, mri = {MRI_PERCENTILES[0]}-{MRI_PERCENTILES[1]} percentiles of nonzero voxels."


def resolve_window(image: sitk.Image | None, window: Sequence[float] | None, preset: str | None) -> tuple[float, float] | None:
    """The [lower, upper] window to send: explicit, a CT preset, or the "mri" percentiles of nonzero voxels
    (which needs the `image`; None when the volume is not local, e.g. a DICOMweb series)."""
    if window is not None and preset is not None:
        raise ClientError("give either a window or a preset, not both")
    if preset is not None:
        if preset == "mri":
            if image is None:
                raise ClientError("preset mri needs the volume's voxels; give --window LO HI or --modality MR instead")
            values = sitk.GetArrayViewFromImage(image)
            values = values[values != 0]
            if values.size == 0:
                raise ClientError("preset mri: the volume has no nonzero voxels")
            lo, hi = (float(v) for v in np.percentile(values, MRI_PERCENTILES))
            window = (lo, hi)
        elif preset in PRESETS:
            window = PRESETS[preset]
        else:
            raise ClientError(f"unknown preset {preset!r}; choose from {', '.join(PRESET_NAMES)}")
    if window is None:
        return None
    lo, hi = (float(v) for v in window)
    if not lo < hi:
        raise ClientError(f"window lower bound {lo} must be below upper bound {hi}")
    return lo, hi
