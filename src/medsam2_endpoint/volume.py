"""All NIfTI reading and writing: bytes (base64 or fetched) in, `Volume` out; masks back out with the same geometry.

Arrays are in SimpleITK order (z, y, x). Spacing, origin and direction are ITK's (LPS world, x first).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from .config import Limits
from .errors import InvalidRequest, PayloadTooLarge, UnsupportedMedia

GZIP_MAGIC = b"\x1f\x8b"
_SUPPORTED_DTYPES = {np.dtype(t) for t in ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")}
_DATA_URL = re.compile(r"^data:[\w/.+-]*;base64,", re.IGNORECASE)


@dataclass(frozen=True)
class Volume:
    """Voxels plus the geometry they came with.

    array: (Z, Y, X) in the file's dtype. spacing/origin: 3 floats (x, y, z). direction: 9 floats, row-major.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @property
    def itk_size(self) -> list[int]:
        """[X, Y, Z], as SimpleITK's GetSize()."""
        z, y, x = self.array.shape
        return [int(x), int(y), int(z)]

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0  # spacing in mm

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Volume:
        return cls(
            array=sitk.GetArrayFromImage(image),
            spacing=tuple(float(v) for v in image.GetSpacing()),
            origin=tuple(float(v) for v in image.GetOrigin()),
            direction=tuple(float(v) for v in image.GetDirection()),
        )

    def image_like(self, array: np.ndarray) -> sitk.Image:
        """A SimpleITK image of `array` (same (Z, Y, X) shape) carrying this volume's geometry."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} differs from the volume's {self.array.shape}")
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


def decode_base64(text: str, *, field: str, limits: Limits) -> bytes:
    """Strict base64 (whitespace and a data-URL prefix tolerated)."""
    if len(text) > limits.max_base64_bytes:
        raise PayloadTooLarge(
            f"{field}: base64 payload of {len(text)} characters exceeds the limit of "
            f"{limits.max_base64_bytes} (MEDSAM2_MAX_BASE64_MB); send a URL instead"
        )
    text = _DATA_URL.sub("", text, count=1)
    compact = "".join(text.split())
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(
            f"{field}: not valid base64; send the .nii or .nii.gz file's bytes base64-encoded, or an https URL"
        ) from None


def gunzip_capped(data: bytes, *, field: str, limit: int, out: BinaryIO | None = None) -> bytes | None:
    """Decompress gzip while streaming, refusing as soon as the output passes `limit` (gzip bombs).

    Returns the bytes, or writes them to `out` (a file: no second in-memory copy of a large volume).
    """
    decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    sink = out if out is not None else io.BytesIO()
    written = 0
    chunk = 1 << 20
    try:
        view = memoryview(data)
        for start in range(0, len(data), chunk):
            piece = decompressor.decompress(view[start : start + chunk], limit + 1 - written)
            while True:
                sink.write(piece)
                written += len(piece)
                if not decompressor.unconsumed_tail or written > limit:
                    break
                piece = decompressor.decompress(decompressor.unconsumed_tail, limit + 1 - written)
            if written > limit or decompressor.eof:
                break
    except zlib.error:
        raise InvalidRequest(f"{field}: the gzip stream is corrupt; send an intact .nii.gz file") from None
    if written > limit:
        raise PayloadTooLarge(
            f"{field}: the decompressed file exceeds the limit of {limit} bytes (MEDSAM2_MAX_FILE_MB)"
        )
    if not decompressor.eof:
        raise InvalidRequest(f"{field}: the gzip stream is truncated; send the whole .nii.gz file")
    return sink.getvalue() if out is None else None


def _header(raw: bytes | np.ndarray, *, field: str) -> nib.Nifti1Header:
    raw = bytes(raw[:540])  # the header region only (raw may be a memory map of the whole file)
    if len(raw) >= 348 and raw[344:348] in (b"n+1\x00",):
        header_class = nib.Nifti1Header
    elif len(raw) >= 540 and raw[4:8] == b"n+2\x00":
        header_class = nib.Nifti2Header
    elif len(raw) >= 348 and raw[344:348] == b"ni1\x00":
        raise UnsupportedMedia(f"{field}: a two-file NIfTI (.hdr/.img) cannot be sent; convert it to a single .nii.gz")
    else:
        raise UnsupportedMedia(f"{field}: not a NIfTI file (no NIfTI magic); send a .nii or .nii.gz volume")
    try:
        return header_class.from_fileobj(io.BytesIO(raw[: header_class.sizeof_hdr]))
    except Exception:
        raise InvalidRequest(f"{field}: the NIfTI header is malformed") from None


def check_header(raw: bytes, *, field: str, limits: Limits) -> tuple[int, ...]:
    """Validate dimensions, dtype and size from the header alone, before any voxel is read."""
    header = _header(raw, field=field)
    shape = tuple(int(v) for v in header.get_data_shape())
    if any(v <= 0 for v in shape):
        raise InvalidRequest(f"{field}: the NIfTI header has a non-positive dimension {list(shape)}")
    spatial = shape[:3]
    extra = shape[3:]
    if len(spatial) < 3:
        raise InvalidRequest(
            f"{field}: the NIfTI image is {len(spatial)}D {list(shape)}; the 3D route needs a volume (use the 2D route for single images)"
        )
    if any(v != 1 for v in extra):
        raise InvalidRequest(
            f"{field}: the NIfTI image has extra dimensions {list(shape)}; send one 3D volume (one time point, one channel)"
        )
    voxels = math.prod(spatial)
    if voxels > limits.max_voxels:
        raise PayloadTooLarge(
            f"{field}: the volume {list(spatial)} has {voxels} voxels, over the limit of {limits.max_voxels} (MEDSAM2_MAX_VOXELS)"
        )
    if spatial[0] * spatial[1] > limits.max_slice_pixels:
        raise PayloadTooLarge(
            f"{field}: slices of {spatial[0]}x{spatial[1]} exceed the limit of {limits.max_slice_pixels} pixels"
        )
    dtype = header.get_data_dtype()
    if dtype.fields is not None or np.dtype(dtype.base).newbyteorder("=") not in _SUPPORTED_DTYPES:
        raise UnsupportedMedia(
            f"{field}: voxel type {dtype} is not supported; send a scalar volume (int8-int32, uint8-uint32, float32 or float64)"
        )
    offset = float(header["vox_offset"])
    if not math.isfinite(offset) or offset < 0:
        raise InvalidRequest(f"{field}: the NIfTI header's vox_offset {offset} is not a valid byte offset")
    needed = int(header.get_data_offset()) + voxels * dtype.itemsize
    if len(raw) < needed:
        raise InvalidRequest(
            f"{field}: the NIfTI file is truncated ({len(raw)} bytes, the header needs {needed}); send the whole file"
        )
    if dtype.kind == "f":
        # SimpleITK's NIfTI reader turns NaN into 0 silently, so look at the raw voxels (a view, no copy).
        voxels_raw = np.frombuffer(raw, dtype=dtype, count=voxels, offset=int(header.get_data_offset()))
        if not np.isfinite(voxels_raw).all():
            raise InvalidRequest(f"{field}: the volume contains NaN or infinite values; replace them before sending")
    return spatial


def read_nifti(data: bytes, *, field: str, limits: Limits) -> Volume:
    """Decode a .nii or .nii.gz (detected by content) into a Volume, checking limits before allocating.

    A .nii.gz is decompressed straight into a temporary file, checked through a read-only memory map and
    read by SimpleITK from there, so only the voxel array itself is held in memory.
    """
    if len(data) > limits.max_file_bytes:
        raise PayloadTooLarge(f"{field}: the file of {len(data)} bytes exceeds the limit of {limits.max_file_bytes} bytes")
    with tempfile.TemporaryDirectory(prefix="medsam2-") as tmp:
        path = Path(tmp) / "volume.nii"
        with open(path, "wb") as handle:
            if data[:2] == GZIP_MAGIC:
                gunzip_capped(data, field=field, limit=limits.max_file_bytes, out=handle)
            else:
                handle.write(data)
        if path.stat().st_size == 0:
            raise UnsupportedMedia(f"{field}: not a NIfTI file (it is empty); send a .nii or .nii.gz volume")
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        try:
            check_header(raw, field=field, limits=limits)
        finally:
            del raw
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError:
            raise InvalidRequest(f"{field}: SimpleITK could not read the NIfTI file; check that it is a valid volume") from None
    if image.GetDimension() == 4:
        size = list(image.GetSize())
        image = sitk.Extract(image, size[:3] + [0], [0, 0, 0, 0])
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise UnsupportedMedia(f"{field}: vector or RGB voxels are not supported; send a scalar volume")
    geometry = (*image.GetSpacing(), *image.GetOrigin(), *image.GetDirection())
    if not all(math.isfinite(v) for v in geometry):
        raise InvalidRequest(
            f"{field}: the NIfTI geometry (spacing, origin or direction from pixdim/qform/sform) has NaN or "
            "infinite values; fix the header"
        )
    return Volume.from_sitk(image)


def write_nifti(image: sitk.Image, *, compressed: bool = True) -> bytes:
    """Serialise a SimpleITK image as .nii.gz (or .nii) bytes."""
    with tempfile.TemporaryDirectory(prefix="medsam2-") as tmp:
        path = Path(tmp) / ("mask.nii.gz" if compressed else "mask.nii")
        sitk.WriteImage(image, str(path), useCompression=compressed)
        return path.read_bytes()
