"""Credentials never appear in what a job prints or writes: its output and error lines, the objects it stores
(manifests, reports, checkpoints, Parquet output and `_SUCCESS`), or the logs of the Ray clusters it runs on.

The test makes its own runs (a successful one, failed ones before and inside Ray, a killed one) in a bucket
of its own, so it checks the same things whichever tests run before it. They run on the session's Ray, whose
logs are checked as well: the killed one is a driver that joined it, killed mid-run while the cluster goes on.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.models import RUN_DATE, base_args, write_input
from tests.procs import (FAKE_KEY_ID, FAKE_SECRET, create_bucket, free_port, get_bytes,
                         in_process, job_env, keys, kill_tree, put_table, run_job, start_job,
                         wait_until)

pytestmark = pytest.mark.integration


def secret_in(data: bytes) -> bool:
    return FAKE_SECRET.encode() in data or FAKE_KEY_ID.encode() in data


def ray_logs(temp_dir: str) -> list[Path]:
    return [p for p in Path(temp_dir).glob("**/session_*/logs/**/*") if p.is_file()]


def test_credentials_never_appear_in_output_or_artifacts(ray_cluster, ray_address, s3_server, storage, capsys,
                                                         tmp_path):
    """Successful, failed and killed runs printed and wrote things: the secret is in none of them, nor in
    any object they stored (manifests, reports, checkpoints, Parquet output: raw bytes, and Parquet decoded,
    as compression would hide a value), nor in the logs of the Ray clusters they ran on."""
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == FAKE_SECRET
    bucket = create_bucket(s3_server, "cred")
    write_input(storage, bucket, rows=2000, shards=2)
    runs: list[str] = []  # stdout + stderr of every run, checked as soon as it ends

    def ran(text: str) -> None:
        assert FAKE_SECRET not in text and FAKE_KEY_ID not in text, f"run {len(runs) + 1} printed a credential"
        runs.append(text)
    short = ["--set", "train.epochs=3", "--set", "train.patience=3"]

    # succeeds: trains and scores (manifest, report, checkpoints, Parquet output, _SUCCESS)
    rc, out, err = in_process("jobs.run", base_args(s3_server, bucket, run="cred") + short
                              + ["--run-date", RUN_DATE], capsys)
    ran(out + err)
    assert rc == 0, runs[-1][-4000:]

    # fails before Ray: a config error, input that is not there, an endpoint that does not answer (the
    # whole process)
    for argv in (base_args(s3_server, bucket, run="cred-bad") + ["--set", "train.epochs=0"],
                 base_args(s3_server, bucket, run="cred-bad", data="nothing-here")):
        rc, out, err = in_process("jobs.train", argv, capsys)
        ran(out + err)
        assert rc == 2, err
    p = run_job("jobs.run", *base_args(f"http://127.0.0.1:{free_port()}", bucket), env=job_env(s3_server),
                timeout=120)
    ran(p.stdout + p.stderr)
    assert p.returncode == 2, runs[-1][-4000:]

    # fails inside Ray: a NaN found by a scoring task, reported through Ray's wrappers
    t = pq.read_table(io.BytesIO(get_bytes(s3_server, bucket, keys(s3_server, bucket, "in/")[0])))
    x = np.array(t.column("features").to_pylist(), dtype=np.float32)
    x[3, 1] = np.nan
    t = t.set_column(t.schema.get_field_index("features"), "features", pa.array(list(x), pa.list_(pa.float32())))
    put_table(s3_server, bucket, "innan/part-00000.parquet", t)
    rc, out, err = in_process("jobs.score", base_args(s3_server, bucket, run="cred", data="innan", out="outnan")
                              + ["--model", "cred"], capsys)
    ran(out + err)
    assert rc == 2 and "rows with NaN" in err, runs[-1][-4000:]

    # a driver on the session's Ray, killed once it has started the job's first Ray Data pass
    log = tmp_path / "killed.log"
    proc = start_job("jobs.train", base_args(s3_server, bucket, run="cred-killed"),
                     {**job_env(s3_server), "RAY_ADDRESS": ray_address}, log)
    try:
        wait_until(lambda: "[prepare]" in log.read_text(), proc, log, what="the normalization pass")
    finally:
        kill_tree(proc)
    ran(log.read_text())

    assert len(runs) == 6
    seen = {".json": 0, "_SUCCESS": 0, "report.html": 0, ".parquet": 0, ".pt": 0}
    for k in keys(s3_server, bucket, ""):
        body = get_bytes(s3_server, bucket, k)
        assert not secret_in(body), k
        if k.endswith(".parquet"):
            t = pq.read_table(io.BytesIO(body))
            decoded = json.dumps(t.to_pylist(), default=str) + repr(t.schema.metadata)
            assert FAKE_SECRET not in decoded and FAKE_KEY_ID not in decoded, k
        seen.update({end: n + 1 for end, n in seen.items() if k.endswith(end)})
    assert all(seen.values()), f"expected every kind of object the runs write: {seen}"
    logs = ray_logs(ray_cluster)
    assert len(logs) >= 10, f"no Ray session logs under {ray_cluster}"
    for p in logs:
        assert not secret_in(p.read_bytes()), p
