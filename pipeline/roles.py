"""Each feature column's role (numeric or categorical) and type family, from its Arrow type.

A vector column (one list<float> column) is as many numeric features as its vectors are long, `name[i]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import pyarrow as pa

from pipeline.errors import InputError

NUMERIC, CATEGORICAL = "numeric", "categorical"


def type_family(t: pa.DataType) -> Optional[str]:
    """The family a column's type belongs to, as the model remembers it; None for a type that is no feature."""
    if pa.types.is_dictionary(t):
        return type_family(t.value_type)
    if pa.types.is_null(t):  # nulls only (a shard where every value was missing): numbers, all missing
        return "float"
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "float"
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    return None


def _unsupported(col: str, t: pa.DataType) -> str:
    if pa.types.is_temporal(t):
        what = "a timestamp/date/time"
        fix = "set data.timestamp_column, or name it in data.exclude_columns"
    elif pa.types.is_nested(t):
        what = "nested"
        fix = "a list of floats must be data.features on its own; else name it in data.exclude_columns"
    elif pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        what = "binary"
        fix = "name it in data.exclude_columns"
    else:
        what, fix = "not a supported feature type", "name it in data.exclude_columns"
    return f"feature column {col!r} is {t} ({what}); {fix}"


@dataclass(frozen=True)
class ColumnRole:
    name: str
    role: str
    """numeric or categorical."""
    family: str
    """float, integer, bool or string: checked again when scoring."""


def column_roles(schema: pa.Schema, columns: list[str], categorical_columns: list[str], where: str) -> list[ColumnRole]:
    """Each scalar feature column's role from its Arrow type; InputError (one line, `where` first) otherwise."""
    roles = []
    for col in columns:
        t = schema.field(col).type
        family = type_family(t)
        if family is None:
            raise InputError(f"{where}: {_unsupported(col, t)}")
        if col in categorical_columns and family == "float":
            raise InputError(f"{where}: column {col!r} in data.categorical_columns is {t}; only integer codes, "
                             "strings and booleans can be categories")
        categorical = family in ("string", "bool") or col in categorical_columns
        roles.append(ColumnRole(col, CATEGORICAL if categorical else NUMERIC, family))
    return roles


def vector_roles(column: str, length: int) -> list[ColumnRole]:
    """A vector column's elements: `length` numeric features named `column[i]`."""
    return [ColumnRole(f"{column}[{i}]", NUMERIC, "float") for i in range(length)]


def as_strings(arr: Union[pa.Array, pa.ChunkedArray]) -> pa.Array:
    """A categorical column's values as strings (nulls stay null): the form its levels are stored in."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = arr.cast(pa.string())
    return arr
