"""The Python and command-line client of the /score route: `segment()`, `medsam2-endpoint predict`.

Needs no model and no torch: reads volumes (NIfTI or a DICOM series), posts them, decodes the mask.
"""

from medsam2_endpoint.client.segment import ObjectPrompt, SegmentationResult, read_volume, segment
from medsam2_endpoint.client.transport import ClientError, EndpointError

__all__ = ["ClientError", "EndpointError", "ObjectPrompt", "SegmentationResult", "read_volume", "segment"]
