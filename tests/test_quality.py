"""Segmentation quality is a behaviour: LiteMedSAM (real weights) must segment the phantoms' lesions."""

import json

import numpy as np
import pytest

from conftest import request_for
from medsam2_endpoint.api.azure import score as score_body
from medsam2_endpoint.core.service import Service
from medsam2_endpoint.core.settings import Settings
from medsam2_endpoint.io.encode import dumps, rle_decode
from medsam2_endpoint.testing.metrics import dice
from medsam2_endpoint.testing.phantoms import phantom_set


@pytest.fixture(scope="module")
def lite_service(tmp_path_factory):
    empty = tmp_path_factory.mktemp("no-weights")
    return Service.from_settings(Settings.from_env({"MEDSAM2_WARMUP": "0"}, model_dir=str(empty)))


@pytest.mark.slow
def test_lite_mean_dice_on_tiny_set(lite_service):
    scores = []
    for phantom in phantom_set("tiny"):
        for index, lesion in enumerate(phantom.lesions):
            (result,) = json.loads(dumps(score_body(lite_service, request_for(phantom, lesion=index, mask_format=["rle"]))))
            assert result["metadata"]["model"]["name"] == "lite-medsam"
            mask = rle_decode(result["mask"]["counts"], tuple(result["mask"]["size"]))
            scores.append(dice(mask, phantom.mask(lesion.label)))
    assert np.mean(scores) >= 0.85, scores
