"""One batch's rows as the model's input: featurized slots, the rows kept (the rest rejected, and why), the
train/validation split.

A row goes to validation when a hash of its id columns falls below `data.validation_fraction`: the split
is stable across reruns, shard layouts and worker counts. Without id columns the hash is of the row's place:
its file and its position in that file (`ROW_KEY`, which Ray Data's Parquet reader adds with
`include_row_hash`, and `row_keys` computes the same way for the files read without Ray Data), so the split
is stable across reruns of the same files. Where a batch has no such column (rows handed over in memory),
it hashes the row's feature values; identical rows then land in the same split, which on a table of a few
distinct rows (categorical columns only) sent whole groups of them to one side.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import AUTO, DataSection
from pipeline.featurizer import Featurizer
from pipeline.roles import vector_roles
from pipeline.shards import PATH_COLUMN, ROW_KEY
from pipeline.storage import Storage

REJECT_SOURCE = "source_file"
REJECT_REASON = "reason"


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x += np.uint64(0x9E3779B97F4A7C15)
    return _mix64(x)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer (a bijection of uint64), in place on `x`."""
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def row_keys(path: str, start: int, n: int) -> np.ndarray:
    """The `ROW_KEY` of rows start..start+n-1 of the file at `path` (as Storage.resolve gives it), computed as
    Ray Data 2.60's Parquet reader does (tests/test_data.py reads both and compares them): the MD5 of the path
    as a 64-bit seed, plus the row's position, through the splitmix64 finalizer."""
    seed = np.uint64(int.from_bytes(hashlib.md5(path.encode("utf-8")).digest()[:8], byteorder="little"))
    with np.errstate(over="ignore"):
        return _mix64(seed + np.arange(start, start + n, dtype=np.uint64))


def with_row_keys(table: pa.Table, path: str, start: int) -> pa.Table:
    """`table`, rows start.. of the file at `path`, with their `ROW_KEY` column (files read without Ray Data)."""
    return table.append_column(ROW_KEY, pa.array(row_keys(path, start, table.num_rows), pa.uint64()))


def row_hash(table: pa.Table, id_columns: list[str], features: Optional[np.ndarray] = None) -> np.ndarray:
    """A uint64 per row, a pure function of the id values; without ids, of the row's place (`ROW_KEY`), or
    where the batch lacks that column, of its feature values."""
    if not id_columns and ROW_KEY in table.column_names:
        return _splitmix64(table.column(ROW_KEY).to_numpy().astype(np.uint64))
    h = np.zeros(table.num_rows, dtype=np.uint64)
    if id_columns:
        for col in id_columns:
            c = table.column(col)
            if pa.types.is_integer(c.type) and not c.null_count:
                v = c.to_numpy().astype(np.int64).view(np.uint64)
                part = _splitmix64(v)
            else:
                part = pd.util.hash_array(np.asarray(c.to_pandas(), dtype=object)).astype(np.uint64)
            h = _splitmix64(h ^ part)
        return h
    assert features is not None, "without id columns the split hashes the features"
    # float features hash by their bits; Featurizer.hash_parts hands over uint32 already
    u = features if features.dtype == np.uint32 else np.ascontiguousarray(features, dtype=np.float32).view(np.uint32)
    for j in range(u.shape[1]):
        h = _splitmix64(h ^ u[:, j].astype(np.uint64))
    return h


def split_position(table: pa.Table, data: DataSection, features: Optional[np.ndarray] = None) -> np.ndarray:
    """Each row's place in [0, 1) for the split, from its hash: below `data.validation_fraction` is validation."""
    h = row_hash(table, data.ids, features)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def validation_mask(table: pa.Table, data: DataSection, features: Optional[np.ndarray] = None) -> np.ndarray:
    """True for rows in the validation split."""
    if data.validation_fraction == AUTO:
        raise ValueError("data.validation_fraction: auto is resolved from the input's row count "
                         "(pipeline.inputs.inspect_input)")
    return split_position(table, data, features) < data.validation_fraction


def split_cut(fraction: float, n_train: int, n_val: int, ends: tuple[float, float, float]) -> float:
    """The split's cut for a tiny input where `fraction` left one side empty: the kept rows' lowest two places
    and highest (`ends`) put the one lowest row in validation, or the one highest in training. `fraction`
    where both sides have rows, or where fewer than two rows are kept (nothing to split)."""
    low, second, high = ends
    if n_train + n_val < 2 or (n_train and n_val) or low == high:
        return fraction
    if not n_val:
        return (low + second) / 2 if second > low else np.nextafter(low, 1.0)
    return high


@dataclass
class Rows:
    """One batch as the model's input: its raw slots, which rows to keep (and why not), what the split hashes."""

    x: np.ndarray
    """(rows, slots) float32, every row of the batch (normalize with the featurizer's offset and scale)."""
    keep: np.ndarray
    """Rows without bad values (the others are rejected, or raised on, per data.missing / data.nan_policy)."""
    reasons: Optional[list[str]]
    """Why each dropped row was dropped (None: none dropped)."""
    split_key: Optional[np.ndarray]
    """What validation_mask hashes without id columns (None with id columns)."""
    raw: np.ndarray
    """The numeric inputs' raw values, NaN where missing (the prepare pass's statistics)."""


def raw_featurizer(data: DataSection, num_features: int) -> Featurizer:
    """Unnormalized numeric inputs, for callers without a fitted featurizer: a vector column's
    `num_features` elements, or the scalar columns as numbers."""
    if data.vector_column:
        col = data.feature_columns[0]
        return Featurizer.unfitted(vector_roles(col, num_features), col)
    return Featurizer.numeric(data.feature_columns, np.zeros(num_features), np.ones(num_features))


def batch_rows(table: pa.Table, data: DataSection, featurizer: Featurizer) -> Rows:
    """The model's input for one Arrow batch, through the featurizer, whatever the columns' roles."""
    x, keep, reasons, raw = featurizer.matrix(table, data.missing, data.nan_policy)
    # the raw values, not x: the prepare pass splits before there are statistics to impute with
    key = None if data.ids or ROW_KEY in table.column_names else featurizer.hash_parts(table, raw)
    return Rows(x, keep, reasons, key, raw)


def to_fixed_size_list(x: np.ndarray) -> pa.FixedSizeListArray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


class SplitFeatures:
    """Ray Data UDF: raw Arrow batch -> one `x` column (fixed_size_list<float32>) for one split.

    `featurizer`: the fitted one; None takes the raw numeric inputs (raw_featurizer)."""

    def __init__(self, data: DataSection, num_features: int, split: str, featurizer: Optional[Featurizer] = None):
        assert split in ("train", "validation", "all")
        self.data, self.split = data, split
        self.featurizer = featurizer if featurizer is not None else raw_featurizer(data, num_features)

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = batch_rows(table, self.data, self.featurizer)
        keep = rows.keep
        if self.split != "all":
            val = validation_mask(table, self.data, rows.split_key)
            keep = keep & (val if self.split == "validation" else ~val)
        return pa.table({"x": to_fixed_size_list(rows.x[keep])})


def rejects_table(table: pa.Table, keep: np.ndarray, data: DataSection, reasons: list[str]) -> pa.Table:
    """The rows `keep` drops: id columns, raw features, the shard they came from and why they were dropped
    (`reasons`, one per dropped row)."""
    take = pa.array(np.flatnonzero(~keep))
    cols: dict[str, Any] = {c: table.column(c).take(take) for c in data.ids}
    for c in data.feature_columns:
        cols[c] = table.column(c).take(take)
    if PATH_COLUMN in table.column_names:
        cols[REJECT_SOURCE] = table.column(PATH_COLUMN).take(take)
    else:
        cols[REJECT_SOURCE] = pa.array(["input"] * len(take), pa.string())
    cols[REJECT_REASON] = pa.array(reasons, pa.string())
    return pa.table(cols)


def write_rejects(storage: Storage, dir_uri: str, rejects: pa.Table) -> str:
    """Write a rejects batch under `dir_uri`, named by a hash of its content: a retried task rewrites the same
    file instead of adding a duplicate. Returns the file's URI."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rejects.schema) as w:
        w.write_table(rejects)
    name = hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()[:32]
    uri = f"{dir_uri.rstrip('/')}/rejects-{name}.parquet"
    fs, path = storage.resolve(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        pq.write_table(rejects, f)
    return uri


class RejectWriter:
    """Writes the rows a batch drops (data.nan_policy or data.missing `drop`) to a rejects table under `dir_uri`."""

    def __init__(self, storage: Storage, dir_uri: str, data: DataSection):
        self.storage, self.dir_uri, self.data = storage, dir_uri, data

    def __call__(self, table: pa.Table, rows: Rows) -> None:
        if not rows.keep.all():
            write_rejects(self.storage, self.dir_uri, rejects_table(table, rows.keep, self.data, rows.reasons))
