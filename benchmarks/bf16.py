"""bf16 on the CPU: LiteMedSAM's image encoder on ONNX Runtime fp32 (the served default before), OpenVINO fp32
and bf16, torch bf16 autocast; then the served answers of fp32 (ONNX Runtime) against bf16 (OpenVINO).

1. Encoder seconds per slice on real CT slices (the liver's range of ../shared/data/real/ct_dicom), the
   variants interleaved slice by slice (a loaded machine slows all of them alike), and the Dice of each
   variant's key-slice mask (the label's box) against ONNX Runtime fp32's.
2. The first 3D request on ct_dicom's liver, end to end through a fresh `Service` per variant (cold caches),
   the two services built and asked alternately.
3. --structures: all 15 structures of benchmarks/real_anatomy.py: 3D Dice against the labels for fp32 and
   bf16, and between them. --phantoms: the same on the "quality" phantoms (testing/phantoms.py).

    PYTHONPATH=src python benchmarks/bf16.py [--slices 12] [--structures] [--phantoms] [--json out.json]
        [--candidate openvino:fp32]   # another served variant against ONNX Runtime fp32

Needs a CPU with native bf16 (avx512_bf16 or amx_bf16); elsewhere OpenVINO emulates bf16 and the figures mean
nothing (the script says so and stops).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

VARIANTS = {"fp32": ("onnx", "fp32"), "bf16": ("openvino", "bf16")}  # served variants compared: (runtime, precision)


def service_for(runtime: str, precision: str) -> Any:
    from medsam2_endpoint.base.budget import Budget
    from medsam2_endpoint.core.service import Service
    from medsam2_endpoint.core.settings import Settings

    env = {"MEDSAM2_WARMUP": "0", "MEDSAM2_RUNTIME": runtime, "MEDSAM2_PRECISION": precision}
    service = Service.from_settings(Settings.from_env(env, model_dir=str(REPO / "benchmarks" / "no-models")))
    service.budget = Budget.unlimited  # type: ignore[method-assign]  # a loaded machine must not cut a request short
    return service


def interleaved(variants: dict[str, Callable[[np.ndarray], Any]], images: list[np.ndarray]) -> dict[str, float]:
    """Mean seconds per image of each variant, every image run by every variant in turn (after one warm-up each)."""
    for run in variants.values():
        run(images[0])
    spent = dict.fromkeys(variants, 0.0)
    for image in images:
        for name, run in variants.items():
            started = time.perf_counter()
            run(image)
            spent[name] += time.perf_counter() - started
    return {name: seconds / len(images) for name, seconds in spent.items()}


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=12, help="real CT slices timed per encoder variant")
    parser.add_argument("--structures", action="store_true", help="3D Dice of fp32 and bf16 on all 15 real structures")
    parser.add_argument("--phantoms", action="store_true", help="3D Dice of fp32 and bf16 on the quality phantoms")
    parser.add_argument("--json", default=None, help="write every figure here too")
    parser.add_argument("--candidate", default="openvino:bf16",
                        help="RUNTIME:PRECISION served against onnx:fp32 in parts 2 and 3 (its columns keep the name bf16)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = arguments().parse_args(argv)
    runtime_c, _, precision_c = args.candidate.partition(":")
    VARIANTS["bf16"] = (runtime_c, precision_c)

    import torch
    from real_anatomy import STRUCTURES, answer_of, box_of, lesion_structures, read_scans, truth_of
    from runtime import LIVER, ct_liver

    from medsam2_endpoint.engines.lite import LiteMedSAMEngine
    from medsam2_endpoint.engines.lite_openvino import compile_encoder
    from medsam2_endpoint.engines.precision import cpu_has_bf16
    from medsam2_endpoint.testing.metrics import dice
    from medsam2_endpoint.testing.phantoms import phantom_set

    if not cpu_has_bf16():
        print("this CPU has no native bf16 (avx512_bf16 / amx_bf16): nothing to measure")
        return 1
    load = os.popen("uptime").read().strip()
    out: dict[str, Any] = {"uptime_before": load, "cpus": os.cpu_count(), "threads": torch.get_num_threads()}

    # 1. the encoder alone, interleaved
    image, labels, windowed, truth = ct_liver()
    engine = LiteMedSAMEngine(runtime="onnx")
    assert engine._onnx_encoder is not None
    ov = {p: compile_encoder(engine._onnx_encoder.path, p) for p in ("fp32", "bf16")}
    zs = np.flatnonzero(truth.any(axis=(1, 2)))
    picked = np.linspace(zs[0], zs[-1], args.slices).astype(int)
    images = [engine._image_tensor(windowed[z]).numpy() for z in picked]

    def torch_bf16(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return engine.net.image_encoder(torch.from_numpy(x)).float().numpy()  # type: ignore[no-any-return]

    encoders: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "onnxruntime fp32": engine._onnx_encoder,
        "openvino fp32": lambda x: np.asarray(ov["fp32"](x)[0]),
        "openvino bf16": lambda x: np.asarray(ov["bf16"](x)[0]),
        "torch bf16 autocast": torch_bf16,
    }
    times = interleaved(encoders, images)
    h, w = windowed.shape[1:]
    slice_dice: dict[str, list[float]] = {name: [] for name in encoders}
    for z, x in zip(picked, images, strict=True):
        box = engine._box_256(np.asarray(box_of(truth[z])), h, w)[None]
        masks = {name: engine._decode(torch.from_numpy(np.asarray(run(x))), box)[0] > 0 for name, run in encoders.items()}
        for name in encoders:
            slice_dice[name].append(dice(masks[name].numpy(), masks["onnxruntime fp32"].numpy()))
    out["encoder"] = {name: {"seconds": times[name], "speedup": times["onnxruntime fp32"] / times[name],
                             "mean_slice_dice_vs_ort": float(np.mean(slice_dice[name])),
                             "min_slice_dice_vs_ort": float(np.min(slice_dice[name]))} for name in encoders}
    print(f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads; {load}")
    print(f"\nencoder on {len(images)} real CT slices ({LIVER.name} range), interleaved")
    print("| encoder | seconds per slice | vs ORT fp32 | key-slice mask Dice vs ORT fp32: mean | min |")
    print("| --- | --- | --- | --- | --- |")
    for name, row in out["encoder"].items():
        print(f"| {name} | {row['seconds']:.3f} | {row['speedup']:.2f}x | {row['mean_slice_dice_vs_ort']:.4f} "
              f"| {row['min_slice_dice_vs_ort']:.4f} |", flush=True)

    # 2. the first request, each on a fresh service, built and asked alternately
    services: dict[str, Any] = {}
    first: dict[str, dict[str, Any]] = {}
    for name, (runtime, precision) in VARIANTS.items():
        started = time.perf_counter()
        services[name] = service_for(runtime, precision)
        build = time.perf_counter() - started
        info = services[name].registry.info("lite-medsam")
        assert info.capabilities.precision == precision, info
        answer, seconds, processed = answer_of(services[name], "lite-medsam", image, truth, LIVER.window, {})
        first[name] = {"build_s": build, "first_request_s": seconds, "slices": processed, "dice": dice(answer, truth),
                       "answer": answer}
    out["first_request"] = {k: {kk: vv for kk, vv in v.items() if kk != "answer"} for k, v in first.items()}
    print("\nfirst 3D request, ct_dicom liver, fresh Service each")
    print("| variant | service build (s) | first request (s) | slices processed | Dice vs label |")
    print("| --- | --- | --- | --- | --- |")
    for name, row in first.items():
        runtime, precision = VARIANTS[name]
        print(f"| {runtime} {precision} | {row['build_s']:.1f} | {row['first_request_s']:.1f} | {row['slices']} | {row['dice']:.3f} |")
    fp32_row, bf16_row = first["fp32"], first["bf16"]
    print(f"speed-up {float(fp32_row['first_request_s']) / float(bf16_row['first_request_s']):.2f}x; "
          f"Dice bf16 vs fp32 {dice(np.asarray(fp32_row['answer']), np.asarray(bf16_row['answer'])):.4f}", flush=True)

    # 3. 3D answers on the real structures and the phantoms
    cases: list[tuple[str, str, Any, np.ndarray, tuple[float, float] | None]] = []
    if args.structures:
        scans = read_scans()
        for s in [*STRUCTURES, *lesion_structures(scans)]:
            cases.append(("ct lesion" if s.scan.startswith("CT_Lesion") else s.scan, s.name, scans[s.scan][0],
                          truth_of(scans[s.scan][1], s), s.window))
    if args.phantoms:
        for phantom in phantom_set("quality"):
            for lesion in phantom.lesions:
                cases.append(("phantom " + phantom.name, lesion.name, phantom.image, phantom.mask(lesion.label), phantom.window))
    if cases:
        print("\n| scan | structure | Dice vs label fp32 | bf16 | bf16 - fp32 | Dice bf16 vs fp32 | time fp32 (s) | bf16 (s) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for scan, name, case_image, case_truth, window in cases:
        got = {v: answer_of(services[v], "lite-medsam", case_image, case_truth, window, {}) for v in VARIANTS}
        row = {"scan": scan, "structure": name, "fp32": dice(got["fp32"][0], case_truth), "bf16": dice(got["bf16"][0], case_truth),
               "between": dice(got["fp32"][0], got["bf16"][0]), "seconds_fp32": got["fp32"][1], "seconds_bf16": got["bf16"][1]}
        rows.append(row)
        print(f"| {scan} | {name} | {row['fp32']:.3f} | {row['bf16']:.3f} | {row['bf16'] - row['fp32']:+.3f} | {row['between']:.4f} "
              f"| {row['seconds_fp32']:.1f} | {row['seconds_bf16']:.1f} |", flush=True)
    out["cases"] = rows
    for group, mine in (("real", [r for r in rows if not str(r["scan"]).startswith("phantom")]),
                        ("phantoms", [r for r in rows if str(r["scan"]).startswith("phantom")])):
        if mine:
            fp32, bf16 = float(np.mean([r["fp32"] for r in mine])), float(np.mean([r["bf16"] for r in mine]))
            worst = min(mine, key=lambda r: float(r["bf16"]) - float(r["fp32"]))
            summary = {"n": len(mine), "mean_fp32": fp32, "mean_bf16": bf16,
                       "largest_drop": float(worst["bf16"]) - float(worst["fp32"]), "largest_drop_at": f"{worst['scan']} {worst['structure']}",
                       "seconds_fp32": sum(float(r["seconds_fp32"]) for r in mine),
                       "seconds_bf16": sum(float(r["seconds_bf16"]) for r in mine)}
            out[f"summary_{group}"] = summary
            print(f"\n{group}: {len(mine)} structures, mean 3D Dice fp32 {fp32:.4f}, bf16 {bf16:.4f} ({bf16 - fp32:+.4f}); "
                  f"largest drop {summary['largest_drop']:+.4f} ({summary['largest_drop_at']}); "
                  f"3D time fp32 {summary['seconds_fp32']:.0f} s, bf16 {summary['seconds_bf16']:.0f} s")
    out["uptime_after"] = os.popen("uptime").read().strip()
    print(out["uptime_after"])
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
