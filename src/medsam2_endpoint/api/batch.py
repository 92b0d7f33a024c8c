"""The Azure ML batch endpoint, behind `batch_score.py`: one NIfTI file per work item, each with a sidecar prompt.

For `<name>.nii.gz` the prompt is `<name>.prompt.json` beside it, holding the 3D route's fields as scalars:
{"bbox": [...], "key_slice_idx": 5, "dicom_window": [-160, 240], "slice_offset": 0, "model": "..."}.
Writes `<name>_mask.nii.gz` (source geometry) to the output folder and returns one summary row per file;
a failing file becomes a row with its error, never a lost mini-batch; a file whose worker process dies
(api/batch_worker.py) becomes an error row with `code: "worker_died"` and a new worker scores the rest.

Every item of the mini-batch gets a row, prompt files included (status "skipped"): the batch driver
counts the rows run() returns as the items that succeeded, so a missing row would count as a failed
file against the deployment's error_threshold.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medsam2_endpoint.api.batch_worker import IsolatedScorer
from medsam2_endpoint.base.errors import InvalidRequest, ServiceError
from medsam2_endpoint.contract.score3d import VolumeItem, parse_request
from medsam2_endpoint.core.service import Service
from medsam2_endpoint.core.settings import Settings

log = logging.getLogger("azmlinfsrv.medsam2")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
PROMPT_SUFFIX = ".prompt.json"


def stem(path: Path) -> str:
    return next((path.name[: -len(s)] for s in NIFTI_SUFFIXES if path.name.endswith(s)), path.stem)


def read_prompt(path: Path) -> VolumeItem:
    """The sidecar prompt of a volume file, validated as a one-item 3D request."""
    prompt_path = path.with_name(stem(path) + PROMPT_SUFFIX)
    if not prompt_path.is_file():
        raise InvalidRequest(f"{path.name}: no prompt file {prompt_path.name} beside it")
    try:
        prompt = json.loads(prompt_path.read_text())
    except ValueError:
        raise InvalidRequest(f"{prompt_path.name}: not valid JSON") from None
    if not isinstance(prompt, dict):
        raise InvalidRequest(f'{prompt_path.name}: expected a JSON object such as {{"bbox": [x0, y0, x1, y1], "key_slice_idx": 5}}')
    columns = {key: [value] for key, value in prompt.items()}
    (item,) = parse_request({"input_data": {**columns, "nii_image": [path.name]}}, max_items=1)
    return item


def empty_row(path: Path, status: str) -> dict[str, Any]:
    return {"file": path.name, "status": status, "voxels": None, "volume_ml": None, "model": None, "mask_file": None, "error": None, "code": None}


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
            result = self.service.score_3d_file(read_prompt(path), path)
            out = self.output_dir / f"{stem(path)}_mask.nii.gz"
            out.write_bytes(result.mask_nifti)
            meta = result.metadata
            row.update(voxels=meta["voxel_count"], volume_ml=meta["volume_ml"], model=meta["model"]["name"], mask_file=out.name)
        except ServiceError as exc:
            row.update(status="error", error=exc.message, code=exc.code)
        except Exception as exc:  # one broken file must not lose the mini-batch
            log.exception("batch file %s failed", path.name)
            row.update(status="error", error=f"internal error ({type(exc).__name__})", code="internal")
        row["time_s"] = round(time.perf_counter() - started, 2)
        return row

    def run(self, mini_batch: Sequence[str]) -> list[str]:
        """One JSON row per item: a result for each volume, "skipped" for prompt files (read with their volume)."""
        rows = []
        for item in mini_batch:
            path = Path(item)
            if path.name.endswith(PROMPT_SUFFIX):
                row = {**empty_row(path, "skipped"), "time_s": 0.0}
            elif self.scorer is not None:
                started = time.perf_counter()
                row = self.scorer.score(path, empty_row(path, "error"))
                row.setdefault("time_s", round(time.perf_counter() - started, 2))
            else:
                row = self.score_one(path)
            rows.append(json.dumps(row))
        return rows
