"""The 3D route's PACS hook: an item's `dicomweb` series in (a `Volume`, slices in position order), its mask
stored back as a DICOM SEG into the series' study (`store_seg`). The Service calls `load` and `answer`; the
DICOMweb work is io/dicomweb.py's.

A store that fails does not fail the request: the mask is answered and `metadata.dicom_seg.error` names what
the PACS said (`pacs_status`: its HTTP status, where it answered), so the user keeps the work the model did.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medsam2_endpoint import __version__
from medsam2_endpoint.base.budget import Budget
from medsam2_endpoint.contract.score3d import VolumeItem
from medsam2_endpoint.core.settings import Settings
from medsam2_endpoint.io.dicom_seg import Algorithm, Segment, read_series
from medsam2_endpoint.io.dicomweb import DicomwebPolicy, DicomwebSeries, SeriesRef, read_dicomweb, store_seg
from medsam2_endpoint.io.limits import VoxelTally
from medsam2_endpoint.io.volume import Volume, read_nifti, write_nifti


def load(item: VolumeItem, settings: Settings, budget: Budget, tally: VoxelTally | None = None) -> tuple[Volume, DicomwebSeries]:
    """The item's series as a volume (z = position order), and the series (its files kept only for a SEG to store)."""
    source = item.dicomweb
    if source is None:
        raise ValueError("pacs.load needs an item with dicomweb")
    field, limits = item.field("dicomweb"), settings.limits
    series = read_dicomweb(SeriesRef(source.url, source.study, source.series), settings.dicomweb, field=field, limits=limits,
                           budget=budget, tally=tally)
    try:
        # through NIfTI bytes, as a series folder in the batch endpoint: the same checks as a file (dtype, finite voxels)
        volume = read_nifti(write_nifti(read_series(series.files, limits=limits)), field=field, limits=limits, budget=budget)
    except BaseException:
        series.close()
        raise
    if not item.store_seg:
        series.close()
    return volume, series


def answer(series: DicomwebSeries, item: VolumeItem, mask: np.ndarray, model: dict[str, Any], policy: DicomwebPolicy,
           budget: Budget) -> dict[str, Any]:
    """The metadata a dicomweb item adds: where its slices came from (in z order) and, with store_seg, the stored SEG."""
    extra: dict[str, Any] = {"source": {"dicomweb": {
        "study": series.ref.study, "series": series.ref.series, "instances": list(series.instances),
        "slice_order": "mask z and key_slice_idx index these instances, sorted by position along the slice normal",
    }}}
    if item.store_seg:
        try:
            if item.multi_object:
                labels, segments = mask, [Segment(o.id, f"object {o.id}") for o in item.objects]
            else:  # one object: the mask is 0/1 whatever its id
                labels, segments = (mask != 0).astype(np.uint8), [Segment(1, f"object {item.objects[0].id}")]
            algorithm = Algorithm(str(model.get("name", "medsam2-endpoint")), __version__, model.get("sha256"))
            extra["dicom_seg"] = store_seg(series, labels, segments, algorithm, policy, field=item.field("dicomweb"), budget=budget)
        finally:
            series.close()
    return extra
