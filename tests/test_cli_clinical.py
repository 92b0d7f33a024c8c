"""`medsam2-endpoint predict` (DICOM series in, DICOM SEG out, every 3D option) and `predict-2d`, run as the
CLI against a real local azmlinfsrv on a loopback port (LiteMedSAM serves: empty model folder)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from dicom_checks import iod_errors
from medsam2_endpoint.api.cli import main
from medsam2_endpoint.io.dicom_seg import series_files
from medsam2_endpoint.io.polygons import geometry_area
from medsam2_endpoint.testing.metrics import dice
from test_dicom_seg import CT_DICOM, LABELS, instance_uid, read_back
from test_prompt2d import phantom_slice

LIVER = 5


@pytest.fixture(scope="module")
def server(lite_server):
    return lite_server.score  # conftest's LiteMedSAM server, shared with test_client.py


def liver_prompt() -> tuple[int, list[int]]:
    """The liver's largest slice in the real series and its box there (x = column)."""
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(LABELS))) == LIVER
    z = int(np.argmax(labels.sum(axis=(1, 2))))
    ys, xs = np.nonzero(labels[z])
    return z, [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]


def image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as png:
        assert png.format == "PNG"
        return png.size


@pytest.mark.slow
@pytest.mark.skipif(not CT_DICOM.is_dir(), reason="the real CT series is not on this machine")
def test_predict_dicom_series_to_seg_and_nifti(server, tmp_path, capsys):
    key, box = liver_prompt()
    seg_path, nifti, meta, png = tmp_path / "liver.dcm", tmp_path / "liver.nii.gz", tmp_path / "meta.json", tmp_path / "p.png"
    argv = ["predict", str(CT_DICOM), "--bbox", *map(str, box), "--key-slice", str(key), "--preset", "ct-soft-tissue",
            "--label", "liver", "--propagation", "both", "--stop-after-empty", "0", "--max-slices", "3",
            "--endpoint", server, "-o", str(seg_path), "-o", str(nifti), "--metadata", str(meta), "--preview", str(png), "-q"]
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert f"mask: {seg_path}" in printed and f"mask: {nifti}" in printed

    (metadata,) = json.loads(meta.read_text())
    assert metadata["propagation"] == "both" and metadata["max_slices"] == 3 and metadata["stop_after_empty"] == 0
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(nifti)))
    touched = np.flatnonzero(mask.any(axis=(1, 2)))
    assert touched.size and touched.min() >= key - 3 and touched.max() <= key + 3  # --max-slices reached the route
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(LABELS)))[key] == LIVER
    assert dice(mask[key], truth) > 0.8

    seg, frames = read_back(seg_path.read_bytes(), tmp_path)
    assert iod_errors(seg_path) == []
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver"]
    (algorithm,) = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence
    assert algorithm.AlgorithmName == "lite-medsam" and metadata["model"]["sha256"] in algorithm.AlgorithmParameters
    import pydicom

    assert seg.FrameOfReferenceUID == pydicom.dcmread(next(CT_DICOM.iterdir()), stop_before_pixels=True).FrameOfReferenceUID
    for z, path in enumerate(series_files(CT_DICOM)):
        frame = frames.get((instance_uid(path), 1))
        if frame is None:
            assert not mask[z].any()
        else:
            np.testing.assert_array_equal(frame, mask[z] == 1)
    width, height = image_size(png)
    assert height > 1.5 * width / 5  # two rows: the key slice's neighbours, then the three orthogonal planes


@pytest.mark.slow
def test_predict_propagation_up_and_seg_needs_dicom(server, tmp_path, capsys):
    from medsam2_endpoint.testing.phantoms import ct_phantom

    phantom = ct_phantom((12, 64, 64), lesions=("ellipsoid",), seed=5, name="up")
    source = tmp_path / "ct.nii.gz"
    sitk.WriteImage(phantom.image, str(source))
    lesion = phantom.lesions[0]
    out = tmp_path / "up.nii.gz"
    common = [str(source), "--bbox", *map(str, lesion.bbox), "--key-slice", str(lesion.key_slice), "--preset", "ct-soft-tissue",
              "--endpoint", server, "-q"]
    assert main(["predict", *common, "--propagation", "up", "-o", str(out)]) == 0, capsys.readouterr().err
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert mask[lesion.key_slice].any() and not mask[: lesion.key_slice].any()  # nothing below the key slice
    capsys.readouterr()
    assert main(["predict", *common, "-o", str(tmp_path / "x.dcm")]) == 2
    assert "a DICOM SEG needs a DICOM series as input" in capsys.readouterr().err


@pytest.mark.slow
def test_predict_2d_png_to_mask_png_geojson_and_preview(server, tmp_path, capsys):
    grey, truth, box = phantom_slice()
    image = tmp_path / "slice.png"
    Image.fromarray(grey).save(image)
    mask_png, geojson, preview = tmp_path / "m.png", tmp_path / "m.geojson", tmp_path / "preview.png"
    argv = ["predict-2d", str(image), "--bbox", *map(str, box), "--endpoint", server, "-o", str(mask_png), "-o", str(geojson),
            "--preview", str(preview)]
    assert main(argv) == 0, capsys.readouterr().err
    assert "model lite-medsam" in capsys.readouterr().out
    mask = np.asarray(Image.open(mask_png)) > 0
    assert mask.shape == grey.shape and dice(mask, truth) > 0.8
    (feature,) = json.loads(geojson.read_text())["features"]
    assert geometry_area(feature["geometry"]) == mask.sum() and 0 < feature["properties"]["quality"] <= 1
    assert image_size(preview)[0] > 200
    capsys.readouterr()
    assert main(["predict-2d", str(image), "--point", "60", "40", "--endpoint", server, "-o", str(mask_png)]) == 1
    assert "takes box prompts only" in capsys.readouterr().err  # the endpoint's own message, as it came


@pytest.mark.slow
@pytest.mark.skipif(not CT_DICOM.is_dir(), reason="the real CT series is not on this machine")
def test_predict_2d_dicom_slice(server, tmp_path, capsys):
    key, box = liver_prompt()
    dicom = series_files(CT_DICOM)[key]
    out = tmp_path / "liver.png"
    argv = ["predict-2d", str(dicom), "--bbox", *map(str, box), "--preset", "ct-soft-tissue", "--endpoint", server, "-o", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(LABELS)))[key] == LIVER
    assert dice(np.asarray(Image.open(out)) > 0, truth) > 0.8


@pytest.mark.parametrize("command", [["--help"], ["predict", "--help"], ["predict-2d", "--help"], ["serve-samapi", "--help"]])
def test_every_help_lists_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(command)
    assert exit_.value.code == 0
    assert "example" in capsys.readouterr().out
