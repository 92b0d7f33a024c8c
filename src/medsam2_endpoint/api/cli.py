"""`medsam2-endpoint predict | predict-2d | serve | serve-samapi | samples | check-sample`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import cast

# The online endpoint's entry functions ship inside the package: no checkout is needed to serve.
ENTRY_SCRIPT = Path(__file__).resolve().with_name("score_entry.py")
EXAMPLES = """examples:
  medsam2-endpoint predict dicom_folder/ --bbox 120 140 210 230 --key-slice 10 -o mask.dcm -o mask.nii.gz --preview p.png
  medsam2-endpoint predict-2d slice.png --bbox 40 30 120 110 -o mask.png -o mask.geojson
  medsam2-endpoint serve --model-dir model
  medsam2-endpoint serve-samapi --port 8000 --model-dir model
"""


def _serve(args: argparse.Namespace) -> int:
    model_dir = str(Path(args.model_dir).resolve())
    command = [
        str(Path(sys.executable).with_name("azmlinfsrv")),
        "--entry_script", str(ENTRY_SCRIPT),
        "--model_dir", model_dir,
        "--port", str(args.port),
    ]
    os.execv(command[0], command)
    return 0  # pragma: no cover - execv does not return


def _samples(args: argparse.Namespace) -> int:
    from medsam2_endpoint.testing.samples import write_samples

    for path in write_samples(Path(args.out)):
        print(path)
    return 0


def _check_sample(args: argparse.Namespace) -> int:
    """Post a sample file to a running endpoint and print each item's Dice against the phantom's ground truth."""
    import requests

    from medsam2_endpoint.testing.samples import check_response

    sample = Path(args.sample)
    expect = json.loads(sample.with_name(sample.name.replace(".json", ".expect.json")).read_text())
    response = requests.post(args.url, data=sample.read_bytes(), headers={"Content-Type": "application/json"}, timeout=args.timeout)
    body = response.json()
    failures, dices = check_response(expect, response.status_code, body)
    if response.status_code == 200:
        for i, result in enumerate(body):
            meta = result["metadata"]
            print(f"{sample.name} item {i}: model {meta['model']['name']}, {meta['voxel_count']} voxels, {meta['timing_ms']['total']:.0f} ms")
        print(f"{sample.name} Dice against ground truth (per item, per object): {', '.join(f'{d:.3f}' for d in dices)}")
    if response.status_code != 200:
        print(f"{sample.name}: HTTP {response.status_code} {body.get('error')}")
    for failure in failures:
        print(f"FAIL {failure}")
    return 1 if failures else 0


def _serve_samapi(args: argparse.Namespace) -> int:
    from medsam2_endpoint.api.samapi import serve

    return serve(host=args.host, port=args.port, model_dir=args.model_dir)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["predict"]:
        from medsam2_endpoint.client.cli import predict_main  # the client has its own argument parser

        return predict_main(argv[1:])
    if argv[:1] == ["predict-2d"]:
        from medsam2_endpoint.client.cli import predict_2d_main

        return predict_2d_main(argv[1:])
    parser = argparse.ArgumentParser(prog="medsam2-endpoint", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("predict", help="segment a local volume or DICOM series through a running endpoint (see predict --help)")
    sub.add_parser("predict-2d", help="segment one 2D image (PNG/TIFF/DICOM slice) through the 2D route (see predict-2d --help)")
    samapi = sub.add_parser("serve-samapi", help="run the samapi-compatible server for the QuPath SAM extension",
                            epilog="example: medsam2-endpoint serve-samapi --port 8000 --model-dir model  "
                            "(QuPath server URL http://127.0.0.1:8000/sam/)")
    samapi.add_argument("--host", default="127.0.0.1")
    samapi.add_argument("--port", type=int, default=8000)
    samapi.add_argument("--model-dir", default=None, help="model folder (default: MEDSAM2_MODEL_DIR or AZUREML_MODEL_DIR)")
    samapi.set_defaults(func=_serve_samapi)
    serve = sub.add_parser("serve", help="run the local Azure ML inference server (azmlinfsrv) on score.py",
                           epilog="example: medsam2-endpoint serve --model-dir model --port 5001  (then POST to http://127.0.0.1:5001/score)")
    serve.add_argument("--model-dir", default="model")
    serve.add_argument("--port", type=int, default=5001)
    serve.set_defaults(func=_serve)
    samples = sub.add_parser("samples", help="regenerate sample_requests/ from phantoms",
                             epilog="example: medsam2-endpoint samples --out sample_requests")
    samples.add_argument("--out", default="sample_requests")
    samples.set_defaults(func=_samples)
    check = sub.add_parser("check-sample", help="post a sample request and print Dice against its ground truth",
                           epilog="example: medsam2-endpoint check-sample sample_requests/3d_ct_liver_lesion.json --url http://127.0.0.1:5001/score")
    check.add_argument("sample")
    check.add_argument("--url", default="http://127.0.0.1:5001/score")
    check.add_argument("--timeout", type=float, default=600)
    check.set_defaults(func=_check_sample)
    args = parser.parse_args(argv)
    return cast(int, args.func(args))


if __name__ == "__main__":
    sys.exit(main())
