"""The featurizer: how a table's feature columns become the model's input slots, and back to columns.

Input slots: the numeric inputs' values first (a vector column's elements, or the numeric columns in
`data.features` order), then one missing indicator per numeric column that had nulls in training, then one
block per categorical column: its `max_categories` most frequent training levels, `other` (rarer and unseen
levels), `missing`. A numeric-only input without nulls is its float matrix as it is (the fast path: a vector
column's values reshaped without a copy), and the model then sees no slot layout.

Per-column errors (models.SlotLayout.errors) come back one per input column, in `data.features` order: what
`feature_errors`, `top_features` and the calibrated score speak of.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import InputError
from pipeline.layout import SlotLayout
from pipeline.roles import CATEGORICAL, NUMERIC, ColumnRole, as_strings, type_family
from pipeline.shards import source_of
from pipeline.stats import TableStats

OTHER, MISSING = "<other>", "<missing>"  # the two levels every categorical column has besides its own


@dataclass
class NumericColumn:
    name: str
    family: str
    offset: float = 0.0
    """Subtracted before scaling (the training mean, for z-scores); also what a missing value is imputed with."""
    scale: float = 1.0
    indicator: bool = False
    """Has a missing-indicator input (training saw nulls in it)."""


@dataclass
class CategoricalColumn:
    name: str
    family: str
    levels: list[str] = field(default_factory=list)
    """The one-hot encoded levels (as strings), most frequent first; `other` and `missing` follow them."""

    @property
    def width(self) -> int:
        return len(self.levels) + 2


Column = Union[NumericColumn, CategoricalColumn]


class Drops:
    """The rows a batch drops so far, each with the first reason found for it."""

    def __init__(self, n: int):
        self.keep = np.ones(n, dtype=bool)
        self.why: Optional[np.ndarray] = None

    def drop(self, rows: np.ndarray, why: Union[str, Callable[[np.ndarray], list[str]]]) -> None:
        """Drop `rows`; `why` is the reason, or gives one for each row of a mask of those not dropped yet."""
        new = rows & self.keep
        if self.why is None:
            self.why = np.full(len(rows), "", dtype=object)
        self.why[new] = why if isinstance(why, str) else why(new)
        self.keep &= ~rows

    def reasons(self) -> Optional[list[str]]:
        return list(self.why[~self.keep]) if self.why is not None and not self.keep.all() else None


def beyond_float32(column: Union[pa.Array, pa.ChunkedArray]) -> int:
    """How many of a numeric (or list of numbers) column's values are finite but beyond float32's range, which
    the model's input turns into infinities (called on the error path only)."""
    values = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    while isinstance(values.type, (pa.ListType, pa.LargeListType, pa.FixedSizeListType)):
        values = values.flatten()
    v = values.cast(pa.float64()).to_numpy(zero_copy_only=False)
    with np.errstate(invalid="ignore"):
        return int((np.isfinite(v) & (np.abs(v) > np.finfo(np.float32).max)).sum())


def vector_values(table: pa.Table, column: str, length: int) -> np.ndarray:
    """(rows, length) float32 of a list<float> column's elements, without a copy where the layout allows.
    A vector has no missing element: null vectors, vectors of another length and null values are refused."""
    arr = table.column(column)
    if isinstance(arr, pa.ChunkedArray):  # one chunk (the usual batch) is taken as it is: combining copies
        arr = arr.chunk(0) if arr.num_chunks == 1 else arr.combine_chunks()
    if arr.null_count:
        raise InputError(f"file {source_of(table)}: column {column!r} has {arr.null_count} null vectors")
    if not pa.types.is_fixed_size_list(arr.type):
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(lengths != length)
        if bad.size:
            raise InputError(
                f"file {source_of(table, lengths != length)}: column {column!r} has {bad.size} vectors whose "
                f"length is not {length} (e.g. {int(lengths[bad[0]])})")
    elif arr.type.list_size != length:
        raise InputError(f"file {source_of(table)}: column {column!r} has vectors of length "
                         f"{arr.type.list_size}, expected {length}")
    values = arr.flatten()
    if values.null_count:
        raise InputError(f"file {source_of(table)}: column {column!r} has {values.null_count} null values")
    if values.type != pa.float32():
        values = values.cast(pa.float32())
    return values.to_numpy(zero_copy_only=False).reshape(table.num_rows, length)


def _warn_if_empty(name: str, empty: bool) -> None:
    if empty:
        warnings.warn(f"column {name!r}: null in every training row, so it carries nothing (exclude it with "
                      "data.exclude_columns)", stacklevel=3)


@dataclass
class Featurizer:
    """How the feature columns become the model's input slots; saved in (and loaded from) the manifest."""

    columns: list[Column]
    """In `data.features` order (a vector column: one numeric column per element, `name[i]`)."""
    vector: Optional[str] = None
    """The list<float> column the features come from, if they are one vector column."""

    # ---- construction

    @classmethod
    def numeric(cls, names: list[str], mean, scale, vector: Optional[str] = None) -> "Featurizer":
        """Numeric inputs with (offset, scale) normalization and no indicators (a manifest without `features`)."""
        return cls([NumericColumn(n, "float", float(m), float(s)) for n, m, s in zip(names, mean, scale)], vector)

    @classmethod
    def unfitted(cls, roles: list[ColumnRole], vector: Optional[str] = None) -> "Featurizer":
        """The layout of the columns before the prepare pass: what the statistics are gathered for."""
        return cls([NumericColumn(r.name, r.family) if r.role == NUMERIC else CategoricalColumn(r.name, r.family)
                    for r in roles], vector)

    def fit(self, stats: TableStats, offset: np.ndarray, scale: np.ndarray, max_categories: int,
            missing_policy: str) -> "Featurizer":
        """Fitted from the merged statistics; (offset, scale) per numeric input from stats.normalization_stats."""
        cols: list[Column] = []
        num = cat = 0
        for c in self.columns:
            if isinstance(c, NumericColumn):
                _warn_if_empty(c.name, stats.numeric.n[num] == 0 and stats.nulls[num] > 0)
                indicator = missing_policy == "impute" and bool(stats.nulls[num])
                cols.append(NumericColumn(c.name, c.family, float(offset[num]), float(scale[num]), indicator))
                num += 1
            else:
                counts = stats.levels[cat]
                _warn_if_empty(c.name, not counts.counts and counts.missing > 0)
                levels = counts.top(max_categories)
                if counts.truncated:
                    warnings.warn(f"column {c.name!r}: more than {len(counts.counts)} distinct values (an id "
                                  f"mistaken for a category? exclude it with data.exclude_columns); "
                                  f"{len(levels)} levels kept, the rest share 'other'", stacklevel=2)
                cols.append(CategoricalColumn(c.name, c.family, levels))
                cat += 1
        return Featurizer(cols, self.vector)

    # ---- shape

    @property
    def names(self) -> list[str]:
        """The input's columns, one entry per per-column error, in `data.features` order."""
        return [c.name for c in self.columns]

    @property
    def numeric_columns(self) -> list[NumericColumn]:
        return [c for c in self.columns if isinstance(c, NumericColumn)]

    @property
    def categorical_columns(self) -> list[CategoricalColumn]:
        return [c for c in self.columns if isinstance(c, CategoricalColumn)]

    @property
    def plain(self) -> bool:
        """Numeric columns only, no missing indicators: the input is the float matrix itself, no layout."""
        return all(isinstance(c, NumericColumn) and not c.indicator for c in self.columns)

    @property
    def nan_is_missing(self) -> bool:
        """NaN in a scalar column is a missing value (data.missing); in a vector column it is a bad value
        (data.nan_policy), as an infinity is."""
        return self.vector is None

    @property
    def _bad_values(self) -> str:
        """What a bad value is, for the messages: in a scalar column NaN is missing, so only an infinity is."""
        return "infinite value" if self.nan_is_missing else "NaN or infinite value"

    @property
    def width(self) -> int:
        num = self.numeric_columns
        return len(num) + sum(c.indicator for c in num) + sum(c.width for c in self.categorical_columns)

    def _per_slot(self, attr: str, fill: float) -> np.ndarray:
        """Per input slot: the numeric columns' `attr` in their leading slots, `fill` in the rest."""
        out = np.full(self.width, fill, np.float32)
        num = self.numeric_columns
        out[:len(num)] = [getattr(c, attr) for c in num]
        return out

    @property
    def offset(self) -> np.ndarray:
        """Per input slot: subtracted before scaling (0 for indicators and one-hot slots)."""
        return self._per_slot("offset", 0.0)

    @property
    def scale(self) -> np.ndarray:
        """Per input slot: divided by after the offset (1 for indicators and one-hot slots)."""
        return self._per_slot("scale", 1.0)

    def layout(self) -> Optional[SlotLayout]:
        """Which slots make which column, for the model's per-column errors; None on the plain path."""
        if self.plain:
            return None
        index = {c.name: i for i, c in enumerate(self.columns)}
        num = self.numeric_columns
        numeric = [(j, index[c.name]) for j, c in enumerate(num)]
        slot = len(num)
        for c in num:
            if c.indicator:
                numeric.append((slot, index[c.name]))
                slot += 1
        groups = []
        for c in self.categorical_columns:
            groups.append((slot, slot + c.width, index[c.name]))
            slot += c.width
        return SlotLayout(len(self.columns), tuple(numeric), tuple(groups))

    # ---- manifest

    def to_dict(self) -> dict[str, Any]:
        return {"vector": self.vector,
                "columns": [{"role": NUMERIC if isinstance(c, NumericColumn) else CATEGORICAL, **dataclasses.asdict(c)}
                            for c in self.columns]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Featurizer":
        cols: list[Column] = []
        for c in d["columns"]:
            c = dict(c)
            role = c.pop("role")
            cols.append(NumericColumn(**c) if role == NUMERIC else CategoricalColumn(**c))
        return cls(cols, d.get("vector"))

    def check_types(self, schema: pa.Schema, where: str) -> None:
        """A column whose type family differs from training's (string now, integer then): one line naming it."""
        if self.vector:
            return
        for c in self.columns:
            idx = schema.get_field_index(c.name)
            if idx < 0:
                raise InputError(f"{where}: missing column {c.name!r} (the model was trained on it)")
            t = schema.field(idx).type
            fam = type_family(t)
            same = fam == c.family or pa.types.is_null(t) or (  # nulls only: missing values (data.missing)
                isinstance(c, NumericColumn) and fam in ("float", "integer") and c.family in ("float", "integer"))
            if not same:
                raise InputError(f"{where}: column {c.name!r} is {t} ({fam or 'unsupported'}), but the model was "
                                 f"trained on it as {c.family}")

    # ---- batches

    def numeric_raw(self, table: pa.Table, missing_policy: str) -> np.ndarray:
        """(rows, numeric inputs) float32 of the raw values, NaN where missing (null): a vector column's
        elements, or the numeric columns straight into the matrix. With `missing: error`, a scalar column's
        nulls are refused naming it."""
        num = self.numeric_columns
        if self.vector:
            return vector_values(table, self.vector, len(num))
        out = np.empty((table.num_rows, len(num)), dtype=np.float32)
        for j, c in enumerate(num):
            col = table.column(c.name)
            if col.null_count:
                if missing_policy == "error":
                    raise InputError(f"file {source_of(table)}: column {c.name!r} has {col.null_count} null values "
                                     "(set data.missing=impute or drop)")
                col = col.cast(pa.float64())
            with np.errstate(over="ignore"):  # a finite value beyond float32 becomes inf: refused with the rest
                out[:, j] = col.to_numpy()
        return out

    def matrix(self, table: pa.Table, missing_policy: str,
               nan_policy: str) -> tuple[np.ndarray, np.ndarray, Optional[list[str]], np.ndarray]:
        """(x, keep, reasons, raw): the input slots (float32; normalize with offset/scale), the rows to keep,
        why the others are dropped (one reason each, or None), and the numeric inputs' raw values (NaN where
        missing)."""
        xnum = self.numeric_raw(table, missing_policy)
        finite = np.isfinite(xnum)
        drops = Drops(table.num_rows)
        if self.plain and finite.all():  # the numeric fast path: the raw matrix is the input
            return xnum, drops.keep, None, xnum
        x = np.zeros((table.num_rows, self.width), dtype=np.float32)
        x[:, :xnum.shape[1]] = xnum
        if not finite.all():
            self._bad_numeric(table, x, xnum, finite, drops, missing_policy, nan_policy)
        self._one_hot(table, x, drops, missing_policy)
        return x, drops.keep, drops.reasons(), xnum

    def _bad_numeric(self, table: pa.Table, x: np.ndarray, xnum: np.ndarray, finite: np.ndarray, drops: Drops,
                     missing_policy: str, nan_policy: str) -> None:
        """Non-finite numeric values: bad ones raise or drop their rows (data.nan_policy), missing ones raise,
        drop or are imputed (data.missing), setting their indicators."""
        num = self.numeric_columns
        missing = np.isnan(xnum) if self.nan_is_missing else np.zeros_like(finite)
        bad = ~finite & ~missing
        if bad.any():
            rows = bad.any(axis=1)
            if nan_policy == "error":
                name = self._source(bad)
                what = ("values beyond float32's range (+-3.4e38, the model's precision; rescale the column)"
                        if beyond_float32(table.column(name)) else self._bad_values + "s")
                raise InputError(f"file {source_of(table, rows)}: column {name!r} has {int(rows.sum())} rows with "
                                 f"{what} (set data.nan_policy=drop to skip them)")
            drops.drop(rows, lambda new: [f"{self._bad_values} in {num[j].name}" for j in bad[new].argmax(axis=1)])
        if not missing.any():
            return
        rows = missing.any(axis=1)
        if missing_policy == "error":
            raise InputError(f"file {source_of(table, rows)}: column {self._source(missing)!r} has "
                             f"{int(rows.sum())} rows with NaN values (set data.missing=impute or drop)")
        if missing_policy == "drop":
            drops.drop(rows, lambda new: [f"missing value in {num[j].name}" for j in missing[new].argmax(axis=1)])
        k = len(num)
        x[:, :k] = np.where(missing, self.offset[:k], x[:, :k])  # imputed: normalizes to 0
        slot = k
        for j, c in enumerate(num):
            if c.indicator:
                x[:, slot] = missing[:, j]
                slot += 1

    def _source(self, mask: np.ndarray) -> str:
        """The column an error names: the vector column, or the first numeric column with a value in `mask`."""
        return self.vector or self.numeric_columns[int(mask.any(axis=0).argmax())].name

    def _one_hot(self, table: pa.Table, x: np.ndarray, drops: Drops, missing_policy: str) -> None:
        """Each categorical column's block of slots: its level's slot set to 1; nulls per data.missing."""
        num = self.numeric_columns
        slot = len(num) + sum(c.indicator for c in num)
        rows_all = np.arange(table.num_rows)
        for c in self.categorical_columns:
            s = as_strings(table.column(c.name))
            if s.null_count and missing_policy != "impute":
                rows = s.is_null().to_numpy(zero_copy_only=False)
                if missing_policy == "error":
                    raise InputError(f"file {source_of(table, rows)}: column {c.name!r} has {int(rows.sum())} null "
                                     "values (set data.missing=impute or drop)")
                drops.drop(rows, f"missing value in {c.name}")
            idx = pc.index_in(s, value_set=pa.array(c.levels, pa.string())).fill_null(-1).to_numpy(zero_copy_only=False)
            level = np.where(idx >= 0, idx, len(c.levels))  # unseen: other
            if s.null_count:
                level[s.is_null().to_numpy(zero_copy_only=False)] = len(c.levels) + 1
            x[rows_all, slot + level] = 1.0
            slot += c.width

    def hash_parts(self, table: pa.Table, xnum: np.ndarray) -> np.ndarray:
        """(rows, inputs) uint32 of the raw values, for the train/validation split of a table without ids: it
        must not depend on the fitted statistics (the prepare pass splits before there are any)."""
        parts = [np.ascontiguousarray(xnum, np.float32).view(np.uint32)]
        if not self.categorical_columns:
            return parts[0]
        for c in self.categorical_columns:
            values = np.asarray(as_strings(table.column(c.name)).to_pandas(), dtype=object)
            parts.append((pd.util.hash_array(values) & np.uint64(0xFFFFFFFF)).astype(np.uint32)[:, None])
        return np.concatenate(parts, axis=1)
