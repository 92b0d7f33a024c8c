"""The Azure ML batch endpoint, behind `batch_score.py`: one NIfTI file (or DICOM series folder) per work
item, each with a sidecar prompt.

For `<name>.nii.gz` the prompt is `<name>.prompt.json` beside it, holding the 3D route's fields as scalars:
{"bbox": [...], "key_slice_idx": 5, "dicom_window": [-160, 240], "slice_offset": 0, "model": "..."}.
Writes `<name>_mask.nii.gz` (source geometry) to the output folder and returns one summary row per file;
a failing file becomes a row with its error, never a lost mini-batch; a file whose worker process dies
(api/batch_worker.py) becomes an error row with `code: "worker_died"` and a new worker scores the rest.

DICOM: a folder `<name>/` of one series with `<name>.prompt.json` beside it. The batch driver hands out
files, so the series is scored when its prompt file comes up (its .dcm files get "skipped" rows); a
folder given as an item is scored too. Besides the NIfTI mask it writes `<name>_seg.dcm`, a DICOM SEG
referencing the series (one segment per object; labels from the prompt's optional
`"segment_labels": {"1": "liver"}`, default "object <id>").

PACS: a prompt file alone, `<name>.prompt.json` with `"dicomweb": {"url": ..., "study": ..., "series": ...}` (and
`"store_seg": true`), is itself the work item: the series is read from the PACS (MEDSAM2_DICOMWEB_URLS) as
`/score` does, `<name>_mask.nii.gz` is written and the SEG is stored into the study (segment labels "object <id>").

Every item of the mini-batch gets a row, prompt files included (status "skipped"): the batch driver
counts the rows run() returns as the items that succeeded, so a missing row would count as a failed
file against the deployment's error_threshold.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medsam2_endpoint import __version__
from medsam2_endpoint.api.batch_worker import IsolatedScorer
from medsam2_endpoint.base.errors import InvalidRequest, ServiceError
from medsam2_endpoint.base.log import log
from medsam2_endpoint.contract.score3d import VolumeItem, parse_request
from medsam2_endpoint.core.service import Service
from medsam2_endpoint.core.settings import Settings
from medsam2_endpoint.io.dicom_seg import Algorithm, Segment, write_dicom_seg

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
    # a series in a PACS (dicomweb) instead of the file beside the prompt: the mask comes back as NIfTI
    source = {"mask_format": ["nifti"]} if "dicomweb" in prompt else {"nii_image": [path.name]}
    (item,) = parse_request({"input_data": {**columns, **source}}, max_items=1)
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


def names_dicomweb(path: Path) -> bool:
    """Whether a prompt file names a series in a PACS (`"dicomweb": {"url", "study", "series"}`) instead of a file."""
    try:
        prompt = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(prompt, dict) and "dicomweb" in prompt


def empty_row(path: Path, status: str) -> dict[str, Any]:
    return {"file": path.name, "status": status, "voxels": None, "volume_ml": None, "model": None, "mask_file": None,
            "seg_file": None, "error": None, "code": None}


class BatchApp:
    """What `batch_score.py` holds: the output folder, and either the Service (in-process) or the child process
    that scores the files (MEDSAM2_BATCH_WORKER_PROCESS, the default), built in init()."""

    def __init__(self) -> None:
        self.service: Service | None = None
        self.scorer: IsolatedScorer | None = None
        self.output_dir = Path(".")

    def init(self, argv: Sequence[str], *, in_process: bool | None = None) -> None:
        parser = argparse.ArgumentParser(allow_abbrev=False)
        parser.add_argument("--output_dir", "--output-dir", default=os.environ.get("AZUREML_BI_OUTPUT_PATH", "."))
        args, _ = parser.parse_known_args(list(argv))
        self.output_dir = Path(args.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        settings = Settings.from_env()
        if in_process is None:
            in_process = not settings.batch_worker_process
        if in_process:
            self.service = Service.from_settings(settings)
        else:
            self.scorer = IsolatedScorer(self.output_dir)

    def score_one(self, path: Path) -> dict[str, Any]:
        started = time.perf_counter()
        row = empty_row(path, "ok")
        try:
            if self.service is None:
                raise ServiceError("init() has not run")
            item, labels = read_prompt(path)
            if item.dicomweb is not None:
                return self._score_dicomweb(path, item, row, started)
            result = self.service.score_3d_file(item, path)
            out = self.output_dir / f"{stem(path)}_mask.nii.gz"
            out.write_bytes(result.mask_nifti)
            meta = result.metadata
            row.update(voxels=meta["voxel_count"], volume_ml=meta["volume_ml"], model=meta["model"]["name"], mask_file=out.name)
            if result.source_files and result.labels is not None:
                model = meta["model"]
                segments = [Segment(o.id, labels.get(o.id, f"object {o.id}")) for o in item.objects]
                seg = self.output_dir / f"{stem(path)}_seg.dcm"
                seg.write_bytes(write_dicom_seg(result.labels, result.source_files, segments,
                                                Algorithm(model["name"], __version__, model.get("sha256"))))
                row["seg_file"] = seg.name
        except ServiceError as exc:
            row.update(status="error", error=exc.message, code=exc.code)
        except Exception as exc:  # one broken file must not lose the mini-batch
            log.exception("batch file %s failed", path.name)
            row.update(status="error", error=f"internal error ({type(exc).__name__})", code="internal")
        row["time_s"] = round(time.perf_counter() - started, 2)
        return row

    def _score_dicomweb(self, path: Path, item: VolumeItem, row: dict[str, Any], started: float) -> dict[str, Any]:
        """A prompt file naming a series in a PACS: scored as /score would (the SEG stored into the PACS with
        store_seg; `seg_file` then reads `dicomweb:<study>/<series>/<instance>`, and a failed store is the row's error)."""
        assert self.service is not None
        (result,) = self.service.score_3d([item])
        out = self.output_dir / f"{stem(path)}_mask.nii.gz"
        out.write_bytes(base64.b64decode(result["mask"]))
        meta = result["metadata"]
        row.update(voxels=meta["voxel_count"], volume_ml=meta["volume_ml"], model=meta["model"]["name"], mask_file=out.name)
        stored = meta.get("dicom_seg")
        if stored is not None and "error" in stored:
            row.update(error=f"the mask is written; the DICOM SEG was not stored: {stored['error']}", code=stored.get("code"))
        elif stored is not None:
            row["seg_file"] = f"dicomweb:{stored['study_uid']}/{stored['series_uid']}/{stored['sop_instance_uid']}"
        row["time_s"] = round(time.perf_counter() - started, 2)
        return row

    def run(self, mini_batch: Sequence[str]) -> list[str]:
        """One JSON row per item: a result for each volume, "skipped" for prompt files (read with their volume)."""
        rows = []
        for item in mini_batch:
            path = Path(item)
            series = series_of(path)
            if path.is_dir() or (series is not None and path.name.endswith(PROMPT_SUFFIX)):
                row = self._score(series or path)
                row["file"] = path.name
            elif series is None and path.name.endswith(PROMPT_SUFFIX) and names_dicomweb(path):
                row = self._score(path)  # the series is in a PACS: the prompt file is the work item
            elif series is not None or path.name.endswith(PROMPT_SUFFIX):
                row = {**empty_row(path, "skipped"), "time_s": 0.0}
            else:
                row = self._score(path)
            rows.append(json.dumps(row))
        return rows

    def _score(self, path: Path) -> dict[str, Any]:
        """One file's (or series folder's) row: in the child process when there is one, else here."""
        if self.scorer is None:
            return self.score_one(path)
        started = time.perf_counter()
        row = self.scorer.score(path, empty_row(path, "error"))
        row.setdefault("time_s", round(time.perf_counter() - started, 2))
        return row
