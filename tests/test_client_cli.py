"""The client's command line and preview beyond test_client.py: library log lines kept off the user's stderr
unless --verbose, the DICOMweb request predict builds, and the preview drawn in the patient's orientation."""

from __future__ import annotations

import base64
import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from dicom_checks import iod_errors
from medsam2_endpoint.client.cli import predict_main
from medsam2_endpoint.client.preview import Orientation, render_preview
from medsam2_endpoint.io.volume import write_nifti
from medsam2_endpoint.testing.phantoms import ct_phantom
from test_client import FakeFrontEnd, box_masks, write_dicom_series

REPO = Path(__file__).resolve().parents[1]
library = importlib.import_module("medsam2_endpoint.client.segment")  # the module; the package exports its function
HIGHDICOM_INFO = "copy Study-related attributes"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`medsam2-endpoint ...` as a user runs it: its own process, stderr as the terminal would show it."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "medsam2_endpoint.api.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300, check=False)


def test_predict_to_dicom_seg_shows_library_logs_only_with_verbose(tmp_path):
    image = sitk.GetImageFromArray(np.random.default_rng(3).integers(-100, 100, (4, 16, 20)).astype(np.int16))
    image.SetSpacing((0.8, 0.8, 2.0))
    folder = tmp_path / "dicom"
    write_dicom_series(image, folder)
    with FakeFrontEnd([box_masks((4, 16, 20))]) as fake:
        common = ["predict", str(folder), "--bbox", "3", "4", "12", "10", "--key-slice", "1", "--endpoint", fake.url]
        quiet = run_cli(*common, "-o", str(tmp_path / "a.dcm"))
        verbose = run_cli(*common, "-o", str(tmp_path / "b.dcm"), "--verbose")
    assert quiet.returncode == 0, quiet.stderr
    assert f"mask: {tmp_path / 'a.dcm'}" in quiet.stdout
    assert quiet.stderr.strip() == "", quiet.stderr  # no highdicom INFO lines, nothing else either
    assert verbose.returncode == 0, verbose.stderr
    assert HIGHDICOM_INFO in verbose.stderr
    assert iod_errors(tmp_path / "a.dcm") == []  # every SEG the suite writes passes dciodvfy


def test_predict_dicomweb_builds_the_request_item(monkeypatch, tmp_path, capsys):
    """--dicomweb/--study/--series/--store-seg go into the item instead of nii_image; the mask comes back as NIfTI."""
    answer = sitk.GetImageFromArray(np.zeros((5, 8, 9), np.uint8))
    answer.SetSpacing((0.7, 0.7, 3.0))
    answer.SetOrigin((1.0, 2.0, 3.0))
    sent: list[dict] = []

    def post(url, body, **kwargs):
        sent.append({"url": url, "body": body})
        meta = {"model": {"name": "fake"}, "voxel_count": 0, "dicom_seg": {"series": "1.2.3.9"}}
        return [{"mask": base64.b64encode(write_nifti(answer)).decode("ascii"), "metadata": meta}]

    monkeypatch.setattr(library, "post_request", post)
    out = tmp_path / "m.nii.gz"
    argv = ["--dicomweb", "http://pacs.example/dicom-web", "--study", "1.2.3", "--series", "1.2.3.4", "--store-seg",
            "--bbox", "1", "2", "6", "7", "--key-slice", "3", "--preset", "ct-soft-tissue", "--endpoint", "http://127.0.0.1:9/score",
            "-o", str(out), "-q"]
    assert predict_main(argv) == 0, capsys.readouterr().err
    (request,) = sent
    columns = request["body"]["input_data"]
    assert columns["dicomweb"] == [{"url": "http://pacs.example/dicom-web", "study": "1.2.3", "series": "1.2.3.4"}]
    assert columns["store_seg"] == [True]
    assert "nii_image" not in columns and "volume_id" not in columns
    assert columns["bbox"] == [[1.0, 2.0, 6.0, 7.0]] and columns["key_slice_idx"] == [3]
    assert columns["dicom_window"] == [[-160.0, 240.0]] and columns["mask_format"] == ["nifti"]
    assert "DICOM SEG stored: study" in capsys.readouterr().out
    saved = sitk.ReadImage(str(out))  # the answer's own geometry: the client never read the series
    assert saved.GetSize() == (9, 8, 5) and np.allclose(saved.GetOrigin(), (1.0, 2.0, 3.0))

    sent.clear()
    assert predict_main([*argv[:6], "--bbox", "1", "2", "6", "7", "--key-slice", "3", "-o", str(out), "-q"]) == 0
    assert "store_seg" not in sent[0]["body"]["input_data"]  # only when asked


@pytest.mark.parametrize(("argv", "message"), [
    (["--dicomweb", "http://pacs/dicom-web", "--series", "1.2"], "needs --study UID and --series UID"),
    (["vol.nii.gz", "--dicomweb", "http://pacs/dicom-web", "--study", "1", "--series", "2"], "not both"),
    (["vol.nii.gz", "--store-seg"], "store_seg"),
    (["--dicomweb", "http://pacs/dicom-web", "--study", "1", "--series", "2", "--preset", "mri"], "preset mri needs"),
])
def test_predict_dicomweb_bad_flags_fail_before_any_request(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vol.nii.gz").write_bytes(write_nifti(sitk.GetImageFromArray(np.zeros((3, 8, 8), np.int16))))
    monkeypatch.setattr(library, "post_request", lambda *a, **k: pytest.fail("no request expected"))
    assert predict_main([*argv, "--bbox", "1", "1", "4", "4", "--key-slice", "1"]) == 2
    assert message in capsys.readouterr().err


def test_predict_help_documents_dicomweb_and_verbose(capsys):
    with pytest.raises(SystemExit):
        predict_main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--dicomweb URL", "--study UID", "--series UID", "--store-seg", "--verbose"):
        assert flag in text


# ---------------------------------------------------------------------------------- preview orientation


def test_orientation_puts_anterior_up_and_right_on_the_left():
    """A volume whose rows run posterior -> anterior (direction y = -1) is turned so row 0 is anterior."""
    array = np.zeros((2, 4, 5), np.int16)
    array[:, 3, 0] = 1  # last stored row: the most anterior when y points to anterior
    image = sitk.GetImageFromArray(array)
    image.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
    oriented = Orientation.of(image).array(array)
    assert oriented[0, 0, 0] == 1 and oriented.sum() == 2  # anterior row first, patient right column first
    assert Orientation.of(image).index(0, 3, 1) == (1, 0, 0)


@pytest.fixture(scope="module")
def anatomy():
    """An asymmetric CT phantom (a lesion off the midline) and its mask, identity direction."""
    phantom = ct_phantom((10, 48, 56), lesions=("ellipsoid",), seed=11, name="orient")
    mask = sitk.GetImageFromArray(phantom.mask(phantom.lesions[0].label).astype(np.uint8))
    mask.CopyInformation(phantom.image)
    return phantom, mask


def picture(path: Path) -> np.ndarray:
    with Image.open(path) as png:
        return np.asarray(png.convert("RGB"))


def test_preview_is_the_same_picture_whatever_the_stored_direction(anatomy, tmp_path):
    phantom, mask = anatomy
    lesion = phantom.lesions[0]
    x0, y0, x1, y1 = lesion.bbox
    height, width = phantom.image.GetSize()[1], phantom.image.GetSize()[0]
    stored = {
        "as is": (phantom.image, mask, (x0, y0, x1, y1)),
        # rows flipped: the direction's y column becomes -y, so the series runs posterior -> anterior
        "rows flipped": (sitk.Flip(phantom.image, [False, True, False]), sitk.Flip(mask, [False, True, False]),
                         (x0, height - 1 - y1, x1, height - 1 - y0)),
        # rows and columns swapped (a transposed in-plane direction)
        "transposed": (sitk.PermuteAxes(phantom.image, [1, 0, 2]), sitk.PermuteAxes(mask, [1, 0, 2]), (y0, x0, y1, x1)),
    }
    pictures = {}
    for name, (image, labels, box) in stored.items():
        assert name == "as is" or image.GetDirection() != phantom.image.GetDirection()
        path = render_preview(image, labels, lesion.key_slice, tmp_path / f"{name}.png", window=(-160, 240),
                              boxes=[(lesion.key_slice, box)], panels=3, title="orientation")
        pictures[name] = picture(path)
    assert width != height  # so a transposed picture would differ in shape
    for name, pixels in pictures.items():
        np.testing.assert_array_equal(pixels, pictures["as is"], err_msg=name)
