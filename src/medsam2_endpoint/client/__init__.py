"""The Python and command-line client of the /score route: `segment()`, `segment_2d()`,
`medsam2-endpoint predict` and `predict-2d`.

Needs no model and no torch: reads volumes (NIfTI or a DICOM series), posts them, decodes the mask.
Modules: segment.py and segment2d.py (the library), files.py (volumes and DICOM series), prompts.py (objects,
prompt files, earlier masks), presets.py (windows), transport.py (HTTP), preview.py (PNGs), cli.py (the commands).
"""

from medsam2_endpoint.client.files import read_volume
from medsam2_endpoint.client.prompts import ObjectPrompt
from medsam2_endpoint.client.segment import DicomWebSeries, SegmentationResult, segment
from medsam2_endpoint.client.segment2d import Segmentation2DResult, segment_2d
from medsam2_endpoint.client.transport import ClientError, EndpointError

__all__ = ["ClientError", "DicomWebSeries", "EndpointError", "ObjectPrompt", "Segmentation2DResult", "SegmentationResult",
           "read_volume", "segment", "segment_2d"]
