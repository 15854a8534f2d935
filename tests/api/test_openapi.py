"""The OpenAPI schema says what the API accepts and answers.

Requests the API refuses are refused by the schema too (checked with jsonschema against the
documented request bodies), and every status a route answers below is one it documents.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jsonschema
import pytest
from fastapi.testclient import TestClient

MakeClient = Callable[..., TestClient]


@pytest.fixture
def client(make_client: MakeClient) -> TestClient:
    return make_client()


@pytest.fixture
def schema(client: TestClient) -> dict[str, Any]:
    reply = client.get("/openapi.json")
    assert reply.status_code == 200
    document: dict[str, Any] = reply.json()
    return document


def body_schema(schema: dict[str, Any], path: str, media: str) -> dict[str, Any]:
    found: dict[str, Any] = schema["paths"][path]["post"]["requestBody"]["content"][media]["schema"]
    return found


def valid(instance: dict[str, Any], against: dict[str, Any]) -> bool:
    try:
        jsonschema.validate(instance, against)
    except jsonschema.ValidationError:
        return False
    return True


def test_no_route_documents_fastapis_own_validation_error(schema: dict[str, Any]) -> None:
    assert "HTTPValidationError" not in str(schema)
    for operations in schema["paths"].values():
        for operation in operations.values():
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")):
                    ref = response["content"]["application/json"]["schema"]["$ref"]
                    assert ref.endswith("/Problem"), (status, ref)


def test_upload_routes_document_the_refusals_made_while_reading(schema: dict[str, Any]) -> None:
    for path in ("/jobs", "/jobs/batch"):
        assert {"400", "408", "413", "422", "429", "503"} <= set(
            schema["paths"][path]["post"]["responses"]
        )


@pytest.mark.parametrize(
    ("instance", "accepted"),
    [
        ({"file": "..."}, True),
        ({"text": "a red sneaker", "k": 3}, True),
        ({"file": "...", "text": "a red sneaker"}, False),  # the API: 400
        ({"text": ""}, False),  # the API: 422
        ({"text": "   "}, False),  # the API: 422
        ({"file": "...", "gallery": ""}, False),  # the API: 422
        ({"file": "...", "k": 0}, False),
        ({"file": "...", "k": 51}, False),
        ({}, False),
    ],
)
def test_the_job_form_schema_refuses_what_the_api_refuses(
    schema: dict[str, Any], instance: dict[str, Any], accepted: bool
) -> None:
    assert valid(instance, body_schema(schema, "/jobs", "multipart/form-data")) is accepted


@pytest.mark.parametrize(
    ("instance", "accepted"),
    [
        ({"file": ["..."]}, True),
        ({"file": ["...", "..."], "gallery": "fashion-mnist"}, True),
        ({"file": []}, False),
        ({"file": ["..."], "gallery": ""}, False),
        ({"file": ["..."], "gallery": "Not A Name"}, False),
    ],
)
def test_the_batch_form_schema_refuses_what_the_api_refuses(
    schema: dict[str, Any], instance: dict[str, Any], accepted: bool
) -> None:
    assert valid(instance, body_schema(schema, "/jobs/batch", "multipart/form-data")) is accepted


def test_the_json_job_schema_refuses_blank_text(schema: dict[str, Any]) -> None:
    against = body_schema(schema, "/jobs", "application/json")
    assert valid({"text": "shoes"}, against)
    assert not valid({"text": " "}, against)
    assert not valid({"k": 5}, against)


JOB = "0" * 32
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("post", "/jobs", {"files": {"file": ("a.png", b"not an image", "image/png")}}),
    ("post", "/jobs", {"data": {"text": "x"}, "params": {"k": "5_0"}}),
    ("post", "/jobs", {"data": {"text": "x", "k": "3"}, "params": {"k": "4"}}),
    ("post", "/jobs", {"data": {"text": "x", "gallery": "b"}, "params": {"gallery": "a"}}),
    ("post", "/jobs", {"content": b"--x", "headers": {"content-type": "multipart/form-data"}}),
    ("post", "/jobs/batch", {"data": {"text": "x"}}),
    ("post", "/jobs/batch", {"files": {"file": ("a.png", b"x" * 11 * 2**20, "image/png")}}),
    ("get", f"/jobs/{JOB}", {"params": {"wait": "-1"}}),
    ("get", f"/jobs/{JOB}", {}),
    ("get", f"/jobs/{JOB}/events", {}),
    ("get", f"/jobs/{JOB}/grid.png", {}),
    ("get", "/gallery/-1.png", {}),
    ("get", "/gallery/1.png", {"params": {"size": "5000"}}),
    ("get", "/galleries", {}),
    ("get", "/readyz", {}),
    ("get", "/metrics", {}),
]


@pytest.mark.parametrize(("method", "path", "kwargs"), CASES)
def test_every_answer_is_documented_for_its_route(
    client: TestClient, schema: dict[str, Any], method: str, path: str, kwargs: dict[str, Any]
) -> None:
    reply = client.request(method.upper(), path, **kwargs)
    templated = {
        f"/jobs/{JOB}": "/jobs/{job_id}",
        f"/jobs/{JOB}/events": "/jobs/{job_id}/events",
        f"/jobs/{JOB}/grid.png": "/jobs/{job_id}/grid.png",
        "/gallery/-1.png": "/gallery/{index}.png",
        "/gallery/1.png": "/gallery/{index}.png",
    }.get(path, path)
    documented = schema["paths"][templated][method]["responses"]
    assert str(reply.status_code) in documented, (reply.status_code, reply.text)
