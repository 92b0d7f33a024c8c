"""All NIfTI reading and writing: bytes (base64 or fetched) in, `Volume` out; masks back out with the same geometry.

Arrays are in SimpleITK order (z, y, x). Spacing, origin and direction are ITK's (LPS world, x first).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import io
import math
import re
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, cast

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from medsam2_endpoint.base.budget import Budget
from medsam2_endpoint.base.errors import InvalidRequest, PayloadTooLarge, UnsupportedMedia
from medsam2_endpoint.io.limits import Limits

GZIP_MAGIC = b"\x1f\x8b"
_SUPPORTED_DTYPES = {np.dtype(t) for t in ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")}
_XYZ = tuple[float, float, float]  # spacing or origin, ITK order
_DATA_URL = re.compile(r"^data:[\w/.+-]*;base64,", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Volume:
    """Voxels plus the geometry they came with.

    array: (Z, Y, X), in the file's dtype as read (uint8 once windowed: `with_array`); may be a read-only
    view of `owner`'s buffer. spacing/origin: 3 floats (x, y, z). direction: 9 floats, row-major.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    owner: object = dataclasses.field(default=None, repr=False, compare=False)  # keeps a viewed buffer alive

    @property
    def itk_size(self) -> list[int]:
        """[X, Y, Z], as SimpleITK's GetSize()."""
        z, y, x = self.array.shape
        return [int(x), int(y), int(z)]

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0  # spacing in mm

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)

    def content_id(self) -> str:
        """A hash of the voxels (dtype, shape, values) and the geometry: equal ids, equal decoded volumes.
        The 3D route's `volume_id`; a client computes it from its own upload the same way (read_nifti first)."""
        digest = hashlib.blake2b(digest_size=16)
        digest.update(f"{self.array.dtype.str}{self.array.shape}{self.spacing}{self.origin}{self.direction}".encode())
        digest.update(np.ascontiguousarray(self.array).data)
        return digest.hexdigest()

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Volume:
        """The image's voxels as a read-only view (no copy of a whole CT) and its geometry."""
        array = sitk.GetArrayViewFromImage(image)
        array.flags.writeable = False
        return cls(
            array=array,
            spacing=cast(_XYZ, tuple(float(v) for v in image.GetSpacing())),
            origin=cast(_XYZ, tuple(float(v) for v in image.GetOrigin())),
            direction=tuple(float(v) for v in image.GetDirection()),
            owner=image,
        )

    def with_array(self, array: np.ndarray) -> Volume:
        """The same geometry with other voxels of the same shape (the windowed uint8 volume); the old buffer is let go."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} differs from the volume's {self.array.shape}")
        return dataclasses.replace(self, array=array, owner=None)

    def label_map(self, array: np.ndarray, *, multi_object: bool = False) -> LabelMap:
        """A segmentation of this volume: `array` (same (Z, Y, X) shape) with this volume's geometry."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} differs from the volume's {self.array.shape}")
        return LabelMap(array=array, spacing=self.spacing, origin=self.origin, direction=self.direction,
                        multi_object=multi_object)

    def image_like(self, array: np.ndarray) -> sitk.Image:
        """A SimpleITK image of `array` (same (Z, Y, X) shape) carrying this volume's geometry."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} differs from the volume's {self.array.shape}")
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


_B64_CHUNK_CHARS = 4 << 20  # decode this many base64 characters at a time (a multiple of 4)


@dataclasses.dataclass(frozen=True)
class LabelMap(Volume):
    """A segmentation with the geometry of the volume it was drawn on (as TorchIO's `LabelMap`): what the
    Service hands every encoder (list, RLE, NIfTI, DICOM SEG). array: (Z, Y, X) 0/1 for one object, or object
    ids (uint8/uint16) when `multi_object`."""

    multi_object: bool = False

    def nifti(self) -> bytes:
        """The label map as gzip-compressed NIfTI in its source geometry (uint8 for one object)."""
        labels = self.array if self.multi_object else self.array.astype(np.uint8, copy=False)
        return write_nifti(self.image_like(labels), compressed=True)


def base64_chunks(text: str, *, field: str, limits: Limits, what: str = "the .nii or .nii.gz file's",
                  budget: Budget | None = None) -> Iterator[bytes]:
    """Strict base64 decoded a few MB at a time (whitespace and a data-URL prefix tolerated).

    A whole CT arrives as a ~100 MB string: decoding it in slices never holds the full decoded
    file (or an ASCII copy of the string) in memory. `what` completes the error's "send ..." hint.
    The request's `budget` is checked before each piece.
    """
    if len(text) > limits.max_base64_bytes:
        raise PayloadTooLarge(
            f"{field}: base64 payload of {len(text)} characters exceeds the limit of "
            f"{limits.max_base64_bytes} (MEDSAM2_MAX_BASE64_MB); send a URL instead"
        )
    prefix = _DATA_URL.match(text)
    text = text[prefix.end() :] if prefix else text
    if any(space in text for space in " \t\n\r\f\v"):
        text = "".join(text.split())  # rare (wrapped lines): one compact copy keeps the slicing 4-aligned
    for start in range(0, len(text), _B64_CHUNK_CHARS):
        if budget is not None:
            budget.check(start // 4 * 3, "bytes_decoded", advice="send a smaller file, or a URL")
        try:
            yield base64.b64decode(text[start : start + _B64_CHUNK_CHARS], validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest(f"{field}: not valid base64; send {what} bytes base64-encoded, or an https URL") from None


def decode_base64(text: str, *, field: str, limits: Limits, what: str = "the .nii or .nii.gz file's") -> bytes:
    """The whole decoded payload (small files: 2D images)."""
    return b"".join(base64_chunks(text, field=field, limits=limits, what=what))


class CappedGunzip:
    """Streaming gzip decompression into a sink, refusing as soon as the output passes `limit` (gzip bombs)."""

    def __init__(self, sink: BinaryIO, *, field: str, limit: int) -> None:
        self.sink, self.field, self.limit = sink, field, limit
        self.written = 0
        self._decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)

    def feed(self, data: bytes | memoryview) -> None:
        if self._decompressor.eof:
            return  # trailing bytes after the gzip member are ignored, as gzip tools do
        try:
            piece = self._decompressor.decompress(data, self.limit + 1 - self.written)
            while True:
                self.sink.write(piece)
                self.written += len(piece)
                self._check_size()
                if not self._decompressor.unconsumed_tail:
                    break
                piece = self._decompressor.decompress(self._decompressor.unconsumed_tail, self.limit + 1 - self.written)
        except zlib.error:
            raise InvalidRequest(f"{self.field}: the gzip stream is corrupt; send an intact .nii.gz file") from None

    def _check_size(self) -> None:
        if self.written > self.limit:
            raise PayloadTooLarge(
                f"{self.field}: the decompressed file exceeds the limit of {self.limit} bytes (MEDSAM2_MAX_FILE_MB)"
            )

    def close(self) -> None:
        if not self._decompressor.eof:
            raise InvalidRequest(f"{self.field}: the gzip stream is truncated; send the whole .nii.gz file")


def gunzip_capped(data: bytes, *, field: str, limit: int) -> bytes:
    """Decompress a whole gzip payload in memory (small files: 2D images), capped at `limit` bytes."""
    sink = io.BytesIO()
    gunzip = CappedGunzip(sink, field=field, limit=limit)
    view = memoryview(data)
    for start in range(0, len(data), 1 << 20):
        gunzip.feed(view[start : start + (1 << 20)])
    gunzip.close()
    return sink.getvalue()


def _spool(chunks: Iterable[bytes | memoryview], handle: BinaryIO, *, field: str, limits: Limits,
           budget: Budget | None = None) -> None:
    """Write the file's bytes to `handle`, gunzipping when they start with the gzip magic; size-capped;
    the request's `budget` checked before each chunk (a 1 GB .nii.gz takes seconds to decompress)."""
    gunzip: CappedGunzip | None = None
    received = 0
    for number, chunk in enumerate(chunks):
        if budget is not None:
            budget.check(received, "bytes_decoded", advice="send a smaller file")
        received += len(chunk)
        if received > limits.max_file_bytes:
            raise PayloadTooLarge(f"{field}: the file exceeds the limit of {limits.max_file_bytes} bytes (MEDSAM2_MAX_FILE_MB)")
        if number == 0 and bytes(chunk[:2]) == GZIP_MAGIC:
            gunzip = CappedGunzip(handle, field=field, limit=limits.max_file_bytes)
        if gunzip is not None:
            gunzip.feed(chunk)
        else:
            handle.write(chunk)
    if gunzip is not None:
        gunzip.close()


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
        header = header_class.from_fileobj(io.BytesIO(raw[: header_class.sizeof_hdr]))
        return cast(nib.Nifti1Header, header)
    except TimeoutError:  # azmlinfsrv's SIGALRM, not a malformed header
        raise
    except Exception:
        raise InvalidRequest(f"{field}: the NIfTI header is malformed") from None


def _check_dims(header: nib.Nifti1Header, *, field: str, limits: Limits) -> tuple[int, int, int]:
    """The header's (X, Y, Z), refused when it is not one 3D volume within the per-volume limits."""
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
            f"{field}: slices of {spatial[0]}x{spatial[1]} exceed the limit of {limits.max_slice_pixels} pixels (MEDSAM2_MAX_SLICE_PIXELS)"
        )
    return spatial[0], spatial[1], spatial[2]


_HEAD_BYTES = 48 << 10  # enough of a file (or of its gzip stream) to hold the NIfTI-1/2 header


def base64_head(text: str) -> bytes | None:
    """The first few KB of a base64 payload, decoded (None when they are not valid base64: the full decode says why)."""
    prefix = _DATA_URL.match(text)
    head = "".join(text[prefix.end() if prefix else 0 :][: 2 * _HEAD_BYTES].split())
    head = head[: len(head) // 4 * 4][: _HEAD_BYTES // 3 * 4]
    try:
        return base64.b64decode(head, validate=True)
    except (binascii.Error, ValueError):
        return None


def peek_shape(head: bytes, *, field: str, limits: Limits) -> tuple[int, int, int] | None:
    """The volume's (X, Y, Z) from the first bytes of a .nii or .nii.gz file, checked against the per-volume
    limits, before any voxel is decoded. None when the head does not hold a whole NIfTI header (the full read
    then checks it); the request's total is summed from these (`io.limits.VoxelTally`)."""
    raw = head
    if head[:2] == GZIP_MAGIC:
        try:
            raw = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS).decompress(head, 540)
        except zlib.error:
            return None
    if len(raw) < 348:
        return None
    return _check_dims(_header(raw, field=field), field=field, limits=limits)


def check_header(raw: bytes | np.ndarray, *, field: str, limits: Limits) -> nib.Nifti1Header:
    """Validate dimensions, dtype and size from the header alone, before any voxel is read; the parsed header."""
    header = _header(raw, field=field)
    spatial = _check_dims(header, field=field, limits=limits)
    voxels = math.prod(spatial)
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
        voxels_raw = np.frombuffer(
            raw, dtype=dtype, count=voxels, offset=int(header.get_data_offset())
        )
        if not np.isfinite(voxels_raw).all():
            raise InvalidRequest(f"{field}: the volume contains NaN or infinite values; replace them before sending")
    return header


def _pieces(data: bytes | bytearray | memoryview, size: int = 4 << 20) -> Iterator[memoryview]:
    """A whole file's bytes in pieces, so decompression checks the budget (and the size cap) as it goes."""
    view = memoryview(data)
    for start in range(0, max(1, len(view)), size):
        yield view[start : start + size]


def read_nifti(data: bytes | Iterable[bytes], *, field: str, limits: Limits, budget: Budget | None = None) -> Volume:
    """Decode a .nii or .nii.gz (detected by content) into a Volume, checking limits before allocating.

    `data` is the file's bytes or an iterable of its chunks (`base64_chunks`). The file is spooled
    (a .nii.gz decompressed on the way) into a temporary file, checked through a read-only memory map
    and read from there (`_read_plain`, else SimpleITK with the array a view of its buffer), so the
    voxels are held in memory once. The request's `budget` is checked between chunks.
    """
    with tempfile.TemporaryDirectory(prefix="medsam2-") as tmp:
        path = Path(tmp) / "volume.nii"
        with open(path, "wb") as handle:
            _spool(_pieces(data) if isinstance(data, (bytes, bytearray, memoryview)) else data, handle, field=field,
                   limits=limits, budget=budget)
        if path.stat().st_size == 0:
            raise UnsupportedMedia(f"{field}: not a NIfTI file (it is empty); send a .nii or .nii.gz volume")
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        try:
            header = check_header(raw, field=field, limits=limits)
        finally:
            del raw
        volume = _read_plain(path, header, field=field)
        if volume is not None:
            return volume
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError:
            raise InvalidRequest(f"{field}: SimpleITK could not read the NIfTI file; check that it is a valid volume") from None
    if image.GetDimension() == 4:
        size = list(image.GetSize())
        image = sitk.Extract(image, size[:3] + [0], [0, 0, 0, 0])
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise UnsupportedMedia(f"{field}: vector or RGB voxels are not supported; send a scalar volume")
    _check_geometry(image, field=field)
    return Volume.from_sitk(image)


def _check_geometry(image: sitk.Image | sitk.ImageFileReader, *, field: str) -> None:
    geometry = (*image.GetSpacing(), *image.GetOrigin(), *image.GetDirection())  # type: ignore[no-untyped-call]
    if not all(math.isfinite(v) for v in geometry):
        raise InvalidRequest(
            f"{field}: the NIfTI geometry (spacing, origin or direction from pixdim/qform/sform) has NaN or "
            "infinite values; fix the header"
        )


def _read_plain(path: Path, header: nib.Nifti1Header, *, field: str) -> Volume | None:
    """The common case read with one copy: a 3D scalar volume, native byte order, no intensity scaling.

    SimpleITK's reader holds the voxels twice while reading (its NIfTI buffer, then the image), so
    here SimpleITK reads only the geometry and numpy reads the voxels: NIfTI stores x fastest, which
    is SimpleITK's (z, y, x) array order (orientation lives in the direction matrix, the voxels are
    never reordered). Anything else (4D, scaled, big-endian, a pixel type SimpleITK would map
    differently) returns None and goes through SimpleITK whole; tests compare both readers.
    """
    dtype = header.get_data_dtype()
    slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
    unscaled = (slope in (0.0, 1.0) or math.isnan(slope)) and (inter == 0.0 or math.isnan(inter))
    if len(header.get_data_shape()) != 3 or not unscaled or not dtype.isnative:
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None  # let the full read report it
    if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
        return None
    if sitk.GetArrayViewFromImage(sitk.Image([1, 1, 1], reader.GetPixelID())).dtype != dtype:
        return None
    _check_geometry(reader, field=field)
    x, y, z = (int(v) for v in header.get_data_shape())
    array = np.fromfile(
        path, dtype=dtype, count=x * y * z, offset=int(header.get_data_offset())
    ).reshape(z, y, x)
    return Volume(
        array=array,
        spacing=cast(_XYZ, tuple(float(v) for v in reader.GetSpacing())),
        origin=cast(_XYZ, tuple(float(v) for v in reader.GetOrigin())),
        direction=tuple(float(v) for v in reader.GetDirection()),
    )


def write_nifti(image: sitk.Image, *, compressed: bool = True) -> bytes:
    """Serialise a SimpleITK image as .nii.gz (or .nii) bytes."""
    with tempfile.TemporaryDirectory(prefix="medsam2-") as tmp:
        path = Path(tmp) / ("mask.nii.gz" if compressed else "mask.nii")
        sitk.WriteImage(image, str(path), useCompression=compressed)
        return path.read_bytes()
