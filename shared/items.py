"""Items of a gallery and the search options that pick among them: what a request may say.

Both sides use these rules: the API refuses a malformed item id, attributes, filter,
``min_score`` or ``exclude`` with a 422 naming the field; the worker compiles the same filter
(worker.filters) and applies it before the top-k.

A filter is a JSON object of conditions on attributes, all of which must hold::

    {"category": "shoes", "in_stock": true, "price": {"lt": 100}, "brand": {"in": ["a", "b"]}}

a value is equality; an object holds ``in`` (a list) and/or ``lt``, ``lte``, ``gt``, ``gte``
(numbers). A condition on an attribute no item has matches nothing: it is not an error.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from shared.errors import FieldRefused

ITEM_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
ATTRIBUTE_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
MAX_ATTRIBUTES = 32
MAX_STRING = 256
MAX_ATTRIBUTES_JSON = 4096
MAX_CONDITIONS = 16
MAX_IN = 100
MAX_EXCLUDE = 1000
RANGE_OPS = ("lt", "lte", "gt", "gte")
MAX_INTEGER = 2**53  # integers beyond this are not exact as float64

BAD_ITEM_ID = "item_id must be 1 to 128 letters, digits, '-', '_', '.' or ':'."
BAD_ITEM = "item must be the id of an item of the gallery (1 to 128 letters, digits, '-_.:')."
BAD_ATTRIBUTES = (
    f"attributes must be a JSON object of at most {MAX_ATTRIBUTES} names (letters, digits, "
    f"'-_.:') with strings (up to {MAX_STRING} characters), numbers or booleans."
)
BAD_FILTER = (
    "filter must be a JSON object of attribute conditions: a string, number or boolean to "
    'equal, or an object of "in" (a list) and "lt", "lte", "gt", "gte" (numbers).'
)
BAD_MIN_SCORE = "min_score must be a number from -1 to 1."
BAD_EXCLUDE = f"exclude must be a list of at most {MAX_EXCLUDE} item ids."

Scalar = str | int | float | bool
Conditions = dict[str, Scalar | dict[str, Any]]


def _number(value: object) -> bool:
    """A JSON number the filters can compare (as a float64): finite, integers up to 2**53."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) <= MAX_INTEGER
    return isinstance(value, float) and math.isfinite(value)


def _scalar(value: object) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, int | float):
        return _number(value)
    return isinstance(value, str) and len(value) <= MAX_STRING


def _load(raw: str | object, refusal: str) -> object:
    if not isinstance(raw, str):
        return raw
    if len(raw) > MAX_ATTRIBUTES_JSON:
        raise FieldRefused(refusal)
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise FieldRefused(refusal) from None


def item_id(value: object, *, refusal: str = BAD_ITEM_ID) -> str:
    if not isinstance(value, str) or ITEM_ID.fullmatch(value) is None:
        raise FieldRefused(refusal)
    return value


def attributes(raw: str | object | None) -> dict[str, Scalar]:
    """An item's attributes from a form field (JSON text) or a JSON body (an object)."""
    if raw is None or raw == "":
        return {}
    value = _load(raw, BAD_ATTRIBUTES)
    if not isinstance(value, dict) or len(value) > MAX_ATTRIBUTES:
        raise FieldRefused(BAD_ATTRIBUTES)
    for name, scalar in value.items():
        if ATTRIBUTE_NAME.fullmatch(name) is None or not _scalar(scalar):
            raise FieldRefused(BAD_ATTRIBUTES)
    if len(json.dumps(value)) > MAX_ATTRIBUTES_JSON:
        raise FieldRefused(BAD_ATTRIBUTES)
    return dict(value)


def filter_conditions(raw: str | object | None) -> Conditions | None:
    """A search's filter, checked; None for no filter."""
    if raw is None or raw == "":
        return None
    value = _load(raw, BAD_FILTER)
    if not isinstance(value, dict) or not 1 <= len(value) <= MAX_CONDITIONS:
        raise FieldRefused(BAD_FILTER)
    for name, condition in value.items():
        if ATTRIBUTE_NAME.fullmatch(name) is None:
            raise FieldRefused(BAD_FILTER)
        if isinstance(condition, dict):
            _check_operators(condition)
        elif not _scalar(condition):
            raise FieldRefused(BAD_FILTER)
    return dict(value)


def _check_operators(condition: dict[str, Any]) -> None:
    if not condition or set(condition) - {"in", *RANGE_OPS}:
        raise FieldRefused(BAD_FILTER)
    if "in" in condition:
        options = condition["in"]
        if not isinstance(options, list) or not 1 <= len(options) <= MAX_IN:
            raise FieldRefused(BAD_FILTER)
        if not all(_scalar(option) for option in options):
            raise FieldRefused(BAD_FILTER)
    for op in RANGE_OPS:
        if op in condition and not _number(condition[op]):
            raise FieldRefused(BAD_FILTER)


def min_score(raw: object) -> float | None:
    if raw is None or raw == "":
        return None
    if isinstance(raw, bool) or (isinstance(raw, int) and not _number(raw)):
        raise FieldRefused(BAD_MIN_SCORE)
    try:
        value = float(raw) if isinstance(raw, str | int | float) else math.nan
    except (ValueError, OverflowError):
        raise FieldRefused(BAD_MIN_SCORE) from None
    if not -1.0 <= value <= 1.0:  # NaN fails too
        raise FieldRefused(BAD_MIN_SCORE)
    return value


def exclude(raw: object) -> list[str]:
    """Item ids never to return: a JSON list (or a list of form values, each an id)."""
    if raw is None or raw == "" or raw == []:
        return []
    value = _load(raw, BAD_EXCLUDE) if isinstance(raw, str) and raw.startswith("[") else raw
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or len(value) > MAX_EXCLUDE:
        raise FieldRefused(BAD_EXCLUDE)
    return [item_id(entry, refusal=BAD_EXCLUDE) for entry in value]
