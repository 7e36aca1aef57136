"""Reliability: faults survived, bad input refused, outputs committed atomically, artifacts safe.

Everything runs for real: a local Ray cluster per job process, the loopback S3 server (moto), processes
killed by pid. docs/reliability.md maps each guarantee to the test here that checks it.

Job runs are collected in RUNS so the last test can check that the fake secret never appears in anything a
run printed or wrote.
"""

from __future__ import annotations

import hashlib
import io
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import FAKE_KEY_ID, FAKE_SECRET, ROOT, free_port, job_env, run_job, wait_for_port

# No module-wide marker: tests/conftest.py marks the tests that use the S3 server or Ray (most of them) as
# integration; the config, schema and UDF checks here are unit tests.

ROWS, SHARDS, FEATURES = 6000, 4, 16
RUN_DATE = "2026-01-02"  # scoring output goes to <output.uri>/run_date=RUN_DATE/
PART = f"run_date={RUN_DATE}"
RUNS: list[str] = []  # stdout + stderr of every job run here, for the credentials check
RAY_TMP: list[str] = []  # RAY_TMPDIR of the job subprocesses (one directory for the module, made on first use)


def base_args(s3: str, bucket: str, run: str = "base", data: str = "in", out: str = "out") -> list[str]:
    """A tiny config on the loopback S3 server: 1 training worker, a few epochs, a 2-CPU local Ray."""
    sets = {
        # the vector column by name (the demo's `auto` would take a string `features` as a categorical)
        "run.name": run, "run.num_cpus": 2, "data.input": f"s3://{bucket}/{data}", "data.features": "features",
        "artifacts.uri": f"s3://{bucket}/artifacts", "output.uri": f"s3://{bucket}/{out}",
        "storage.endpoint_url": s3, "train.epochs": 6, "train.patience": 6, "train.num_workers": 1,
        "train.cpus_per_worker": 0.5, "train.batch_size": 64, "train.lr": 0.003, "train.checkpoint_every": 1,
        "model.hidden_dims": "[32,16]", "model.latent_dim": 4, "score.batch_size": 256,
    }
    out_args = ["--config", str(ROOT / "jobs/configs/demo.yaml")]
    for k, v in sets.items():
        out_args += ["--set", f"{k}={v}"]
    return out_args


def in_process(module: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """Run a job's main() here (checks that fail before Ray starts need no cluster)."""
    import importlib

    rc = importlib.import_module(module).main(argv)
    cap = capsys.readouterr()
    RUNS.append(cap.out + cap.err)
    return rc, cap.out, cap.err


def ray_tmpdir() -> str:
    """Where the jobs started here keep their local Ray's session directories (logs included), so the
    credentials check can read them. Short: Ray's socket paths must fit in 107 characters."""
    if not RAY_TMP:
        RAY_TMP.append(tempfile.mkdtemp(prefix="rel-ray-", dir="/tmp"))
    return RAY_TMP[0]


@pytest.fixture(scope="module", autouse=True)
def _remove_ray_tmpdir():
    yield
    if RAY_TMP:
        shutil.rmtree(RAY_TMP.pop(), ignore_errors=True)


def reliability_env(s3: str) -> dict[str, str]:
    return {**job_env(s3), "RAY_TMPDIR": ray_tmpdir()}


def job(module: str, argv: list[str], s3: str, timeout: float = 900) -> subprocess.CompletedProcess:
    p = run_job(module, *argv, env=reliability_env(s3), timeout=timeout)
    RUNS.append(p.stdout + p.stderr)
    return p


def assert_one_line_error(rc: int, err: str, *needles: str) -> str:
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err[-3000:]
    for n in needles:
        assert n in last, last
    return last


def s3_client(s3: str):
    import boto3

    return boto3.client("s3", endpoint_url=s3, region_name="us-east-1")


def keys(s3: str, bucket: str, prefix: str) -> list[str]:
    """Object keys under `prefix`, without the empty `dir/` markers pyarrow's S3 client leaves."""
    out, token = [], None
    while True:
        kw = dict(Bucket=bucket, Prefix=prefix, **({"ContinuationToken": token} if token else {}))
        r = s3_client(s3).list_objects_v2(**kw)
        out += [o["Key"] for o in r.get("Contents", []) if not o["Key"].endswith("/")]
        if not r.get("IsTruncated"):
            return sorted(out)
        token = r["NextContinuationToken"]


def put_table(s3: str, bucket: str, key: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    s3_client(s3).put_object(Bucket=bucket, Key=key, Body=buf.getvalue())


def read_published(s3: str, bucket: str, prefix: str) -> pa.Table:
    parts = []
    for k in keys(s3, bucket, prefix + "/"):
        rel = k[len(prefix) + 1:]
        if k.endswith(".parquet") and not any(p.startswith(("_", ".")) for p in rel.split("/")):
            body = s3_client(s3).get_object(Bucket=bucket, Key=k)["Body"].read()
            parts.append(pq.read_table(io.BytesIO(body)))
    return pa.concat_tables(parts) if parts else pa.table({})


def write_input(storage, bucket: str, prefix: str = "in", rows: int = ROWS, shards: int = SHARDS,
                features: int = FEATURES, layout: str = "vector") -> list[str]:
    from pipeline.sample import write_sample

    return write_sample(f"s3://{bucket}/{prefix}", storage, rows=rows, shards=shards, features=features,
                        layout=layout)


def descendants(pid: int):
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def cmdline(p) -> str:
    import psutil

    try:
        return " ".join(p.cmdline()) or p.name()
    except psutil.Error:
        return ""


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a job and every process it started (its local Ray included), as a lost machine would."""
    import psutil

    procs = descendants(proc.pid)
    for p in [psutil.Process(proc.pid), *procs] if proc.poll() is None else procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)
    psutil.wait_procs(procs, timeout=30)


def start_job(module: str, argv: list[str], s3: str, log: Path) -> subprocess.Popen:
    f = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", module, *argv], stdout=f, stderr=subprocess.STDOUT,
                            env=reliability_env(s3), cwd=ROOT)


def wait_until(cond, proc: subprocess.Popen, log: Path, timeout: float = 600, what: str = "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        if proc.poll() is not None:
            pytest.fail(f"job exited (rc {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    kill_tree(proc)
    pytest.fail(f"timed out waiting for {what}")


def checkpoint_registered(s3: str, bucket: str, run: str) -> bool:
    """A checkpoint is resumable by a new driver once Ray Train's snapshot of the run lists it."""
    key = f"artifacts/{run}/train/{run}/checkpoint_manager_snapshot.json"
    if key not in keys(s3, bucket, f"artifacts/{run}/train/"):
        return False
    body = s3_client(s3).get_object(Bucket=bucket, Key=key)["Body"].read()
    try:
        return bool(json.loads(body).get("latest_checkpoint_result"))
    except ValueError:  # caught mid-write
        return False


def manifest(s3: str, bucket: str, run: str) -> dict:
    body = s3_client(s3).get_object(Bucket=bucket, Key=f"artifacts/{run}/model/manifest.json")["Body"].read()
    return json.loads(body)


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def shared_bucket(s3_server):
    import uuid

    name = f"rel-{uuid.uuid4().hex[:10]}"
    s3_client(s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def trained(s3_server, shared_bucket):
    """An uninterrupted training run (the baseline for the fault tests and the model scoring tests use)."""
    from pipeline.config import StorageSection
    from pipeline.storage import Storage

    write_input(Storage(StorageSection(endpoint_url=s3_server)), shared_bucket)
    p = job("jobs.train", base_args(s3_server, shared_bucket), s3_server)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return manifest(s3_server, shared_bucket, "base")


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("override,needle", [
    ("train.epohcs=3", "config train.epohcs: unknown key"),
    ("train.epochs=many", "config train.epochs: expected an integer"),
    ("train.epochs=0", "config train.epochs: 0 must be >= 1"),
    ("data.nan_policy=skip", "config data.nan_policy: 'skip' is not one of error, drop"),
    ("storage.endpoint_url=ftp://x", "config storage.endpoint_url"),
])
def test_invalid_config_is_named_by_key(override, needle, capsys):
    rc, _, err = in_process("jobs.train", ["--config", str(ROOT / "jobs/configs/demo.yaml"), "--set", override],
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


def test_vectors_of_varying_length_are_refused(s3_server, bucket):
    from pipeline.config import DataSection
    from pipeline.errors import InputError
    from pipeline.rows import batch_rows, raw_featurizer
    from pipeline.shards import PATH_COLUMN

    t = pa.table({"id": [1, 2, 3], "features": pa.array([[1.0, 2.0], [1.0], [1.0, 2.0]], pa.list_(pa.float32())),
                  PATH_COLUMN: ["s3://b/in/x.parquet", "s3://b/in/y.parquet", "s3://b/in/x.parquet"]})
    with pytest.raises(InputError, match=r"file s3://b/in/y.parquet: column 'features' has 1 vectors whose "
                                         r"length is not 2 \(e.g. 1\)"):
        batch_rows(t, DataSection(), raw_featurizer(DataSection(), 2))


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


def test_scoring_features_must_match_the_model(trained, s3_server, shared_bucket, storage, capsys):
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


def test_nan_inside_ray_stops_the_job_with_one_line_and_publishes_nothing(trained, s3_server, shared_bucket,
                                                                          storage):
    """The NaN is found by the scoring actor mid-stream (not by the footer check): the message must still
    come back through Ray's wrappers as one line naming the file and column, exit 2."""
    files = write_input(storage, shared_bucket, "innan", rows=2000, shards=3)
    t = pq.read_table(storage.resolve(files[1])[1], filesystem=storage.filesystem(files[1]))
    x = np.array(t.column("features").to_pylist(), dtype=np.float32)
    x[5, 3], x[9, 0] = np.nan, np.inf
    t = t.set_column(t.schema.get_field_index("features"), "features", pa.array(list(x), pa.list_(pa.float32())))
    put_table(s3_server, shared_bucket, "innan/part-00001.parquet", t)
    p = job("jobs.score", base_args(s3_server, shared_bucket, data="innan", out="outnan") + ["--model", "base"],
            s3_server)
    assert_one_line_error(p.returncode, p.stderr, "part-00001.parquet", "column 'features' has 2 rows with NaN")
    assert "part-00000" not in p.stderr.strip().splitlines()[-1]
    assert keys(s3_server, shared_bucket, "outnan/") == [], "a failed run leaves nothing, not even staging"


# ------------------------------------------------------------------------------------------ rejects


def test_nan_policy_drop_counts_and_writes_rejects(trained, s3_server, shared_bucket, storage, ray_cluster):
    """Scoring with nan_policy=drop: rejected rows go to `_rejects/` with the reason; _SUCCESS adds up."""
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
    success = json.loads(s3_client(s3_server).get_object(Bucket=shared_bucket, Key=f"outdrop/{PART}/_SUCCESS")["Body"].read())
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
    from pipeline.config import DataSection, StorageSection
    from pipeline.prepare import BatchStats
    from pipeline.rows import RejectWriter, raw_featurizer
    from pipeline.shards import PATH_COLUMN
    from pipeline.storage import Storage

    storage = Storage(StorageSection())
    t = _good_table(50).append_column(PATH_COLUMN, pa.array(["in/a.parquet"] * 50))
    x = np.array(t.column("features").to_pylist(), dtype=np.float32)
    x[3, 2] = np.nan
    t = t.set_column(2, "features", pa.array(list(x), pa.list_(pa.float32())))
    data = DataSection(nan_policy="drop")
    udf = BatchStats(data, raw_featurizer(data, FEATURES), RejectWriter(storage, str(tmp_path / "rejects"), data))
    out = udf(t)
    assert int(out["n_rejected"][0]) == 1 and int(out["n"][0] + out["n_val"][0]) == 49
    udf(t)  # a retried task rewrites the same file rather than adding a duplicate
    files = list((tmp_path / "rejects").iterdir())
    assert len(files) == 1
    rej = pq.read_table(files[0])
    assert rej.column("id").to_pylist() == [3]
    assert rej.column("reason").to_pylist() == ["NaN or infinite value in features[2]"]
    with pytest.raises(Exception, match="rows with NaN or infinite values"):
        BatchStats(DataSection(), raw_featurizer(DataSection(), FEATURES))(t)


# ------------------------------------------------------------------------------------------ artifacts


def _copy_model(s3: str, bucket: str, src: str, dst: str) -> None:
    c = s3_client(s3)
    for k in keys(s3, bucket, f"artifacts/{src}/model/"):
        c.copy_object(Bucket=bucket, Key=k.replace(f"artifacts/{src}/", f"artifacts/{dst}/"),
                      CopySource={"Bucket": bucket, "Key": k})


def test_tampered_or_foreign_artifact_is_refused(trained, s3_server, shared_bucket, capsys):
    import torch

    c = s3_client(s3_server)
    argv = base_args(s3_server, shared_bucket, out="out-tampered")
    # one flipped byte in the weights
    _copy_model(s3_server, shared_bucket, "base", "tampered")
    key = "artifacts/tampered/model/weights.safetensors"
    blob = bytearray(c.get_object(Bucket=shared_bucket, Key=key)["Body"].read())
    blob[-1] ^= 0xFF
    c.put_object(Bucket=shared_bucket, Key=key, Body=bytes(blob))
    rc, _, err = in_process("jobs.score", argv + ["--model", "tampered"], capsys)
    assert_one_line_error(rc, err, "checksum does not match the manifest")

    # a pickle (which could run code on load) swapped in, with the manifest's checksum updated to match
    _copy_model(s3_server, shared_bucket, "base", "foreign")
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, buf)
    c.put_object(Bucket=shared_bucket, Key="artifacts/foreign/model/weights.safetensors", Body=buf.getvalue())
    m = manifest(s3_server, shared_bucket, "foreign")
    m["weights"]["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    c.put_object(Bucket=shared_bucket, Key="artifacts/foreign/model/manifest.json", Body=json.dumps(m).encode())
    rc, _, err = in_process("jobs.score", argv + ["--model", "foreign"], capsys)
    assert_one_line_error(rc, err, "weights do not fit the manifest's model")

    # a manifest of some other format
    m["format"] = "someone-else/v9"
    c.put_object(Bucket=shared_bucket, Key="artifacts/foreign/model/manifest.json", Body=json.dumps(m).encode())
    rc, _, err = in_process("jobs.score", argv + ["--model", "foreign"], capsys)
    assert_one_line_error(rc, err, "not a tabular-autoencoder/v1 manifest")
    assert keys(s3_server, shared_bucket, "out-tampered/") == []


def test_finished_run_is_not_overwritten_silently(trained, s3_server, shared_bucket, capsys):
    rc, _, err = in_process("jobs.train", base_args(s3_server, shared_bucket), capsys)
    assert_one_line_error(rc, err, "run base: already trained", "--overwrite")
    # --overwrite with input that fails its checks keeps the old run
    rc, _, err = in_process("jobs.train", base_args(s3_server, shared_bucket, data="nothing-here")
                            + ["--overwrite"], capsys)
    assert_one_line_error(rc, err, "no Parquet files found")
    assert manifest(s3_server, shared_bucket, "base")["model_version"] == trained["model_version"]


# ------------------------------------------------------------------------------------------ storage errors


@pytest.fixture(scope="module")
def auth_s3_server():
    """A second moto server that checks credentials (ours are unknown to it, so every request is refused)."""
    port = free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("fault", ["unreachable", "bad_credentials", "missing_bucket"])
@pytest.mark.parametrize("module", ["jobs.train", "jobs.score"])
def test_storage_errors_fail_fast_with_one_line(fault, module, s3_server, bucket, auth_s3_server, capsys):
    endpoint = {"unreachable": f"http://127.0.0.1:{free_port()}", "bad_credentials": auth_s3_server,
                "missing_bucket": s3_server}[fault]
    b = "no-such-bucket-here" if fault == "missing_bucket" else bucket
    start = time.monotonic()
    rc, _, err = in_process(module, base_args(endpoint, b, run="st"), capsys)
    elapsed = time.monotonic() - start
    needle = {"unreachable": "cannot reach the storage endpoint", "bad_credentials": "access denied",
              "missing_bucket": "bucket not found"}[fault]
    assert_one_line_error(rc, err, needle, f"s3://{b}/")
    assert elapsed < 60, f"took {elapsed:.0f}s to fail"


def test_unreachable_storage_exits_2_from_the_command_line(s3_server):
    """The whole process: exit code 2, one line, no Ray started, bounded time (bounded retries)."""
    start = time.monotonic()
    p = job("jobs.run", base_args(f"http://127.0.0.1:{free_port()}", "somewhere"), s3_server, timeout=120)
    assert_one_line_error(p.returncode, p.stderr, "cannot reach the storage endpoint")
    assert p.stderr.strip().count("\n") == 0, p.stderr
    assert time.monotonic() - start < 60


# ------------------------------------------------------------------------------------------ faults


def test_killed_training_worker_is_replaced_and_resumes_from_checkpoint(trained, s3_server, shared_bucket,
                                                                          tmp_path):
    import psutil

    log = tmp_path / "train.log"
    proc = start_job("jobs.train", base_args(s3_server, shared_bucket, run="workerkill"), s3_server, log)
    try:
        # a checkpoint uploaded but not yet registered is (rightly) not resumed from: wait for registration
        wait_until(lambda: checkpoint_registered(s3_server, shared_bucket, "workerkill"), proc, log,
                   what="a registered checkpoint")
        workers = [p for p in descendants(proc.pid) if "RayTrainWorker" in cmdline(p)]
        assert len(workers) == 1, [cmdline(p) for p in descendants(proc.pid)]
        killed = workers[0].pid
        os.kill(killed, signal.SIGKILL)
        rc = proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    text = log.read_text()
    RUNS.append(text)
    assert rc == 0, text[-4000:]
    assert not psutil.pid_exists(killed) or psutil.Process(killed).status() == psutil.STATUS_ZOMBIE
    resumed = [line for line in text.splitlines() if "[train] resumed from checkpoint after epoch" in line]
    assert resumed, text[-4000:]
    m = manifest(s3_server, shared_bucket, "workerkill")
    assert m["metrics"]["epochs_run"] == 6
    # as good as the uninterrupted run: same data, same epochs, resumed with the optimizer state
    assert m["metrics"]["best_val_loss"] < 0.5 * m["metrics"]["first_val_loss"]
    assert m["metrics"]["best_val_loss"] < 1.5 * trained["metrics"]["best_val_loss"]


def test_killed_driver_rerun_resumes_from_checkpoint(trained, s3_server, shared_bucket, tmp_path):
    log = tmp_path / "train1.log"
    argv = base_args(s3_server, shared_bucket, run="driverkill")
    proc = start_job("jobs.train", argv, s3_server, log)
    try:
        wait_until(lambda: checkpoint_registered(s3_server, shared_bucket, "driverkill"), proc, log,
                   what="a registered checkpoint")
    finally:
        kill_tree(proc)  # the driver and its whole local Ray, mid-training
    RUNS.append(log.read_text())
    assert keys(s3_server, shared_bucket, "artifacts/driverkill/model/") == [], "no model from a killed run"
    p = job("jobs.train", argv, s3_server)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    out = p.stdout + p.stderr
    assert "[prepare] reusing normalization statistics" in out
    resumed = [line for line in out.splitlines() if "[train] resumed from checkpoint after epoch" in line]
    assert resumed, out[-4000:]
    m = manifest(s3_server, shared_bucket, "driverkill")
    assert m["metrics"]["epochs_run"] == 6
    assert m["metrics"]["best_val_loss"] < 1.5 * trained["metrics"]["best_val_loss"]


def test_killed_scoring_publishes_nothing_and_rerun_replaces_cleanly(trained, s3_server, shared_bucket,
                                                                      storage, tmp_path):
    rows = 40_000
    write_input(storage, shared_bucket, "inbig", rows=rows, shards=8)
    argv = base_args(s3_server, shared_bucket, data="inbig", out="outbig") + ["--model", "base", "--run-date", RUN_DATE]

    def staged() -> bool:
        return any(k.endswith(".parquet") for k in keys(s3_server, shared_bucket, f"outbig/{PART}/_staging/"))

    def killed_mid_write(log: Path) -> None:
        proc = start_job("jobs.score", argv, s3_server, log)
        try:
            wait_until(staged, proc, log, what="the first staged file")
        finally:
            kill_tree(proc)
        RUNS.append(log.read_text())

    # 1. killed mid-write with nothing published yet: the published location shows nothing
    killed_mid_write(tmp_path / "score1.log")
    visible = [k for k in keys(s3_server, shared_bucket, "outbig/") if "/_staging/" not in k]
    assert visible == [], visible

    # 2. a rerun clears the abandoned staging and publishes every row exactly once
    p = job("jobs.score", argv, s3_server)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "removing staging left by an earlier, unfinished run" in p.stdout
    published = read_published(s3_server, shared_bucket, f"outbig/{PART}")
    ids = published.column("id").to_numpy()
    assert published.num_rows == rows and len(np.unique(ids)) == rows
    success_key = f"outbig/{PART}/_SUCCESS"
    success = s3_client(s3_server).get_object(Bucket=shared_bucket, Key=success_key)["Body"].read()
    assert json.loads(success)["scored_rows"] == rows
    before = [k for k in keys(s3_server, shared_bucket, "outbig/") if "/_staging/" not in k]
    assert not any("_staging" in k for k in keys(s3_server, shared_bucket, "outbig/"))

    # 3. killed again: the published output is untouched, complete, and still marked complete
    killed_mid_write(tmp_path / "score3.log")
    after = [k for k in keys(s3_server, shared_bucket, "outbig/") if "/_staging/" not in k]
    assert after == before
    assert s3_client(s3_server).get_object(Bucket=shared_bucket, Key=success_key)["Body"].read() == success
    assert read_published(s3_server, shared_bucket, f"outbig/{PART}").num_rows == rows


# ------------------------------------------------------------------------------------------ credentials


def secret_in(data: bytes) -> bool:
    return FAKE_SECRET.encode() in data or FAKE_KEY_ID.encode() in data


def test_credentials_never_appear_in_output_or_artifacts(s3_server, shared_bucket):
    """Runs above (successful, failed and killed) printed and wrote things: the secret is in none of them,
    nor in any object they stored (manifests, reports, checkpoints, Parquet output: raw bytes, and Parquet
    decoded, as compression would hide a value), nor in the logs of the Ray clusters they started."""
    assert len(RUNS) >= 5, "this test checks the output of the runs above; run the whole module"
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == FAKE_SECRET
    for text in RUNS:
        assert FAKE_SECRET not in text
        assert FAKE_KEY_ID not in text
    c = s3_client(s3_server)
    seen = {".json": 0, "_SUCCESS": 0, "report.html": 0, ".parquet": 0, ".pt": 0}
    for k in keys(s3_server, shared_bucket, ""):
        body = c.get_object(Bucket=shared_bucket, Key=k)["Body"].read()
        assert not secret_in(body), k
        if k.endswith(".parquet"):
            t = pq.read_table(io.BytesIO(body))
            decoded = json.dumps(t.to_pylist(), default=str) + repr(t.schema.metadata)
            assert FAKE_SECRET not in decoded and FAKE_KEY_ID not in decoded, k
        seen.update({end: n + 1 for end, n in seen.items() if k.endswith(end)})
    assert all(seen.values()), f"expected every kind of object the runs write: {seen}"
    logs = [p for p in Path(ray_tmpdir()).glob("ray/session_*/logs/**/*") if p.is_file()]
    assert len(logs) >= 10, f"no Ray session logs under {ray_tmpdir()}"
    for p in logs:
        assert not secret_in(p.read_bytes()), p


# ------------------------------------------------------------------------------------------ transient errors


class FlakyProxy:
    """A TCP proxy in front of the S3 server that answers the first `failures` connections with
    `503 Slow Down` (what S3 sends when throttling), then forwards bytes both ways."""

    def __init__(self, upstream_port: int, failures: int):
        import socket
        import threading

        self.upstream_port, self.failures, self.refused = upstream_port, failures, 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self._lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                refuse = self.refused < self.failures
                self.refused += refuse
            if refuse:
                threading.Thread(target=self._refuse, args=(client,), daemon=True).start()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _refuse(client) -> None:
        client.recv(65536)  # the request head
        body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                b"<Message>Please reduce your request rate.</Message></Error>")
        client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                       + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        client.close()

    @staticmethod
    def _pipe(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(2)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def test_transient_storage_errors_are_retried_a_bounded_number_of_times(s3_server, bucket):
    from pipeline.config import StorageSection
    from pipeline.errors import StorageError
    from pipeline.storage import Storage

    port = int(s3_server.rsplit(":", 1)[1])
    proxy = FlakyProxy(port, failures=2)
    try:  # two throttled attempts, then the third of storage.retries=3 goes through
        st = Storage(StorageSection(endpoint_url=f"http://127.0.0.1:{proxy.port}", retries=3))
        st.write_bytes(f"s3://{bucket}/retry/ok.txt", b"hello")
        assert proxy.refused == 2
    finally:
        proxy.close()
    assert s3_client(s3_server).get_object(Bucket=bucket, Key="retry/ok.txt")["Body"].read() == b"hello"

    proxy = FlakyProxy(port, failures=1000)
    try:  # throttled for good: exactly storage.retries attempts, then one line naming the URI
        st = Storage(StorageSection(endpoint_url=f"http://127.0.0.1:{proxy.port}", retries=3))
        start = time.monotonic()
        with pytest.raises(StorageError, match=f"s3://{bucket}/retry/never.txt: ") as e:
            st.read_bytes(f"s3://{bucket}/retry/never.txt")
        assert proxy.refused == 3
        assert "\n" not in str(e.value) and time.monotonic() - start < 30
    finally:
        proxy.close()
