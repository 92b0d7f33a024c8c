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

Every item of the mini-batch gets a row, prompt files included (status "skipped"): the batch driver
counts the rows run() returns as the items that succeeded, so a missing row would count as a failed
file against the deployment's error_threshold.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medsam2_endpoint.api.batch_files import PROMPT_SUFFIX, FileScorer, empty_row, series_of
from medsam2_endpoint.api.batch_worker import IsolatedScorer
from medsam2_endpoint.core.service import Service
from medsam2_endpoint.core.settings import Settings


class BatchApp:
    """What `batch_score.py` holds: the output folder, and either the Service (in-process) or the child process
    that scores the files (MEDSAM2_BATCH_WORKER_PROCESS, the default), built in init()."""

    def __init__(self) -> None:
        self.local: FileScorer | None = None
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
            self.local = FileScorer(self.output_dir, Service.from_settings(settings))
        else:
            self.scorer = IsolatedScorer(self.output_dir)

    def run(self, mini_batch: Sequence[str]) -> list[str]:
        """One JSON row per item: a result for each volume, "skipped" for prompt files (read with their volume)."""
        rows = []
        for item in mini_batch:
            path = Path(item)
            series = series_of(path)
            if path.is_dir() or (series is not None and path.name.endswith(PROMPT_SUFFIX)):
                row = self._score(series or path)
                row["file"] = path.name
            elif series is not None or path.name.endswith(PROMPT_SUFFIX):
                row = {**empty_row(path, "skipped"), "time_s": 0.0}
            else:
                row = self._score(path)
            rows.append(json.dumps(row))
        return rows

    def _score(self, path: Path) -> dict[str, Any]:
        """One file's (or series folder's) row: in the child process when there is one, else here."""
        if self.scorer is None:
            if self.local is None:
                raise RuntimeError("init() has not run")
            return self.local.score_one(path, self.output_dir)
        started = time.perf_counter()
        row = self.scorer.score(path, empty_row(path, "error"))
        row.setdefault("time_s", round(time.perf_counter() - started, 2))
        return row
