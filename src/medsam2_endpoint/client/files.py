"""The client's volume reading: a file SimpleITK reads, or a DICOM series folder read by `io.dicom_seg` (the
same reader, slice order and rescale as the service's batch route), as a 3D scalar image."""

from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

from medsam2_endpoint.base.errors import ServiceError
from medsam2_endpoint.client.transport import ClientError
from medsam2_endpoint.io.dicom_seg import read_series, series_files

__all__ = ["read_dicom_series", "read_volume", "scalar_image"]


def read_volume(path: str | Path, *, series_uid: str | None = None) -> sitk.Image:
    """A volume file (anything SimpleITK reads: .nii[.gz], .nrrd, .mha, ...) or a DICOM series folder."""
    path = Path(path)
    if path.is_dir():
        return read_dicom_series(path, series_uid=series_uid)[0]
    if not path.is_file():
        raise ClientError(f"{path}: no such file or folder")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError:
        raise ClientError(f"{path}: SimpleITK cannot read it; give a NIfTI, NRRD or MHA file or a DICOM folder") from None


def read_dicom_series(folder: Path, *, series_uid: str | None = None) -> tuple[sitk.Image, tuple[Path, ...]]:
    """One DICOM series of `folder`, slices sorted by GDCM along the slice normal, rescale applied; and
    its files in that (z) order."""
    try:
        files = series_files(folder, series_uid=series_uid, choose="--series")
        return read_series(files), tuple(files)
    except ServiceError as exc:
        raise ClientError(exc.message) from None


def scalar_image(volume: str | Path | sitk.Image, series_uid: str | None) -> tuple[sitk.Image, tuple[Path, ...]]:
    """The 3D scalar image, and the DICOM series' files in z order when the volume was one."""
    source_files: tuple[Path, ...] = ()
    if isinstance(volume, sitk.Image):
        image = volume
    elif Path(volume).is_dir():
        image, source_files = read_dicom_series(Path(volume), series_uid=series_uid)
    else:
        image = read_volume(volume, series_uid=series_uid)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ClientError(
            f"expected a 3D scalar volume, got {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} components"
        )
    return image, source_files
