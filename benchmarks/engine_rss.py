"""Peak resident memory of one LiteMedSAM engine on a runtime and precision: built, then 3 slices answered.

    PYTHONPATH=src python benchmarks/engine_rss.py onnx fp32
    PYTHONPATH=src python benchmarks/engine_rss.py openvino bf16

Run each in a fresh process (ru_maxrss is the process's peak); the ONNX exports come from the default cache.
"""

from __future__ import annotations

import argparse
import resource
import sys

import harness


def arguments() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__)
    parser.add_argument("runtime", choices=["torch", "onnx", "openvino"])
    parser.add_argument("precision", choices=["fp32", "bf16"])
    return parser


def main(args: argparse.Namespace) -> int:
    import numpy as np

    from medsam2_endpoint.engines.lite import LiteMedSAMEngine

    engine = LiteMedSAMEngine(runtime=args.runtime, precision=args.precision)
    built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    volume = (np.random.default_rng(0).random((3, 512, 512)) * 255).astype(np.uint8)
    state = engine.start(volume)
    for z in range(3):
        engine.segment_slice(state, z, [100, 100, 300, 300])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.runtime} {args.precision}: peak RSS after build {built:.0f} MB, after 3 slices {peak:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main(arguments().parse_args()))
