"""The committed swagger3.json (served by azmlinfsrv at GET /swagger.json?version=3) matches the pydantic models."""

from __future__ import annotations

import json

from local_server import REPO
from medsam2_endpoint.api.openapi import build_openapi, render, to_openapi30


def test_committed_swagger3_is_up_to_date():
    committed = (REPO / "swagger3.json").read_text(encoding="utf-8")
    assert committed == render(), (
        "swagger3.json is stale: regenerate it with `.venv/bin/python -m medsam2_endpoint.api.openapi swagger3.json`"
    )


def test_document_is_openapi_30_without_json_schema_2020_constructs():
    doc = build_openapi()
    assert doc["openapi"].startswith("3.0.")
    text = json.dumps(doc)
    for construct in ('"$defs"', '"const"', '{"type": "null"}', '"prefixItems"'):
        assert construct not in text, construct
    body = doc["paths"]["/score"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    refs = [branch["$ref"].rsplit("/", 1)[-1] for branch in body["oneOf"]]
    assert refs == ["ScoreRequest", "ImageRequest"]
    for ref in refs:
        assert ref in doc["components"]["schemas"]
    columns = doc["components"]["schemas"]["VolumeColumns"]
    assert columns["additionalProperties"] is False and "required" not in columns
    assert columns["anyOf"] == [{"required": ["nii_image"]}, {"required": ["volume_id"]}]  # one names each item's volume


def test_conversion_rules():
    assert to_openapi30({"anyOf": [{"type": "integer"}, {"type": "null"}]}) == {"type": "integer", "nullable": True}
    assert to_openapi30({"anyOf": [{"$ref": "#/x"}, {"type": "null"}]}) == {"allOf": [{"$ref": "#/x"}], "nullable": True}
    assert to_openapi30({"anyOf": [{"enum": ["a"], "type": "string"}, {"type": "null"}]}) == {
        "enum": ["a", None], "type": "string", "nullable": True
    }
    assert to_openapi30({"const": "x"}) == {"enum": ["x"]}
    assert to_openapi30({"exclusiveMaximum": 1.0}) == {"maximum": 1.0, "exclusiveMaximum": True}
