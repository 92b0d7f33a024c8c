"""`medsam2-endpoint predict --dicomweb URL --study UID --series UID [--store-seg]`: the endpoint reads the series
from the PACS itself (nothing is uploaded); the mask comes back as NIfTI with the series' geometry, and with
--store-seg the endpoint stores the DICOM SEG into the study and says where (`metadata.dicom_seg`)."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medsam2_endpoint.client.transport import KEY_ENV, ClientError, EndpointError, post_request


def dicomweb_columns(url: str, study: str, series: str, *, store_seg: bool = False) -> dict[str, list[Any]]:
    """The 3D route's source columns for a series in a PACS (instead of nii_image)."""
    return {"dicomweb": [{"url": url, "study": study, "series": series}], "store_seg": [store_seg]}


def prompt_columns(objects: Sequence[Any] | None, prompts: Sequence[dict[str, Any]] | None) -> dict[str, list[Any]]:
    """The prompt columns of the request: one box (bbox + key_slice_idx), several objects, or the request's own prompts.
    `objects` are the client's ObjectPrompt (bbox, key_slice, object_id)."""
    if prompts is not None:
        return {"objects": [list(prompts)]}
    if objects is None or not objects:
        raise ClientError("give --bbox and --key-slice, --objects or --prompts")
    if len(objects) == 1 and objects[0].object_id == 1:
        return {"bbox": [list(objects[0].bbox)], "key_slice_idx": [objects[0].key_slice]}
    return {"objects": [[{"id": o.object_id, "bbox": list(o.bbox), "key_slice_idx": o.key_slice} for o in objects]]}


def predict_dicomweb(url: str, study: str, series: str, prompt_columns: dict[str, list[Any]], *, store_seg: bool,
                     outputs: Sequence[str], endpoint: str, deployment: str | None, timeout: float, retries: int,
                     options: dict[str, Any], metadata_path: str | None = None) -> int:
    """Send the request, write the mask (NIfTI) to `outputs`, print where the SEG went; 0 on success."""
    for target in outputs:
        if not target.endswith((".nii.gz", ".nii")):
            raise ClientError(f"{target}: with --dicomweb the mask is written as NIfTI (.nii.gz); the DICOM SEG goes to the PACS "
                              "(--store-seg)")
    columns = {**dicomweb_columns(url, study, series, store_seg=store_seg), **prompt_columns, "mask_format": ["nifti"],
               **{name: [value] for name, value in options.items() if value is not None}}
    answer = post_request(endpoint, {"input_data": columns}, key=os.environ.get(KEY_ENV), deployment=deployment, timeout=timeout,
                          retries=retries)
    if not isinstance(answer, list) or len(answer) != 1:
        raise EndpointError(200, "expected a list of 1 result", http_status=200)
    (entry,) = answer
    data, metadata = base64.b64decode(entry["mask"]), entry.get("metadata", {})
    for target in outputs or [f"{series}.nii.gz"]:
        if target.endswith(".nii"):
            import gzip

            data = gzip.decompress(data)
        Path(target).write_bytes(data)
        print(f"mask: {target}")
    print(f"{metadata.get('voxel_count')} voxels, {metadata.get('volume_ml')} ml, model {metadata.get('model', {}).get('name', '?')}")
    stored = metadata.get("dicom_seg")
    if stored is not None:
        print(f"DICOM SEG not stored: {stored['error']}" if "error" in stored else
              f"DICOM SEG stored: study {stored['study_uid']} series {stored['series_uid']} instance {stored['sop_instance_uid']}")
    if metadata_path:
        Path(metadata_path).write_text(json.dumps(metadata, indent=1))
    return 0 if stored is None or "error" not in stored else 1
