"""The featurizer: the one place that knows how a table's columns become the model's input and back.

    roles = column_roles(schema, columns, data)      each feature column's role from its Arrow type
    stats = TableStats.of_batch(...) / .merge(...)    mergeable per-block statistics (the prepare pass)
    fz    = Featurizer.fit(roles, stats, data)        offsets, scales, indicators, levels
    x, keep, reasons = fz.matrix(table, data)         Arrow batch -> raw input slots (float32), rows to keep
    fz.offset, fz.scale                               per-slot normalization (Normalizer) for the model
    fz.layout()                                       which slots make which column (SlotLayout, for the model)
    fz.to_dict() / Featurizer.from_dict(...)          the manifest's `features` section

Input slots: the numeric columns' values first (in `data.features` order), then one missing indicator per
numeric column that had nulls in training, then one block per categorical column: its `max_categories` most
frequent training levels, `other` (rarer and unseen levels), `missing`. Numeric-only inputs without nulls are
exactly today's float matrix (the fast path), and the model then sees no layout at all.

Per-column errors (models.SlotLayout.errors) come back one per input column, in `data.features` order: what
`feature_errors`, `top_features` and the calibrated score speak of.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import InputError
from pipeline.layout import SlotLayout

NUMERIC, CATEGORICAL = "numeric", "categorical"
OTHER, MISSING = "<other>", "<missing>"  # the two levels every categorical column has besides its own


# ------------------------------------------------------------------------------------------ roles


def type_family(t: pa.DataType) -> Optional[str]:
    """The family a column's type belongs to, as the model remembers it; None for a type that is no feature."""
    if pa.types.is_dictionary(t):
        return type_family(t.value_type)
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


# ------------------------------------------------------------------------------------------ statistics


def as_strings(arr: Union[pa.Array, pa.ChunkedArray]) -> pa.Array:
    """A categorical column's values as strings (nulls stay null): the form its levels are stored in."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = arr.cast(pa.string())
    return arr


def counter_capacity(max_categories: int) -> int:
    """Distinct levels a counter keeps: well above the levels kept, so the top ones survive any block split;
    bounded, so a column of ids mistaken for a category cannot exhaust memory."""
    return max(1024, 16 * max_categories)


@dataclass
class LevelCounts:
    """Frequencies of a categorical column's levels, bounded to `capacity` distinct levels.

    Merging sums the counts and keeps the `capacity` largest (ties by level, so the result does not depend on
    the order of blocks); while no block or merge goes over the bound, merging is exactly associative. Over
    it, the rarest levels are dropped (`truncated`): the frequent ones, the only ones one-hot encoded, stay."""

    counts: dict[str, int] = field(default_factory=dict)
    missing: int = 0
    truncated: bool = False

    @classmethod
    def of(cls, arr: Union[pa.Array, pa.ChunkedArray], capacity: int) -> "LevelCounts":
        s = as_strings(arr)
        vc = pc.value_counts(s.drop_null())
        counts = dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()))
        return cls(counts, s.null_count)._bound(capacity)

    def merge(self, other: "LevelCounts", capacity: int) -> "LevelCounts":
        counts = dict(self.counts)
        for k, v in other.counts.items():
            counts[k] = counts.get(k, 0) + v
        return LevelCounts(counts, self.missing + other.missing, self.truncated or other.truncated)._bound(capacity)

    def _bound(self, capacity: int) -> "LevelCounts":
        if len(self.counts) > capacity:
            keep = sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))[:capacity]
            return LevelCounts(dict(keep), self.missing, True)
        return self

    def top(self, k: int) -> list[str]:
        """The k most frequent levels, most frequent first (ties by level)."""
        return [lv for lv, _ in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


@dataclass
class ColumnMoments:
    """Per-column count, mean and sum of squared deviations over the values present (NaN = missing), merged
    with Chan et al.'s parallel rule column by column."""

    n: np.ndarray
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, k: int) -> "ColumnMoments":
        return cls(np.zeros(k, np.int64), np.zeros(k), np.zeros(k))

    @classmethod
    def of(cls, x: np.ndarray) -> "ColumnMoments":
        x64 = x.astype(np.float64)
        present = ~np.isnan(x64)
        if present.all():  # the common case: the same arithmetic as data.Moments
            n = np.full(x64.shape[1], x64.shape[0], np.int64)
            if x64.shape[0] == 0:
                return cls.empty(x64.shape[1])
            mean = x64.mean(axis=0)
            return cls(n, mean, ((x64 - mean) ** 2).sum(axis=0))
        n = present.sum(axis=0)
        total = np.where(present, x64, 0.0).sum(axis=0)
        mean = np.divide(total, n, out=np.zeros_like(total), where=n > 0)
        m2 = (np.where(present, x64 - mean, 0.0) ** 2).sum(axis=0)
        return cls(n.astype(np.int64), mean, m2)

    def merge(self, other: "ColumnMoments") -> "ColumnMoments":
        n = self.n + other.n
        safe = np.maximum(n, 1)
        delta = other.mean - self.mean
        mean = np.where(self.n == 0, other.mean, np.where(other.n == 0, self.mean,
                                                         self.mean + delta * (other.n / safe)))
        m2 = self.m2 + other.m2 + delta ** 2 * (self.n * other.n / safe)
        return ColumnMoments(n, mean, m2)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / np.maximum(self.n - 1, 1))


@dataclass
class TableStats:
    """The prepare pass's statistics of the training rows' scalar feature columns, mergeable across blocks."""

    numeric: ColumnMoments
    nulls: np.ndarray
    """Missing values (null or NaN) per numeric column."""
    levels: list[LevelCounts]
    """Per categorical column."""

    @classmethod
    def empty(cls, n_numeric: int, n_categorical: int) -> "TableStats":
        return cls(ColumnMoments.empty(n_numeric), np.zeros(n_numeric, np.int64),
                   [LevelCounts() for _ in range(n_categorical)])

    def merge(self, other: "TableStats", capacity: int) -> "TableStats":
        return TableStats(self.numeric.merge(other.numeric), self.nulls + other.nulls,
                          [a.merge(b, capacity) for a, b in zip(self.levels, other.levels)])

    def to_json(self) -> str:
        return json.dumps({"n": self.numeric.n.tolist(), "mean": self.numeric.mean.tolist(),
                           "m2": self.numeric.m2.tolist(), "nulls": self.nulls.tolist(),
                           "levels": [dataclasses.asdict(lc) for lc in self.levels]})

    @classmethod
    def from_json(cls, text: str) -> "TableStats":
        d = json.loads(text)
        return cls(ColumnMoments(np.asarray(d["n"], np.int64), np.asarray(d["mean"], np.float64),
                                 np.asarray(d["m2"], np.float64)), np.asarray(d["nulls"], np.int64),
                   [LevelCounts(**lc) for lc in d["levels"]])


# ------------------------------------------------------------------------------------------ featurizer


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
        """Numeric columns with (offset, scale) normalization: what every model before categoricals had."""
        return cls([NumericColumn(n, "float", float(m), float(s)) for n, m, s in zip(names, mean, scale)], vector)

    @classmethod
    def unfitted(cls, roles: list[ColumnRole]) -> "Featurizer":
        """The layout of the columns before the prepare pass: what the statistics are gathered for."""
        return cls([NumericColumn(r.name, r.family) if r.role == NUMERIC else CategoricalColumn(r.name, r.family)
                    for r in roles])

    def fit(self, stats: TableStats, offset: np.ndarray, scale: np.ndarray, max_categories: int,
            missing_policy: str) -> "Featurizer":
        """Fitted from the merged statistics; (offset, scale) per numeric column from data.normalization_stats."""
        cols: list[Column] = []
        num = cat = 0
        for c in self.columns:
            if isinstance(c, NumericColumn):
                indicator = missing_policy == "impute" and bool(stats.nulls[num])
                cols.append(NumericColumn(c.name, c.family, float(offset[num]), float(scale[num]), indicator))
                num += 1
            else:
                counts = stats.levels[cat]
                if counts.truncated:
                    warnings.warn(f"column {c.name!r}: more than {len(counts.counts)} distinct values (an id "
                                  f"mistaken for a category?); keeping its {max_categories} most frequent levels",
                                  stacklevel=2)
                cols.append(CategoricalColumn(c.name, c.family, counts.top(max_categories)))
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
    def width(self) -> int:
        num = self.numeric_columns
        return len(num) + sum(c.indicator for c in num) + sum(c.width for c in self.categorical_columns)

    def _numeric_slots(self, attr: str, fill: float) -> np.ndarray:
        """Per input slot: the numeric columns' `attr` in their leading slots, `fill` in the rest."""
        out = np.full(self.width, fill, np.float32)
        num = self.numeric_columns
        out[:len(num)] = [getattr(c, attr) for c in num]
        return out

    @property
    def offset(self) -> np.ndarray:
        """Per input slot: subtracted before scaling (0 for indicators and one-hot slots)."""
        return self._numeric_slots("offset", 0.0)

    @property
    def scale(self) -> np.ndarray:
        """Per input slot: divided by after the offset (1 for indicators and one-hot slots)."""
        return self._numeric_slots("scale", 1.0)

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

    # ---- batches

    def numeric_raw(self, table: pa.Table, missing_policy: str) -> np.ndarray:
        """(rows, numeric columns) float32 of the raw values, NaN where missing (null); with `missing: error`,
        nulls are refused naming the column, as before categoricals."""
        from pipeline.data import source_of  # noqa: PLC0415 - data imports this module

        num = self.numeric_columns
        out = np.empty((table.num_rows, len(num)), dtype=np.float32)
        for j, c in enumerate(num):
            col = table.column(c.name)
            if col.null_count:
                if missing_policy == "error":
                    raise InputError(f"file {source_of(table)}: column {c.name!r} has {col.null_count} null values "
                                     "(set data.missing=impute or drop)")
                col = col.cast(pa.float64())
            out[:, j] = col.to_numpy()
        return out

    def check_types(self, schema: pa.Schema, where: str) -> None:
        """A column whose type family differs from training's (string now, integer then): one line naming it."""
        for c in self.columns:
            if self.vector:
                return
            idx = schema.get_field_index(c.name)
            if idx < 0:
                raise InputError(f"{where}: missing column {c.name!r} (the model was trained on it)")
            t = schema.field(idx).type
            fam = type_family(t)
            same = fam == c.family or (isinstance(c, NumericColumn) and fam in ("float", "integer")
                                       and c.family in ("float", "integer"))
            if not same:
                raise InputError(f"{where}: column {c.name!r} is {t} ({fam or 'unsupported'}), but the model was "
                                 f"trained on it as {c.family}")

    def matrix(self, table: pa.Table, missing_policy: str,
               nan_policy: str) -> tuple[np.ndarray, np.ndarray, Optional[list[str]], np.ndarray]:
        """(x, keep, reasons, raw): the input slots (float32; normalize with offset/scale), the rows to keep,
        why the others are dropped (one reason each, or None), and the numeric columns' raw values (NaN where
        missing). Scalar columns only (a vector column goes through data.feature_matrix)."""
        from pipeline.data import source_of  # noqa: PLC0415

        n = table.num_rows
        num = self.numeric_columns
        k = len(num)
        xnum = self.numeric_raw(table, missing_policy)
        finite = np.isfinite(xnum)
        keep = np.ones(n, dtype=bool)
        reasons: Optional[np.ndarray] = None
        if self.plain and finite.all():  # the numeric fast path: exactly the matrix as before
            return xnum, keep, None, xnum
        x = np.zeros((n, self.width), dtype=np.float32)
        x[:, :k] = xnum
        if not finite.all():
            nan = np.isnan(xnum)
            inf = ~finite & ~nan
            if inf.any():
                rows = inf.any(axis=1)
                col = num[int(inf.any(axis=0).argmax())].name
                if nan_policy == "error":
                    raise InputError(f"file {source_of(table, rows)}: column {col!r} has {int(rows.sum())} rows with "
                                     "NaN or infinite values (set data.nan_policy=drop to skip them)")
                reasons = np.full(n, "", dtype=object)
                reasons[rows] = [f"NaN or infinite value in {num[j].name}" for j in inf[rows].argmax(axis=1)]
                keep &= ~rows
            if nan.any():
                rows = nan.any(axis=1)
                if missing_policy == "error":
                    col = num[int(nan.any(axis=0).argmax())].name
                    raise InputError(f"file {source_of(table, rows)}: column {col!r} has {int(rows.sum())} rows with "
                                     "NaN or infinite values (set data.missing=impute or drop)")
                if missing_policy == "drop":
                    reasons = reasons if reasons is not None else np.full(n, "", dtype=object)
                    new = rows & keep
                    reasons[new] = [f"missing value in {num[j].name}" for j in nan[new].argmax(axis=1)]
                    keep &= ~rows
                x[:, :k] = np.where(nan, self.offset[:k], x[:, :k])  # imputed: normalizes to 0
                slot = k
                for j, c in enumerate(num):
                    if c.indicator:
                        x[:, slot] = nan[:, j]
                        slot += 1
        slot = k + sum(c.indicator for c in num)
        for c in self.categorical_columns:
            s = as_strings(table.column(c.name))
            if s.null_count and missing_policy != "impute":
                rows = s.is_null().to_numpy(zero_copy_only=False)
                if missing_policy == "error":
                    raise InputError(f"file {source_of(table, rows)}: column {c.name!r} has {int(rows.sum())} null "
                                     "values (set data.missing=impute or drop)")
                reasons = reasons if reasons is not None else np.full(n, "", dtype=object)
                reasons[rows & keep] = f"missing value in {c.name}"
                keep &= ~rows
            idx = pc.index_in(s, value_set=pa.array(c.levels, pa.string())).fill_null(-1).to_numpy(zero_copy_only=False)
            level = np.where(idx >= 0, idx, len(c.levels))  # unseen: other
            if s.null_count:
                level[s.is_null().to_numpy(zero_copy_only=False)] = len(c.levels) + 1
            x[np.arange(n), slot + level] = 1.0
            slot += c.width
        return x, keep, (list(reasons[~keep]) if reasons is not None and not keep.all() else None), xnum

    def hash_parts(self, table: pa.Table, xnum: np.ndarray) -> np.ndarray:
        """(rows, columns) uint32 of the raw values, for the train/validation split of a table without ids: it
        must not depend on the fitted statistics (the prepare pass splits before there are any)."""
        parts = [np.ascontiguousarray(xnum, np.float32).view(np.uint32)]
        if not self.categorical_columns:
            return parts[0]
        for c in self.categorical_columns:
            values = np.asarray(as_strings(table.column(c.name)).to_pandas(), dtype=object)
            parts.append((pd.util.hash_array(values) & np.uint64(0xFFFFFFFF)).astype(np.uint32)[:, None])
        return np.concatenate(parts, axis=1)
