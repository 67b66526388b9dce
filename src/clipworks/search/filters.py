"""Metadata filters: conditions on a collection's record columns, applied inside a search.

A filter is written as JSON (the API's `filters` field) or as a short string (the page's address bar, the
command line). Both give the same `Condition`s:

    {"source": "laion"}                         source == "laion"
    {"aesthetic": {"gte": 5, "lt": 9}}          5 <= aesthetic < 9
    {"year": {"in": [2020, 2021]}}               year is 2020 or 2021
    "source=laion;aesthetic>=5;aesthetic<9"     the same as a string (`;`-separated; `in` as `year=2020|2021`)

Operators: eq, ne, lt, lte, gt, gte, in. Ranges need a numeric column; a missing value (null) matches no
condition, as in SQL. Every backend applies the same conditions: the FAISS index as a row mask (`row_mask`),
Milvus and LanceDB as their own filter expressions.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

__all__ = ["OPS", "Condition", "FilterError", "parse_filters", "parse_filter_string", "row_mask", "column_kind",
           "check_conditions"]  # fmt: skip

OPS = ("eq", "ne", "lt", "lte", "gt", "gte", "in")
_RANGE_OPS = ("lt", "lte", "gt", "gte")
_STRING_OPS = {"<=": "lte", ">=": "gte", "!=": "ne", "<": "lt", ">": "gt", "=": "eq"}  # longest first
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
MAX_CONDITIONS = 32
MAX_IN_VALUES = 1000
Scalar = str | int | float | bool


class FilterError(ValueError):
    """A filter that cannot be applied: malformed, an unknown column, an operator the column's type does not
    have. The message is one line, fit for a 422."""


@dataclass(frozen=True)
class Condition:
    """`column op value`; `value` is a scalar, or a tuple of scalars for "in"."""

    column: str
    op: str
    value: Any


def column_kind(values: Any) -> str:
    """"number", "bool" or "string": the kind of a column (a numpy array or a pyarrow type name)."""
    dtype = getattr(values, "dtype", None)
    if dtype is not None and np.issubdtype(dtype, np.bool_):
        return "bool"
    if dtype is not None and np.issubdtype(dtype, np.number):
        return "number"
    return "string"


def _scalar(column: str, value: Any) -> Scalar:
    if isinstance(value, bool) or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise FilterError(f"filter on {column!r}: {value} is not a finite number")
        return value
    raise FilterError(f"filter on {column!r}: expected a string, number or boolean, got {type(value).__name__}")


def _check_name(column: Any) -> str:
    if not isinstance(column, str) or not _NAME.match(column):
        raise FilterError(f"filter column {str(column)[:80]!r}: expected a column name (letters, digits, _)")
    return column


def parse_filters(spec: Mapping[str, Any] | None) -> tuple[Condition, ...]:
    """The conditions of a JSON filter object (see the module docstring); () for None or {}.

    Raises:
        FilterError: not an object, a bad column name or operator, a value that is not a scalar, an empty or
            oversized "in" list, or more than 32 conditions.
    """
    if spec is None:
        return ()
    if not isinstance(spec, Mapping):
        raise FilterError(f"filters: expected an object of column: value or column: {{op: value}}, got "
                          f"{type(spec).__name__}")  # fmt: skip
    conditions = []
    for column, test in spec.items():
        _check_name(column)
        tests = test if isinstance(test, Mapping) else {"eq": test}
        if not tests:
            raise FilterError(f"filter on {column!r}: an empty object; give an operator such as {{\"gte\": 5}}")
        for op, value in tests.items():
            if op not in OPS:
                raise FilterError(f"filter on {column!r}: unknown operator {str(op)[:20]!r} (expected one of "
                                  f"{', '.join(OPS)})")  # fmt: skip
            if op == "in":
                if not isinstance(value, (list, tuple)) or not 0 < len(value) <= MAX_IN_VALUES:
                    raise FilterError(f"filter on {column!r}: \"in\" needs a list of 1 to {MAX_IN_VALUES} values")
                value = tuple(_scalar(column, v) for v in value)
            else:
                value = _scalar(column, value)
                if op in _RANGE_OPS and (isinstance(value, (bool, str))):
                    raise FilterError(f"filter on {column!r}: {op} needs a number, got {value!r}")
            conditions.append(Condition(column, op, value))
    if len(conditions) > MAX_CONDITIONS:
        raise FilterError(f"{len(conditions)} filter conditions: at most {MAX_CONDITIONS}")
    return tuple(conditions)


def _string_value(text: str) -> Scalar:
    """A value written in a filter string: a number when it reads as one, true/false, else the text."""
    if text in ("true", "false"):
        return text == "true"
    try:
        number = float(text)
    except ValueError:
        return text
    if not math.isfinite(number):
        return text
    return int(text) if re.fullmatch(r"[+-]?\d+", text) else number


def parse_filter_string(text: str | None) -> tuple[Condition, ...]:
    """The conditions of a filter string such as "source=laion;aesthetic>=5;year=2020|2021" (see the module
    docstring); () for None or "". Values that read as numbers are numbers; quote nothing.

    Raises:
        FilterError: a part without an operator, or the checks of `parse_filters`.
    """
    spec: dict[str, dict] = {}
    for part in (text or "").split(";"):
        part = part.strip()
        if not part:
            continue
        for symbol, op in _STRING_OPS.items():
            column, found, value = part.partition(symbol)
            if found and column.strip() and not any(s in column for s in "<>=!"):
                break
        else:
            raise FilterError(f"filter {part[:80]!r}: expected COLUMN=VALUE, COLUMN>=NUMBER (or <, <=, >, !=)")
        column, value = column.strip(), value.strip()
        tests = spec.setdefault(column, {})
        if op == "eq" and "|" in value:
            op, parsed = "in", [_string_value(v.strip()) for v in value.split("|")]
        else:
            parsed = _string_value(value)
        if op in tests:
            raise FilterError(f"filter on {column!r}: {op} given twice")
        tests[op] = parsed
    return parse_filters(spec)


def _as_text(value: Scalar) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def check_conditions(conditions: tuple[Condition, ...], kinds: Mapping[str, str]) -> tuple[Condition, ...]:
    """The conditions made ready for a collection whose columns have `kinds` (name -> "number", "bool" or
    "string"): a number or boolean compared with a text column becomes its text ("year=2020" on a text column
    matches "2020").

    Raises:
        FilterError: a column not in `kinds`, a value of another kind than its column, or a range on a column
            that is not numeric.
    """
    ready = []
    for c in conditions:
        if c.column not in kinds:
            known = ", ".join(sorted(kinds)) or "none"
            raise FilterError(f"filter on {c.column!r}: no such column (this collection has: {known})")
        kind = kinds[c.column]
        if c.op in _RANGE_OPS and kind != "number":
            raise FilterError(f"filter on {c.column!r}: {c.op} needs a numeric column; it holds {kind}s")
        values = c.value if c.op == "in" else (c.value,)
        if kind == "string":
            values = tuple(_as_text(v) for v in values)
        for v in values:
            v_kind = "bool" if isinstance(v, bool) else "number" if isinstance(v, (int, float)) else "string"
            if v_kind != kind:
                raise FilterError(f"filter on {c.column!r}: the column holds {kind}s, not {v_kind}s ({v!r})")
        ready.append(Condition(c.column, c.op, values if c.op == "in" else values[0]))
    return tuple(ready)


def _compare(column: np.ndarray, op: str, value: Any) -> np.ndarray:
    if column.dtype == object:  # text or booleans, None where missing
        present = np.array([v is not None for v in column], dtype=bool)
        if op == "in":
            wanted = set(value)
            return present & np.array([v in wanted for v in column], dtype=bool)
        equal = np.array([v is not None and v == value for v in column], dtype=bool)
        return equal if op == "eq" else present & ~equal
    present = ~np.isnan(column) if np.issubdtype(column.dtype, np.floating) else np.ones(len(column), dtype=bool)
    if op == "in":
        return present & np.isin(column, np.asarray(value))
    with np.errstate(invalid="ignore"):
        result = {"eq": np.equal, "ne": np.not_equal, "lt": np.less, "lte": np.less_equal, "gt": np.greater,
                  "gte": np.greater_equal}[op](column, value)  # fmt: skip
    return present & result


def row_mask(conditions: tuple[Condition, ...], columns: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """A boolean array, True for the rows where every condition holds; None when there are no conditions.

    `columns` maps a name to its values: a numeric array (NaN where missing), a bool array, or an object array
    (text or booleans, None where missing). The conditions come from `check_conditions`.
    """
    if not conditions:
        return None
    mask = None
    for c in conditions:
        part = _compare(columns[c.column], c.op, c.value)
        mask = part if mask is None else mask & part
    return mask
