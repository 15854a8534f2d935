"""worker.filters: attribute conditions as boolean masks over a gallery's rows."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from worker.filters import Columns

ROWS: list[dict[str, Any]] = [
    {"category": "shoes", "price": 80, "in_stock": True, "code": "10"},  # 0
    {"category": "shoes", "price": 120.5, "in_stock": False, "code": 10},  # 1
    {"category": "bags", "price": 40, "in_stock": True},  # 2
    {"category": "bags", "flag": 1},  # 3: no price, no in_stock
    {},  # 4: no attributes at all
    {"category": "hats", "price": 100, "in_stock": 1, "flag": True},  # 5
]


def rows_where(mask: np.ndarray) -> list[int]:
    assert mask.dtype == np.bool_
    return [int(r) for r in np.flatnonzero(mask)]


@pytest.fixture
def columns() -> Columns:
    made = Columns(capacity=8)
    for row, attributes in enumerate(ROWS):
        made.set_row(row, attributes)
    return made


def select(columns: Columns, conditions: dict[str, Any]) -> list[int]:
    mask = columns.mask(conditions, len(ROWS))
    assert mask.shape == (len(ROWS),)
    return rows_where(mask)


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        ({"category": "shoes"}, [0, 1]),
        ({"category": "boots"}, []),  # a string no row has
        ({"price": 80}, [0]),
        ({"price": 80.0}, [0]),  # numbers compare as numbers
        ({"price": 120.5}, [1]),
        ({"in_stock": True}, [0, 2]),
        ({"in_stock": False}, [1]),
        ({"code": "10"}, [0]),  # a string equals strings only
        ({"code": 10}, [1]),  # a number equals numbers only
        ({"flag": True}, [5]),  # true does not equal 1
        ({"flag": 1}, [3]),  # 1 does not equal true
        ({"in_stock": 1}, [5]),
        ({"category": "shoes", "in_stock": True}, [0]),  # every condition must hold
    ],
    ids=lambda value: repr(value)[:40],
)
def test_equality_never_mixes_types(
    columns: Columns, conditions: dict[str, Any], expected: list[int]
) -> None:
    assert select(columns, conditions) == expected


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        ({"category": {"in": ["shoes", "hats"]}}, [0, 1, 5]),
        ({"category": {"in": ["boots"]}}, []),
        ({"code": {"in": ["10"]}}, [0]),
        ({"code": {"in": [10]}}, [1]),
        ({"code": {"in": [10, "10"]}}, [0, 1]),
        ({"flag": {"in": [True]}}, [5]),
        ({"flag": {"in": [1]}}, [3]),
        ({"price": {"in": [40, 100]}}, [2, 5]),
    ],
    ids=lambda value: repr(value)[:40],
)
def test_in_matches_any_option_of_its_own_type(
    columns: Columns, conditions: dict[str, Any], expected: list[int]
) -> None:
    assert select(columns, conditions) == expected


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        ({"price": {"lt": 100}}, [0, 2]),
        ({"price": {"lte": 100}}, [0, 2, 5]),
        ({"price": {"gt": 100}}, [1]),
        ({"price": {"gte": 100}}, [1, 5]),
        ({"price": {"gte": 40, "lt": 100}}, [0, 2]),
        ({"price": {"gt": 1000}}, []),
        ({"price": {"in": [80, 120.5], "lt": 100}}, [0]),
        ({"category": {"lt": 5}}, []),  # strings have no number: never in a range
        ({"in_stock": {"gte": 0}}, [5]),  # nor have booleans (row 5 has the number 1)
        ({"flag": {"gte": 1}}, [3]),
    ],
    ids=lambda value: repr(value)[:40],
)
def test_ranges_leave_out_rows_without_a_number(
    columns: Columns, conditions: dict[str, Any], expected: list[int]
) -> None:
    assert select(columns, conditions) == expected


def test_a_condition_on_an_attribute_no_row_has_matches_nothing(columns: Columns) -> None:
    assert select(columns, {"colour": "red"}) == []
    assert select(columns, {"category": "shoes", "colour": {"lt": 3}}) == []


def test_an_empty_gallery_gives_an_empty_mask() -> None:
    assert Columns().mask({"a": 1}, 0).shape == (0,)


def test_the_mask_covers_only_the_rows_asked_for(columns: Columns) -> None:
    assert rows_where(columns.mask({"category": "shoes"}, 1)) == [0]
    assert columns.mask({"category": "shoes"}, 1).shape == (1,)


def test_set_row_replaces_every_attribute_of_the_row(columns: Columns) -> None:
    columns.set_row(0, {"category": "bags", "price": "cheap"})

    assert select(columns, {"category": "shoes"}) == [1]
    assert select(columns, {"category": "bags"}) == [0, 2, 3]
    assert select(columns, {"price": {"lt": 100}}) == [2]  # a string now: no number
    assert select(columns, {"price": "cheap"}) == [0]
    assert select(columns, {"in_stock": True}) == [2]  # no longer given for row 0
    assert select(columns, {"code": "10"}) == []


def test_set_row_changes_the_type_of_a_value(columns: Columns) -> None:
    columns.set_row(5, {"flag": 1})
    assert select(columns, {"flag": True}) == []
    assert select(columns, {"flag": 1}) == [3, 5]


def test_clear_row_leaves_the_row_out_of_every_condition(columns: Columns) -> None:
    columns.clear_row(0)
    assert select(columns, {"category": "shoes"}) == [1]
    assert select(columns, {"price": {"lt": 1000}}) == [1, 2, 5]
    assert select(columns, {"in_stock": True}) == [2]
    assert select(columns, {"code": "10"}) == []


def test_grow_keeps_the_rows_and_takes_new_ones() -> None:
    columns = Columns(capacity=2)
    columns.set_row(0, {"category": "shoes", "price": 1})
    columns.set_row(1, {"category": "bags", "in_stock": True})

    columns.grow(5)
    columns.grow(3)  # never shrinks
    assert columns.capacity == 5
    columns.set_row(4, {"category": "shoes", "price": 2, "colour": "red"})

    assert rows_where(columns.mask({"category": "shoes"}, 5)) == [0, 4]
    assert rows_where(columns.mask({"price": {"gt": 0}}, 5)) == [0, 4]
    assert rows_where(columns.mask({"in_stock": True}, 5)) == [1]
    assert rows_where(columns.mask({"colour": "red"}, 5)) == [4]


def test_of_labels_makes_one_string_attribute_from_class_labels() -> None:
    labels = np.array([0, 2, 1, 2, 0], dtype=np.uint8)
    columns = Columns.of_labels("class", labels, ["T-shirt", "Trouser", "Sneaker"])

    assert rows_where(columns.mask({"class": "Sneaker"}, 5)) == [1, 3]
    assert rows_where(columns.mask({"class": {"in": ["T-shirt", "Trouser"]}}, 5)) == [0, 2, 4]
    assert rows_where(columns.mask({"class": "Bag"}, 5)) == []
    assert rows_where(columns.mask({"class": 2}, 5)) == []  # a label number is not its name
    assert rows_where(columns.mask({"colour": "red"}, 5)) == []
