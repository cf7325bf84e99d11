"""`twinflow serve`'s OpenAPI document: committed, and true to what the server sends."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest

from schemas.outputs import AlarmEvent, Status
from schemas.serve import ApiError
from tests.unit.test_plant_view import alarm, state
from twinflow.plant import PlantView
from twinflow.serve.openapi import DOCUMENT, rendered, served_document
from twinflow.twin_model import load_twin_model

MODEL = Path(__file__).resolve().parents[2] / "infra" / "twin-model" / "example-plant.yaml"


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return served_document()


def test_the_committed_document_is_the_served_one(document: dict[str, Any]) -> None:
    assert DOCUMENT.read_text() == rendered(document), (
        "schemas/openapi/serve.v1.json is stale: run `python -m twinflow.serve.openapi`"
    )


def _validator(document: dict[str, Any], path: str, method: str, status: str) -> Any:
    schema = document["paths"][path][method]["responses"][status]["content"]["application/json"][
        "schema"
    ]
    return jsonschema.Draft202012Validator({**schema, "components": document["components"]})


def test_answers_match_their_documented_schemas(document: dict[str, Any]) -> None:
    view = PlantView(load_twin_model(MODEL))
    view.apply_state(state("pump-001", 1000, Status.ALARM, 0.4))
    view.apply_alarm(alarm("pump-001", 900, 1000, True, AlarmEvent.RAISED))
    answers = {
        ("/api/v1/plant", "get", "200"): view.tree(),
        ("/api/v1/entities/{id}", "get", "200"): view.entity("pump-001"),
        ("/api/v1/entities/{id}", "get", "404"): ApiError("no entity", "id"),
        ("/api/v1/alarms", "get", "200"): view.alarm_list(),
    }
    for (path, method, status), answer in answers.items():
        sent = json.loads(msgspec.json.encode(answer))
        _validator(document, path, method, status).validate(sent)
    with pytest.raises(jsonschema.ValidationError):
        _validator(document, "/api/v1/plant", "get", "200").validate({"kind": "plant"})


def test_every_operation_documents_refusals_as_api_errors(document: dict[str, Any]) -> None:
    for path, operations in document["paths"].items():
        if path in ("/api/v1/events",):
            continue
        for method, operation in operations.items():
            for status in ("401", "422"):
                content = operation["responses"][status]["content"]["application/json"]
                assert content["schema"] == {"$ref": "#/components/schemas/ApiError"}, (
                    method,
                    path,
                    status,
                )
