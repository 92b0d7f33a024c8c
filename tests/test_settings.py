"""Settings: one pydantic-settings object for every MEDSAM2_* variable, validated at start, documented once."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from medsam2_endpoint.core.settings import PREFIX, Settings, SettingsError, settings_table

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "medsam2_endpoint"


def test_readme_table_is_the_generated_one():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- settings-table:start -->\n(.*?)\n<!-- settings-table:end -->", readme, re.S)
    assert block, "README lost its settings table markers"
    assert block.group(1) == settings_table(), "README settings table is stale: paste `python -m medsam2_endpoint.core.settings`"


def test_every_variable_the_server_reads_is_a_setting():
    """No module reads a MEDSAM2_* variable of its own: they all go through Settings (the client's key aside)."""
    fields = {f"{PREFIX}{name.upper()}" for name in Settings.model_fields}
    client_only = {"MEDSAM2_ENDPOINT_KEY"}
    named = set()
    for path in PACKAGE.rglob("*.py"):
        named |= set(re.findall(r"\bMEDSAM2_[A-Z0-9_]+\b(?!\*)", path.read_text()))  # prefixes (MEDSAM2_FETCH_*) aside
    assert named - fields - client_only == set()
    for path in PACKAGE.rglob("*.py"):
        if path.name != "settings.py" and "client" not in path.parts:
            assert "os.environ.get(\"MEDSAM2" not in path.read_text(), path


@pytest.mark.parametrize(("env", "variable"), [
    ({"MEDSAM2_MAX_ITEMS": "lots"}, "MEDSAM2_MAX_ITEMS"),
    ({"MEDSAM2_MAX_ITEMS": "0"}, "MEDSAM2_MAX_ITEMS"),
    ({"MEDSAM2_DEVICE": "tpu"}, "MEDSAM2_DEVICE"),
    ({"MEDSAM2_WARMUP": "maybe"}, "MEDSAM2_WARMUP"),
    ({"MEDSAM2_REQUEST_DEADLINE_S": "-1"}, "MEDSAM2_REQUEST_DEADLINE_S"),
    ({"MEDSAM2_FETCH_ALLOW_NETWORKS": "10.0.0.0/33"}, "MEDSAM2_FETCH_ALLOW_NETWORKS"),
])
def test_a_bad_value_fails_at_start_naming_the_variable(env, variable):
    with pytest.raises(SettingsError, match=f"^{variable}="):
        Settings.from_env(env)


def test_values_reach_the_parameter_types_of_the_lower_layers(tmp_path):
    s = Settings.from_env({
        "MEDSAM2_MAX_BASE64_MB": "2", "MEDSAM2_MAX_VOXELS": "1000", "MEDSAM2_FETCH_MAX_MB": "3", "MEDSAM2_SAMAPI_MAX_FRAMES": "7",
        "MEDSAM2_WARMUP": "off", "MEDSAM2_ENABLE_LITE": "yes", "MEDSAM2_FEATURE_CACHE_MB": "",
    }, model_dir=tmp_path)
    assert s.limits.max_base64_bytes == 2 << 20 and s.limits.max_voxels == 1000
    assert s.fetch.max_bytes == 3 << 20 and s.samapi.max_frames == 7
    assert s.warmup is False and s.enable_lite is True and s.feature_cache_mb == 256  # empty means unset
    assert s.model_dir == tmp_path.resolve() and s.samapi.weights_dir == tmp_path.resolve() / "registered"


def test_the_deadline_never_passes_the_platform_limit():
    assert Settings.from_env({"MEDSAM2_REQUEST_DEADLINE_S": "600"}).deadline_s == 180
    assert Settings.from_env({}).deadline_s == 170


def test_azure_model_dir_is_read_when_ours_is_unset(tmp_path):
    assert Settings.from_env({"AZUREML_MODEL_DIR": str(tmp_path)}).model_dir == tmp_path.resolve()
