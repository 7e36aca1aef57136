"""Ingest: find the Parquet shards, check their schema up front, turn batches into feature matrices.

The pure functions here (`inspect_input`, `feature_matrix`, `validation_mask`, `Moments`) run and are tested
without Ray; `read_dataset` and `compute_moments` build the Ray Data pipelines on top of them.

A row goes to validation when a hash of its id columns (or of its feature values when there are no id
columns) falls below `data.validation_fraction`: the split is stable across reruns, shard layouts and
worker counts.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Union

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import AUTO, DataSection
from pipeline.errors import InputError, StorageError
from pipeline.features import (ColumnMoments, ColumnRole, Featurizer, LevelCounts, TableStats, column_roles,
                               counter_capacity)
from pipeline.storage import Storage, map_io
from pipeline.uri import normalize_uri, scheme_of
from pipeline.watchdog import beating

PATH_COLUMN = "path"  # added by read_parquet(include_paths=True): names the shard in error messages
REJECT_SOURCE = "source_file"
REJECT_REASON = "reason"


@dataclass
class InputSpec:
    """What the schema check learned about the input: every file, the feature layout, the row count."""

    uri: str
    files: list[str]
    feature_names: list[str]
    num_rows: int
    columns: list[str]
    """Columns to read: features, ids and timestamp."""
    file_rows: dict[str, int] = field(default_factory=dict)
    data: Optional[DataSection] = None
    """The data section with `features: auto` resolved to the input's columns."""
    roles: list[ColumnRole] = field(default_factory=list)
    """Scalar feature columns: each one's role (numeric, categorical) and type family; empty for a vector."""
    schema: Optional[pa.Schema] = None
    """The first file's schema (every file has the same types in the columns read)."""

    @property
    def num_features(self) -> int:
        return len(self.feature_names)

    @property
    def featurizer(self) -> Optional[Featurizer]:
        """The scalar columns' featurizer before the prepare pass fits it; None for a vector column."""
        return Featurizer.unfitted(self.roles) if self.roles else None


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_decimal(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _read_footer(storage: Storage, uri: str) -> tuple[str, pa.Schema, int]:
    try:
        with storage.open_parquet(uri) as pf:
            md = pf.metadata
            return uri, md.schema.to_arrow_schema(), md.num_rows
    except (StorageError, FileNotFoundError):
        raise
    except pa.ArrowInvalid as e:
        raise InputError(f"file {uri}: not a readable Parquet file ({str(e).splitlines()[0][:200]})") from None
    except OSError as e:
        text = str(e).lower()
        if "parquet" in text or "magic" in text or "footer" in text or "size" in text:
            raise InputError(f"file {uri}: not a readable Parquet file ({str(e).splitlines()[0][:200]})") \
                from None
        raise


def _first_vector_length(storage: Storage, uri: str, column: str) -> Optional[int]:
    with storage.open_parquet(uri) as pf:
        for batch in pf.iter_batches(batch_size=64, columns=[column]):
            arr = batch.column(0)
            lengths = pc.list_value_length(arr).drop_null()
            if len(lengths):
                return int(lengths[0].as_py())
    return None


def inspect_input(data: DataSection, storage: Storage, files: Optional[list[str]] = None) -> InputSpec:
    """List the shards and check every footer: columns present, types numeric, one schema throughout.

    Reads only Parquet footers (in parallel), plus the first few rows of one file for variable-length
    list features. Raises InputError/StorageError with one line naming the file and column.
    """
    uri = normalize_uri(data.input)
    if files is None:
        if scheme_of(uri) == "file" and not storage.exists(uri):
            raise InputError(f"data.input {uri}: no such file or directory")
        if storage.exists(uri) and not storage.is_dir(uri):
            files = [uri]
        else:
            files = [f for f in storage.list_files(uri) if not f.endswith((".crc", ".json", ".txt"))]
    if not files:
        raise InputError(f"data.input {uri}: no Parquet files found")

    footers = map_io(lambda u: _read_footer(storage, u), files)

    if data.features == AUTO:
        data = dataclasses.replace(data, features=auto_features(data, footers[0][1], footers[0][0]))
    feature_cols = data.feature_columns
    required = list(dict.fromkeys(feature_cols + data.id_columns
                                  + ([data.timestamp_column] if data.timestamp_column else [])))
    ref_types: dict[str, tuple[pa.DataType, str]] = {}
    file_rows: dict[str, int] = {}
    for f_uri, schema, nrows in footers:
        file_rows[f_uri] = nrows
        for col in required:
            idx = schema.get_field_index(col)
            if idx < 0:
                raise InputError(f"file {f_uri}: missing column {col!r}")
            t = schema.field(idx).type
            if col in ref_types and ref_types[col][0] != t:
                raise InputError(f"file {f_uri}: column {col!r} is {t}, but {ref_types[col][1]} has "
                                 f"{ref_types[col][0]} (shards must share one schema)")
            ref_types.setdefault(col, (t, f_uri))
        for col in feature_cols:
            t = schema.field(col).type
            if data.vector_column:
                if not (_is_list(t) and _is_numeric(t.value_type)):
                    raise InputError(f"file {f_uri}: feature column {col!r} is {t}, expected a list of floats")
        roles = [] if data.vector_column else column_roles(schema, feature_cols, data.categorical_columns,
                                                           f"file {f_uri}")
        if data.timestamp_column:
            t = schema.field(data.timestamp_column).type
            if not (pa.types.is_timestamp(t) or pa.types.is_date(t)):
                raise InputError(f"file {f_uri}: timestamp column {data.timestamp_column!r} is {t}, "
                                 "expected a timestamp or date")

    num_rows = sum(file_rows.values())
    if num_rows == 0:
        raise InputError(f"data.input {uri}: the input is empty ({len(files)} files, 0 rows)")

    if data.vector_column:
        col = feature_cols[0]
        t = ref_types[col][0]
        if pa.types.is_fixed_size_list(t):
            dim = t.list_size
        else:
            dim = None
            for f_uri in files:
                if file_rows[f_uri]:
                    dim = _first_vector_length(storage, f_uri, col)
                    if dim:
                        break
            if not dim:
                raise InputError(f"data.input {uri}: feature column {col!r} has no non-empty vectors")
        names = [f"{col}[{i}]" for i in range(dim)]
    else:
        names = list(feature_cols)
    return InputSpec(uri=uri, files=list(files), feature_names=names, num_rows=num_rows,
                     columns=required, file_rows=file_rows, data=data, roles=roles, schema=footers[0][1])


def auto_features(data: DataSection, schema: pa.Schema, f_uri: str) -> Union[str, list[str]]:
    """`data.features: auto`: every column but the ids, the timestamp and `data.exclude_columns` (names the
    input lacks are skipped: one config serves tables with and without, say, a label). One list<float> column
    left is the vector form."""
    skip = set(data.id_columns) | set(data.exclude_columns) | {data.timestamp_column, PATH_COLUMN}
    cols = [name for name in schema.names if name not in skip]
    if not cols:
        raise InputError(f"file {f_uri}: data.features auto: no columns left besides ids, timestamp and exclusions")
    if len(cols) == 1 and _is_list(schema.field(cols[0]).type):
        return cols[0]
    return cols


# ------------------------------------------------------------------------------------------ batches


def source_of(table: pa.Table, rows: Optional[np.ndarray] = None) -> str:
    """The shard(s) of a batch, or of the rows selected by the boolean mask `rows` (the offending ones)."""
    if PATH_COLUMN in table.column_names and table.num_rows:
        col = table.column(PATH_COLUMN)
        if rows is not None:
            col = col.filter(pa.array(rows))
        paths = pc.unique(col).to_pylist()
        return ", ".join(str(p) for p in paths[:3]) + (" ..." if len(paths) > 3 else "")
    return "input"


def feature_matrix(table: pa.Table, data: DataSection, num_features: int) -> np.ndarray:
    """(rows, num_features) float32 from one Arrow batch; zero-copy where the layout allows.

    Raises InputError naming the file and column for vectors of the wrong length or null values.
    """
    n = table.num_rows
    if data.vector_column:
        col = data.feature_columns[0]
        arr = table.column(col)
        arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
        if arr.null_count:
            raise InputError(f"file {source_of(table)}: column {col!r} has {arr.null_count} null vectors")
        if not pa.types.is_fixed_size_list(arr.type):
            lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
            bad = np.flatnonzero(lengths != num_features)
            if bad.size:
                raise InputError(
                    f"file {source_of(table, lengths != num_features)}: column {col!r} has {bad.size} vectors whose "
                    f"length is not {num_features} (e.g. {int(lengths[bad[0]])})")
        elif arr.type.list_size != num_features:
            raise InputError(f"file {source_of(table)}: column {col!r} has vectors of length "
                             f"{arr.type.list_size}, expected {num_features}")
        values = arr.flatten()
        if values.null_count:
            raise InputError(f"file {source_of(table)}: column {col!r} has {values.null_count} null values")
        if values.type != pa.float32():
            values = values.cast(pa.float32())
        return values.to_numpy(zero_copy_only=False).reshape(n, num_features)
    out = np.empty((n, num_features), dtype=np.float32)
    for j, col in enumerate(data.feature_columns):
        c = table.column(col)
        if c.null_count:
            raise InputError(f"file {source_of(table)}: column {col!r} has {c.null_count} null values")
        out[:, j] = c.to_numpy()
    return out


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x += np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def row_hash(table: pa.Table, id_columns: list[str], features: Optional[np.ndarray] = None) -> np.ndarray:
    """A uint64 per row, a pure function of the id values (or of the feature values without ids)."""
    n = table.num_rows
    h = np.zeros(n, dtype=np.uint64)
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


def validation_mask(table: pa.Table, data: DataSection, features: Optional[np.ndarray] = None) -> np.ndarray:
    """True for rows in the validation split."""
    h = row_hash(table, data.id_columns, features)
    u = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return u < data.validation_fraction


def finite_mask(x: np.ndarray) -> np.ndarray:
    return np.isfinite(x).all(axis=1)


def check_finite(table: pa.Table, x: np.ndarray, data: DataSection) -> np.ndarray:
    """Rows to keep; with nan_policy=error, non-finite values raise naming the file and column."""
    ok = finite_mask(x)
    if data.nan_policy == "error" and not ok.all():
        bad_cols = np.flatnonzero(~np.isfinite(x).all(axis=0))
        col = data.feature_columns[0] if data.vector_column else data.feature_columns[int(bad_cols[0])]
        raise InputError(f"file {source_of(table, ~ok)}: column {col!r} has {int((~ok).sum())} rows with NaN or "
                         "infinite values (set data.nan_policy=drop to skip them)")
    return ok


def feature_name(data: DataSection, j: int) -> str:
    return f"{data.feature_columns[0]}[{j}]" if data.vector_column else data.feature_columns[j]


def rejects_table(table: pa.Table, x: np.ndarray, keep: np.ndarray, data: DataSection,
                  reasons: Optional[list[str]] = None) -> pa.Table:
    """The rows `keep` drops: id columns, raw features, the shard they came from and why they were dropped
    (`reasons`, one per dropped row, or the first non-finite feature of `x`)."""
    idx = np.flatnonzero(~keep)
    if reasons is None:
        reasons = [f"NaN or infinite value in {feature_name(data, int(j))}"
                   for j in (~np.isfinite(x[idx])).argmax(axis=1)]
    take = pa.array(idx)
    cols: dict[str, Any] = {c: table.column(c).take(take) for c in data.id_columns}
    for c in data.feature_columns:
        cols[c] = table.column(c).take(take)
    if PATH_COLUMN in table.column_names:
        cols[REJECT_SOURCE] = table.column(PATH_COLUMN).take(take)
    else:
        cols[REJECT_SOURCE] = pa.array(["input"] * len(idx), pa.string())
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
    """Writes the rows a batch drops (nan_policy=drop) to a rejects table under `dir_uri`."""

    def __init__(self, storage: Storage, dir_uri: str, data: DataSection):
        self.storage, self.dir_uri, self.data = storage, dir_uri, data

    def __call__(self, table: pa.Table, x: np.ndarray, keep: np.ndarray, reasons: Optional[list[str]] = None) -> None:
        if not keep.all():
            write_rejects(self.storage, self.dir_uri, rejects_table(table, x, keep, self.data, reasons))


@dataclass
class Rows:
    """One batch as the model's input: its raw slots, which rows to keep (and why not), what the split hashes."""

    x: np.ndarray
    """(rows, slots) float32, every row of the batch (normalize with the featurizer's offset and scale)."""
    keep: np.ndarray
    """Rows without bad values (the others are rejected, or raised on, per data.missing / data.nan_policy)."""
    reasons: Optional[list[str]] = None
    """Why each dropped row was dropped (None: none dropped, or the first non-finite slot of a vector)."""
    split_key: Optional[np.ndarray] = None
    """What validation_mask hashes without id columns."""
    raw: Optional[np.ndarray] = None
    """Scalar columns: the numeric columns' raw values, NaN where missing (the prepare pass's statistics)."""


def batch_rows(table: pa.Table, data: DataSection, num_features: int, featurizer: Optional[Featurizer]) -> Rows:
    """The model's input for one Arrow batch: a vector column (or plain numeric columns without a featurizer)
    as before, scalar columns of any role through the featurizer."""
    if featurizer is None or featurizer.vector:
        x = feature_matrix(table, data, num_features)
        return Rows(x, check_finite(table, x, data), split_key=x)
    x, keep, reasons, raw = featurizer.matrix(table, data.missing, data.nan_policy)
    # the raw values, not x: the prepare pass splits before there are statistics to impute with
    key = None if data.id_columns else featurizer.hash_parts(table, raw)
    return Rows(x, keep, reasons, key, raw)


def to_fixed_size_list(x: np.ndarray) -> pa.FixedSizeListArray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


class SplitFeatures:
    """Ray Data UDF: raw Arrow batch -> one `x` column (fixed_size_list<float32>) for one split."""

    def __init__(self, data: DataSection, num_features: int, split: str, featurizer: Optional[Featurizer] = None):
        assert split in ("train", "validation", "all")
        self.data, self.num_features, self.split, self.featurizer = data, num_features, split, featurizer

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = batch_rows(table, self.data, self.num_features, self.featurizer)
        keep = rows.keep
        if self.split != "all":
            val = validation_mask(table, self.data, rows.split_key)
            keep = keep & (val if self.split == "validation" else ~val)
        return pa.table({"x": to_fixed_size_list(rows.x[keep])})


# ------------------------------------------------------------------------------------------ moments


@dataclass
class Moments:
    """Count, mean and sum of squared deviations per feature, merged with Chan et al.'s parallel rule."""

    n: int
    mean: np.ndarray
    m2: np.ndarray

    @staticmethod
    def of(x: np.ndarray) -> "Moments":
        x64 = x.astype(np.float64)
        n = x64.shape[0]
        if n == 0:
            d = x.shape[1]
            return Moments(0, np.zeros(d), np.zeros(d))
        mean = x64.mean(axis=0)
        return Moments(n, mean, ((x64 - mean) ** 2).sum(axis=0))

    def merge(self, other: "Moments") -> "Moments":
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2 + delta ** 2 * (self.n * other.n / n)
        return Moments(n, mean, m2)

    @property
    def std(self) -> np.ndarray:
        var = self.m2 / max(self.n - 1, 1)
        return np.sqrt(var)


def normalization_stats(m: Moments) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) as float32; a constant feature gets scale 1 so it normalizes to 0, not to NaN."""
    std = m.std
    tiny = 1e-6 * np.maximum(1.0, np.abs(m.mean))
    scale = np.where(std > tiny, std, 1.0)
    return m.mean.astype(np.float32), scale.astype(np.float32)


class BatchMoments:
    """Ray Data UDF: one row of partial statistics per batch (train rows), plus split and reject counts.

    With a (not yet fitted) featurizer, the statistics are the scalar columns' TableStats (JSON in `stats`)."""

    def __init__(self, data: DataSection, num_features: int, on_reject: Optional[RejectWriter] = None,
                 featurizer: Optional[Featurizer] = None):
        self.data, self.num_features, self.on_reject, self.featurizer = data, num_features, on_reject, featurizer

    def __call__(self, table: pa.Table) -> dict[str, Any]:
        if self.featurizer is not None:
            return self._table_stats(table)
        x = feature_matrix(table, self.data, self.num_features)
        keep = check_finite(table, x, self.data)
        if self.on_reject is not None:
            self.on_reject(table, x, keep)
        val = validation_mask(table, self.data, x)
        m = Moments.of(x[keep & ~val])
        return {
            "n": np.array([m.n], dtype=np.int64),
            "mean": m.mean[None, :],
            "m2": m.m2[None, :],
            "n_val": np.array([int((keep & val).sum())], dtype=np.int64),
            "n_rejected": np.array([int((~keep).sum())], dtype=np.int64),
        }


    def _table_stats(self, table: pa.Table) -> dict[str, Any]:
        fz, data = self.featurizer, self.data
        rows = batch_rows(table, data, self.num_features, fz)
        if self.on_reject is not None:
            self.on_reject(table, rows.x, rows.keep, rows.reasons)
        val = validation_mask(table, data, rows.split_key)
        train = rows.keep & ~val
        cap = counter_capacity(data.max_categories)
        xnum = rows.raw[train]
        stats = TableStats(ColumnMoments.of(xnum), np.isnan(xnum).sum(axis=0).astype(np.int64),
                           [LevelCounts.of(table.column(c.name).filter(pa.array(train)), cap)
                            for c in fz.categorical_columns])
        return {
            "n": np.array([int(train.sum())], dtype=np.int64),
            "stats": np.array([stats.to_json()], dtype=object),
            "n_val": np.array([int((rows.keep & val).sum())], dtype=np.int64),
            "n_rejected": np.array([int((~rows.keep).sum())], dtype=np.int64),
        }


def merge_table_rows(rows: Iterable[dict[str, Any]], featurizer: Featurizer,
                     max_categories: int) -> tuple[TableStats, int, int, int]:
    """(merged statistics, train rows, validation rows, rejected rows) from BatchMoments' rows."""
    total = TableStats.empty(len(featurizer.numeric_columns), len(featurizer.categorical_columns))
    n = n_val = n_rej = 0
    for r in rows:
        total = total.merge(TableStats.from_json(str(r["stats"])), counter_capacity(max_categories))
        n, n_val, n_rej = n + int(r["n"]), n_val + int(r["n_val"]), n_rej + int(r["n_rejected"])
    return total, n, n_val, n_rej


def merge_moment_rows(rows: Iterable[dict[str, Any]], num_features: int) -> tuple[Moments, int, int]:
    total = Moments(0, np.zeros(num_features), np.zeros(num_features))
    n_val = n_rej = 0
    for r in rows:
        total = total.merge(Moments(int(r["n"]), np.asarray(r["mean"], np.float64), np.asarray(r["m2"], np.float64)))
        n_val += int(r["n_val"])
        n_rej += int(r["n_rejected"])
    return total, n_val, n_rej


# ------------------------------------------------------------------------------------------ Ray Data


BLOCK_BYTES = 32 * 2**20
"""Largest block a read (and the maps fused with it) makes. A task holds a few copies of its block at once
(Arrow, the feature matrix, the model's outputs), so this, not the shard size, bounds a task's memory:
with Ray Data's default of 128 MB, `make scale`'s 155 MB shards took the job's peak memory to 1.44x that on
13 MB shards; real shards are 128-512 MB."""


def read_dataset(spec: InputSpec, storage: Storage, with_paths: bool = True, num_cpus: Optional[float] = None,
                 shuffle_files: bool = False):
    """A streaming Ray Dataset over the shards: one read task per file, only the needed columns.

    Ray 2.60's default Parquet reader (DataSourceV2: ListFiles -> ReadFiles) planned every file of the input
    into a single read task here, which produced the whole input as one block: no parallel reads, no
    streaming, memory growing with the input (`make bench`: 0.13 of pyarrow's rows/s, first batch only at
    the end). The V1 `ParquetDatasource` reads a file per task and splits blocks larger than
    `target_max_block_size`, so reads run in parallel and the data streams through the object store.
    `num_cpus`, when a following map asks for the same, lets Ray fuse the read into that map's tasks.
    `shuffle_files`: each execution (each streamed epoch) reads the files in a new order, without the
    all-to-all barrier of `randomize_block_order`, which waits for every block of the input and, on an
    input larger than the object store, spills most of it.
    """
    import ray.data

    fs = storage.filesystem(spec.files[0])
    paths = [storage.resolve(f)[1] for f in spec.files]
    ctx = ray.data.DataContext.get_current()
    prev, ctx.use_datasource_v2 = ctx.use_datasource_v2, False  # read_parquet picks the datasource here
    # The dataset keeps a copy of the context it was made in: its blocks are at most BLOCK_BYTES.
    prev_block, ctx.target_max_block_size = ctx.target_max_block_size, BLOCK_BYTES
    try:
        # `columns=` is pushed down into the V1 reader (V2 would want select_columns instead).
        return ray.data.read_parquet(paths, filesystem=fs, include_paths=with_paths, columns=spec.columns,
                                     override_num_blocks=len(paths), num_cpus=num_cpus,
                                     shuffle="files" if shuffle_files else None)
    finally:
        ctx.use_datasource_v2, ctx.target_max_block_size = prev, prev_block


def _moment_rows(spec: InputSpec, data: DataSection, storage: Storage, rejects_uri: Optional[str],
                 featurizer: Optional[Featurizer]) -> list[dict[str, Any]]:
    on_reject = RejectWriter(storage, rejects_uri, data) if rejects_uri and data.drops_rows else None
    ds = read_dataset(spec, storage).map_batches(BatchMoments(data, spec.num_features, on_reject, featurizer),
                                                 batch_format="pyarrow", batch_size=None)
    rows = []
    for batch in beating(ds.iter_batches(batch_format="numpy", batch_size=None)):
        for i in range(len(batch["n"])):
            rows.append({k: batch[k][i] for k in batch})
    return rows


def compute_moments(spec: InputSpec, data: DataSection, storage: Storage,
                    rejects_uri: Optional[str] = None) -> tuple[Moments, int, int]:
    """One distributed pass over a vector column: normalization moments of the training rows, validation and
    reject counts. With `rejects_uri` (and nan_policy=drop), the dropped rows are written there with the reason."""
    return merge_moment_rows(_moment_rows(spec, data, storage, rejects_uri, None), spec.num_features)


def compute_table_stats(spec: InputSpec, data: DataSection, storage: Storage,
                        rejects_uri: Optional[str] = None) -> tuple[TableStats, int, int, int]:
    """The same pass over scalar columns of any role: (TableStats, train, validation, rejected rows)."""
    fz = spec.featurizer
    assert fz is not None, "a vector column goes through compute_moments"
    return merge_table_rows(_moment_rows(spec, data, storage, rejects_uri, fz), fz, data.max_categories)
