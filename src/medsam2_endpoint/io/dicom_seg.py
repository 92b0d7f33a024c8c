"""DICOM in, DICOM Segmentation out: a series folder's files in slice order, and a label map written as a
DICOM SEG object (highdicom) that references that series.

Slice order is GDCM's (SimpleITK's ImageSeriesReader), so `labels[z]` belongs to `files[z]`, the same
z the volume sent to the model had. The SEG shares the series' Frame of Reference and Study, holds one
segment per object (its label, and an algorithm identification naming the model, its version and the
checkpoint's sha256), and one frame per source slice that has that object (empty frames are left out,
as highdicom does by default).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, cast

import numpy as np
import SimpleITK as sitk

from medsam2_endpoint.base.errors import InvalidRequest, PayloadTooLarge, UnsupportedMedia
from medsam2_endpoint.io.limits import Limits
from medsam2_endpoint.io.volume import LabelMap

SEG_SUFFIX = ".dcm"


@dataclass(frozen=True)
class Segment:
    """One object of a label map: its value there (1..65535) and the label the SEG gives it."""

    value: int
    label: str


@dataclass(frozen=True)
class Algorithm:
    """What made the masks, for the SEG's Segment Algorithm Identification."""

    name: str
    version: str
    sha256: str | None = None


def series_files(folder: Path, *, series_uid: str | None = None) -> list[Path]:
    """The files of one DICOM series of `folder` in GDCM's slice order (the volume's z order)."""
    uids = cast("tuple[str, ...]", sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    if not uids:
        raise UnsupportedMedia(f"{folder.name}: no DICOM series found in this folder")
    if series_uid is None and len(uids) > 1:
        raise InvalidRequest(f"{folder.name}: {len(uids)} DICOM series ({', '.join(uids)}); name one (series_uid)")
    uid = series_uid or uids[0]
    if uid not in uids:
        raise InvalidRequest(f"{folder.name}: no DICOM series {uid}; found {', '.join(uids)}")
    return [Path(p) for p in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)]


def read_series(files: Sequence[Path], *, limits: Limits | None = None) -> sitk.Image:
    """The series' volume (rescale slope/intercept applied), slices in the order given. With `limits`, the
    size (files x the first file's rows x columns) is checked from the header before any pixel is read."""
    if limits is not None:
        header = sitk.ImageFileReader()
        header.SetFileName(str(files[0]))
        try:
            header.ReadImageInformation()
        except RuntimeError:
            raise UnsupportedMedia(f"{files[0].name}: not a readable DICOM file") from None
        width, height = header.GetSize()[:2]
        voxels = width * height * len(files)
        if voxels > limits.max_voxels:
            raise PayloadTooLarge(f"{files[0].parent.name}: the series {[width, height, len(files)]} has {voxels} voxels, "
                                  f"over the limit of {limits.max_voxels} (MEDSAM2_MAX_VOXELS)")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in files])
    try:
        return cast(sitk.Image, reader.Execute())
    except RuntimeError as exc:
        raise UnsupportedMedia(f"{files[0].parent.name}: cannot read the DICOM series: {str(exc).strip().splitlines()[-1]}") from None


def _with_uids(sources: list[Any]) -> list[Any]:
    """The datasets with the UIDs a SEG must reference. De-identified exports (as the TotalSegmentator test
    series) may leave SOP Class/Instance UIDs empty in the data set while the file meta keeps them: those
    are taken from the file meta. Missing Study/Series Instance and Frame of Reference UIDs are derived
    from the instances' own UIDs (pydicom's generate_uid over them), so the same series always gets the
    same ones (and the SEG shares them)."""
    from pydicom.uid import generate_uid

    for ds in sources:
        meta = getattr(ds, "file_meta", None)
        if not ds.get("SOPClassUID") and meta is not None and meta.get("MediaStorageSOPClassUID"):
            ds.SOPClassUID = meta.MediaStorageSOPClassUID
        if not ds.get("SOPInstanceUID") and meta is not None and meta.get("MediaStorageSOPInstanceUID"):
            ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        if not ds.get("SOPClassUID") or not ds.get("SOPInstanceUID"):
            raise UnsupportedMedia("a DICOM file of the series has no SOP Class/Instance UID; a SEG cannot reference it")
    instances = [str(ds.SOPInstanceUID) for ds in sources]
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        if not all(ds.get(keyword) for ds in sources):
            derived = generate_uid(entropy_srcs=[keyword, *instances])
            for ds in sources:
                setattr(ds, keyword, derived)
    return sources


def write_dicom_seg(label_map: LabelMap | np.ndarray, source_files: Sequence[Path], segments: Sequence[Segment], algorithm: Algorithm,
                    *, series_description: str = "MedSAM2 segmentation") -> bytes:
    """A DICOM SEG (binary, one segment per object) of a (Z, Y, X) label map over the series `source_files`.

    `labels[z]` lies on `source_files[z]`; each segment's pixels are those equal to its `value`. The SEG's
    geometry is the source images' (a LabelMap's own geometry came from the same series).
    """
    labels = label_map.array if isinstance(label_map, LabelMap) else label_map
    import highdicom as hd  # loaded only when a SEG is written
    import pydicom
    from pydicom.sr.codedict import codes

    if labels.ndim != 3 or labels.shape[0] != len(source_files):
        raise InvalidRequest(f"the mask has {labels.shape[0] if labels.ndim == 3 else '?'} slices, the series {len(source_files)} files")
    if not segments:
        raise InvalidRequest("no segments to write; give at least one object")
    sources = _with_uids([pydicom.dcmread(str(p)) for p in source_files])
    rows, columns = int(sources[0].Rows), int(sources[0].Columns)
    if labels.shape[1:] != (rows, columns):
        raise InvalidRequest(f"the mask's slices are {labels.shape[2]} x {labels.shape[1]}, the series' {columns} x {rows}")
    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm.name, version=algorithm.version, family=codes.cid7162.ArtificialIntelligence,
        parameters={"sha256": algorithm.sha256} if algorithm.sha256 else None,
    )
    # SEG segment numbers run 1..n; objects keep their order (and their own ids in the labels)
    numbered = np.zeros(labels.shape, dtype=np.uint16 if len(segments) > 255 else np.uint8)
    descriptions = []
    for number, segment in enumerate(segments, start=1):
        numbered[labels == segment.value] = number
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=segment.label[:64],
            segmented_property_category=codes.cid7150.Tissue, segmented_property_type=codes.cid7166.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,  # prompted by a person's box
            algorithm_identification=identification, tracking_uid=hd.UID(), tracking_id=f"object {segment.value}",
        ))
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=numbered, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=hd.UID(),
            series_number=int(sources[0].get("SeriesNumber") or 0) + 1000, sop_instance_uid=hd.UID(), instance_number=1,
            manufacturer="medsam2-endpoint", manufacturer_model_name=algorithm.name, software_versions=algorithm.version,
            device_serial_number="none", series_description=series_description[:64],
        )
    except ValueError as exc:  # highdicom's checks of the source images (geometry, IOD attributes)
        raise UnsupportedMedia(f"cannot write a DICOM SEG over this series: {exc}") from None
    out = BytesIO()
    seg.save_as(out)
    return out.getvalue()
