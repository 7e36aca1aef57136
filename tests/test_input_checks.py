"""Bad config and bad input are refused: one line naming the key, file or column, exit code 2, nothing
published; and `data.nan_policy: drop` counts and writes what it drops.

The checks that come before Ray run a job's main() in this process; the ones made inside Ray tasks score with
the session's shared model (`trained_model("s3-vector")`, tests/models.py) on the session's Ray. The README's
"Guarantees" table names the tests here.
"""

from __future__ import annotations

import datetime as dt
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.models import FEATURES, PART, RUN_DATE, base_args, vector_data, write_input
from tests.procs import ROOT, assert_one_line_error, get_bytes, in_process, keys, put_table, read_published, s3_client


# No module-wide marker: tests/conftest.py marks the tests that use the S3 server or Ray as integration; the
# config, schema and UDF checks here are unit tests.


@pytest.fixture
def base(trained_model):
    return trained_model("s3-vector")


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("override,needle", [
    ("train.epohcs=3", "config train.epohcs: unknown key"),
    ("train.epochs=many", "config train.epochs: expected an integer"),
    ("train.epochs=0", "config train.epochs: 0 must be >= 1"),
    ("data.nan_policy=skip", "config data.nan_policy: 'skip' is not one of error, drop"),
    ("storage.endpoint_url=ftp://x", "config storage.endpoint_url"),
])
def test_invalid_config_is_named_by_key(override, needle, capsys):
    rc, _, err = in_process("jobs.train", ["--config", str(ROOT / "jobs/configs/tiny.yaml"), "--set", override],
                            capsys)
    assert_one_line_error(rc, err, needle)


# ------------------------------------------------------------------------------------------ bad input


def _good_table(rows: int = 100, start: int = 0) -> pa.Table:
    rng = np.random.default_rng(start)
    x = rng.normal(size=(rows, FEATURES)).astype(np.float32)
    offsets = pa.array(np.arange(0, (rows + 1) * FEATURES, FEATURES, dtype=np.int32))
    return pa.table({"id": pa.array(np.arange(start, start + rows, dtype=np.int64)),
                     "event_time": pa.array(np.full(rows, 0, dtype="datetime64[us]"), pa.timestamp("us", tz="UTC")),
                     "features": pa.ListArray.from_arrays(offsets, pa.array(x.reshape(-1)))})


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


BAD_INPUTS = {
    # name: (files {name: bytes}, expected text in the error line)
    "missing_column": ({"a.parquet": _parquet_bytes(_good_table().drop_columns(["features"]))},
                       ["a.parquet", "missing column 'features'"]),
    "wrong_type": ({"a.parquet": _parquet_bytes(_good_table().set_column(
        2, "features", pa.array([str(i) for i in range(100)])))}, ["a.parquet", "'features'", "expected a list"]),
    "schema_differs": ({"a.parquet": _parquet_bytes(_good_table()),
                        "b.parquet": _parquet_bytes(_good_table(start=100).set_column(
                            0, "id", pa.array([str(i) for i in range(100, 200)])))},
                       ["b.parquet", "column 'id'", "shards must share one schema"]),
    "empty": ({"a.parquet": _parquet_bytes(_good_table(0))}, ["input is empty", "0 rows"]),
    "no_files": ({}, ["no Parquet files found"]),
    "corrupt": ({"a.parquet": _parquet_bytes(_good_table()), "b.parquet": b"PAR1 this is not parquet at all"},
                ["b.parquet", "not a readable Parquet file"]),
    "truncated": ({"a.parquet": _parquet_bytes(_good_table())[:-200]}, ["a.parquet", "not a readable Parquet"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_before_ray_with_one_line(case, s3_server, bucket, capsys):
    files, needles = BAD_INPUTS[case]
    for name, body in files.items():
        s3_client(s3_server).put_object(Bucket=bucket, Key=f"bad/{name}", Body=body)
    rc, _, err = in_process("jobs.train", base_args(s3_server, bucket, run=f"bad-{case}", data="bad"), capsys)
    assert_one_line_error(rc, err, *needles)
    assert keys(s3_server, bucket, "artifacts/") == [], "nothing may be published for bad input"


def test_vectors_of_varying_length_are_refused():
    from pipeline.errors import InputError
    from pipeline.rows import batch_rows, raw_featurizer
    from pipeline.shards import PATH_COLUMN

    t = pa.table({"id": [1, 2, 3], "features": pa.array([[1.0, 2.0], [1.0], [1.0, 2.0]], pa.list_(pa.float32())),
                  PATH_COLUMN: ["s3://b/in/x.parquet", "s3://b/in/y.parquet", "s3://b/in/x.parquet"]})
    with pytest.raises(InputError, match=r"file s3://b/in/y.parquet: column 'features' has 1 vectors whose "
                                         r"length is not 2 \(e.g. 1\)"):
        batch_rows(t, vector_data(), raw_featurizer(vector_data(), 2))


def test_feature_order_differs_from_manifest():
    from pipeline.errors import InputError
    from pipeline.inputs import InputSpec
    from pipeline.preflight import check_features_match

    spec = InputSpec("in", ["in/a"], ["b", "a", "c"], 10, ["a", "b", "c"])
    with pytest.raises(InputError, match="feature order differs from the model's manifest"):
        check_features_match({"feature_names": ["a", "b", "c"]}, spec)
    spec.feature_names = ["a", "b", "d"]
    with pytest.raises(InputError, match=r"features differ from the model's manifest \(missing \['c'\]\)"):
        check_features_match({"feature_names": ["a", "b", "c"]}, spec)


def test_scoring_features_must_match_the_model(base, s3_server, storage, capsys):
    shared_bucket = base.bucket
    write_input(storage, shared_bucket, "in12", rows=200, shards=1, features=12)
    rc, _, err = in_process("jobs.score", base_args(s3_server, shared_bucket, data="in12", out="out12")
                            + ["--model", "base"], capsys)
    assert_one_line_error(rc, err, "12 features, but the model was trained on 16")
    write_input(storage, shared_bucket, "incols", rows=200, shards=1, features=16, layout="columns")
    rc, _, err = in_process("jobs.score", base_args(s3_server, shared_bucket, data="incols", out="outcols")
                            + ["--set", "data.features=[" + ",".join(f"f{j:02d}" for j in range(16)) + "]",
                               "--model", "base"], capsys)
    assert_one_line_error(rc, err, "features differ from the model's manifest", "features[0]")
    assert keys(s3_server, shared_bucket, "out12/") == keys(s3_server, shared_bucket, "outcols/") == []


def test_nan_inside_ray_stops_the_job_with_one_line_and_publishes_nothing(base, s3_server, storage, capsys):
    """The NaN is found by the scoring task mid-stream (not by the footer check): the message must still
    come back through Ray's wrappers as one line naming the file and column, exit 2."""
    shared_bucket = base.bucket
    files = write_input(storage, shared_bucket, "innan", rows=2000, shards=3)
    t = pq.read_table(storage.resolve(files[1])[1], filesystem=storage.filesystem(files[1]))
    x = np.array(t.column("features").to_pylist(), dtype=np.float32)
    x[5, 3], x[9, 0] = np.nan, np.inf
    t = t.set_column(t.schema.get_field_index("features"), "features", pa.array(list(x), pa.list_(pa.float32())))
    put_table(s3_server, shared_bucket, "innan/part-00001.parquet", t)
    rc, _, err = in_process("jobs.score", base_args(s3_server, shared_bucket, data="innan", out="outnan")
                            + ["--model", "base"], capsys)
    last = assert_one_line_error(rc, err, "part-00001.parquet", "column 'features' has 2 rows with NaN")
    assert "part-00000" not in last
    assert keys(s3_server, shared_bucket, "outnan/") == [], "a failed run leaves nothing, not even staging"


# ------------------------------------------------------------------------------------------ rejects


def test_nan_policy_drop_counts_and_writes_rejects(base, s3_server, storage):
    """Scoring with nan_policy=drop: rejected rows go to `_rejects/` with the reason; _SUCCESS adds up."""
    shared_bucket = base.bucket
    from pipeline.cli import config_from_args, base_parser
    from pipeline.jobs import score_job

    files = write_input(storage, shared_bucket, "indrop", rows=1500, shards=3)
    t = pq.read_table(storage.resolve(files[2])[1], filesystem=storage.filesystem(files[2]))
    x = np.array(t.column("features").to_pylist(), dtype=np.float32)
    bad_rows = [0, 17, 400]
    x[0, 1], x[17, 15], x[400, 0] = np.nan, -np.inf, np.nan
    t = t.set_column(t.schema.get_field_index("features"), "features", pa.array(list(x), pa.list_(pa.float32())))
    put_table(s3_server, shared_bucket, "indrop/part-00002.parquet", t)
    bad_ids = sorted(t.column("id").to_numpy()[bad_rows].tolist())

    argv = base_args(s3_server, shared_bucket, data="indrop", out="outdrop") + ["--set", "data.nan_policy=drop"]
    cfg = config_from_args(base_parser("").parse_args(argv))
    res = score_job(cfg, storage, model_run="base", run_date=dt.date.fromisoformat(RUN_DATE))
    success = json.loads(get_bytes(s3_server, shared_bucket, f"outdrop/{PART}/_SUCCESS"))
    assert success["input_rows"] == 1500
    assert success["rejected_rows"] == 3 and success["scored_rows"] == 1497
    assert success["input_rows"] == success["scored_rows"] + success["rejected_rows"]
    assert (res.scored_rows, res.rejected_rows) == (1497, 3)
    published = read_published(s3_server, shared_bucket, f"outdrop/{PART}")
    assert published.num_rows == 1497 and not set(bad_ids) & set(published.column("id").to_pylist())
    rejects = read_published(s3_server, shared_bucket, f"outdrop/{PART}/_rejects")
    assert sorted(rejects.column("id").to_pylist()) == bad_ids
    reasons = dict(zip(rejects.column("id").to_pylist(), rejects.column("reason").to_pylist()))
    ids = t.column("id").to_pylist()
    assert reasons[ids[0]] == "NaN or infinite value in features[1]"
    assert reasons[ids[17]] == "NaN or infinite value in features[15]"
    assert set(rejects.column("source_file").to_pylist()) == {f"{shared_bucket}/indrop/part-00002.parquet"}


def test_training_drop_counts_and_writes_rejects(tmp_path):
    """The training statistics pass counts rejects and writes them with the reason (pure UDF, no Ray)."""
    from pipeline.config import StorageSection
    from pipeline.errors import InputError
    from pipeline.prepare import BatchStats
    from pipeline.rows import RejectWriter, raw_featurizer
    from pipeline.shards import PATH_COLUMN
    from pipeline.storage import Storage

    storage = Storage(StorageSection())
    t = _good_table(50).append_column(PATH_COLUMN, pa.array(["in/a.parquet"] * 50))
    x = np.array(t.column("features").to_pylist(), dtype=np.float32)
    x[3, 2] = np.nan
    t = t.set_column(2, "features", pa.array(list(x), pa.list_(pa.float32())))
    data = vector_data(nan_policy="drop", validation_fraction=0.1)
    udf = BatchStats(data, raw_featurizer(data, FEATURES), RejectWriter(storage, str(tmp_path / "rejects"), data))
    out = udf(t)
    assert int(out["n_rejected"][0]) == 1 and int(out["n"][0] + out["n_val"][0]) == 49
    udf(t)  # a retried task rewrites the same file rather than adding a duplicate
    files = list((tmp_path / "rejects").iterdir())
    assert len(files) == 1
    rej = pq.read_table(files[0])
    assert rej.column("id").to_pylist() == [3]
    assert rej.column("reason").to_pylist() == ["NaN or infinite value in features[2]"]
    # the default policy (error) refuses the same batch, naming the shard and the column
    with pytest.raises(InputError, match=r"^file in/a\.parquet: column 'features' has 1 rows with NaN or infinite "
                                         r"values \(set data\.nan_policy=drop to skip them\)$"):
        BatchStats(vector_data(), raw_featurizer(vector_data(), FEATURES))(t)
