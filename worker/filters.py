"""Attribute filters, applied before the top-k: a boolean mask over a gallery's rows.

A gallery keeps its items' attributes as columns, one per attribute name and JSON type, so a
filter is a few vectorised comparisons however many items there are: strings as integer codes
(equality and ``in`` compare codes), numbers as float64 (NaN where absent), booleans as int8
(-1 where absent). Types do not mix: ``"10"`` does not equal ``10``, ``true`` does not equal
``1``. A condition on an attribute no item has matches nothing.

Columns grow and change row by row (a live gallery's adds and deletes), and can be made at
once from a built gallery's class labels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from shared.items import RANGE_OPS, Conditions

Mask = npt.NDArray[np.bool_]
MISSING = -1


class _Column:
    def __init__(self, capacity: int) -> None:
        self.codes = np.full(capacity, MISSING, dtype=np.int32)
        self.numbers = np.full(capacity, np.nan, dtype=np.float64)
        self.flags = np.full(capacity, MISSING, dtype=np.int8)
        self.vocabulary: dict[str, int] = {}

    def grow(self, capacity: int) -> None:
        size = len(self.codes)
        self.codes = np.concatenate([self.codes, np.full(capacity - size, MISSING, np.int32)])
        self.numbers = np.concatenate([self.numbers, np.full(capacity - size, np.nan)])
        self.flags = np.concatenate([self.flags, np.full(capacity - size, MISSING, np.int8)])

    def set(self, row: int, value: Any) -> None:
        self.clear(row)
        if isinstance(value, bool):
            self.flags[row] = int(value)
        elif isinstance(value, int | float):
            self.numbers[row] = float(value)
        elif isinstance(value, str):
            self.codes[row] = self.vocabulary.setdefault(value, len(self.vocabulary))

    def clear(self, row: int) -> None:
        self.codes[row], self.numbers[row], self.flags[row] = MISSING, np.nan, MISSING

    def equals(self, value: Any, rows: int) -> Mask:
        if isinstance(value, bool):
            return np.asarray(self.flags[:rows] == int(value), dtype=bool)
        if isinstance(value, int | float):
            return np.asarray(self.numbers[:rows] == float(value), dtype=bool)
        code = self.vocabulary.get(str(value))
        if code is None:
            return np.zeros(rows, dtype=bool)
        return np.asarray(self.codes[:rows] == code, dtype=bool)

    def satisfies(self, condition: Any, rows: int) -> Mask:
        if not isinstance(condition, Mapping):
            return self.equals(condition, rows)
        mask = np.ones(rows, dtype=bool)
        if "in" in condition:
            mask &= np.logical_or.reduce(
                [self.equals(option, rows) for option in condition["in"]]
                or [np.zeros(rows, dtype=bool)]
            )
        numbers = self.numbers[:rows]
        with np.errstate(invalid="ignore"):  # NaN (no number here) compares False
            for op in RANGE_OPS:
                if op in condition:
                    bound = float(condition[op])
                    mask &= {
                        "lt": numbers < bound,
                        "lte": numbers <= bound,
                        "gt": numbers > bound,
                        "gte": numbers >= bound,
                    }[op]
        return mask


class Columns:
    """The attributes of a gallery's rows, by name, for filtering."""

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self._columns: dict[str, _Column] = {}

    @classmethod
    def of_labels(
        cls, name: str, labels: npt.NDArray[np.integer[Any]], classes: Sequence[str]
    ) -> Columns:
        """A built gallery's one attribute: its rows' class names, from their labels."""
        columns = cls(len(labels))
        column = _Column(len(labels))
        column.codes = np.asarray(labels, dtype=np.int32)
        column.vocabulary = {label: code for code, label in enumerate(classes)}
        columns._columns[name] = column
        return columns

    def grow(self, capacity: int) -> None:
        if capacity <= self.capacity:
            return
        for column in self._columns.values():
            column.grow(capacity)
        self.capacity = capacity

    def set_row(self, row: int, attributes: Mapping[str, Any]) -> None:
        for name, column in self._columns.items():
            if name not in attributes:
                column.clear(row)
        for name, value in attributes.items():
            if name not in self._columns:
                self._columns[name] = _Column(self.capacity)
            self._columns[name].set(row, value)

    def clear_row(self, row: int) -> None:
        for column in self._columns.values():
            column.clear(row)

    def mask(self, conditions: Conditions, rows: int) -> Mask:
        """Rows ``0..rows`` meeting every condition."""
        mask = np.ones(rows, dtype=bool)
        for name, condition in conditions.items():
            column = self._columns.get(name)
            if column is None:
                return np.zeros(rows, dtype=bool)
            mask &= column.satisfies(condition, rows)
        return mask
