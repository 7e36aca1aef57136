"""Ingest without Ray: schema checks over every shard, feature matrices, the split, normalization."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import DataSection, StorageSection
from pipeline.featurizer import Featurizer
from pipeline.inputs import input_notes, inspect_input, is_key_name, merged_type
from pipeline.prepare import BatchStats, _say_shared_keys, distinct_keys, merge_stat_rows, prepare_key
from pipeline.rows import SplitFeatures, batch_rows, raw_featurizer, row_keys, validation_mask
from pipeline.stats import KEY_SAMPLE, ColumnMoments, DistinctKeys, TableStats, normalization_stats, rare_flags
from pipeline.errors import InputError
from pipeline.storage import Storage
from tests.models import vector_data


LOCAL = Storage(StorageSection())


def feature_matrix(table: pa.Table, data: DataSection, num_features: int) -> np.ndarray:
    """The raw input slots of a batch, as the featurizer makes them before any statistics."""
    return batch_rows(table, data, raw_featurizer(data, num_features)).x


def vec_table(n: int, d: int, start: int = 0, fixed: bool = False) -> pa.Table:
    x = np.arange(start * d, (start + n) * d, dtype=np.float32).reshape(n, d)
    if fixed:
        feats = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d)
    else:
        feats = pa.array(list(x), pa.list_(pa.float32()))
    return pa.table({"id": pa.array(np.arange(start, start + n, dtype=np.int64)), "features": feats})


def write(tmp_path, name: str, table: pa.Table) -> str:
    p = tmp_path / name
    pq.write_table(table, p)
    return str(p)


def test_inspect_vector_input(tmp_path):
    write(tmp_path, "a.parquet", vec_table(10, 4))
    write(tmp_path, "b.parquet", vec_table(5, 4, start=10))
    spec = inspect_input(vector_data(input=str(tmp_path)), LOCAL)
    assert spec.num_rows == 15 and len(spec.files) == 2
    assert spec.feature_names == [f"features[{i}]" for i in range(4)]
    assert set(spec.columns) == {"features", "id"}


def test_inspect_fixed_size_and_columns(tmp_path):
    write(tmp_path, "a.parquet", vec_table(3, 6, fixed=True))
    assert inspect_input(vector_data(input=str(tmp_path)), LOCAL).num_features == 6
    cols = tmp_path / "cols"
    cols.mkdir()
    write(cols, "a.parquet", pa.table({"id": [1, 2], "a": [1.0, 2.0], "b": pa.array([1, 2], pa.int32())}))
    spec = inspect_input(DataSection(input=str(cols), features=["b", "a"]), LOCAL)
    assert spec.feature_names == ["b", "a"]


@pytest.mark.parametrize("table, data, match", [
    (pa.table({"id": [1], "other": [[1.0]]}), {}, r"b\.parquet: missing column 'features'"),
    (pa.table({"id": [1], "features": ["x"]}), {}, r"feature column 'features' is string"),
    (pa.table({"id": [1], "a": pa.array([1], pa.timestamp("s"))}), {"features": ["a"]},
     r"feature column 'a' is timestamp\[m?s\] \(a timestamp/date/time\); set data.timestamp_column"),
    (pa.table({"id": [1], "a": [[1.0]], "b": [1.0]}), {"features": ["a", "b"]}, r"feature column 'a' is list"),
    (pa.table({"features": [[1.0]]}), {}, r"missing column 'id'"),
])
def test_schema_errors_name_file_and_column(tmp_path, table, data, match):
    write(tmp_path, "b.parquet", table)
    with pytest.raises(InputError, match=match) as e:
        inspect_input(vector_data(input=str(tmp_path), **data), LOCAL)
    assert "\n" not in str(e.value)


def test_auto_features_and_ids_are_the_defaults(tmp_path):
    """A user who sets only the input: every column is a feature, `id` (where the input has one) the key."""
    keyed, keyless = tmp_path / "keyed", tmp_path / "keyless"
    keyed.mkdir(), keyless.mkdir()
    write(keyed, "a.parquet", pa.table({"id": [1, 2], "a": [1.0, 2.0], "s": ["x", "y"]}))
    spec = inspect_input(DataSection(input=str(keyed)), LOCAL)
    assert (spec.data.features, spec.data.id_columns, spec.feature_names) == (["a", "s"], ["id"], ["a", "s"])
    write(keyless, "a.parquet", pa.table({"x": [1.0, 2.0]}))
    spec = inspect_input(DataSection(input=str(keyless)), LOCAL)
    assert (spec.data.features, spec.data.id_columns, spec.columns) == (["x"], [], ["x"])
    assert inspect_input(DataSection(input=str(keyed), id_columns=[]), LOCAL).feature_names == ["id", "a", "s"]
    # the input's one timestamp (or date) column is the event time; with two, neither (both left out of the features)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    when = pa.array([1, 2], pa.timestamp("ms"))
    write(one, "a.parquet", pa.table({"id": [1, 2], "a": [1.0, 2.0], "at": when}))
    spec = inspect_input(DataSection(input=str(one)), LOCAL)
    assert (spec.data.timestamp_column, spec.feature_names) == ("at", ["a"])
    write(two, "a.parquet", pa.table({"a": [1.0, 2.0], "at": when, "on": pa.array([1, 2], pa.date32())}))
    assert inspect_input(DataSection(input=str(two), features=["a"]), LOCAL).data.timestamp_column is None
    spec = inspect_input(DataSection(input=str(two)), LOCAL)
    assert (spec.data.timestamp_column, spec.feature_names) == (None, ["a"])
    assert spec.left_out == ["at (timestamp[ms])", "on (date32[day])"]
    notes = input_notes(DataSection(input=str(two)), spec)
    assert notes[0].startswith("event time: the run's as-of time") and "2 timestamp/date columns, at, on" in notes[0]
    assert notes[1].startswith("left out of the features: at (timestamp[ms]), on (date32[day])")
    assert input_notes(DataSection(input=str(one)), inspect_input(DataSection(input=str(one)), LOCAL)) == [
        "event time: column 'at' (data.timestamp_column auto: the input's one timestamp column), copied to "
        "event_timestamp"]


def test_auto_ids_are_the_columns_named_as_keys_and_never_features(tmp_path):
    """`data.id_columns: auto` takes every column named as a key (`user_id`, `customerId`, `ID`, ...) with integer,
    string or float values; they are copied to the output and are no features, and the job names them."""
    names = ["id", "ID", "user_id", "USER-ID", "Patient ID", "order.uuid", "userId", "customerID", "device7Id",
             "row_guid"]
    not_keys = ["paid", "valid", "grid", "PID", "ids", "idle", "id_card", "Valid", "PAID", "identity"]
    assert [n for n in names if not is_key_name(n)] == [] and [n for n in not_keys if is_key_name(n)] == []
    write(tmp_path, "a.parquet", pa.table({
        "customer_id": [7, 9], "amount": [1.0, 2.0], "paid": [True, False], "store_id": ["s1", "s2"],
        "device_id": pa.array([1.0, None]), "flag_id": [True, False], "blob_id": [b"a", b"b"]}))
    spec = inspect_input(DataSection(input=str(tmp_path)), LOCAL)
    # a bool or binary column named as a key is no key; the binary one is left out of the features as binary
    assert spec.data.id_columns == ["customer_id", "store_id", "device_id"]
    assert spec.feature_names == ["amount", "paid", "flag_id"] and spec.left_out == ["blob_id (binary)"]
    assert spec.columns[:3] == ["amount", "paid", "flag_id"] and set(spec.columns[3:]) == set(spec.data.ids)
    assert input_notes(DataSection(input=str(tmp_path)), spec)[0] == (
        "ids: customer_id, store_id, device_id (data.id_columns auto: the columns named as keys; copied to the "
        "output and hashed for the split, not features; set data.id_columns to choose)")
    # a column given another role keeps it; set ids are taken as they are and named by no note
    spec = inspect_input(DataSection(input=str(tmp_path), categorical_columns=["customer_id"],
                                     exclude_columns=["device_id", "blob_id"]), LOCAL)
    assert spec.data.id_columns == ["store_id"] and spec.feature_names == ["customer_id", "amount", "paid", "flag_id"]
    spec = inspect_input(DataSection(input=str(tmp_path), id_columns=["customer_id"], exclude_columns=["blob_id"]),
                         LOCAL)
    assert spec.feature_names == ["amount", "paid", "store_id", "device_id", "flag_id"]
    assert input_notes(DataSection(input=str(tmp_path), id_columns=["customer_id"]), spec) == []
    # keys and nothing else: refused, saying that auto took them and how to choose
    keys = tmp_path / "keys"
    keys.mkdir()
    write(keys, "a.parquet", pa.table({"user_id": [1, 2], "item_id": [3, 4]}))
    with pytest.raises(InputError, match=r"no columns left besides ids, timestamp and exclusions; data.id_columns "
                                         r"auto took user_id, item_id as keys \(their names\): set data.id_columns"):
        inspect_input(DataSection(input=str(keys)), LOCAL)
    assert inspect_input(DataSection(input=str(keys), id_columns=["user_id"]), LOCAL).feature_names == ["item_id"]


def test_a_column_some_files_lack_is_left_out_under_auto_whichever_file_comes_first(tmp_path):
    """A table that gained columns over time: newer partitions have `extra` (and a key, `user_id`), older ones
    do not. Under the autos neither is taken, and the job names the column, whether the file that has it is
    read first or last (before, the first file decided: the column was dropped silently, or refused). Listed
    in the config, the file that lacks it is named."""
    old = pa.table({"a": [1.0, 2.0], "b": [3.0, 4.0]})
    new = old.append_column("extra", pa.array([5.0, 6.0])).append_column("user_id", pa.array([1, 2]))
    for first, last in ((old, new), (new, old)):
        d = tmp_path / f"first{first.num_columns}"
        d.mkdir()
        write(d, "a.parquet", first)
        write(d, "b.parquet", last)
        spec = inspect_input(DataSection(input=str(d)), LOCAL)
        assert (spec.feature_names, spec.data.id_columns, sorted(spec.columns)) == (["a", "b"], [], ["a", "b"])
        assert spec.left_out == ["extra (in 1 of 2 files)", "user_id (in 1 of 2 files)"]
        assert input_notes(DataSection(input=str(d)), spec)[0].startswith(
            "left out of the features: extra (in 1 of 2 files), user_id (in 1 of 2 files) (data.features auto: ")
        lacking = "a.parquet" if first is old else "b.parquet"
        with pytest.raises(InputError, match=rf"file .*{lacking}: missing column 'extra'"):
            inspect_input(DataSection(input=str(d), features=["a", "extra"]), LOCAL)
    assert inspect_input(DataSection(input=str(d), exclude_columns=["extra", "user_id"]), LOCAL).left_out == []


def test_a_partition_in_the_path_is_no_column_and_the_error_says_so(tmp_path):
    """A Hive-style table (`date=.../part.parquet`): its files are read as they are, and a key named after a
    directory in the path is refused with the reason, not only as a missing column."""
    for day in ("2026-01-01", "2026-01-02"):
        (tmp_path / f"date={day}").mkdir()
        write(tmp_path / f"date={day}", "part-0.parquet", pa.table({"user_id": [1, 2], "a": [1.0, 2.0]}))
    spec = inspect_input(DataSection(input=str(tmp_path)), LOCAL)
    assert (spec.feature_names, spec.data.id_columns, len(spec.files)) == (["a"], ["user_id"], 2)
    with pytest.raises(InputError, match=r"date=2026-01-01/part-0\.parquet: missing column 'date' \(date=2026-01-01 "
                                         r"is a directory in its path: the job reads the columns in the files"):
        inspect_input(DataSection(input=str(tmp_path), id_columns=["date", "user_id"]), LOCAL)
    with pytest.raises(InputError, match=r"missing column 'day'$"):  # no such directory: no hint
        inspect_input(DataSection(input=str(tmp_path), id_columns=["day"]), LOCAL)


def test_a_dataframe_index_pandas_wrote_is_no_feature(tmp_path):
    """`df.to_parquet()` after a filter writes the index as `__index_level_0__`: row labels that grow from one
    partition to the next. Under `data.features: auto` it is left out and named; a named index that is a key is
    an id; a RangeIndex is no column at all."""
    import pandas as pd

    frame = pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0], "b": [0.5, 0.1, 0.2, 0.3]})
    filtered, named, ranged = tmp_path / "filtered", tmp_path / "named", tmp_path / "ranged"
    for d in (filtered, named, ranged):
        d.mkdir()
    frame.iloc[[0, 2, 3]].to_parquet(filtered / "a.parquet")  # not a range any more
    frame.set_axis(pd.Index([7, 3, 9, 1], name="user_id")).to_parquet(named / "a.parquet")
    frame.to_parquet(ranged / "a.parquet")
    spec = inspect_input(DataSection(input=str(filtered)), LOCAL)
    assert spec.feature_names == ["a", "b"] and spec.left_out == ["__index_level_0__ (pandas index)"]
    assert "__index_level_0__" not in spec.columns
    assert input_notes(DataSection(input=str(filtered)), spec)[0].startswith(
        "left out of the features: __index_level_0__ (pandas index) (data.features auto: ")
    spec = inspect_input(DataSection(input=str(named)), LOCAL)
    assert (spec.data.id_columns, spec.feature_names, spec.left_out) == (["user_id"], ["a", "b"], [])
    assert inspect_input(DataSection(input=str(ranged)), LOCAL).left_out == []
    # listed, it is a feature like any other column
    assert inspect_input(DataSection(input=str(filtered), features=["a", "__index_level_0__"]), LOCAL).feature_names \
        == ["a", "__index_level_0__"]


def test_columns_that_cannot_be_features_are_left_out_under_auto_and_refused_when_listed(tmp_path):
    """Under `data.features: auto` a table goes in as it is: binary and nested columns (a list of floats beside
    other columns too) are left out and named; listed in `data.features`, each is refused, naming it; a table of
    nothing else is refused, naming them all."""
    table = pa.table({"id": [1, 2], "a": [1.0, 2.0], "raw": pa.array([b"x", b"y"]), "tags": [["p"], ["q", "r"]],
                      "emb": [[1.0, 2.0], [3.0, 4.0]], "s": ["u", "v"]})
    write(tmp_path, "a.parquet", table)
    spec = inspect_input(DataSection(input=str(tmp_path)), LOCAL)
    assert spec.feature_names == ["a", "s"] and spec.columns == ["a", "s", "id"]
    assert spec.left_out == ["raw (binary)", "tags (list<element: string>)", "emb (list<element: double>)"]
    with pytest.raises(InputError, match=r"a\.parquet: feature column 'raw' is binary \(binary\)"):
        inspect_input(DataSection(input=str(tmp_path), features=["a", "raw"]), LOCAL)
    write(tmp_path, "a.parquet", table.select(["id", "raw", "tags"]))
    with pytest.raises(InputError, match=r"no columns left besides ids, timestamp and exclusions \(raw \(binary\), "
                                         r"tags \(list<element: string>\) cannot be features\)"):
        inspect_input(DataSection(input=str(tmp_path)), LOCAL)


def test_schema_must_agree_across_shards(tmp_path):
    write(tmp_path, "a.parquet", vec_table(3, 4))
    write(tmp_path, "b.parquet", vec_table(3, 4, fixed=True))
    with pytest.raises(InputError, match=r"b\.parquet: column 'features' is fixed_size_list.*a\.parquet"):
        inspect_input(vector_data(input=str(tmp_path)), LOCAL)


def test_feature_columns_may_differ_across_shards_in_width_or_nulls_only(tmp_path):
    """Shards written apart (one a day, by pandas) differ in ways that hold the same values: integer widths,
    integers where another day has floats (a day with a null), a column of nulls only (a day where every value
    was missing), dictionary-encoded strings. Those are one feature; ids, and values of another kind, are not."""
    day1 = pa.table({"id": pa.array([1, 2], pa.int64()), "k": pa.array([1, 2], pa.int64()), "x": [1.0, 2.0],
                     "note": ["a", "b"], "c": pa.array(["u", "v"]).dictionary_encode()})
    day2 = pa.table({"id": pa.array([3, 4], pa.int64()), "k": pa.array([1, None], pa.float64()),
                     "x": pa.array([1, 2], pa.int32()), "note": pa.nulls(2), "c": ["v", "w"]})
    write(tmp_path, "a.parquet", day2)  # the first file's nulls do not decide the column's role
    write(tmp_path, "b.parquet", day1)
    spec = inspect_input(DataSection(input=str(tmp_path)), LOCAL)
    assert [(r.name, r.role, r.family) for r in spec.roles] == [
        ("k", "numeric", "float"), ("x", "numeric", "float"), ("note", "categorical", "string"),
        ("c", "categorical", "string")]
    assert spec.left_out == [] and spec.schema.field("note").type == pa.string()
    assert merged_type(pa.int8(), pa.uint32()) == pa.int64() and merged_type(pa.null(), pa.null()) == pa.null()
    assert merged_type(pa.int64(), pa.string()) is None and merged_type(pa.bool_(), pa.int64()) is None
    write(tmp_path, "b.parquet", day1.set_column(0, "id", pa.array([3, 4], pa.int32())))
    with pytest.raises(InputError, match=r"column 'id' is int32, but .*a\.parquet has int64 \(shards must share "
                                         r"one schema; a feature column's types may differ only in width or nulls\)"):
        inspect_input(DataSection(input=str(tmp_path)), LOCAL)
    write(tmp_path, "b.parquet", day1.set_column(1, "k", pa.array(["1", "2"])))
    with pytest.raises(InputError, match=r"b\.parquet: column 'k' is string, but .*a\.parquet has double"):
        inspect_input(DataSection(input=str(tmp_path)), LOCAL)
    # integer codes (data.categorical_columns) may change width, not become floats: 3 and 3.0 are two levels
    coded = DataSection(input=str(tmp_path), categorical_columns=["k"], features=["k"])
    write(tmp_path, "b.parquet", day1)
    with pytest.raises(InputError, match=r"b\.parquet: column 'k' is int64, but .*a\.parquet has double"):
        inspect_input(coded, LOCAL)
    # a third shard that breaks a merged column: the message names the first file with that file's own type
    write(tmp_path, "b.parquet", day1)
    write(tmp_path, "c.parquet", day1.set_column(2, "x", pa.array(["1", "2"])))
    with pytest.raises(InputError, match=r"c\.parquet: column 'x' is string, but .*a\.parquet has int32 \("):
        inspect_input(DataSection(input=str(tmp_path)), LOCAL)


def test_empty_and_missing_input(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        inspect_input(vector_data(input=str(tmp_path / "nope")), LOCAL)
    with pytest.raises(InputError, match="no Parquet files"):
        inspect_input(vector_data(input=str(tmp_path)), LOCAL)
    write(tmp_path, "a.parquet", vec_table(0, 4))
    with pytest.raises(InputError, match="empty"):
        inspect_input(vector_data(input=str(tmp_path)), LOCAL)


def test_corrupt_file_is_named(tmp_path):
    write(tmp_path, "a.parquet", vec_table(3, 4))
    (tmp_path / "c.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InputError, match=r"c\.parquet: not a readable Parquet file"):
        inspect_input(vector_data(input=str(tmp_path)), LOCAL)


def test_feature_matrix_layouts_agree():
    var, fixed = vec_table(5, 3), vec_table(5, 3, fixed=True)
    data = vector_data()
    a, b = feature_matrix(var, data, 3), feature_matrix(fixed, data, 3)
    assert a.dtype == np.float32 and a.shape == (5, 3)
    np.testing.assert_array_equal(a, b)
    # a sliced batch (non-zero offset) still lines up
    np.testing.assert_array_equal(feature_matrix(fixed.slice(2, 2), data, 3), a[2:4])
    cols = pa.table({"id": [1, 2], "a": [1.0, 2.0], "b": pa.array([3, 4], pa.int64())})
    two = DataSection(features=["a", "b"], id_columns=[])
    np.testing.assert_array_equal(feature_matrix(cols, two, 2), [[1, 3], [2, 4]])


def test_wrong_vector_length_and_nan_are_refused():
    t = pa.table({"id": [1, 2], "features": [[1.0, 2.0], [1.0]], "path": ["s3://b/x.parquet"] * 2})
    with pytest.raises(InputError, match=r"s3://b/x\.parquet: column 'features' has 1 vectors whose length is not 2"):
        feature_matrix(t, vector_data(), 2)
    t = pa.table({"id": [1, 2], "features": [[1.0, float("nan")], [1.0, 2.0]], "path": ["f.parquet"] * 2})
    with pytest.raises(InputError, match=r"f\.parquet: column 'features' has 1 rows with NaN"):
        SplitFeatures(vector_data(), 2, "all")(t)
    kept = SplitFeatures(vector_data(nan_policy="drop"), 2, "all")(t)
    assert kept.num_rows == 1


def test_split_is_deterministic_and_independent_of_batching():
    t = vec_table(20_000, 2)
    data = vector_data(validation_fraction=0.2)
    whole = validation_mask(t, data)
    parts = np.concatenate([validation_mask(t.slice(i, 777), data) for i in range(0, 20_000, 777)])
    np.testing.assert_array_equal(whole, parts)
    assert 0.18 < whole.mean() < 0.22
    # string ids and no ids at all also split stably
    s = pa.table({"id": [f"user-{i}" for i in range(5000)], "features": t.column("features").slice(0, 5000)})
    m1, m2 = validation_mask(s, data), validation_mask(s, data)
    np.testing.assert_array_equal(m1, m2)
    x = feature_matrix(t, data, 2)
    no_ids = vector_data(validation_fraction=0.2, id_columns=[])
    np.testing.assert_array_equal(validation_mask(t, no_ids, x), validation_mask(t, no_ids, x.copy()))


def test_moments_merge_matches_numpy_on_wild_scales():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(10_000, 4)) * [1e-3, 1.0, 1e4, 0.0] + [0.0, -5.0, 1e6, 42.0]).astype(np.float32)
    chunks = [ColumnMoments.of(x[i:i + 999]) for i in range(0, len(x), 999)]
    total = chunks[0]
    for c in chunks[1:]:
        total = total.merge(c)
    assert (total.n == len(x)).all()
    np.testing.assert_allclose(total.mean, x.astype(np.float64).mean(0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(total.std[:3], x.astype(np.float64).std(0, ddof=1)[:3], rtol=1e-6)
    mean, scale = normalization_stats(total)
    assert scale[3] == 1.0  # constant feature: scale 1, so it normalizes to 0 rather than NaN
    z = (x - mean) / scale
    assert np.isfinite(z).all()
    np.testing.assert_allclose(z[:, :3].std(0), 1.0, rtol=1e-2)
    np.testing.assert_allclose(z[:, 3], 0.0)


def test_in_a_table_of_flags_rare_flags_are_scaled_by_half_their_range():
    rng = np.random.default_rng(3)
    n = 20_000
    third = (rng.random(n) < 0.005).astype(float)
    third[123] = 0.5  # one value between the two: no longer two-valued
    x = np.stack([
        (rng.random(n) < 0.005).astype(float),  # a rare flag
        1e3 + (rng.random(n) > 0.995),  # a rare flag far from 0
        5.0 + 2.0 * (rng.random(n) > 0.004),  # a rare flag whose rarer value is the smaller, 5 (7 otherwise)
        (rng.random(n) < 0.5).astype(float),  # a balanced flag
        (rng.random(n) > 0.5).astype(float),
        (rng.random(n) < 0.05).astype(float),  # rare, but not under 1% of rows
        third,
        rng.integers(0, 3, n).astype(float),  # three values
        rng.normal(size=n),
    ], axis=1)
    x[::5, 0] = np.nan  # missing values are not a value
    whole = ColumnMoments.of(x)
    blocks = [x[:0], x[:1], *(x[i:i + 997] for i in range(1, n, 997))]  # an empty block, a one-row block
    merged = ColumnMoments.empty(x.shape[1])
    for b in blocks:
        merged = merged.merge(ColumnMoments.of(b))
    stored = TableStats.from_json(TableStats(merged, np.zeros(x.shape[1], np.int64), []).to_json()).numeric
    std = np.nanstd(x, axis=0, ddof=1)
    for m in (whole, merged, stored):
        assert m.two_valued.tolist() == [True] * 6 + [False] * 3
        # rows carry 0.005 * 3 + 0.5 + 0.5 + 0.05 = 1.065 rarer flag values on average: a table of flags
        assert rare_flags(m).tolist() == [True] * 3 + [False] * 6
        mean, scale = normalization_stats(m)
        np.testing.assert_allclose(scale[:3], [0.5, 0.5, 1.0], rtol=1e-4)
        np.testing.assert_allclose(scale[3:], std[3:], rtol=1e-6)
        z = (x - mean) / scale
        # the rare flag, set, stands 2 from unset, not sqrt(1 / 0.005) = 14 standard deviations
        assert np.nanmax(z[:, 0]) - np.nanmin(z[:, 0]) == pytest.approx(2.0, rel=1e-4)
    # the same rare flags among measurements (0.015 rarer values a row): events, kept at their standard deviation
    few = ColumnMoments.of(x[:, [0, 1, 2, 6, 7, 8]])
    assert few.two_valued.tolist() == [True] * 3 + [False] * 3 and not rare_flags(few).any()
    np.testing.assert_allclose(normalization_stats(few)[1], std[[0, 1, 2, 6, 7, 8]], rtol=1e-6)


def test_distinct_keys_are_counted_exactly_up_to_the_sample_and_estimated_above_it():
    rng = np.random.default_rng(0)
    keys = rng.random(KEY_SAMPLE - 1)
    parts = np.array_split(np.concatenate([keys, keys[:500]]), 7)  # 500 keys twice, across blocks
    total = DistinctKeys()
    for p in parts[::-1]:
        total = total.merge(DistinctKeys.of(p))
    assert total.count() == (KEY_SAMPLE - 1, True)
    for n in (20_000, 200_000):  # above the sample: within 5% (three standard deviations)
        keys = rng.random(n)
        parts = [DistinctKeys.of(p) for p in np.array_split(np.concatenate([keys, keys[::3]]), 9)]
        got, exact = distinct_keys([{"keys": p.smallest.tobytes()} for p in parts]).count()
        assert not exact and abs(got / n - 1) < 0.05, (n, got)


def test_rows_that_share_keys_are_counted_and_warned_of(capsys):
    """A table of a partition a day read whole: each user once a day. The key count comes from the prepare
    pass's blocks, and the job warns that the output will hold rows a reader joining on the key cannot tell
    apart; a table of unique keys, or one without id columns, gets no warning."""
    users = np.tile(np.arange(800), 2)
    t = pa.table({"user_id": users, "a": np.arange(1600, dtype=np.float64)})
    data = DataSection(input="x", features=["a"], id_columns=["user_id"], timestamp_column=None,
                       validation_fraction=0.2)
    fz = raw_featurizer(data, 1)
    rows = [{k: v[0] for k, v in BatchStats(data, fz)(t.slice(i, 400)).items()} for i in range(0, 1600, 400)]
    assert distinct_keys(rows).count() == (800, True)
    _say_shared_keys(data, 1600, 800, True)
    assert capsys.readouterr().out.startswith("[prepare] warning: the 1,600 rows have 800 distinct keys in "
                                              "data.id_columns (user_id): the output holds more than one row")
    _say_shared_keys(data, 1600, 1600, True)
    _say_shared_keys(data, 100_000, 95_000, False)  # an estimate within its noise of the rows
    assert capsys.readouterr().out == ""
    _say_shared_keys(data, 100_000, 60_000, False)
    assert "have about 60,000 distinct keys" in capsys.readouterr().out
    no_ids = DataSection(input="x", features=["a"], id_columns=[], timestamp_column=None, validation_fraction=0.2)
    row = {k: v[0] for k, v in BatchStats(no_ids, fz)(t).items()}
    assert distinct_keys([row]).count() == (0, True)


def test_batch_stats_rows_merge_to_train_split_stats():
    t = vec_table(3000, 3)
    data = vector_data(validation_fraction=0.25)
    fz = raw_featurizer(data, 3)
    bm = BatchStats(data, fz)
    rows = []
    for i in range(0, 3000, 1000):
        out = bm(t.slice(i, 1000))
        rows.append({k: v[0] for k, v in out.items()})
    stats, n_train, n_val, n_rej = merge_stat_rows(rows, fz, data.max_categories)
    m = stats.numeric
    x = feature_matrix(t, data, 3)
    val = validation_mask(t, data)
    assert (m.n == n_train).all() and n_train + n_val == 3000 and n_rej == 0
    np.testing.assert_allclose(m.mean, x[~val].astype(np.float64).mean(0), rtol=1e-9)


def test_a_tiny_inputs_split_moves_its_cut_so_that_both_sides_have_rows():
    """A few rows may all hash to one side of data.validation_fraction; the cut then moves to put the row at that
    end on the other side (`split_cut`), from the kept rows' lowest two and highest places that BatchStats
    gathers per block (`split_ends`). Two or more rows always split; one row, or rows that all share a key,
    cannot."""
    from pipeline.prepare import split_ends
    from pipeline.rows import split_cut, split_position

    data = vector_data(validation_fraction=0.3)
    fz = raw_featurizer(data, 3)
    place = {i: split_position(pa.table({"id": pa.array([i], pa.int64())}), data)[0] for i in range(200)}
    all_val = [i for i in range(199) if place[i] < 0.3 and place[i + 1] < 0.3][0]
    for ids, side in (([0, 1, 2], "train"), ([all_val, all_val + 1], "validation"), (list(range(10)), "both")):
        t = pa.table({"id": pa.array(ids, pa.int64()), "features": vec_table(len(ids), 3).column("features")})
        u = split_position(t, data)
        rows = [{k: v[0] for k, v in BatchStats(data, fz)(part).items()} for part in (t.slice(0, 1), t.slice(1))]
        low, second, high = split_ends(rows)
        assert (low, second, high) == tuple(sorted(u)[:2]) + (max(u),)
        n_val = int((u < 0.3).sum())
        cut = split_cut(0.3, len(ids) - n_val, n_val, (low, second, high))
        val = u < cut
        assert 0 < val.sum() < len(ids)
        assert n_val == {"train": 0, "validation": len(ids)}.get(side, n_val) and (side != "both" or 0 < n_val < 10)
        if 0 < n_val < len(ids):
            assert cut == 0.3  # both sides had rows: the setting stands
        else:  # one row moved: the lowest to validation, or the highest to training
            assert val.sum() == (1 if n_val == 0 else len(ids) - 1)
    assert split_cut(0.3, 1, 0, (0.5, 1.0, 0.5)) == 0.3  # one row: nothing to split
    assert split_cut(0.3, 4, 0, (0.7, 0.7, 0.7)) == 0.3  # every row one key: one place
    assert split_cut(0.3, 0, 3, (0.1, 0.1, 0.2)) == 0.2  # the highest, alone, trains


def test_prepare_key_changes_with_every_data_setting(tmp_path):
    """The prepare pass's cache key comes from the data section itself: a setting added to it later is in the
    key without anyone remembering to add it (the list below must name every field)."""
    import dataclasses

    write(tmp_path, "a.parquet", vec_table(10, 4))
    spec = inspect_input(vector_data(input=str(tmp_path)), LOCAL)
    base = prepare_key(spec, spec.data)
    assert base == prepare_key(spec, spec.data)
    changes = {"input": str(tmp_path / "other"), "features": "vectors", "exclude_columns": ["label"],
               "categorical_columns": ["code"], "missing": "drop", "max_categories": 7, "id_columns": ["user"],
               "timestamp_column": "ts", "validation_fraction": 0.2, "nan_policy": "drop"}
    assert set(changes) == {f.name for f in dataclasses.fields(DataSection)}
    for name, value in changes.items():
        assert prepare_key(spec, dataclasses.replace(spec.data, **{name: value})) != base, name
    other = inspect_input(vector_data(input=str(tmp_path)), LOCAL,
                          files=[write(tmp_path, "b.parquet", vec_table(10, 4))])
    assert prepare_key(other, other.data) != base  # other files, the same settings


def test_row_keys_are_ray_datas_row_hash():
    """The key of a row without ids, computed as Ray Data's Parquet reader computes its `row_hash` column."""
    from ray.data._internal.datasource_v2.common.synthesized_columns import _compute_row_hashes

    for path, start, n in [("/data/in/part-0.parquet", 0, 1000), ("bucket/prefix/x.parquet", 8192, 77)]:
        np.testing.assert_array_equal(row_keys(path, start, n), _compute_row_hashes(path, start, n))


def test_an_input_without_ids_splits_by_each_rows_place_in_every_pass(ray_cluster, tmp_path):
    """Rows without ids are split by their place (file, position), the same way through Ray Data, the cached
    epochs' direct reads and the driver's validation sample; identical rows no longer land together (a table
    of six distinct rows once held out whole groups: a third of its rows, scores of 1e11)."""
    from pipeline.inputs import inspect_input
    from pipeline.read import read_dataset
    from pipeline.shards import ROW_KEY
    from pipeline.train.batches import DirectSplits

    rng = np.random.default_rng(0)
    for i, n in enumerate([3000, 1700]):
        pq.write_table(pa.table({"s": rng.choice(["a", "b", "c"], n), "t": rng.choice(["x", "y"], n)}),
                       tmp_path / f"part-{i}.parquet", row_group_size=500)
    spec = inspect_input(DataSection(input=str(tmp_path), validation_fraction=0.2), LOCAL)
    assert spec.data.ids == []
    read = pa.concat_tables(read_dataset(spec, LOCAL, row_keys=True).iter_batches(batch_format="pyarrow",
                                                                                   batch_size=None))
    want = {}
    for f in spec.files:
        path = LOCAL.resolve(f)[1]
        want.update(zip(row_keys(path, 0, spec.file_rows[f]).tolist(), [path] * spec.file_rows[f]))
    assert sorted(read.column(ROW_KEY).to_pylist()) == sorted(want) and len(want) == 4700
    val = validation_mask(read, spec.data)
    assert 0.17 < val.mean() < 0.23
    fz = Featurizer.unfitted(spec.roles)
    direct = DirectSplits(list(spec.files), spec.columns, spec.data, spec.num_features, fz)
    train, validation = direct.read(LOCAL, 0, 1)
    assert sum(t.num_rows for t in validation) == int(val.sum())
    assert sum(t.num_rows for t in train) == int((~val).sum())


def test_streamed_epochs_hold_a_few_blocks_per_training_worker_in_the_object_store():
    import ray.data

    from pipeline.read import BLOCK_BYTES, STREAM_BUFFER_BLOCKS, stream_execution_options

    ctx = ray.data.DataContext.get_current()
    before = ctx.execution_options.resource_limits.object_store_memory
    opts = stream_execution_options(num_workers=3)
    assert opts.resource_limits.object_store_memory == 3 * STREAM_BUFFER_BLOCKS * BLOCK_BYTES
    one = stream_execution_options(num_workers=1)
    assert one.resource_limits.object_store_memory == STREAM_BUFFER_BLOCKS * BLOCK_BYTES
    # a copy: the driver's own context (every other dataset's) keeps Ray Data's limit
    assert ctx.execution_options.resource_limits.object_store_memory == before
