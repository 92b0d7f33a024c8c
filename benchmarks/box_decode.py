"""LiteMedSAM's prompt decoder per box, by how many boxes are decoded at once (one torch thread): what the box-grid
automask's budget-check step (pipeline/automask.BOX_STEP) costs and saves.

    PYTHONPATH=src .venv/bin/python benchmarks/box_decode.py [--boxes 64]

Prints seconds per box for steps of 1, 2, 4, 8, 16 and 64 boxes on a 512 x 384 disk phantom, prompted with the
region boxes the automask decodes (pipeline/box_prompts: the regions its points_per_side 32 grid points sit in,
repeated to --boxes), and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import harness


def arguments() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__)
    parser.add_argument("--boxes", type=int, default=64, help="boxes decoded per step size (default 64)")
    parser.add_argument("--steps", default="1,2,4,8,16,64", help="comma-separated step sizes")
    return parser


if __name__ == "__main__":  # --help answers before torch is imported
    ARGS = arguments().parse_args()

import numpy as np
import torch

from medsam2_endpoint.engines.lite import LiteMedSAMEngine
from medsam2_endpoint.pipeline.box_prompts import grid_points, region_boxes
from medsam2_endpoint.testing.phantoms import disk_image


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    service = harness.service({"MEDSAM2_NUM_THREADS": "1"})
    engine = service.prompter.image_engine(service.default)
    assert isinstance(engine, LiteMedSAMEngine)  # the box decoder measured here
    rgb, _ = disk_image(384, 512, centre_xy=(300.0, 180.0), radius=80.0)
    grey = np.asarray(rgb.mean(axis=2), dtype=np.uint8)  # as the automask sees it
    embedding, _ = service.prompter.embedding(service.default, rgb)
    found = region_boxes(grey, grid_points(384, 512, 32)).boxes
    boxes = np.resize(found, (max(args.boxes, 2), 4))  # the grid's boxes, repeated: the decoder's cost is per box
    engine.predict_logits_2d(embedding, boxes[:2], multimask=False)  # warm
    result: dict[str, object] = {"load_average": os.getloadavg()[0], "grid_boxes": len(found), "boxes": len(boxes)}
    for step in (int(s) for s in args.steps.split(",")):
        started = time.perf_counter()
        for start in range(0, len(boxes), step):
            engine.predict_logits_2d(embedding, boxes[start : start + step], multimask=False)
        result[f"s_per_box_step_{step}"] = round((time.perf_counter() - started) / len(boxes), 3)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
