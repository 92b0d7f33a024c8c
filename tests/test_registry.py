"""The model registry: built once, the only place engines are made, safe to read while weights are registered."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest

from medsam2_endpoint.api.samapi_types import ModelTypes
from medsam2_endpoint.base.errors import InvalidRequest, ModelUnavailable
from medsam2_endpoint.contract.score2d import ImagePrompt
from medsam2_endpoint.core import registration
from medsam2_endpoint.core.registry import LITE_NAME, ModelRegistry
from medsam2_endpoint.core.service import Service
from medsam2_endpoint.engines.medsam2 import STAGING_PREFIX, find_checkpoints
from test_prompt2d import phantom_slice, png_b64

REGISTERED = ("W1", "W2", "W3")


def own_service(service: Service, weights_dir) -> Service:
    """A Service over a copy of the shared registry (registration grows this copy only)."""
    settings = service.settings.model_copy(update={"samapi_allow_weight_registration": True, "samapi_weights_dir": weights_dir,
                                                   "inference_slots": 4})  # the readers share the model: no busy answers here
    return Service(settings, ModelRegistry(service.registry.snapshot(), service.default, feature_cache_mb=8))


def test_registration_while_other_threads_list_and_use_models(service, medsam2_checkpoint, tmp_path, monkeypatch):
    own = own_service(service, tmp_path / "weights")
    data = medsam2_checkpoint.read_bytes()
    monkeypatch.setattr(registration, "fetch_bytes", lambda url, policy, **_: data)
    grey, _, box = phantom_slice()
    image = png_b64(grey)
    types = ModelTypes(own)
    errors: list[BaseException] = []
    seen: list[list[int]] = [[] for _ in range(3)]
    done = threading.Event()

    def reader(k: int) -> None:
        try:
            rounds = 0
            while rounds < 400 and (not done.is_set() or rounds < 5):
                rounds += 1
                names = list(own.models())
                seen[k].append(len(names))
                for name, engine in own.registry.snapshot().items():  # iterating while a writer adds
                    assert engine.info.name == name or name == LITE_NAME
                    own.registry.image_engine(name)
                assert {w["name"] for w in types.weights(None)} == set(types.names("sam2_t")) | set(types.names("vit_t"))
                result = own.segment_image(LITE_NAME, image, ImagePrompt(box=list(box)))  # cached embedding after the first
                assert result.masks and result.masks[0].area > 0
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    readers = [threading.Thread(target=reader, args=(k,)) for k in range(3)]
    for t in readers:
        t.start()
    try:
        answers = [own.register_weights("sam2_t", name, f"https://weights.example.org/{name}.pt") for name in REGISTERED]
    finally:
        done.set()
        for t in readers:
            t.join(300)
    assert not errors, errors
    assert answers == [f"{n} (https://weights.example.org/{n}.pt) is registered. Choose it in the weights list of type sam2_t." for n in REGISTERED]
    assert set(REGISTERED) <= set(own.available_models())  # nothing lost
    for counts in seen:
        assert counts == sorted(counts), "a reader saw a model disappear"
    assert {w["name"] for w in types.weights("sam2_t")} >= set(REGISTERED)
    assert all(own.registry.get(n).features.max_bytes == 8 << 20 for n in REGISTERED), "registered engines get the configured cache"
    assert not set(REGISTERED) & set(service.available_models())


def test_build_loads_registered_weights_and_never_staging(medsam2_checkpoint, tmp_path):
    models = tmp_path / "models"
    (models / "registered" / f"{STAGING_PREFIX}abc").mkdir(parents=True)
    shutil.copy(medsam2_checkpoint, models / "registered" / f"{STAGING_PREFIX}abc" / "Half.pt")  # a registration cut short
    shutil.copy(medsam2_checkpoint, models / "Main.pt")
    outside = tmp_path / "elsewhere" / "Mine.pt"
    outside.parent.mkdir()
    shutil.copy(medsam2_checkpoint, outside)
    assert [p.name for p in find_checkpoints(models)] == ["Main.pt"]
    registry = ModelRegistry.build(model_dir=models, device="cpu", feature_cache_mb=4, enable_lite=False,
                                   extra_checkpoints={"Mine": outside})
    assert registry.names() == ["Main", "Mine"] and registry.default == "Main"
    assert all(registry.get(n).features.max_bytes == 4 << 20 for n in registry.names())


def test_names_resolve_or_fail_clearly(service):
    registry = service.registry
    assert registry.resolve(None, field="input_data.model[0]") == registry.default
    with pytest.raises(InvalidRequest, match=r"input_data.model\[0\]: unknown model 'nope'; available models: "):
        registry.resolve("nope", field="input_data.model[0]")
    with pytest.raises(ModelUnavailable, match="model nope is not loaded"):
        registry.get("nope")
    with pytest.raises(InvalidRequest, match="already loaded"):
        ModelRegistry(registry.snapshot(), registry.default).add(registry.default, registry.get(registry.default))


def test_snapshots_are_read_only_copies(service):
    snapshot = service.registry.snapshot()
    with pytest.raises(TypeError):
        snapshot["x"] = snapshot[service.default]  # type: ignore[index]
    copy = ModelRegistry(snapshot, service.default)
    copy.add("extra", snapshot[service.default])
    assert "extra" not in snapshot and "extra" in copy.snapshot()
    assert np.all([name in service.registry for name in snapshot])
