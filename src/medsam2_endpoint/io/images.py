"""All 2D image decoding: bytes (base64, fetched, uploaded) in, `Picture` out; then 8-bit RGB for the models.

Formats, detected by content (never by name): PNG (8 or 16 bits, grey, grey+alpha, palette, RGB,
RGBA), JPEG, TIFF (one page; 8/16/32-bit integer or float; any number of channels) and 2D NIfTI
(`.nii`/`.nii.gz` whose size is 1 in every dimension but two). The pixel count is checked from the
header before any pixel is decoded (decompression bombs stop there): at most
`Limits.max_slice_pixels` (MEDSAM2_MAX_SLICE_PIXELS).

Arrays are (H, W) or (H, W, C), row-major: pixels[y, x], x the column. NIfTI keeps the 3D route's
convention (SimpleITK's GetArrayFromImage), so a 2D NIfTI slice is oriented as `array[z]` of a volume.

Conversion to the models' 8-bit RGB (`to_rgb_u8`), documented in the README:
- channels: 1 -> grey copied to R, G and B; 2 (grey + alpha) -> grey; 3 -> RGB; 4 (RGBA) -> RGB
  (alpha ignored, not composited); more than 4 -> the first three channels as R, G, B.
- intensities: with a window [lo, hi]: clip, then min-max scale the clipped values to 0..255
  (truncation), the 3D route's arithmetic. Without one: uint8 pixels are used as they are; any other
  type (16-bit, 32-bit, float) is min-max scaled over the whole image.
"""

from __future__ import annotations

import io
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import cv2
import nibabel as nib
import numpy as np
import SimpleITK as sitk
from PIL import Image, UnidentifiedImageError

from medsam2_endpoint.base.errors import InvalidRequest, PayloadTooLarge, UnsupportedMedia
from medsam2_endpoint.io.limits import Limits
from medsam2_endpoint.io.volume import GZIP_MAGIC, gunzip_capped

_PNG = b"\x89PNG\r\n\x1a\n"
_TIFF = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_KINDS = "a PNG, JPEG, TIFF or 2D NIfTI image"
IMAGE_FILE = f"{_KINDS} file's"  # completes base64 errors: "send <IMAGE_FILE> bytes base64-encoded"


@dataclass(frozen=True)
class Picture:
    """Decoded pixels in the file's dtype: (H, W) or (H, W, C)."""

    pixels: np.ndarray
    format: str  # "png", "jpeg", "tiff" or "nifti"

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def channels(self) -> int:
        return 1 if self.pixels.ndim == 2 else int(self.pixels.shape[2])


def check_pixels(width: int, height: int, *, field: str, limits: Limits) -> None:
    if width <= 0 or height <= 0:
        raise InvalidRequest(f"{field}: the image has no pixels ({width} x {height})")
    if width * height > limits.max_slice_pixels:
        raise PayloadTooLarge(
            f"{field}: the image of {width} x {height} pixels exceeds the limit of {limits.max_slice_pixels} "
            "pixels (MEDSAM2_MAX_SLICE_PIXELS); send a smaller field of view or a downsampled image"
        )


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from an image file's header alone, no pixel decoded; None when the header does not
    say (2D NIfTI, unknown or corrupt content: `read_picture` then checks and reports)."""
    if data[:8] == _PNG:
        return (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) if len(data) >= 24 else None
    if data[:3] == b"\xff\xd8\xff" or data[:4] in _TIFF:
        try:
            with Image.open(io.BytesIO(data)) as image:  # lazy: reads the header only
                return int(image.width), int(image.height)
        except TimeoutError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
            return None
    return None


def read_picture(data: bytes, *, field: str, limits: Limits) -> Picture:
    """Decode image file bytes (format detected by content), checking the pixel count first."""
    if data[:8] == _PNG:
        return _read_png(data, field=field, limits=limits)
    if data[:3] == b"\xff\xd8\xff":
        return Picture(_read_pillow(data, field=field, limits=limits), "jpeg")
    if data[:4] in _TIFF:
        return Picture(_read_sitk(data, ".tif", field=field, limits=limits), "tiff")
    if data[:2] == GZIP_MAGIC or data[344:348] in (b"n+1\x00",) or data[4:8] == b"n+2\x00":
        return Picture(_read_nifti(data, field=field, limits=limits), "nifti")
    raise UnsupportedMedia(f"{field}: not {_KINDS} (unrecognised content); QuPath sends PNG")


def _read_png(data: bytes, *, field: str, limits: Limits) -> Picture:
    # IHDR: width, height, bit depth, colour type. Pillow reads 16-bit colour PNGs as 8-bit, so those go to OpenCV.
    if len(data) < 33:
        raise InvalidRequest(f"{field}: the PNG file is truncated")
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    bit_depth, colour_type = data[24], data[25]
    check_pixels(width, height, field=field, limits=limits)
    if bit_depth == 16 and colour_type in (2, 6):
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if decoded is None or decoded.ndim != 3:
            raise InvalidRequest(f"{field}: the 16-bit PNG could not be decoded (truncated or corrupt)")
        code = cv2.COLOR_BGRA2RGBA if decoded.shape[2] == 4 else cv2.COLOR_BGR2RGB
        return Picture(cv2.cvtColor(decoded, code), "png")
    return Picture(_read_pillow(data, field=field, limits=limits), "png")


def _read_pillow(data: bytes, *, field: str, limits: Limits) -> np.ndarray:
    """PNG or JPEG through Pillow: the size is read lazily from the header, checked, then decoded."""
    try:
        image: Image.Image = Image.open(io.BytesIO(data))
        check_pixels(image.width, image.height, field=field, limits=limits)
        frames = getattr(image, "n_frames", 1)
        if frames > 1:
            raise InvalidRequest(f"{field}: animated image with {frames} frames; send a single image")
        image.load()
    except TimeoutError:  # azmlinfsrv's SIGALRM (an OSError): answered as a deadline, not as a corrupt image
        raise
    except Image.DecompressionBombError:
        raise PayloadTooLarge(f"{field}: the image declares more pixels than the limit allows") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        raise InvalidRequest(f"{field}: the image could not be decoded (truncated or corrupt)") from None
    mode = image.mode
    if mode == "1":
        image = image.convert("L")
    elif mode in ("P", "PA"):
        image = image.convert("RGBA")  # expand the palette; alpha is dropped later like any alpha
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")
    elif mode in ("RGBa", "La"):
        image = image.convert(mode.upper())  # premultiplied alpha -> straight colours
    return np.asarray(image)


def _read_sitk(data: bytes, suffix: str, *, field: str, limits: Limits) -> np.ndarray:
    """TIFF (or NIfTI) through SimpleITK: any channel count, 16/32-bit and float; header checked first."""
    with tempfile.TemporaryDirectory(prefix="medsam2-2d-") as tmp:
        path = Path(tmp) / f"image{suffix}"
        path.write_bytes(data)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            raise InvalidRequest(f"{field}: the file could not be read (truncated or corrupt)") from None
        size = list(reader.GetSize())
        extra = [s for s in size[2:] if s != 1]
        if extra:
            raise InvalidRequest(
                f"{field}: the image has size {size} (pages or slices beyond the first two dimensions); "
                "send one 2D image (for volumes use nii_image, the 3D route)"
            )
        check_pixels(size[0], size[1] if len(size) > 1 else 1, field=field, limits=limits)
        try:
            image = reader.Execute()
        except RuntimeError:
            raise InvalidRequest(f"{field}: the file could not be decoded (truncated or corrupt)") from None
    array = sitk.GetArrayFromImage(image)
    if image.GetNumberOfComponentsPerPixel() == 1:
        return array.reshape(size[1], size[0])
    return array.reshape(size[1], size[0], image.GetNumberOfComponentsPerPixel())


def _read_nifti(data: bytes, *, field: str, limits: Limits) -> np.ndarray:
    raw = gunzip_capped(data, field=field, limit=limits.max_file_bytes) if data[:2] == GZIP_MAGIC else data
    if len(raw) >= 348 and raw[344:348] == b"n+1\x00":
        header_class = nib.Nifti1Header
    elif len(raw) >= 540 and raw[4:8] == b"n+2\x00":
        header_class = nib.Nifti2Header
    else:
        raise UnsupportedMedia(f"{field}: not {_KINDS} (gzip without a NIfTI file inside)")
    try:
        header = header_class.from_fileobj(io.BytesIO(raw[: header_class.sizeof_hdr]))
    except TimeoutError:  # azmlinfsrv's SIGALRM, not a malformed header
        raise
    except Exception:
        raise InvalidRequest(f"{field}: the NIfTI header is malformed") from None
    shape = [int(v) for v in header.get_data_shape()]
    if len(shape) < 2 or any(v <= 0 for v in shape):
        raise InvalidRequest(f"{field}: the NIfTI image has the shape {shape}; the 2D route needs X x Y pixels")
    if any(v != 1 for v in shape[2:]):
        raise InvalidRequest(
            f"{field}: the NIfTI image {shape} is not 2D; send one slice (size 1 beyond X and Y), or use nii_image (3D route)"
        )
    check_pixels(shape[0], shape[1], field=field, limits=limits)
    dtype = header.get_data_dtype()
    needed = int(header.get_data_offset()) + math.prod(shape) * dtype.itemsize
    if len(raw) < needed:
        raise InvalidRequest(f"{field}: the NIfTI file is truncated ({len(raw)} bytes, the header needs {needed})")
    if dtype.fields is None and dtype.kind == "f":
        values = np.frombuffer(raw, dtype=dtype, count=math.prod(shape), offset=int(header.get_data_offset()))
        if not np.isfinite(values).all():
            raise InvalidRequest(f"{field}: the image contains NaN or infinite values; replace them before sending")
    return _read_sitk(raw, ".nii", field=field, limits=limits)


def _scale(values: np.ndarray, window: tuple[float, float] | None, *, field: str) -> np.ndarray:
    """Window (clip, then min-max of the clipped values) or min-max, to uint8 by truncation."""
    if window is None and values.dtype == np.uint8:
        return values
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise InvalidRequest(f"{field}: the image contains NaN or infinite values; replace them before sending")
    data = values.astype(np.float64)
    if window is not None:
        data = np.clip(data, window[0], window[1])
    low, high = float(data.min()), float(data.max())
    if high == low:
        where = f"inside the window [{window[0]}, {window[1]}]" if window is not None else f"({values.dtype} pixels, no window)"
        raise InvalidRequest(
            f"{field}: the image is constant {where} (every pixel is {low}), so it cannot be scaled to 8 bits; "
            "choose a window that covers the image's intensities"
        )
    return cast(np.ndarray, np.uint8((data - low) / (high - low) * 255.0))


def to_rgb_u8(picture: Picture, window: tuple[float, float] | None = None, *, field: str = "image") -> np.ndarray:
    """uint8 (H, W, 3) RGB for the models; see the module docstring for the conversion rules."""
    pixels = picture.pixels
    if pixels.dtype == np.bool_:
        pixels = pixels.astype(np.uint8) * 255
    if pixels.ndim == 2:
        grey = _scale(pixels, window, field=field)
        return np.repeat(grey[:, :, None], 3, axis=2)
    channels = pixels.shape[2]
    if channels <= 2:
        grey = _scale(pixels[:, :, 0], window, field=field)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.array(_scale(pixels[:, :, :3], window, field=field), dtype=np.uint8, order="C")  # a writable copy


def to_grey_u8(rgb: np.ndarray) -> np.ndarray:
    """uint8 (H, W) luma of an RGB image (ITU-R 601, Pillow's "L"): a grey image comes back unchanged."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).convert("L"))
