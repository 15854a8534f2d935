"""The OpenAPI schema, made to say what the API really answers.

FastAPI documents a 422 with its own list-shaped ``HTTPValidationError`` on every route that
has parameters, whether or not the route can refuse them. lookalike answers every refusal as
``{"detail": "<sentence>"}`` and declares, route by route, the statuses it can send
(api.schemas.problem_responses). Those declarations are kept; FastAPI's own 422 is dropped.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

FASTAPI_ONLY = ("HTTPValidationError", "ValidationError")


def _fastapi_422(response: dict[str, Any]) -> bool:
    schema = response.get("content", {}).get("application/json", {}).get("schema", {})
    return str(schema.get("$ref", "")).endswith("/HTTPValidationError")


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, summary=app.summary, routes=app.routes
    )
    for operations in schema["paths"].values():
        for operation in operations.values():
            responses = operation["responses"]
            if "422" in responses and _fastapi_422(responses["422"]):
                del responses["422"]
    components = schema.get("components", {}).get("schemas", {})
    for name in FASTAPI_ONLY:
        components.pop(name, None)
    app.openapi_schema = schema
    return schema


def install(app: FastAPI) -> None:
    app.openapi = lambda: openapi_schema(app)  # type: ignore[method-assign]
