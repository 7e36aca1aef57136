"""Input inspection: find the Parquet shards and check their footers up front, before any Ray work.

`inspect_input` reads only Parquet footers (in parallel), plus the first rows of one file for a
variable-length vector column; a bad input stops the job with one line naming the file and column.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Optional, Union

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import AUTO, DataSection
from pipeline.errors import InputError, StorageError
from pipeline.featurizer import Featurizer
from pipeline.roles import ColumnRole, column_roles, type_family, vector_roles
from pipeline.shards import PATH_COLUMN, ROW_KEY
from pipeline.sizing import resolve_validation
from pipeline.storage import Storage, map_io
from pipeline.uri import normalize_uri, scheme_of

KEY_NAMES = (re.compile(r"(?:^|[_\-. ])(?:id|uuid|guid)$", re.IGNORECASE),
             re.compile(r"[a-z0-9](?:Id|ID|Uuid|UUID|Guid|GUID)$"))
"""Names that mark a column as a row or entity key for `data.id_columns: auto`: `id`, `ID`, `user_id`,
`CUSTOMER-ID`, `order uuid`, and in camel case `userId`, `customerID`; not `paid`, `valid`, `grid` or `PID`."""
KEY_FAMILIES = ("integer", "string", "float")
"""The types a key-named column is taken as an id in (a float: pandas writes an integer key with nulls so)."""


def is_key_name(name: str) -> bool:
    return any(pattern.search(name) for pattern in KEY_NAMES)


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
    """The data section with `features: auto` resolved to the input's columns, and `validation_fraction: auto`
    to the input's row count."""
    roles: list[ColumnRole] = field(default_factory=list)
    """Each feature's role (numeric, categorical) and type family; a vector column's elements are numeric."""
    schema: Optional[pa.Schema] = None
    """The input's columns over every file, each feature column's type merged over the files that have it
    (`merged_schema`): what the roles, and scoring's check against the model, are decided on."""
    left_out: list[str] = field(default_factory=list)
    """`data.features: auto`: the columns that cannot be features, as `name (type)`; the job names them."""

    @property
    def num_features(self) -> int:
        return len(self.feature_names)

    @property
    def featurizer(self) -> Featurizer:
        """The features' featurizer before the prepare pass fits it."""
        vector = self.data.feature_columns[0] if self.data is not None and self.data.vector_column else None
        return Featurizer.unfitted(self.roles, vector)


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


def _list_files(uri: str, storage: Storage) -> list[str]:
    if scheme_of(uri) == "file" and not storage.exists(uri):
        raise InputError(f"data.input {uri}: no such file or directory")
    if storage.exists(uri) and not storage.is_dir(uri):
        return [uri]
    return [f for f in storage.list_files(uri) if not f.endswith((".crc", ".json", ".txt"))]


def _in_path(f_uri: str, col: str) -> str:
    """A hint where the column is a partition in the file's path (`date=2026-01-01/`): the job reads the
    columns in the files, not values in directory names."""
    seg = next((s for s in f_uri.split("/")[:-1] if s.startswith(f"{col}=")), None)
    return (f" ({seg} is a directory in its path: the job reads the columns in the files, not partition values "
            "in paths; write the column into the files)") if seg else ""


def _check_file(data: DataSection, f_uri: str, schema: pa.Schema, required: list[str], merged: pa.Schema,
                first: tuple[str, pa.Schema]) -> None:
    """One file's footer: every column read present, of a usable kind, with the first file's type, or for a
    feature column one that holds the same kind of values (`merged_type`: it folds into the merged type)."""
    first_uri, first_schema = first
    for col in required:
        idx = schema.get_field_index(col)
        if idx < 0:
            raise InputError(f"file {f_uri}: missing column {col!r}{_in_path(f_uri, col)}")
        t, ref = schema.field(idx).type, first_schema.field(col).type
        if not _alike(data, col, t, ref, merged.field(col).type):
            raise InputError(f"file {f_uri}: column {col!r} is {t}, but {first_uri} has {ref} (shards must share "
                             "one schema; a feature column's types may differ only in width or nulls)")
    if data.vector_column:
        col = data.feature_columns[0]
        t = schema.field(col).type
        if not (_is_list(t) and _is_numeric(t.value_type)):
            raise InputError(f"file {f_uri}: feature column {col!r} is {t}, expected a list of floats")
    if data.timestamp_column:
        t = schema.field(data.timestamp_column).type
        if not _temporal(t):
            raise InputError(f"file {f_uri}: timestamp column {data.timestamp_column!r} is {t}, "
                             "expected a timestamp or date")


def _alike(data: DataSection, col: str, t: pa.DataType, first: pa.DataType, merged: pa.DataType) -> bool:
    """A shard's type `t` for `col` is one the pipeline reads as it reads the first shard's: the same type (ids,
    the timestamp, a vector column), or for a scalar feature one that folds into the column's merged type;
    integer codes (data.categorical_columns) where another shard has floats are refused, since 3 and 3.0 would
    be two levels."""
    if col not in data.feature_columns or data.vector_column:
        return t == first
    codes = col in data.categorical_columns and not (pa.types.is_null(t) or pa.types.is_null(merged))
    return not (codes and type_family(t) != type_family(merged)) and merged_type(merged, t) == merged


def merged_type(a: pa.DataType, b: pa.DataType) -> Optional[pa.DataType]:
    """The type of a feature column whose shards hold `a` and `b`, where the pipeline reads both alike (each
    shard is read in its own type; the featurizer takes any numeric type as numbers and any string type as
    levels): integers of any width (int64), integers and floats or decimals (float64), a string in any of its
    forms (string), and a column of nulls only (a shard where every value was missing: the other type).
    None where they are not one kind of value."""
    if a == b or pa.types.is_null(b):
        return a
    if pa.types.is_null(a):
        return b
    fa, fb = type_family(a), type_family(b)
    if fa is None or fb is None:
        return None
    if {fa, fb} <= {"integer", "float"}:
        return pa.int64() if fa == fb == "integer" else pa.float64()
    if fa == fb == "string":
        return pa.string()
    return None


def merged_schema(schemas: list[pa.Schema]) -> pa.Schema:
    """Every shard's columns, in the order first seen, each with its type merged over the shards that have it
    (`merged_type`; where two do not merge, the first seen: the file check then names the file)."""
    types: dict[str, pa.DataType] = {}
    for schema in schemas:
        for f in schema:
            if f.name not in types:
                types[f.name] = f.type
            else:
                types[f.name] = merged_type(types[f.name], f.type) or types[f.name]
    return pa.schema([pa.field(name, t) for name, t in types.items()])


def partial_columns(schemas: list[pa.Schema]) -> dict[str, str]:
    """The columns some shards lack, each as `in k of n files`: a column added to a table over time (newer
    partitions have it, older ones do not). Under the autos such a column is no feature, key or event time,
    whichever file is read first; listed in the config, the file that lacks it is named."""
    counts: dict[str, int] = {}
    for schema in schemas:
        for name in dict.fromkeys(schema.names):
            counts[name] = counts.get(name, 0) + 1
    return {name: f"in {k} of {len(schemas)} files" for name, k in counts.items() if k < len(schemas)}


def _vector_length(uri: str, storage: Storage, col: str, t: pa.DataType, file_rows: dict[str, int]) -> int:
    """A vector column's length: from its type when fixed, else from the first non-empty vector."""
    if pa.types.is_fixed_size_list(t):
        return t.list_size
    for f_uri, rows in file_rows.items():
        if rows:
            dim = _first_vector_length(storage, f_uri, col)
            if dim:
                return dim
    raise InputError(f"data.input {uri}: feature column {col!r} has no non-empty vectors")


def inspect_input(data: DataSection, storage: Storage, files: Optional[list[str]] = None) -> InputSpec:
    """List the shards and check every footer: columns present, types usable, one schema throughout.

    Raises InputError/StorageError with one line naming the file and column."""
    uri = normalize_uri(data.input)
    files = _list_files(uri, storage) if files is None else files
    if not files:
        raise InputError(f"data.input {uri}: no Parquet files found")
    footers = map_io(lambda u: _read_footer(storage, u), files)
    schemas = [s for _, s, _ in footers]
    schema, partial = merged_schema(schemas), partial_columns(schemas)
    everywhere = pa.schema([f for f in schema if f.name not in partial])  # what the autos choose from
    ids_auto = data.id_columns == AUTO
    if ids_auto:
        data = dataclasses.replace(data, id_columns=auto_ids(everywhere, data))
    if data.timestamp_column == AUTO:
        data = dataclasses.replace(data, timestamp_column=auto_timestamp(data, everywhere))
    if not data.ids and ROW_KEY in schema.names:
        raise InputError(f"file {footers[0][0]}: column {ROW_KEY!r} is reserved for the row keys of an input "
                         "without id columns; set data.id_columns or rename it")
    left_out: list[str] = []
    if data.features == AUTO:
        features, left_out = auto_features(data, schema, footers[0][0], ids_auto,
                                           pandas_index_columns(schemas), partial)
        data = dataclasses.replace(data, features=features)
    required = list(dict.fromkeys(data.feature_columns + data.ids
                                  + ([data.timestamp_column] if data.timestamp_column else [])))
    for f_uri, file_schema, _ in footers:
        _check_file(data, f_uri, file_schema, required, schema, footers[0][:2])
    roles = [] if data.vector_column else column_roles(schema, data.feature_columns, data.categorical_columns,
                                                       f"file {footers[0][0]}")
    file_rows = {f_uri: nrows for f_uri, _, nrows in footers}
    num_rows = sum(file_rows.values())
    if num_rows == 0:
        raise InputError(f"data.input {uri}: the input is empty ({len(files)} files, 0 rows)")
    if data.vector_column:
        col = data.feature_columns[0]
        roles = vector_roles(col, _vector_length(uri, storage, col, schema.field(col).type, file_rows))
    data = resolve_validation(data, num_rows)
    return InputSpec(uri=uri, files=list(files), feature_names=[r.name for r in roles], num_rows=num_rows,
                     columns=required, file_rows=file_rows, data=data, roles=roles, schema=schema,
                     left_out=left_out)


def pandas_index_columns(schemas: list[pa.Schema]) -> list[str]:
    """The columns that pandas' `to_parquet` wrote from a DataFrame's index (`__index_level_0__` after a filter,
    or the index's own name), as the files' pandas metadata lists them; their order over the files."""
    found: dict[str, None] = {}
    for schema in schemas:
        try:
            meta = json.loads((schema.metadata or {}).get(b"pandas", b"{}"))
        except ValueError:
            continue
        for col in meta.get("index_columns", []) if isinstance(meta, dict) else []:
            if isinstance(col, str) and col in schema.names:  # a RangeIndex is stored as a range, not a column
                found[col] = None
    return list(found)


def auto_ids(schema: pa.Schema, data: Optional[DataSection] = None) -> list[str]:
    """`data.id_columns: auto`: the columns whose names mark them as keys (`is_key_name`: `id`, `user_id`,
    `customerId`, ...) and whose values are integers, strings or floats, in the input's order; none where no
    column is so named (the split then hashes each row's place). A column `data` gives another role (listed in
    `data.features`, `data.categorical_columns` or `data.exclude_columns`, or the timestamp) is not taken.

    A key is no feature: as a number its magnitude means nothing, and a key that grows over time (new customers)
    would put every new row outside the training range; the output carries it, for joining the rows back."""
    taken: set = set()
    if data is not None:
        taken = set(data.exclude_columns) | set(data.categorical_columns) | {data.timestamp_column}
        if isinstance(data.features, list):
            taken |= set(data.features)
    return [f.name for f in schema if f.name not in taken and is_key_name(f.name)
            and type_family(f.type) in KEY_FAMILIES]


def _temporal(t: pa.DataType) -> bool:
    return pa.types.is_timestamp(t) or pa.types.is_date(t)


def auto_timestamp(data: DataSection, schema: pa.Schema) -> Optional[str]:
    """`data.timestamp_column: auto`: the input's one timestamp or date column outside the ids, the exclusions
    and a listed `data.features`, where there is exactly one; else none. (Several are left as they are: under
    `features: auto` they are then left out of the features, and the job names them.)"""
    found = timestamp_candidates(data, schema)
    return found[0] if len(found) == 1 else None


def timestamp_candidates(data: DataSection, schema: pa.Schema) -> list[str]:
    """The columns `data.timestamp_column: auto` chooses from (it takes one only where there is one)."""
    taken = set(data.ids) | set(data.exclude_columns) | (set(data.features) if isinstance(data.features, list)
                                                          else set())
    return [f.name for f in schema if f.name not in taken and _temporal(f.type)]


def auto_features(data: DataSection, schema: pa.Schema, f_uri: str, ids_auto: bool = False,
                  pandas_index: tuple[str, ...] | list[str] = (),
                  partial: Optional[dict[str, str]] = None) -> tuple[Union[str, list[str]], list[str]]:
    """`data.features: auto`: every column but the ids, the timestamp and `data.exclude_columns` (names the
    input lacks are skipped: one config serves tables with and without, say, a label). One list<float> column
    left is the vector form.

    Columns that cannot be features (timestamps and dates other than the event time, binary, nested: a list of
    floats beside other columns) are left out rather than refused, so that a table goes in as it is; returns
    (features, the columns left out as `name (type)`). A listed `data.features` is taken as it is, and such a
    column in it is refused, naming it.

    A DataFrame's index that pandas wrote beside the data (`pandas_index`, from the files' metadata:
    `__index_level_0__` after a filter) is left out too, as `name (pandas index)`, unless it is an id: row
    labels, not a measurement, and a row number grows from one partition to the next. Listed in
    `data.features`, it is a feature like any other column. A column some files lack (`partial`, from
    `partial_columns`) is left out too, as `name (in k of n files)`, whichever file is read first; listed in
    `data.features`, the file that lacks it is refused."""
    partial = partial or {}
    ids_auto = ids_auto or data.id_columns == AUTO
    ids = auto_ids(schema, data) if data.id_columns == AUTO else data.ids
    skip = set(ids) | set(data.exclude_columns) | {data.timestamp_column, PATH_COLUMN}
    cols = [name for name in schema.names if name not in skip]
    index = [f"{name} (pandas index)" for name in cols if name in pandas_index]
    index += [f"{name} ({partial[name]})" for name in cols if name in partial and name not in pandas_index]
    cols = [name for name in cols if name not in pandas_index and name not in partial]
    if len(cols) == 1 and _is_list(schema.field(cols[0]).type):
        return cols[0], index
    usable = [name for name in cols if type_family(schema.field(name).type) is not None]
    left_out = [f"{name} ({schema.field(name).type})" for name in cols if name not in usable] + index
    if not usable:
        what = f" ({', '.join(left_out)} cannot be features)" if left_out else ""
        keys = (f"; data.id_columns auto took {', '.join(ids)} as keys (their names): set data.id_columns"
                if ids_auto and ids else "")
        raise InputError(f"file {f_uri}: data.features auto: no columns left besides ids, timestamp and "
                         f"exclusions{what}{keys}")
    return usable, left_out


def input_notes(requested: DataSection, spec: InputSpec) -> list[str]:
    """What the autos chose that a user should read: ids other than a plain `id`, the event time, and the columns
    left out of the features."""
    data, notes = spec.data or requested, []
    if requested.id_columns == AUTO and data.id_columns not in (AUTO, [], ["id"]):
        notes.append(f"ids: {', '.join(data.id_columns)} (data.id_columns auto: the columns named as keys; "
                     "copied to the output and hashed for the split, not features; set data.id_columns to choose)")
    if requested.timestamp_column == AUTO and spec.schema is not None:
        found = timestamp_candidates(data, spec.schema)
        if data.timestamp_column:
            notes.append(f"event time: column {data.timestamp_column!r} (data.timestamp_column auto: the input's "
                         "one timestamp column), copied to event_timestamp")
        elif len(found) > 1:
            notes.append(f"event time: the run's as-of time (data.timestamp_column auto: the input has "
                         f"{len(found)} timestamp/date columns, {', '.join(found)}; set it to one of them)")
    if spec.left_out:
        notes.append(f"left out of the features: {', '.join(spec.left_out)} (data.features auto: a timestamp, "
                     "binary or nested column, a DataFrame index pandas wrote, or a column some files lack, is no "
                     "feature; name them in data.exclude_columns to silence this)")
    return notes
