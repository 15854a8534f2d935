"""Fixtures for the API tests: the real service (shared with tests/e2e) and in-process apps."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from lookalike.redis_server import RedisServer
from lookalike.stack import Stack
from shared.settings import ApiSettings, BrokerSettings, Settings

MakeClient = Callable[..., TestClient]


@pytest.fixture
def http(service: Stack) -> Iterator[httpx.Client]:
    """An HTTP client on the real API process."""
    with httpx.Client(base_url=service.url, timeout=30) as client:
        yield client


def in_process_settings(redis_url: str, **api: Any) -> Settings:
    """Settings for an in-process app on ``redis_url``; ``api`` sets ApiSettings fields."""
    return Settings(broker=BrokerSettings(redis_url=redis_url), api=ApiSettings(**api))


@pytest.fixture
def make_client(redis_server: RedisServer) -> Iterator[MakeClient]:
    """Start in-process apps (lifespan included) on the session Redis; closed after the test.

    No worker runs: jobs that are accepted stay queued.
    """
    clients: list[TestClient] = []

    def make(**api: Any) -> TestClient:
        app = create_app(in_process_settings(redis_server.url, **api))
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)
