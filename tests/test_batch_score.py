"""batch_score.py as the Azure batch driver calls it: init() once, then run(mini_batch) over a folder.

The folder holds two phantoms with sidecar prompts, a truncated .nii.gz (with a prompt), a volume
without a prompt and one whose prompt is not a JSON object. LiteMedSAM serves (empty model folder).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dicom_checks import iod_errors
from medsam2_endpoint.testing.metrics import dice
from medsam2_endpoint.testing.phantoms import ct_phantom, mri_phantom, oblique_direction

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """The batch_score module after init(): output folder from --output_dir, LiteMedSAM only, no warm-up."""
    models = tmp_path_factory.mktemp("batch-model")
    output = tmp_path_factory.mktemp("batch-out")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MEDSAM2_MODEL_DIR", raising=False)
        mp.delenv("AZUREML_BI_OUTPUT_PATH", raising=False)
        mp.setenv("AZUREML_MODEL_DIR", str(models))
        mp.setenv("MEDSAM2_WARMUP", "0")
        mp.setenv("MEDSAM2_NUM_THREADS", "1")  # under CPU contention one thread wastes least
        mp.setenv("MEDSAM2_BATCH_WORKER_PROCESS", "0")  # in-process here; the child-process worker: test_faults_batch.py
        mp.setattr(sys, "argv", ["batch_score.py", "--output_dir", str(output)])
        spec = importlib.util.spec_from_file_location("batch_score_under_test", REPO / "batch_score.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.init()
    assert module.app.local is not None and module.app.local.service.available_models() == ["lite-medsam"]
    yield module, output
    torch.set_num_threads(threads)  # init() set the process-wide count; later tests get theirs back


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Files of one input folder, and the good cases' phantoms by file name."""
    folder = tmp_path_factory.mktemp("cohort")
    ct = ct_phantom((16, 64, 64), direction=oblique_direction(10.0), lesions=("ellipsoid",), seed=1, name="ct")
    mr = mri_phantom((16, 64, 64), spacing=(1.1, 1.1, 4.0), origin=(5.0, -3.0, 20.0), lesions=("ellipsoid",), seed=2, name="mr")
    good = {}
    for name, phantom, suffix in (("case_ct", ct, ".nii.gz"), ("case_mr", mr, ".nii")):
        sitk.WriteImage(phantom.image, str(folder / f"{name}{suffix}"), useCompression=suffix == ".nii.gz")
        lesion = phantom.lesions[0]
        prompt = {"bbox": list(lesion.bbox), "key_slice_idx": lesion.key_slice, "dicom_window": phantom.window, "slice_offset": 0}
        (folder / f"{name}.prompt.json").write_text(json.dumps(prompt))
        good[f"{name}{suffix}"] = phantom
    data = (folder / "case_ct.nii.gz").read_bytes()
    (folder / "broken.nii.gz").write_bytes(data[: len(data) // 2])
    shutil.copy(folder / "case_ct.prompt.json", folder / "broken.prompt.json")
    shutil.copy(folder / "case_ct.nii.gz", folder / "no_prompt.nii.gz")
    shutil.copy(folder / "case_ct.nii.gz", folder / "list_prompt.nii.gz")
    (folder / "list_prompt.prompt.json").write_text("[10, 10, 30, 30]")
    return sorted(folder.iterdir()), good


@pytest.mark.slow
def test_batch_writes_good_masks_and_reports_bad_files(batch, cohort):
    module, output = batch
    files, good = cohort
    rows = [json.loads(row) for row in module.run([str(p) for p in files])]

    # One row per mini-batch item (the driver counts returned rows as succeeded items); prompts are "skipped".
    assert len(rows) == len(files)
    by_file = {row["file"]: row for row in rows}
    prompts = [p.name for p in files if p.name.endswith(".prompt.json")]
    volumes = [p.name for p in files if p.name.endswith((".nii", ".nii.gz"))]
    assert all(by_file[name]["status"] == "skipped" for name in prompts)
    assert sorted(name for name, row in by_file.items() if row["status"] != "skipped") == sorted(volumes)

    for name, phantom in good.items():
        row = by_file[name]
        assert row["status"] == "ok" and row["error"] is None, row
        assert row["model"] == "lite-medsam" and row["voxels"] > 0 and row["volume_ml"] > 0 and row["time_s"] >= 0
        mask = sitk.ReadImage(str(output / row["mask_file"]))
        source = sitk.ReadImage(str(Path(files[0]).parent / name))
        assert mask.GetSize() == source.GetSize()
        for getter in ("GetSpacing", "GetOrigin", "GetDirection"):
            assert np.allclose(getattr(mask, getter)(), getattr(source, getter)(), atol=1e-5), (name, getter)
        labels = sitk.GetArrayFromImage(mask)
        assert int(labels.sum()) == row["voxels"]
        assert dice(labels, phantom.mask(phantom.lesions[0].label)) >= 0.8, name

    errors = {name: by_file[name]["error"] for name in ("broken.nii.gz", "no_prompt.nii.gz", "list_prompt.nii.gz")}
    assert all(by_file[name]["status"] == "error" and by_file[name]["mask_file"] is None for name in errors)
    assert "truncated" in errors["broken.nii.gz"] and "broken.nii.gz" in errors["broken.nii.gz"]
    assert "no prompt file no_prompt.prompt.json" in errors["no_prompt.nii.gz"]
    assert "expected a JSON object" in errors["list_prompt.nii.gz"]
    assert sorted(p.name for p in output.iterdir()) == ["case_ct_mask.nii.gz", "case_mr_mask.nii.gz"]


def test_dicom_series_folder_gets_a_nifti_mask_and_a_seg(batch, tmp_path):
    """A series folder with `<name>.prompt.json` beside it, handed out file by file as the driver does."""
    from test_client import write_dicom_series
    from test_dicom_seg import instance_uid, read_back

    module, _ = batch
    phantom = ct_phantom((12, 64, 64), lesions=("ellipsoid",), seed=4, name="dicom")
    folder = tmp_path / "in" / "1.2.826.0.1.3680043.8.498.77"
    write_dicom_series(phantom.image, folder)
    lesion = phantom.lesions[0]
    prompt = {"bbox": list(lesion.bbox), "key_slice_idx": lesion.key_slice, "dicom_window": phantom.window,
              "segment_labels": {"1": "lesion"}}
    (folder.parent / f"{folder.name}.prompt.json").write_text(json.dumps(prompt))
    items = sorted(str(p) for p in folder.iterdir()) + [str(folder.parent / f"{folder.name}.prompt.json")]
    out = tmp_path / "out"
    out.mkdir()
    module.app.output_dir = out
    try:
        rows = [json.loads(r) for r in module.run(items)]
    finally:
        module.app.output_dir = batch[1]
    assert len(rows) == len(items) and [r["status"] for r in rows[:-1]] == ["skipped"] * (len(items) - 1)
    row = rows[-1]
    assert row["status"] == "ok", row
    assert row["mask_file"] == f"{folder.name}_mask.nii.gz" and row["seg_file"] == f"{folder.name}_seg.dcm"
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / row["mask_file"])))
    assert dice(mask, phantom.mask(lesion.label)) >= 0.8
    seg, frames = read_back((out / row["seg_file"]).read_bytes(), tmp_path)
    assert iod_errors(out / row["seg_file"]) == []
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["lesion"]
    assert seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "lite-medsam"
    files = sorted(folder.iterdir(), key=lambda p: int(p.stem.rsplit("_", 1)[1]))  # s2_000.dcm ... in z order
    for z, path in enumerate(files):
        frame = frames.get((instance_uid(path), 1))
        if frame is None:
            assert not mask[z].any()
        else:
            np.testing.assert_array_equal(frame, mask[z] == 1)
