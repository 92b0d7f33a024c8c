"""Alternatives to the served ONNX Runtime fp32 encoder of LiteMedSAM, measured on this machine (not served):

- OpenVINO: the same exported encoder (engines/lite_onnx.py) compiled by OpenVINO for the CPU (latency hint,
  as many threads as torch), against ORT and torch in the same run: seconds per slice and the largest
  difference of its embedding from ORT's.
- int8: the encoder quantised statically by onnxruntime.quantization (QDQ, per-channel weights, calibrated
  on slices of the project's phantoms, testing/phantoms.py), seconds per slice against fp32, and the Dice of
  the served 3D answer with the int8 encoder against fp32's on every structure of benchmarks/real_anatomy.py.

    PYTHONPATH=src python benchmarks/cpu_runtimes.py [--openvino] [--int8] [--slices 10]

OpenVINO is imported only with --openvino (pip install openvino; it is not a dependency of the package).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness


def arguments() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__)
    parser.add_argument("--openvino", action="store_true")
    parser.add_argument("--int8", action="store_true")
    parser.add_argument("--slices", type=int, default=10)
    return parser


if __name__ == "__main__":  # --help answers before torch is imported
    ARGS = arguments().parse_args()

import numpy as np
import torch
from real_anatomy import STRUCTURES, answer_of, lesion_structures, read_scans, truth_of
from runtime import LIVER, ct_liver

from medsam2_endpoint.base.budget import Budget
from medsam2_endpoint.engines.lite import LiteMedSAMEngine
from medsam2_endpoint.engines.lite_onnx import INPUT_NAME, OUTPUT_NAME, OnnxEncoder
from medsam2_endpoint.pipeline.window import window_to_uint8
from medsam2_endpoint.testing.metrics import dice
from medsam2_endpoint.testing.phantoms import ct_phantom, mri_phantom


def per_slice(run: Any, images: list[np.ndarray]) -> float:
    run(images[0])
    started = time.perf_counter()
    for image in images:
        run(image)
    return (time.perf_counter() - started) / len(images)


def calibration_images(engine: LiteMedSAMEngine) -> list[np.ndarray]:
    """Encoder inputs from the project's phantoms: CT and MR, several slices each."""
    images = []
    for phantom in (ct_phantom((8, 128, 160), seed=1), ct_phantom((8, 96, 96), lesions=("lobulated",), seed=2),
                    mri_phantom((8, 128, 128), seed=3)):
        array = phantom.array()
        volume = window_to_uint8(array, phantom.window or (float(array.min()), float(array.max())))
        images += [engine._image_tensor(volume[z]).numpy() for z in range(0, volume.shape[0], 2)]
    return images


def quantise(fp32: Path, int8: Path, engine: LiteMedSAMEngine) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.items = iter(calibration_images(engine))

        def get_next(self) -> dict[str, np.ndarray] | None:
            item = next(self.items, None)
            return None if item is None else {INPUT_NAME: item}

    prepared = int8.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(prepared))
    quantize_static(str(prepared), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as cache:
        env = {"MEDSAM2_WARMUP": "0", "MEDSAM2_RUNTIME": "onnx", "MEDSAM2_ONNX_CACHE_DIR": cache}
        service = harness.service(env)
        service.budget = Budget.unlimited  # type: ignore[method-assign]  # a loaded machine must not cut a request short
        engine = service.registry.get("lite-medsam")
        assert isinstance(engine, LiteMedSAMEngine) and isinstance(engine._onnx_encoder, OnnxEncoder)
        _, _, windowed, truth = ct_liver()
        zs = np.flatnonzero(truth.any(axis=(1, 2)))
        images = [engine._image_tensor(windowed[z]).numpy() for z in np.linspace(zs[0], zs[-1], args.slices).astype(int)]
        ort_fp32 = engine._onnx_encoder.session
        times = {"onnxruntime fp32": per_slice(lambda x: ort_fp32.run([OUTPUT_NAME], {INPUT_NAME: x}), images),
                 "torch eager": per_slice(lambda x: engine.net.image_encoder(torch.from_numpy(x)), images)}
        notes = {}
        if args.openvino:
            import openvino as ov

            core = ov.Core()
            compiled = core.compile_model(str(engine._onnx_encoder.path), "CPU", {
                "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": str(torch.get_num_threads())})
            times[f"openvino {ov.__version__.split('-')[0]}"] = per_slice(lambda x: compiled(x), images)
            diff = max(float(np.abs(compiled(x)[0] - ort_fp32.run([OUTPUT_NAME], {INPUT_NAME: x})[0]).max()) for x in images[:3])
            notes["openvino vs ORT, largest embedding difference"] = f"{diff:.2e}"
        structures = []
        if args.int8:
            int8_path = Path(cache) / "lite_encoder-int8.onnx"
            quantise(engine._onnx_encoder.path, int8_path, engine)
            ort_int8 = session(int8_path)
            times["onnxruntime int8"] = per_slice(lambda x: ort_int8.run([OUTPUT_NAME], {INPUT_NAME: x}), images)
            int8_env = {**env, "MEDSAM2_ONNX_CACHE_DIR": cache}
            int8_service = harness.service(int8_env)
            int8_service.budget = Budget.unlimited  # type: ignore[method-assign]
            int8_engine = int8_service.registry.get("lite-medsam")
            assert isinstance(int8_engine, LiteMedSAMEngine) and isinstance(int8_engine._onnx_encoder, OnnxEncoder)
            int8_engine._onnx_encoder.session = ort_int8  # this benchmark only: the served encoder stays fp32
            scans = read_scans()
            for structure in [*STRUCTURES, *lesion_structures(scans)]:
                image, labels = scans[structure.scan]
                s_truth = truth_of(labels, structure)
                fp32_answer = answer_of(service, "lite-medsam", image, s_truth, structure.window, {})[0]
                int8_answer = answer_of(int8_service, "lite-medsam", image, s_truth, structure.window, {})[0]
                structures.append((structure.scan, structure.name, dice(fp32_answer, int8_answer),
                                   dice(fp32_answer, s_truth), dice(int8_answer, s_truth)))
    print(f"{harness.machine()}, {torch.get_num_threads()} threads; {LIVER.name} slices of the real CT")
    print("| encoder | seconds per slice | vs ORT fp32 |")
    print("| --- | --- | --- |")
    base = times["onnxruntime fp32"]
    for name, seconds in times.items():
        print(f"| {name} | {seconds:.3f} | {base / seconds:.2f}x |")
    for key, value in notes.items():
        print(f"\n{key}: {value}")
    if structures:
        print("\n| scan | structure | Dice int8 vs fp32 | Dice vs label (fp32) | Dice vs label (int8) |")
        print("| --- | --- | --- | --- | --- |")
        for scan, name, between, d32, d8 in structures:
            print(f"| {scan} | {name} | {between:.4f} | {d32:.3f} | {d8:.3f} |")
        worst = max(structures, key=lambda r: r[3] - r[4])
        print(f"\nlargest Dice loss vs label: {worst[3] - worst[4]:+.4f} ({worst[0]} {worst[1]}); "
              f"lowest Dice int8 vs fp32: {min(r[2] for r in structures):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
