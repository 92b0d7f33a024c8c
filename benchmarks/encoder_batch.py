"""Does encoding several slices in one batch (ahead of the propagation front) pay off on this machine?

    .venv/bin/python benchmarks/encoder_batch.py              # CPU (or CUDA when visible), MedSAM2 random weights
    .venv/bin/python benchmarks/encoder_batch.py --batches 1,2,4,8 --repeats 3

Times the MedSAM2 image encoder (SAM 2.1 hiera-tiny at 512 px, `forward_image`) per slice at each batch
size, after one warm-up call per size; on CUDA under bf16 autocast, with peak GPU memory. The engine
encodes one slice at a time: this script is the evidence for (or against) batching.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import harness


def arguments() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__)
    parser.add_argument("--batches", default="1,2,4")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default=None, help="default: cuda when visible, else cpu")
    return parser


if __name__ == "__main__":  # --help answers before torch is imported
    ARGS = arguments().parse_args()

import torch

from medsam2_endpoint.core.registry import configure_threads
from medsam2_endpoint.engines.medsam2 import MedSAM2Engine


def main(args: argparse.Namespace) -> int:
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    checkpoint = harness.random_checkpoint()
    threads = configure_threads(0)
    engine = MedSAM2Engine(checkpoint, device=args.device, name="bench")
    cuda = args.device.startswith("cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    print(f"device {args.device} ({torch.cuda.get_device_name() if cuda else f'{threads} CPU threads'})")
    print("| batch | s per slice | peak GPU MB |")
    print("| --- | --- | --- |")
    for batch in [int(b) for b in args.batches.split(",")]:
        frames = torch.randn(batch, 3, 512, 512, device=args.device)
        with torch.inference_mode(), autocast:
            engine.predictor.forward_image(frames)  # warm-up (kernels, allocator)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            for _ in range(args.repeats):
                engine.predictor.forward_image(frames)
            if cuda:
                torch.cuda.synchronize()
        per_slice = (time.perf_counter() - started) / (args.repeats * batch)
        peak = f"{torch.cuda.max_memory_allocated() / 2**20:.0f}" if cuda else "-"
        print(f"| {batch} | {per_slice:.3f} | {peak} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
