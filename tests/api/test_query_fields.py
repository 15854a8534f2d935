"""``k`` and ``gallery`` follow one set of rules wherever they come from (query string, form,
JSON), and a request may not give them twice with different values."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from api.uploads import BAD_GALLERY, BAD_K, CONFLICT

MakeClient = Callable[..., TestClient]


@pytest.fixture
def client(make_client: MakeClient) -> TestClient:
    return make_client()


@pytest.mark.parametrize("k", ["5_0", "3.0", "+5", " 5e0", "0", "51", "٣", "", "5 5"])
@pytest.mark.parametrize("where", ["query", "form", "json"])
def test_k_is_refused_alike_wherever_it_comes_from(client: TestClient, k: str, where: str) -> None:
    if where == "query":
        reply = client.post("/jobs", data={"text": "shoes"}, params={"k": k})
    elif where == "form":
        reply = client.post("/jobs", data={"text": "shoes", "k": k})
    else:
        reply = client.post("/jobs", json={"text": "shoes", "k": k})
    assert (reply.status_code, reply.json()) == (422, {"detail": BAD_K})


@pytest.mark.parametrize("where", ["query", "form", "json"])
def test_k_is_accepted_alike_wherever_it_comes_from(client: TestClient, where: str) -> None:
    if where == "query":
        reply = client.post("/jobs", data={"text": "shoes"}, params={"k": "7"})
    elif where == "form":
        reply = client.post("/jobs", data={"text": "shoes", "k": "7"})
    else:
        reply = client.post("/jobs", json={"text": "shoes", "k": 7})
    assert reply.status_code == 202, reply.text
    assert reply.json()["k"] == 7


@pytest.mark.parametrize(
    ("field", "query", "body"), [("k", "4", "5"), ("gallery", "fashion-mnist", "other")]
)
def test_a_field_given_twice_with_different_values_is_422(
    client: TestClient, field: str, query: str, body: str
) -> None:
    reply = client.post("/jobs", data={"text": "shoes", field: body}, params={field: query})
    assert (reply.status_code, reply.json()) == (422, {"detail": CONFLICT.format(name=field)})


def test_a_field_given_twice_with_the_same_value_is_accepted(client: TestClient) -> None:
    reply = client.post("/jobs", json={"text": "shoes", "k": 4}, params={"k": "4"})
    assert reply.status_code == 202, reply.text


@pytest.mark.parametrize("gallery", ["", "Not A Name", "a/b"])
def test_a_query_gallery_that_is_not_a_name_is_422(client: TestClient, gallery: str) -> None:
    reply = client.post("/jobs", data={"text": "shoes"}, params={"gallery": gallery})
    assert (reply.status_code, reply.json()) == (422, {"detail": BAD_GALLERY})
