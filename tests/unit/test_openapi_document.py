"""The OpenAPI document at /schema/openapi.json (contract §1: every route, with request and response
schemas) is valid OpenAPI 3.1, and describes what every operation answers: its success body, and
each error it can answer with the one error envelope (api/schemas.py). A route added without them
fails here; tests/adversarial/test_openapi_fuzz.py checks real answers against the document.
"""

from __future__ import annotations

from typing import Any

import pytest
from openapi_spec_validator import validate

from tests.support import openapi_document

CONFIG = """
model_list:
  - model_name: mock-model
    litellm_params:
      model: mock/demo
general_settings:
  master_key: sk-document-9d2f6a1c4e8b7035
"""
DOCUMENT = openapi_document(CONFIG)
# Sorted: the document's order of paths may differ between processes (parallel workers collect alike).
OPERATIONS = sorted(
    (
        (method.upper(), path, operation)
        for path, item in DOCUMENT["paths"].items()
        for method, operation in item.items()
        if method in ("get", "post", "put", "patch", "delete")
    ),
    key=lambda found: (found[1], found[0]),
)
IDS = [f"{method} {path}" for method, path, _ in OPERATIONS]
ENVELOPE = {"$ref": "#/components/schemas/ErrorBody"}
# No key, no database: the process's own health (readiness answers its own 503 body).
UNGUARDED = {"GET /health/liveliness", "GET /health/liveness", "GET /health/readiness", "GET /metrics"}
# No key, a signature: Lago's webhooks (its errors documented like any route's).
SIGNED = {"POST /lago/webhooks"}
# LLM routes read any body (the provider may take more than JSON's media type says).
LLM_ROUTES = {"/chat/completions", "/completions", "/embeddings"}


def _schema(ref_or_schema: dict[str, Any]) -> dict[str, Any]:
    ref = ref_or_schema.get("$ref")
    if ref is None:
        return ref_or_schema
    schema: dict[str, Any] = DOCUMENT["components"]["schemas"][ref.rsplit("/", 1)[1]]
    return schema


def test_the_document_is_valid_openapi_3_1() -> None:
    assert DOCUMENT["openapi"].startswith("3.1")
    validate(DOCUMENT)


def test_the_error_envelope_is_the_one_every_error_is_sent_in() -> None:
    envelope = _schema(ENVELOPE)
    assert envelope["required"] == ["error"]
    detail = _schema(envelope["properties"]["error"])
    assert detail["required"] == ["code", "message", "param", "type"]


@pytest.mark.parametrize(("method", "path", "operation"), OPERATIONS, ids=IDS)
def test_every_operation_describes_its_success_body(
    method: str, path: str, operation: dict[str, Any]
) -> None:
    successes = {status: r for status, r in operation["responses"].items() if status.startswith("2")}
    assert successes, f"{method} {path} documents no 2xx response"
    for status, response in successes.items():
        assert response.get("content"), f"{method} {path} {status}: no body described"
        for media_type, content in response["content"].items():
            schema = content.get("schema")
            # `Response[Any]` documents `{}`: a handler must name the shape it sends.
            assert schema, f"{method} {path} {status} {media_type}: no schema for the body"


@pytest.mark.parametrize(("method", "path", "operation"), OPERATIONS, ids=IDS)
def test_every_operation_documents_its_errors_in_the_envelope(
    method: str, path: str, operation: dict[str, Any]
) -> None:
    label = f"{method} {path}"
    responses = operation["responses"]
    errors = {status: r for status, r in responses.items() if status[0] in "45"}
    for status, response in errors.items():
        if label == "GET /health/readiness" and status == "503":
            continue  # readiness answers its own body: what is not ready
        content = response.get("content") or {}
        assert list(content) == ["application/json"], f"{label} {status}: {list(content)}"
        assert content["application/json"]["schema"] == ENVELOPE, f"{label} {status} is not the envelope"
    if label in UNGUARDED:
        assert "security" not in operation, label
        return
    if label in SIGNED:
        assert "security" not in operation, label
        assert {"400", "401", "413", "503"} <= set(errors), f"{label} documents {sorted(errors)}"
        return
    # Every route asks who is calling (401), and may find the database down (503 + retry-after).
    assert operation.get("security") == [{"api_key": []}], f"{label} documents no key"
    assert {"401", "503"} <= set(errors), f"{label} documents {sorted(errors)}"
    assert errors["503"]["headers"]["retry-after"]["required"] is True, label
    if "parameters" in operation or "requestBody" in operation:
        assert "400" in errors, f"{label} takes input but documents no 400"
    if "requestBody" in operation:
        assert "413" in errors, f"{label} reads a body but documents no 413"
        if path.removeprefix("/v1") not in LLM_ROUTES:
            assert "415" in errors, f"{label} is a management change without its 415"


def test_money_is_documented_as_the_number_it_is_sent_as() -> None:
    schemas = DOCUMENT["components"]["schemas"]
    assert schemas["KeyView"]["properties"]["spend"]["type"] == "number"
    assert schemas["NewBudgetRequest"]["properties"]["max_budget"]["oneOf"][0]["type"] == "number"
