"""Resident memory through one 3D request, phase by phase (where the peak comes from).

    .venv/bin/python benchmarks/memory_phases.py --size 300
    .venv/bin/python benchmarks/memory_phases.py --size 300 --no-release   # glibc keeps freed heap

One MedSAM2 request (random-weight checkpoint, stop rules on, `rle`) on the speed phantom of the given
depth, in this process. A thread samples RSS every 10 ms; each line shows the RSS at a phase boundary and
the peak so far. `--no-release` turns off the service's periodic `malloc_trim` and, after propagation,
calls it once to show how much freed memory glibc had kept.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import harness


def arguments() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__)
    parser.add_argument("--size", type=int, default=300, help="phantom depth: 40, 120 or 300")
    parser.add_argument("--feature-cache-mb", type=int, help="MEDSAM2_FEATURE_CACHE_MB (default: the service's)")
    parser.add_argument("--no-release", action="store_true", help="no malloc_trim during the request")
    return parser


if __name__ == "__main__":  # --help answers before torch is imported
    ARGS = arguments().parse_args()

from medsam2_endpoint.api.azure import score as score_body


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


class Recorder:
    def __init__(self) -> None:
        self.peak = 0.0
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.01)

    def mark(self, phase: str) -> None:
        now = rss_mb()
        self.peak = max(self.peak, now)
        print(f"| {phase} | {now:.0f} | {self.peak:.0f} |", flush=True)


def main(args: argparse.Namespace) -> int:
    work = harness.OUT
    checkpoint = harness.random_checkpoint()
    # the phantom is built in another process: its memory is not this request's
    code = f"import json, sys; sys.path.insert(0, {str(harness.BENCHMARKS)!r}); import speed; from pathlib import Path; print(json.dumps(speed.write_case({args.size}, Path({str(work)!r}))))"
    case = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)

    recorder = Recorder()
    print("| phase | RSS (MB) | peak so far (MB) |\n| --- | --- | --- |")
    import speed

    import medsam2_endpoint.core.service as service_module
    import medsam2_endpoint.engines.medsam2 as medsam2
    import medsam2_endpoint.pipeline.propagate as propagate
    from medsam2_endpoint.base import heap

    # the phases are marked by wrapping the served functions in place (monkeypatching, as the tests do)
    if args.no_release:
        setattr(propagate, "release_if_grown", lambda: False)  # noqa: B010 - mypy forbids assigning a function
        setattr(service_module, "release_free_memory", lambda: None)  # noqa: B010

    def wrap(module: Any, name: str, before: str, after: str) -> None:
        original = getattr(module, name)

        def wrapped(*a: Any, **k: Any) -> Any:
            recorder.mark(before)
            result = original(*a, **k)
            recorder.mark(after)
            return result

        setattr(module, name, wrapped)

    wrap(propagate, "keep_largest_component", "largest component", "largest component done")
    if args.no_release:
        labelled = propagate.keep_largest_component

        def trim_then_label(mask: Any, *a: Any, **k: Any) -> Any:
            recorder.mark("propagation done")
            heap.release_free_memory()
            recorder.mark("after one malloc_trim")
            return labelled(mask, *a, **k)

        setattr(propagate, "keep_largest_component", trim_then_label)  # noqa: B010
    wrap(service_module, "encode_mask", "encoding", "encoding done")
    track = medsam2.MedSAM2Engine.track

    def counted_track(self: Any, state: Any, **kw: Any) -> Iterator[Any]:
        direction = "down" if kw["reverse"] else "up"
        n = 0
        for n, step in enumerate(track(self, state, **kw), start=1):
            if n % 50 == 0:
                recorder.mark(f"{direction}: {n} slices, feature cache {self.features.size_bytes / 2**20:.0f} MB")
            yield step
        recorder.mark(f"{direction}: done ({n} slices)")

    setattr(medsam2.MedSAM2Engine, "track", counted_track)  # noqa: B010
    recorder.mark("imports")
    service = speed._service("medsam2", checkpoint, args.feature_cache_mb)
    recorder.mark("models loaded")
    body = speed._body(case, [(tuple(case["bbox"]), case["key_slice"])], stop_after_empty=2, mask_format="rle")
    recorder.mark("request body parsed")
    started = time.perf_counter()
    score_body(service, body)
    recorder.mark(f"request done ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
