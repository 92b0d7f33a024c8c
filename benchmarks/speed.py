"""Speed and memory, project vs the reference pipeline, on the same volume, checkpoint and machine.

    .venv/bin/python benchmarks/speed.py --sizes 40 --models medsam2,lite
    .venv/bin/python benchmarks/speed.py --sizes 300,40 --models lite
    .venv/bin/python benchmarks/speed.py --sizes 120 --models medsam2 --no-reference --no-extras --feature-cache-mb 0
    .venv/bin/python benchmarks/speed.py --sizes 300 --models medsam2 --no-reference --extras second

Each measurement runs in its own process (peak RSS = that process's ru_maxrss, model loading included),
which reads the phantom's .nii.gz written by the parent and holds the parsed request body, as a server
worker would. The service runs with its deployed defaults (feature cache 256 MB per model) unless
--feature-cache-mb says otherwise.
MedSAM2 uses a random-weight checkpoint (random weights never give empty slices, so stop rules cannot
shorten its propagation: its "stop on" rows show the cost of the checks, not their savings). Volumes:
the phantoms' "speed" set (512 x 512 x Z CT, int16, one lesion spanning ~15 slices).
"""

from __future__ import annotations

import argparse
import base64
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import harness

if TYPE_CHECKING:
    from medsam2_endpoint.core.service import Service
    from medsam2_endpoint.testing.phantoms import Phantom

# (box, key slice) of one object
Prompt = tuple[Sequence[int], int]


def arguments() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__)
    parser.add_argument("--sizes", default="40")
    parser.add_argument("--models", default="medsam2,lite")
    parser.add_argument("--feature-cache-mb", type=int, help="MEDSAM2_FEATURE_CACHE_MB for the project runs (default: the service's, 256)")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference and stop-rules-off rows")
    parser.add_argument("--no-extras", action="store_true", help="first request only (no second request, objects, formats)")
    parser.add_argument("--extras", default="second,objects,formats", help="which extras to measure after the first request")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    return parser


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def _phantom(depth: int) -> Phantom:
    from medsam2_endpoint.testing.phantoms import phantom_set

    return next(p for p in phantom_set("speed") if p.labels.shape[0] == depth)


def write_case(depth: int, work: Path) -> dict[str, Any]:
    """Write the phantom's .nii.gz and return what a measuring process needs (it never builds the phantom:
    its peak RSS is then the service's, not the phantom generator's)."""
    phantom = _phantom(depth)
    path = work / f"speed_{depth}.nii.gz"
    path.write_bytes(phantom.nifti_bytes())
    lesion = phantom.lesions[0]
    assert phantom.window is not None  # the speed set is CT, windowed
    return {
        "nifti": str(path),
        "bbox": [int(v) for v in lesion.bbox],
        "key_slice": int(lesion.key_slice),
        "window": [float(v) for v in phantom.window],
        "input_mb": phantom.array().nbytes / 2**20,
    }


def _service(model: str, checkpoint: Path, feature_cache_mb: int | None = None) -> Service:
    from medsam2_endpoint.base.budget import Budget
    from medsam2_endpoint.core.registry import configure_threads
    from medsam2_endpoint.core.service import Service
    from medsam2_endpoint.core.settings import Settings

    configure_threads(0)
    env = {"MEDSAM2_WARMUP": "0", "MEDSAM2_REQUEST_DEADLINE_S": "100000", "MEDSAM2_MAX_BASE64_MB": "2048"}
    if feature_cache_mb is not None:  # else the deployed default (256 MB per model)
        env["MEDSAM2_FEATURE_CACHE_MB"] = str(feature_cache_mb)
    folder = checkpoint.parent if model == "medsam2" else Path(tempfile.mkdtemp())
    if model != "medsam2":
        env["MEDSAM2_ENABLE_LITE"] = "1"
    service = Service.from_settings(Settings.from_env(env, model_dir=str(folder)))
    # the platform's 180 s cap bounds every request's budget: a loaded machine must not cut a measurement short
    service.budget = Budget.unlimited  # type: ignore[method-assign]
    return service


def _body(case: dict[str, Any], boxes: Sequence[Prompt], **columns: object) -> dict[str, Any]:
    cols: dict[str, Any] = {"nii_image": [base64.b64encode(Path(case["nifti"]).read_bytes()).decode()], "dicom_window": [case["window"]]}
    if len(boxes) == 1:
        cols.update(bbox=[list(boxes[0][0])], key_slice_idx=[boxes[0][1]])
    else:
        cols["objects"] = [[{"id": i + 1, "bbox": list(b), "key_slice_idx": k} for i, (b, k) in enumerate(boxes)]]
    cols.update({k: [v] for k, v in columns.items()})
    return {"input_data": cols}


def _shifted(case: dict[str, Any], dz: int, dx: int) -> Prompt:
    x0, y0, x1, y1 = case["bbox"]
    return (x0 + dx, y0, x1 + dx, y1), case["key_slice"] + dz


def run_one(config: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this process; returns timings (s) and peak RSS (MB)."""
    import numpy as np

    from medsam2_endpoint.api.azure import score as score_body

    case = config["case"]
    checkpoint = Path(config["checkpoint"])
    out: dict[str, Any] = {"input_mb": case["input_mb"], "model_mb": checkpoint.stat().st_size / 2**20 if config["model"] == "medsam2" else 37.5}
    if config["kind"] == "reference":
        from reference_pipeline import build_reference_predictor, reference_segment

        predictor = build_reference_predictor(checkpoint)
        started = time.perf_counter()
        mask = reference_segment(Path(case["nifti"]), tuple(case["bbox"]), case["key_slice"], tuple(case["window"]), predictor=predictor)
        out.update(seconds=time.perf_counter() - started, voxels=int(mask.sum()), slices=int(mask.shape[0]))
        np.save(Path(config["mask_out"]), mask) if config.get("mask_out") else None
    else:
        from medsam2_endpoint.io.encode import dumps

        service = _service(config["model"], checkpoint, config.get("feature_cache_mb"))
        out["loaded_rss_mb"] = _current_rss_mb()
        stop = config.get("stop_after_empty", 2)
        boxes = [(tuple(case["bbox"]), case["key_slice"])]
        body = _body(case, boxes, stop_after_empty=stop, mask_format="rle")  # the parsed JSON a server would hold
        started = time.perf_counter()
        (result,) = score_body(service, body)
        del body
        out.update(seconds=time.perf_counter() - started, slices=result["metadata"]["slices_processed"], voxels=result["metadata"]["voxel_count"])
        out["peak_rss_mb"] = _peak_rss_mb()  # one request; the extras below add their own inputs and results
        if config.get("mask_out"):
            from medsam2_endpoint.io.encode import rle_decode

            np.save(Path(config["mask_out"]), rle_decode(result["mask"]["counts"], tuple(result["mask"]["size"])))
        if config.get("second"):
            caches = [cast(Any, engine).features for engine in service.registry.snapshot().values()]
            misses = sum(c.misses for c in caches)
            started = time.perf_counter()
            (second,) = score_body(service, _body(case, [_shifted(case, 1, 2)], stop_after_empty=stop, mask_format="rle"))
            out["second_seconds"] = time.perf_counter() - started
            out["second_slices"] = second["metadata"]["slices_processed"]
            out["second_encoded"] = sum(c.misses for c in caches) - misses  # slices the image encoder ran on again
        if config.get("objects"):
            fresh = service
            for engine in fresh.registry.snapshot().values():  # empty the feature caches: the 3 objects start cold, as the first run
                held = cast(Any, engine)  # each engine's own cache, not on the protocol
                held.features = type(held.features)(held.features.max_bytes)
            three = [boxes[0], _shifted(case, 1, 3), _shifted(case, -1, -3)]
            body = _body(case, three, stop_after_empty=stop, mask_format="rle")
            started = time.perf_counter()
            score_body(fresh, body)
            out["three_objects_seconds"] = time.perf_counter() - started
        if config.get("formats"):
            for fmt in ("list", "rle", "nifti"):
                body = _body(case, boxes, stop_after_empty=stop, mask_format=fmt)
                (res,) = score_body(service, body)
                started = time.perf_counter()
                text = dumps([res])
                out[f"{fmt}_bytes"] = len(text)
                out[f"{fmt}_encode_seconds"] = res["metadata"]["timing_ms"]["encode"] / 1000 + time.perf_counter() - started
    out.setdefault("peak_rss_mb", _peak_rss_mb())
    return out


def measure(config: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(config)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main(args: argparse.Namespace) -> int:
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return 0
    work = harness.OUT
    checkpoint = harness.random_checkpoint()
    import numpy as np

    rows: list[tuple[int, str, str, dict[str, Any], float | None]] = []
    for depth in [int(s) for s in args.sizes.split(",")]:
        base = {"depth": depth, "checkpoint": str(checkpoint), "case": write_case(depth, work), "feature_cache_mb": args.feature_cache_mb}
        extras: dict[str, bool] = {} if args.no_extras else {name: True for name in args.extras.split(",") if name}
        for model in args.models.split(","):
            if model == "medsam2" and not args.no_reference:
                ref = measure({**base, "model": model, "kind": "reference", "mask_out": str(work / "ref.npy")})
                off = measure({**base, "model": model, "kind": "project", "stop_after_empty": 0, "mask_out": str(work / "off.npy")})
                identical = bool(np.array_equal(np.load(work / "ref.npy"), np.load(work / "off.npy")))
                rows.append((depth, model, "reference", ref, None))
                rows.append((depth, model, f"project, stop rules off (mask identical: {identical})", off, ref["seconds"]))
            on = measure({**base, "model": model, "kind": "project", "stop_after_empty": 2, **extras})
            rows.append((depth, model, "project, stop rules on (default)", on, None))
    print("| Z | model | run | time (s) | ratio to reference | slices processed | RSS after loading (MB) | peak RSS (MB) | RSS limit 1.5x(input+model+1GB) (MB) | extras |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for depth, model, run, r, ref_seconds in rows:
        limit = 1.5 * (r["input_mb"] + r["model_mb"] + 1024)
        notes = []
        if "second_seconds" in r:
            notes.append(
                f"second request {r['second_seconds']:.1f} s ({r['seconds'] / r['second_seconds']:.2f}x faster; "
                f"per slice {r['seconds'] / r['slices']:.3f} -> {r['second_seconds'] / r['second_slices']:.3f} s; "
                f"{r['second_encoded']} of {r['second_slices']} slices encoded again)"
            )
        if "three_objects_seconds" in r:
            notes.append(f"3 objects {r['three_objects_seconds']:.1f} s ({r['three_objects_seconds'] / r['seconds']:.2f}x of 1 object)")
        if "list_bytes" in r:
            notes.append(
                "bytes list/rle/nifti " + "/".join(str(r[f"{f}_bytes"]) for f in ("list", "rle", "nifti"))
                + f" (rle {100 * r['rle_bytes'] / r['list_bytes']:.3f}%, nifti {100 * r['nifti_bytes'] / r['list_bytes']:.3f}% of list);"
                + " encode s list/rle/nifti " + "/".join(f"{r[f'{f}_encode_seconds']:.2f}" for f in ("list", "rle", "nifti"))
            )
        ratio = f"{r['seconds'] / ref_seconds:.2f}" if ref_seconds else ""
        loaded = f"{r['loaded_rss_mb']:.0f}" if "loaded_rss_mb" in r else ""
        print(f"| {depth} | {model} | {run} | {r['seconds']:.1f} | {ratio} | {r['slices']} | {loaded} | {r['peak_rss_mb']:.0f} | {limit:.0f} | {'; '.join(notes)} |")
    return 0


if __name__ == "__main__":  # the package is imported only by the functions that run
    sys.exit(main(arguments().parse_args()))
