"""The batch endpoint's work items: a volume file or DICOM series folder with its sidecar prompt, and its
summary row; `FileScorer` scores one item in this process through the Service (the child process of
api/batch_worker.py holds one). See api/batch.py for the layout of a batch input folder."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from medsam2_endpoint.base.errors import InvalidRequest, ServiceError
from medsam2_endpoint.base.log import log
from medsam2_endpoint.contract.score3d import VolumeItem, parse_request
from medsam2_endpoint.core.service import Service
from medsam2_endpoint.core.settings import Settings

NIFTI_SUFFIXES = (".nii.gz", ".nii")
PROMPT_SUFFIX = ".prompt.json"


def stem(path: Path) -> str:
    if path.is_dir():
        return path.name  # series folders are often named by UID: no suffix to strip
    return next((path.name[: -len(s)] for s in NIFTI_SUFFIXES + (PROMPT_SUFFIX,) if path.name.endswith(s)), path.stem)


def read_prompt(path: Path) -> tuple[VolumeItem, dict[int, str]]:
    """The sidecar prompt of a volume file (or series folder), validated as a one-item 3D request, and its
    segment labels."""
    prompt_path = path.with_name(stem(path) + PROMPT_SUFFIX)
    if not prompt_path.is_file():
        raise InvalidRequest(f"{path.name}: no prompt file {prompt_path.name} beside it")
    try:
        prompt = json.loads(prompt_path.read_text())
    except ValueError:
        raise InvalidRequest(f"{prompt_path.name}: not valid JSON") from None
    if not isinstance(prompt, dict):
        raise InvalidRequest(f'{prompt_path.name}: expected a JSON object such as {{"bbox": [x0, y0, x1, y1], "key_slice_idx": 5}}')
    labels = prompt.pop("segment_labels", None) or {}
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise InvalidRequest(f'{prompt_path.name}: segment_labels: expected {{"<object id>": "<label>", ...}}')
    columns = {key: [value] for key, value in prompt.items()}
    (item,) = parse_request({"input_data": {**columns, "nii_image": [path.name]}}, max_items=1)
    try:
        return item, {int(k): v for k, v in labels.items()}
    except ValueError:
        raise InvalidRequest(f"{prompt_path.name}: segment_labels: keys are object ids (1, 2, ...)") from None


def series_of(path: Path) -> Path | None:
    """The DICOM series folder a work item belongs to: a prompt file's sibling folder, or a file's parent
    folder when that folder has a prompt beside it (its files are scored together, with the prompt)."""
    if path.name.endswith(PROMPT_SUFFIX):
        folder = path.with_name(path.name[: -len(PROMPT_SUFFIX)])
        return folder if folder.is_dir() else None
    parent = path.parent
    return parent if parent.with_name(parent.name + PROMPT_SUFFIX).is_file() else None


def empty_row(path: Path, status: str) -> dict[str, Any]:
    return {"file": path.name, "status": status, "voxels": None, "volume_ml": None, "model": None, "mask_file": None,
            "seg_file": None, "error": None, "code": None}



class FileScorer:
    """Scores one work item in this process: the Service computes and encodes, this writes the outputs."""

    def __init__(self, output_dir: Path, service: Service | None = None) -> None:
        self.output_dir = output_dir
        self.service = service or Service.from_settings(Settings.from_env())

    def score_one(self, path: Path, output_dir: Path | None = None) -> dict[str, Any]:
        """The item's row; its outputs written to `output_dir` (default: this scorer's)."""
        output_dir = output_dir or self.output_dir
        started = time.perf_counter()
        row = empty_row(path, "ok")
        try:
            item, labels = read_prompt(path)
            result = self.service.score_3d_file(item, path, segment_labels=labels)
            out = output_dir / f"{stem(path)}_mask.nii.gz"
            out.write_bytes(result.mask_nifti)
            meta = result.metadata
            row.update(voxels=meta["voxel_count"], volume_ml=meta["volume_ml"], model=meta["model"]["name"], mask_file=out.name)
            if result.dicom_seg is not None:
                seg = output_dir / f"{stem(path)}_seg.dcm"
                seg.write_bytes(result.dicom_seg)
                row["seg_file"] = seg.name
        except ServiceError as exc:
            row.update(status="error", error=exc.message, code=exc.code)
        except Exception as exc:  # one broken file must not lose the mini-batch
            log.exception("batch file %s failed", path.name)
            row.update(status="error", error=f"internal error ({type(exc).__name__})", code="internal")
        row["time_s"] = round(time.perf_counter() - started, 2)
        return row
