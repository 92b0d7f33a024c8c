"""The Python and command-line client of the /score route: `segment()`, `segment_2d()`,
`medsam2-endpoint predict` and `predict-2d`.

Needs no model and no torch: reads volumes (NIfTI or a DICOM series), posts them, decodes the mask.
"""

from medsam2_endpoint.client.segment import ObjectPrompt, SegmentationResult, read_volume, segment
from medsam2_endpoint.client.segment2d import Segmentation2DResult, segment_2d
from medsam2_endpoint.client.transport import ClientError, EndpointError

__all__ = ["ClientError", "EndpointError", "ObjectPrompt", "Segmentation2DResult", "SegmentationResult", "read_volume", "segment",
           "segment_2d"]
