"""LiteMedSAM's prompt decoder per box, by how many boxes are decoded at once (one torch thread): what the box-grid
automask's budget-check step (pipeline/automask.BOX_STEP) costs and saves.

    PYTHONPATH=src .venv/bin/python benchmarks/box_decode.py

Prints seconds per box for steps of 1, 2, 4, 8, 16 and 64 boxes on a 512 x 384 field of view (the grid of a
points_per_side 32 automask), and the load average.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np
import torch

from medsam2_endpoint.core.service import Service
from medsam2_endpoint.core.settings import Settings
from medsam2_endpoint.pipeline.automask import _grid_boxes


def main() -> None:
    torch.set_num_threads(1)
    settings = Settings.from_env({"MEDSAM2_WARMUP": "0", "MEDSAM2_NUM_THREADS": "1"}, model_dir=tempfile.mkdtemp())
    service = Service.from_settings(settings)
    engine = service.prompter.image_engine(service.default)
    rgb = np.random.default_rng(0).integers(0, 255, (384, 512, 3), dtype=np.uint8)
    embedding, _ = service.prompter.embedding(service.default, rgb)
    boxes, _ = _grid_boxes(384, 512, 32)
    engine.predict_logits_2d(embedding, boxes[:2], multimask=False)  # warm
    result: dict[str, object] = {"load_average": os.getloadavg()[0], "grid_boxes": len(boxes)}
    for step in (1, 2, 4, 8, 16, 64):
        total = 64
        started = time.perf_counter()
        for start in range(0, total, step):
            engine.predict_logits_2d(embedding, boxes[start : start + step], multimask=False)
        result[f"s_per_box_step_{step}"] = round((time.perf_counter() - started) / total, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
