"""Shapes only the API answers with, and the OpenAPI description of its refusals."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from shared.schemas import Job, Problem


def problem_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for refusals: each status answers FastAPI's ``{"detail": ...}``."""
    return {code: {"model": Problem} for code in codes}


class BatchAccepted(BaseModel):
    jobs: list[Job]


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    modes: dict[str, bool]
    galleries: list[str]
    workers: list[dict[str, Any]]
