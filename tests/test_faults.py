"""Faults survived: a training worker killed mid-run is replaced and training resumes from its checkpoint; a
killed driver's rerun resumes; a scoring job killed mid-write publishes nothing and its rerun publishes every
row once. Processes are killed for real (SIGKILL by pid).

The killed training worker and the killed scoring jobs are subprocesses that join the session's Ray, as a job
joins a cluster (`ray job submit`, KubeRay): the worker killed is one of that Ray's processes, and a killed
scoring driver's tasks end with it (the test waits until they have) while the cluster goes on. The killed
driver has a local Ray of its own, killed with it, as when the machine of a `python -m jobs.train` run is
lost. The reruns, which are not killed, and the baseline model they are compared against
(`trained_model("s3-vector")`, tests/models.py) use the session's Ray.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from tests.models import PART, RUN_DATE, base_args, write_input
from tests.procs import (checkpoint_registered, cmdline, descendants, get_bytes, in_process, job_env, keys,
                         kill_tree, manifest, private_ray_tmpdir, read_published, run_job, start_job, wait_gone,
                         wait_until)

pytestmark = pytest.mark.integration


@pytest.fixture
def base(trained_model):
    return trained_model("s3-vector")


@pytest.fixture(scope="module")
def env(s3_server):
    """The killed driver's environment: its local Ray keeps its session directories in a temp dir of this
    module's, removed at the end."""
    with private_ray_tmpdir("faults-ray-") as ray_tmp:
        yield job_env(s3_server, ray_tmp)


@pytest.fixture
def on_session_ray(s3_server, ray_address):
    """A job subprocess's environment to join the session's Ray (its workers are this process's descendants)."""
    return {**job_env(s3_server), "RAY_ADDRESS": ray_address}


def test_killed_training_worker_is_replaced_and_resumes_from_checkpoint(base, s3_server, on_session_ray, tmp_path):
    import psutil

    shared_bucket, trained = base.bucket, base.manifest
    log = tmp_path / "train.log"
    proc = start_job("jobs.train", base_args(s3_server, shared_bucket, run="workerkill"), on_session_ray, log)
    try:
        # a checkpoint uploaded but not yet registered is (rightly) not resumed from: wait for registration
        wait_until(lambda: checkpoint_registered(s3_server, shared_bucket, "workerkill"), proc, log,
                   what="a registered checkpoint")
        workers = [p for p in descendants(os.getpid()) if "RayTrainWorker" in cmdline(p)]
        assert len(workers) == 1, [cmdline(p) for p in descendants(os.getpid())]
        killed = workers[0].pid
        os.kill(killed, signal.SIGKILL)
        rc = proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    text = log.read_text()
    assert rc == 0, text[-4000:]
    assert not psutil.pid_exists(killed) or psutil.Process(killed).status() == psutil.STATUS_ZOMBIE
    resumed = [line for line in text.splitlines() if "[train] resumed from checkpoint after epoch" in line]
    assert resumed, text[-4000:]
    m = manifest(s3_server, shared_bucket, "workerkill")
    assert m["metrics"]["epochs_run"] == 6
    # as good as the uninterrupted run: same data, same epochs, resumed with the optimizer state
    assert m["metrics"]["best_val_loss"] < 0.5 * m["metrics"]["first_val_loss"]
    assert m["metrics"]["best_val_loss"] < 1.5 * trained["metrics"]["best_val_loss"]


def test_killed_driver_rerun_resumes_from_checkpoint(base, s3_server, env, ray_address, tmp_path):
    shared_bucket, trained = base.bucket, base.manifest
    log = tmp_path / "train1.log"
    argv = base_args(s3_server, shared_bucket, run="driverkill")
    proc = start_job("jobs.train", argv, env, log)
    try:
        wait_until(lambda: checkpoint_registered(s3_server, shared_bucket, "driverkill"), proc, log,
                   what="a registered checkpoint")
    finally:
        kill_tree(proc)  # the driver and its whole local Ray, mid-training
    assert keys(s3_server, shared_bucket, "artifacts/driverkill/model/") == [], "no model from a killed run"
    # the rerun is not killed: it joins the session's Ray (a new driver, as after a restart)
    p = run_job("jobs.train", *argv, env={**env, "RAY_ADDRESS": ray_address}, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    out = p.stdout + p.stderr
    assert "[prepare] reusing normalization statistics" in out
    resumed = [line for line in out.splitlines() if "[train] resumed from checkpoint after epoch" in line]
    assert resumed, out[-4000:]
    m = manifest(s3_server, shared_bucket, "driverkill")
    assert m["metrics"]["epochs_run"] == 6
    assert m["metrics"]["best_val_loss"] < 1.5 * trained["metrics"]["best_val_loss"]


def test_killed_scoring_publishes_nothing_and_rerun_replaces_cleanly(base, s3_server, storage, on_session_ray,
                                                                      tmp_path, capsys):
    shared_bucket = base.bucket
    rows = 40_000
    write_input(storage, shared_bucket, "inbig", rows=rows, shards=8)
    # small output files: the first staged file appears while the others are still being scored, so the kill
    # lands mid-write (one 64 MB file would be written at the end, next to publish)
    argv = base_args(s3_server, shared_bucket, data="inbig", out="outbig") + [
        "--model", "base", "--run-date", RUN_DATE, "--set", "output.file_mb=0.1"]

    def staged() -> bool:
        return any(k.endswith(".parquet") for k in keys(s3_server, shared_bucket, f"outbig/{PART}/_staging/"))

    def killed_mid_write(log: Path) -> None:
        proc = start_job("jobs.score", argv, on_session_ray, log)
        try:
            wait_until(staged, proc, log, what="the first staged file")
        finally:
            kill_tree(proc)  # the driver: the cluster goes on, and ends the job's read, score and write tasks
        wait_gone("ScoreBatches", "ray::Write", "ReadParquet")

    # 1. killed mid-write with nothing published yet: the published location shows nothing
    killed_mid_write(tmp_path / "score1.log")
    visible = [k for k in keys(s3_server, shared_bucket, "outbig/") if "/_staging/" not in k]
    assert visible == [], visible

    # 2. a rerun (a new driver on the same Ray) clears the abandoned staging and publishes every row exactly
    # once
    rc, out, err = in_process("jobs.score", argv, capsys)
    assert rc == 0, (out + err)[-4000:]
    assert "removing staging left by an earlier, unfinished run" in out
    published = read_published(s3_server, shared_bucket, f"outbig/{PART}")
    ids = published.column("id").to_numpy()
    assert published.num_rows == rows and len(np.unique(ids)) == rows
    success_key = f"outbig/{PART}/_SUCCESS"
    success = get_bytes(s3_server, shared_bucket, success_key)
    marker = json.loads(success)
    assert marker["scored_rows"] == rows
    assert len(marker["files"]) >= 4  # output.file_mb took effect: the kill point is mid-write
    before = [k for k in keys(s3_server, shared_bucket, "outbig/") if "/_staging/" not in k]
    assert not any("_staging" in k for k in keys(s3_server, shared_bucket, "outbig/"))

    # 3. killed again: the published output is untouched, complete, and still marked complete
    killed_mid_write(tmp_path / "score3.log")
    after = [k for k in keys(s3_server, shared_bucket, "outbig/") if "/_staging/" not in k]
    assert after == before
    assert get_bytes(s3_server, shared_bucket, success_key) == success
    assert read_published(s3_server, shared_bucket, f"outbig/{PART}").num_rows == rows
