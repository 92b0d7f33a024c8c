"""A batch run in which one file's worker process dies mid-file (SIGKILL): every other file's mask is written,
that file gets an error row (`code: "worker_died"`), and a new worker scores the files after it."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import SimpleITK as sitk

from medsam2_endpoint.api.batch import BatchApp
from medsam2_endpoint.testing.phantoms import ct_phantom


def write_case(folder, name, shape, seed):
    phantom = ct_phantom(shape, lesions=("ellipsoid",), seed=seed, name=name)
    sitk.WriteImage(phantom.image, str(folder / f"{name}.nii.gz"), useCompression=True)
    lesion = phantom.lesions[0]
    prompt = {"bbox": list(lesion.bbox), "key_slice_idx": lesion.key_slice, "dicom_window": phantom.window}
    (folder / f"{name}.prompt.json").write_text(json.dumps(prompt))
    return folder / f"{name}.nii.gz"


def test_a_file_whose_worker_dies_gets_an_error_row_and_the_others_their_masks(tmp_path, monkeypatch):
    inputs, output, models = tmp_path / "in", tmp_path / "out", tmp_path / "model"
    for folder in (inputs, models):
        folder.mkdir()
    first = write_case(inputs, "a_first", (16, 64, 64), 1)
    doomed = write_case(inputs, "b_doomed", (80, 128, 128), 2)  # long enough to be killed in the middle
    last = write_case(inputs, "c_last", (16, 64, 64), 3)
    for key in [k for k in os.environ if k.startswith("MEDSAM2_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("AZUREML_MODEL_DIR", str(models))
    monkeypatch.setenv("MEDSAM2_WARMUP", "0")
    monkeypatch.setenv("MEDSAM2_NUM_THREADS", "1")
    monkeypatch.setattr(sys, "argv", ["batch_score.py"])
    app = BatchApp()
    app.init(["--output_dir", str(output)])
    assert app.scorer is not None and app.local is None  # the default: files are scored in a child process
    rows: list[str] = []
    runner = threading.Thread(target=lambda: rows.extend(app.run([str(first), str(doomed), str(last)])))
    runner.start()
    try:
        deadline = time.monotonic() + 240
        while app.scorer.current != doomed.name and time.monotonic() < deadline:
            time.sleep(0.1)
        assert app.scorer.current == doomed.name
        time.sleep(2.0)  # decoded and walking its 80 slices
        os.kill(app.scorer.worker_pid, signal.SIGKILL)
        runner.join(300)
        assert not runner.is_alive()
    finally:
        app.scorer.close()
    by_file = {row["file"]: row for row in map(json.loads, rows)}
    assert by_file[first.name]["status"] == "ok" and by_file[last.name]["status"] == "ok", by_file
    dead = by_file[doomed.name]
    assert dead["status"] == "error" and dead["code"] == "worker_died" and dead["mask_file"] is None, dead
    assert "worker process died" in dead["error"]
    assert sorted(p.name for p in output.iterdir()) == ["a_first_mask.nii.gz", "c_last_mask.nii.gz"]

