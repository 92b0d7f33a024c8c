"""Write the corpus of nasty input files (tests/corpus/*) and expected.json, the answer each must get.

    .venv/bin/python tests/corpus/make_corpus.py

Every file is posted as `nii_image` (base64) by tests/test_limits_server.py to the real server, which runs
with MEDSAM2_MAX_FILE_MB=16 (so the gzip bomb stays small) and the other limits at their defaults.
Output is reproducible (gzip without timestamps, fixed seeds). Each file is a few KB at most.
"""

from __future__ import annotations

import gzip
import io
import json
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

HERE = Path(__file__).resolve().parent
OFFSET_VOX = 108  # byte offsets in the NIfTI-1 header
OFFSET_DIM0 = 40
OFFSET_DATATYPE = 70
OFFSET_QFORM_CODE, OFFSET_SFORM_CODE, OFFSET_SROW_X = 252, 254, 280


def _nii(array_xyz: np.ndarray, dtype: str | None = None) -> bytes:
    """Uncompressed single-file NIfTI-1 of an (x, y, z, ...) array, identity affine."""
    return nib.Nifti1Image(array_xyz, np.eye(4), dtype=dtype or array_xyz.dtype).to_bytes()


def _gz(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _phantom(shape=(16, 16, 4), dtype="int16") -> np.ndarray:
    array = np.zeros(shape, dtype=dtype)
    array[: shape[0] // 2, : shape[1] // 2 + 1] = 100
    return array


def _patched(data: bytes, offset: int, fmt: str, *values) -> bytes:
    raw = bytearray(data)
    struct.pack_into(fmt, raw, offset, *values)
    return bytes(raw)


def header_only(shape: tuple[int, ...], dtype: str = "int16") -> bytes:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    return header.binaryblock + b"\0" * 4  # no voxels: must be refused from the header alone


def jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.tile(np.arange(16, dtype=np.uint8) * 16, (16, 1))).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def nan_volume() -> bytes:
    """float32 with one NaN voxel; SimpleITK writes it as is (nibabel may rescale it away)."""
    import SimpleITK as sitk

    array = np.ones((4, 8, 8), np.float32)
    array[1, 2, 3] = np.nan
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "nan.nii"
        sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
        return _gz(path.read_bytes())


def gzip_bomb() -> bytes:
    """A valid header for 512 x 512 x 64 int16 (32 MiB of zeros) that gzip squeezes to ~32 KB."""
    header = nib.Nifti1Header()
    header.set_data_shape((512, 512, 64))
    header.set_data_dtype("int16")
    header["vox_offset"] = 352
    stream = io.BytesIO()
    with gzip.GzipFile(fileobj=stream, mode="wb", compresslevel=9, mtime=0) as out:
        out.write(header.binaryblock + b"\0" * 4)
        zeros = b"\0" * (1 << 20)
        for _ in range(32):
            out.write(zeros)
    return stream.getvalue()


def two_file_header() -> bytes:
    """The .hdr of a two-file NIfTI pair (magic ni1): the voxels would live in a separate .img."""
    image = nib.Nifti1Pair(_phantom(), np.eye(4))
    return image.header.binaryblock


# name -> (builder, expected status, fragment of the error message; None: still a bug, see `known_bug`)
CORPUS: dict[str, tuple[Callable[[], bytes], int, str]] = {
    "truncated.nii.gz": (lambda: _half(_gz(_nii(_phantom()))), 400, "truncated"),
    "truncated_voxels.nii": (lambda: _nii(_phantom())[:-200], 400, "truncated"),
    "jpeg_as_nifti.nii": (jpeg, 415, "not a NIfTI file"),
    "text.nii": (lambda: b"this is not a NIfTI file, just text\n" * 20, 415, "not a NIfTI file"),
    "empty.nii": (lambda: b"", 415, "not a NIfTI file"),
    "gzip_of_gzip.nii.gz": (lambda: _gz(_gz(_nii(_phantom()))), 415, "not a NIfTI file"),
    "two_d.nii": (lambda: _nii(_phantom((16, 16))), 400, "2D"),
    "four_d_three_volumes.nii": (lambda: _nii(_phantom((8, 8, 8, 3))), 400, "extra dimensions"),
    "header_30000_cubed.nii": (lambda: header_only((30000, 30000, 30000)), 413, "MEDSAM2_MAX_VOXELS"),
    "header_slice_3000x3000.nii": (lambda: header_only((3000, 3000, 1)), 413, "pixels"),
    "gzip_bomb.nii.gz": (gzip_bomb, 413, "MEDSAM2_MAX_FILE_MB"),
    "nan.nii.gz": (nan_volume, 400, "NaN"),
    "two_file_header.hdr": (two_file_header, 415, "two-file"),
    "complex64.nii": (lambda: _nii(_phantom(dtype="complex64")), 415, "voxel type"),
    "int64.nii": (lambda: _nii(_phantom(dtype="int64"), dtype="int64"), 415, "voxel type"),
    "rgb24.nii": (lambda: _patched(_nii(_phantom(dtype="uint8")), OFFSET_DATATYPE, "<h", 128), 415, "voxel type"),
    "bad_dim0.nii": (lambda: _patched(_nii(_phantom()), OFFSET_DIM0, "<h", 9), 400, "malformed"),
    "unknown_datatype.nii": (lambda: _patched(_nii(_phantom()), OFFSET_DATATYPE, "<h", 999), 400, "malformed"),
    "vox_offset_nan.nii": (lambda: _patched(_nii(_phantom()), OFFSET_VOX, "<f", float("nan")), 400, "vox_offset"),
    "vox_offset_huge.nii": (lambda: _patched(_nii(_phantom()), OFFSET_VOX, "<f", 1e9), 400, "truncated"),
    "nan_geometry.nii": (
        lambda: _patched(
            _patched(_nii(_phantom()), OFFSET_QFORM_CODE, "<hh", 0, 1), OFFSET_SROW_X, "<4f", 1.0, 0.0, 0.0, float("nan")
        ),
        400,
        "geometry",
    ),
    "constant.nii.gz": (lambda: _gz(_nii(np.full((16, 16, 4), 7, np.int16))), 400, "constant"),
}
#: Files that still get a 500 (reported, not fixed: the code is not this test's to change). Status 0 = any 4xx or 200.
KNOWN_BUGS: dict[str, str] = {}


def main() -> None:
    expected = {}
    for name, (build, status, fragment) in CORPUS.items():
        data = build()
        (HERE / name).write_bytes(data)
        expected[name] = {"status": status, "contains": fragment, "bytes": len(data), "known_bug": KNOWN_BUGS.get(name)}
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(f"wrote {len(expected)} files to {HERE}")


if __name__ == "__main__":
    main()
