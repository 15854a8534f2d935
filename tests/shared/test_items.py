"""shared.items: what a request may say about items and search options, and the sentences
that refuse the rest."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from shared import items
from shared.errors import FieldRefused, RequestRefused
from shared.items import (
    BAD_ATTRIBUTES,
    BAD_EXCLUDE,
    BAD_FILTER,
    BAD_ITEM,
    BAD_ITEM_ID,
    BAD_MIN_SCORE,
    MAX_ATTRIBUTES,
    MAX_CONDITIONS,
    MAX_EXCLUDE,
    MAX_IN,
    MAX_STRING,
)

HUGE = 10**400  # a JSON integer no float holds


def refused(call: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(FieldRefused) as caught:
        call(*args, **kwargs)
    return str(caught.value)


# --- item ids -----------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["a", "sku-1", "A_b.c:d-9", "x" * 128, "0", "..", "::"], ids=repr)
def test_item_id_accepts_letters_digits_and_four_marks(value: str) -> None:
    assert items.item_id(value) == value


@pytest.mark.parametrize(
    "value",
    ["", "x" * 129, "a b", "a/b", "é", "a\n", "sku#1", "a%20b", 12, None, b"abc", ["a"]],
    ids=repr,
)
def test_item_id_refuses_the_rest(value: object) -> None:
    assert refused(items.item_id, value) == BAD_ITEM_ID


def test_item_id_says_the_refusal_it_is_given() -> None:
    assert refused(items.item_id, "a b", refusal=BAD_ITEM) == BAD_ITEM


def test_a_field_refusal_is_a_request_refusal() -> None:
    assert issubclass(FieldRefused, RequestRefused)


# --- attributes ---------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [None, ""])
def test_no_attributes_are_an_empty_object(raw: object) -> None:
    assert items.attributes(raw) == {}


def test_attributes_come_as_json_text_or_as_an_object() -> None:
    value = {"category": "shoes", "in_stock": True, "price": 79.5, "size": 42, "s.k:u-_": "x"}
    assert items.attributes(json.dumps(value)) == value
    assert items.attributes(value) == value
    assert items.attributes("{}") == {}


def test_attributes_may_have_the_most_names_and_the_longest_strings() -> None:
    value = {f"a{n}": "x" * 100 for n in range(MAX_ATTRIBUTES)}
    assert len(items.attributes(value)) == MAX_ATTRIBUTES
    assert items.attributes({"long": "y" * MAX_STRING}) == {"long": "y" * MAX_STRING}


@pytest.mark.parametrize(
    "raw",
    [
        "[1]",
        '"shoes"',
        "3",
        "null",
        "{not json",
        [{"a": 1}],
        "shoes",
        {"nested": {"a": 1}},
        {"list": [1, 2]},
        {"none": None},
        {"bad name": 1},
        {"": 1},
        {"x" * 65: 1},
        {"long": "y" * (MAX_STRING + 1)},
        {"nan": math.nan},
        {"inf": math.inf},
        '{"nan": NaN}',
        '{"inf": Infinity}',
        {f"a{n}": 1 for n in range(MAX_ATTRIBUTES + 1)},
        "{" + " " * 5000 + "}",  # JSON text past the size cap
        "[" * 100_000,  # too deep to parse
    ],
    ids=lambda raw: repr(raw)[:40],
)
def test_attributes_refuse_anything_but_a_flat_object_of_scalars(raw: object) -> None:
    assert refused(items.attributes, raw) == BAD_ATTRIBUTES


def test_attributes_refuse_an_object_too_large_once_encoded() -> None:
    # 32 names of 256 characters each pass one by one but make over 4096 characters of JSON
    value = {f"a{n}": "é" * MAX_STRING for n in range(20)}
    assert refused(items.attributes, value) == BAD_ATTRIBUTES


def test_attributes_refuse_an_integer_no_float_holds() -> None:
    assert refused(items.attributes, json.dumps({"price": HUGE})) == BAD_ATTRIBUTES


# --- filter -------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [None, ""])
def test_no_filter_is_none(raw: object) -> None:
    assert items.filter_conditions(raw) is None


@pytest.mark.parametrize(
    "value",
    [
        {"category": "shoes"},
        {"in_stock": True},
        {"price": 10},
        {"price": 9.5},
        {"price": {"lt": 100}},
        {"price": {"gte": 1, "lte": 2.5, "gt": -3, "lt": 1e9}},
        {"brand": {"in": ["a", 1, True, 2.5]}},
        {"brand": {"in": ["a"], "lt": 3}},
        {f"a{n}": n for n in range(MAX_CONDITIONS)},
        {"brand": {"in": list(range(MAX_IN))}},
    ],
    ids=lambda value: json.dumps(value)[:40],
)
def test_filter_accepts_equalities_in_and_ranges(value: dict[str, Any]) -> None:
    assert items.filter_conditions(value) == value
    assert items.filter_conditions(json.dumps(value)) == value


@pytest.mark.parametrize(
    "raw",
    [
        "{not json",
        "[]",
        "[1]",
        '"shoes"',
        "{}",
        {},
        ["a"],
        42,
        {"bad name": 1},
        {"a": None},
        {"a": [1, 2]},
        {"a": "x" * (MAX_STRING + 1)},
        {"a": math.nan},
        {"a": math.inf},
        '{"a": NaN}',
        {"a": {}},
        {"a": {"near": 3}},
        {"a": {"lt": 3, "eq": 3}},
        {"a": {"in": []}},
        {"a": {"in": "x"}},
        {"a": {"in": [[1]]}},
        {"a": {"in": [None]}},
        {"a": {"in": [math.nan]}},
        {"a": {"in": list(range(MAX_IN + 1))}},
        {"a": {"lt": "3"}},
        {"a": {"lt": True}},
        {"a": {"gte": False}},
        {"a": {"lt": None}},
        {"a": {"lt": math.inf}},
        {"a": {"gt": -math.inf}},
        {"a": {"lte": math.nan}},
        '{"a": {"lt": Infinity}}',
        {f"a{n}": n for n in range(MAX_CONDITIONS + 1)},
        "{" + " " * 5000 + '"a": 1}',
    ],
    ids=lambda raw: repr(raw)[:40],
)
def test_filter_refusals(raw: object) -> None:
    assert refused(items.filter_conditions, raw) == BAD_FILTER


def test_filter_refuses_a_range_bound_no_float_holds() -> None:
    assert refused(items.filter_conditions, {"price": {"lt": HUGE}}) == BAD_FILTER


def test_filter_refuses_an_equality_no_float_holds() -> None:
    assert refused(items.filter_conditions, {"price": HUGE}) == BAD_FILTER


# --- min_score ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, None),
        ("", None),
        ("0.5", 0.5),
        (" 0.5 ", 0.5),
        ("-1", -1.0),
        ("1", 1.0),
        (0, 0.0),
        (1, 1.0),
        (-0.25, -0.25),
        ("1e-3", 0.001),
    ],
    ids=repr,
)
def test_min_score_accepts_numbers_from_minus_one_to_one(raw: object, expected: object) -> None:
    assert items.min_score(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "2",
        "-1.01",
        1.5,
        -2,
        "nan",
        "NaN",
        "inf",
        "-inf",
        math.nan,
        math.inf,
        True,
        False,
        "high",
        "0.5.1",
        [0.5],
        {"v": 0.5},
        "1" + "0" * 400,
    ],
    ids=repr,
)
def test_min_score_refusals(raw: object) -> None:
    assert refused(items.min_score, raw) == BAD_MIN_SCORE


def test_min_score_refuses_an_integer_no_float_holds() -> None:
    assert refused(items.min_score, HUGE) == BAD_MIN_SCORE


# --- exclude ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, []),
        ("", []),
        ([], []),
        ("[]", []),
        ("sku-1", ["sku-1"]),  # one form value: one id
        ('["a", "b:c"]', ["a", "b:c"]),  # JSON text of a list
        (["a", "b"], ["a", "b"]),  # repeated form values
        (["x"] * MAX_EXCLUDE, ["x"] * MAX_EXCLUDE),
    ],
    ids=lambda raw: repr(raw)[:40],
)
def test_exclude_accepts_a_list_a_json_list_or_one_id(raw: object, expected: list[str]) -> None:
    assert items.exclude(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "[not json",
        '["a", 1]',
        "[null]",
        '["a b"]',
        '[["a"]]',
        '{"a": 1}',
        "a b",
        "x" * 129,
        ["a", ""],
        ["a", 2],
        ["ok", "no/slash"],
        42,
        {"a": "b"},
        ["x"] * (MAX_EXCLUDE + 1),
        json.dumps(["x"] * 2000),  # JSON text past the size cap
    ],
    ids=lambda raw: repr(raw)[:40],
)
def test_exclude_refusals(raw: object) -> None:
    assert refused(items.exclude, raw) == BAD_EXCLUDE
