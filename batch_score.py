"""Azure ML batch entry script: one NIfTI file per work item, each with a sidecar prompt.

For `<name>.nii.gz` the prompt is `<name>.prompt.json` beside it, holding the 3D route's fields as scalars:
{"bbox": [...], "key_slice_idx": 5, "dicom_window": [-160, 240], "slice_offset": 0, "model": "..."}.
Writes `<name>_mask.nii.gz` (source geometry) to the output folder and returns one summary row per file;
a failing file becomes a row with its error, never a lost mini-batch.

Every item of the mini-batch gets a row, prompt files included (status "skipped"): the batch driver
counts the rows run() returns as the items that succeeded, so a missing row would count as a failed
file against the deployment's error_threshold.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from medsam2_endpoint.core.settings import Settings  # noqa: E402
from medsam2_endpoint.base.errors import ServiceError  # noqa: E402
from medsam2_endpoint.core.service import Service  # noqa: E402
from medsam2_endpoint.io.volume import write_nifti  # noqa: E402

log = logging.getLogger("azmlinfsrv.medsam2")
service: Service | None = None
output_dir: Path = Path(".")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
PROMPT_SUFFIX = ".prompt.json"


def _stem(path: Path) -> str:
    return next((path.name[: -len(s)] for s in NIFTI_SUFFIXES if path.name.endswith(s)), path.stem)


def init() -> None:
    global service, output_dir
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--output_dir", "--output-dir", default=os.environ.get("AZUREML_BI_OUTPUT_PATH", "."))
    args, _ = parser.parse_known_args()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    service = Service.from_settings(Settings.from_env())


def score_one(path: Path) -> dict:
    started = time.perf_counter()
    row = {"file": path.name, "status": "ok", "voxels": None, "volume_ml": None, "model": None, "mask_file": None, "error": None}
    try:
        prompt_path = path.with_name(_stem(path) + PROMPT_SUFFIX)
        if not prompt_path.is_file():
            raise ServiceError(f"{path.name}: no prompt file {prompt_path.name} beside it", status=400)
        try:
            prompt = json.loads(prompt_path.read_text())
        except ValueError:
            raise ServiceError(f"{prompt_path.name}: not valid JSON", status=400) from None
        if not isinstance(prompt, dict):
            raise ServiceError(
                f'{prompt_path.name}: expected a JSON object such as {{"bbox": [x0, y0, x1, y1], "key_slice_idx": 5}}', status=400
            )
        mask, volume, metadata = service.score_file(path, prompt)
        out = output_dir / f"{_stem(path)}_mask.nii.gz"
        out.write_bytes(write_nifti(volume.image_like(mask)))
        row.update(voxels=metadata["voxel_count"], volume_ml=metadata["volume_ml"], model=metadata["model"]["name"], mask_file=out.name)
    except ServiceError as exc:
        row.update(status="error", error=exc.message)
    except Exception as exc:  # one broken file must not lose the mini-batch
        log.exception("batch file %s failed", path.name)
        row.update(status="error", error=f"internal error ({type(exc).__name__})")
    row["time_s"] = round(time.perf_counter() - started, 2)
    return row


def run(mini_batch: list[str]) -> list[str]:
    """One JSON row per item: a result for each volume, "skipped" for prompt files (read with their volume)."""
    rows = []
    for item in mini_batch:
        path = Path(item)
        if path.name.endswith(PROMPT_SUFFIX):
            row = {"file": path.name, "status": "skipped", "voxels": None, "volume_ml": None, "model": None, "mask_file": None,
                   "error": None, "time_s": 0.0}
        else:
            row = score_one(path)
        rows.append(json.dumps(row))
    return rows
