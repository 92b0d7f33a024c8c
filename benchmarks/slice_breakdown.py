"""Where a MedSAM2 slice's time goes, on a cold request and again on the same volume from the feature cache.

    .venv/bin/python benchmarks/slice_breakdown.py --size 40

Times the predictor's four networks with forward hooks (wall time, per slice processed) during one cold
request and one second request (box shifted 2 px, key slice +1), as `speed.py` does. What the second request
still spends is what a feature cache cannot save. Random-weight checkpoint, phantoms' `speed` volume.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from typing import Any

import harness


def arguments() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__)
    parser.add_argument("--size", type=int, default=40, help="slices in the phantom (40, 120 or 300)")
    return parser


if __name__ == "__main__":  # --help answers before torch is imported
    ARGS = arguments().parse_args()

import speed  # the same phantom, checkpoint, service and request bodies

from medsam2_endpoint.api.azure import score as score_body
from medsam2_endpoint.engines.medsam2 import MedSAM2Engine

PARTS = ("image_encoder", "memory_attention", "memory_encoder", "sam_mask_decoder")


def timed(predictor: Any) -> dict[str, float]:
    """Seconds spent inside each of PARTS, accumulated from now on."""
    spent: dict[str, float] = defaultdict(float)
    for name in PARTS:
        module = getattr(predictor, name)
        starts: list[float] = []
        module.register_forward_pre_hook(lambda _m, _a, starts=starts: starts.append(time.perf_counter()))
        module.register_forward_hook(lambda _m, _a, _o, name=name, starts=starts: spent.__setitem__(name, spent[name] + time.perf_counter() - starts.pop()))
    return spent


def main(args: argparse.Namespace) -> int:
    checkpoint = harness.random_checkpoint()
    case = speed.write_case(args.size, harness.OUT)
    service = speed._service("medsam2", checkpoint)
    (engine,) = [e for e in service.registry.snapshot().values() if e.info.family == "medsam2"]
    assert isinstance(engine, MedSAM2Engine)  # its networks are timed
    rows = []
    for label, (dz, dx) in (("cold (first request)", (0, 0)), ("warm (second request)", (1, 2))):
        spent = timed(engine.predictor)
        misses = engine.features.misses
        started = time.perf_counter()
        (result,) = score_body(service, speed._body(case, [speed._shifted(case, dz, dx)], stop_after_empty=0, mask_format="rle"))
        total = time.perf_counter() - started
        for module in [getattr(engine.predictor, name) for name in PARTS]:
            module._forward_pre_hooks.clear()
            module._forward_hooks.clear()
        slices = result["metadata"]["slices_processed"]
        rows.append((label, slices, engine.features.misses - misses, total, dict(spent)))
    print(f"MedSAM2, 512 x 512 x {args.size}, stop rules off; seconds per slice processed")
    table = []
    for label, slices, encoded, total, spent in rows:
        parts = [spent.get(name, 0.0) / slices for name in PARTS]
        table.append([label, slices, encoded, f"{total / slices:.3f}", *(f"{v:.3f}" for v in parts),
                      f"{total / slices - sum(parts):.3f}"])
    print(harness.table(["request", "slices", "encoded", "total", *PARTS, "rest"], table))
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
