"""DICOM SEG out (io/dicom_seg.py) on the real CT series: read back with highdicom and pydicom, every frame
lies on the source slice it names, and its pixels equal the NIfTI label map's slice."""

from __future__ import annotations

import os
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from dicom_checks import iod_errors
from medsam2_endpoint.base.errors import InvalidRequest
from medsam2_endpoint.io.dicom_seg import Algorithm, Segment, read_series, series_files, write_dicom_seg

# as test_quality.py; a worktree beside the checkout points at the data with MEDSAM2_TEST_REAL_DATA
REAL = Path(os.environ.get("MEDSAM2_TEST_REAL_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data" / "real")
CT_DICOM = REAL / "ct_dicom"
LABELS = CT_DICOM.with_name("ct_dicom_labels.nii.gz")
pytestmark = pytest.mark.skipif(not CT_DICOM.is_dir(), reason="the real CT series is not on this machine")


def read_back(data: bytes, tmp_path: Path) -> tuple[hd.seg.Segmentation, dict[tuple[str, int], np.ndarray]]:
    """The SEG and its frames keyed by (referenced source SOP Instance UID, segment number), from the
    per-frame functional groups (what a viewer reads), not from our own writer's bookkeeping."""
    path = tmp_path / "seg.dcm"
    path.write_bytes(data)
    seg = hd.seg.segread(path)
    pixels = pydicom.dcmread(path).pixel_array.reshape(-1, seg.Rows, seg.Columns)
    shared = seg.SharedFunctionalGroupsSequence[0]
    frames = {}
    for i, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        source = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        identification = group if "SegmentIdentificationSequence" in group else shared  # shared when one segment
        number = int(identification.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        frames[(str(source), number)] = pixels[i].astype(bool)
    return seg, frames


def instance_uid(path: Path) -> str:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.get("SOPInstanceUID") or ds.file_meta.MediaStorageSOPInstanceUID)


def test_seg_round_trip_on_the_real_series(tmp_path):
    files = series_files(CT_DICOM)
    image = read_series(files)
    reference = sitk.ReadImage(str(LABELS))
    assert reference.GetSize() == image.GetSize()
    labels = sitk.GetArrayFromImage(reference)
    objects = np.zeros(labels.shape, np.uint16)
    objects[labels == 5] = 3  # liver as object id 3, stomach as 9: SEG segments renumber them 1, 2
    objects[labels == 6] = 9
    nifti = tmp_path / "mask.nii.gz"
    mask_image = sitk.GetImageFromArray(objects)
    mask_image.CopyInformation(image)
    sitk.WriteImage(mask_image, str(nifti))
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(nifti)))
    sha = "0123456789abcdef" * 4

    data = write_dicom_seg(mask, files, [Segment(3, "liver"), Segment(9, "stomach")], Algorithm("lite-medsam", "0.1.0", sha))
    seg, frames = read_back(data, tmp_path)

    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert seg.Modality == "SEG" and seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "stomach"]
    for s in seg.SegmentSequence:
        (algorithm,) = s.SegmentationAlgorithmIdentificationSequence
        assert algorithm.AlgorithmName == "lite-medsam" and sha in algorithm.AlgorithmParameters
    referenced = {str(r.ReferencedSOPInstanceUID) for series in seg.ReferencedSeriesSequence
                  for r in series.ReferencedInstanceSequence}
    assert referenced == {instance_uid(f) for f in files}
    for z, path in enumerate(files):
        uid = instance_uid(path)
        for number, value in ((1, 3), (2, 9)):
            expected = mask[z] == value
            got = frames.get((uid, number))
            if got is None:
                assert not expected.any(), f"slice {z} has object {value} but no frame"
            else:
                np.testing.assert_array_equal(got, expected)
        position = [float(v) for v in pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient]
        assert np.allclose(position, image.TransformIndexToPhysicalPoint((0, 0, z)), atol=1e-3)
    assert len(frames) == sum(int((mask[z] == v).any()) for z in range(mask.shape[0]) for v in (3, 9))
    assert iod_errors(tmp_path / "seg.dcm") == []  # David Clunie's validator: no IOD violation


def test_series_size_is_checked_before_reading():
    from medsam2_endpoint.base.errors import PayloadTooLarge
    from medsam2_endpoint.io.limits import Limits

    files = series_files(CT_DICOM)
    with pytest.raises(PayloadTooLarge, match=r"the series \[512, 512, 20\] has 5242880 voxels, over the limit of 1000000"):
        read_series(files, limits=Limits(max_voxels=1_000_000))
    assert read_series(files, limits=Limits()).GetSize() == (512, 512, 20)


def test_seg_refuses_a_mask_of_another_shape(tmp_path):
    files = series_files(CT_DICOM)
    with pytest.raises(InvalidRequest, match="the mask has 3 slices, the series 20 files"):
        write_dicom_seg(np.zeros((3, 512, 512), np.uint8), files, [Segment(1, "x")], Algorithm("m", "1"))
