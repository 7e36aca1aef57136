"""Helpers for tests that run jobs as processes and read what they stored: starting, waiting for and killing
job processes (with every process they started), a Ray temp dir of a job's own, one-line error checks, and
S3 listing and reading on the loopback server.

One module, imported by every test that needs them, so a fix to how a job is killed or a listing is paged
reaches all of them.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest

from tests.loopback_s3 import FAKE_KEY_ID, FAKE_SECRET, free_port, wait_for_port  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ job processes


def _refuse_in_unit_tier(what: str) -> None:
    from tests import conftest

    conftest.unit_tier_refuses(what)


def job_env(s3_server: str | None = None, ray_tmpdir: str | None = None) -> dict[str, str]:
    """Environment for running a job entrypoint as a subprocess (its own local Ray); `ray_tmpdir`: where that
    Ray keeps its session directories (logs included)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env.pop("RAY_ADDRESS", None)
    if s3_server:
        env["AWS_ENDPOINT_URL"] = s3_server
    if ray_tmpdir:
        env["RAY_TMPDIR"] = ray_tmpdir
    return env


@contextmanager
def private_ray_tmpdir(prefix: str = "job-ray-") -> Iterator[str]:
    """A Ray temp dir for the jobs started in the block: a job's plain `ray.init()` would otherwise join any
    cluster /tmp/ray names. Short, under /tmp: Ray's socket paths must fit in 107 characters."""
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_job(module: str, *args: str, env: dict[str, str] | None = None, timeout: float = 600,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    _refuse_in_unit_tier(f"a job subprocess (python -m {module})")
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env=env or job_env(), timeout=timeout, cwd=cwd or ROOT)


def start_job(module: str, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A job in the background, its stdout and stderr to `log`."""
    _refuse_in_unit_tier(f"a job subprocess (python -m {module})")
    with open(log, "w") as f:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", module, *argv], stdout=f, stderr=subprocess.STDOUT,
                                env=env, cwd=ROOT)


def in_process(module: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """Run a job's main() in this process: (exit code, stdout, stderr). Checks that fail before Ray starts
    need no cluster; past them the job joins the session's Ray (`connect` keeps a running one)."""
    import importlib

    capsys.readouterr()  # only the job's own output: a session model the test just trained printed too
    rc = importlib.import_module(module).main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def descendants(pid: int) -> list:
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


def wait_gone(*marks: str, timeout: float = 120) -> None:
    """Wait until no process this one started (the session's Ray workers among them) has any of `marks` in its
    command line: a killed job's tasks and actors on a cluster that outlives it have ended."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        left = [c for c in map(cmdline, descendants(os.getpid())) if any(m in c for m in marks)]
        if not left:
            return
        time.sleep(0.2)
    pytest.fail(f"still running {timeout}s after their job was killed: {left[:3]}")


def wait_until(cond: Callable[[], object], proc: subprocess.Popen, log: Path, what: str,
               timeout: float = 600, poll_s: float = 0.2):
    """`cond()`'s first true value; fails the test (killing the job) if the job exits first or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = cond()
        if got:
            return got
        if proc.poll() is not None:
            pytest.fail(f"job exited (rc {proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        time.sleep(poll_s)
    kill_tree(proc)
    pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")


def finish(proc: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    """The log of a job that must end with exit code 0 within `timeout`."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        pytest.fail(f"job still running after {timeout}s:\n{log.read_text()[-4000:]}")
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    return text


# ------------------------------------------------------------------------------------------ error lines


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


def assert_one_line_error(rc: int, err: str, *needles: str) -> str:
    """Exit code 2, no traceback, the last line `error: ...` containing every needle; returns that line."""
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err[-3000:]
    for n in needles:
        assert n in last, last
    return last


# ------------------------------------------------------------------------------------------ S3


def s3_client(s3: str):
    import boto3

    return boto3.client("s3", endpoint_url=s3, region_name="us-east-1")


def create_bucket(s3: str, prefix: str = "test") -> str:
    import uuid

    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    s3_client(s3).create_bucket(Bucket=name)
    return name


def keys(s3: str, bucket: str, prefix: str) -> list[str]:
    """Object keys under `prefix`, sorted, without the empty `dir/` markers pyarrow's S3 client leaves."""
    pages = s3_client(s3).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []) if not o["Key"].endswith("/"))


def get_bytes(s3: str, bucket: str, key: str) -> bytes:
    return s3_client(s3).get_object(Bucket=bucket, Key=key)["Body"].read()


def put_table(s3: str, bucket: str, key: str, table) -> None:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    s3_client(s3).put_object(Bucket=bucket, Key=key, Body=buf.getvalue())


def read_published(s3: str, bucket: str, prefix: str):
    """The Parquet files under `prefix` as one table, leaving out `_`- and `.`-prefixed paths (staging,
    rejects, markers)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = []
    for k in keys(s3, bucket, prefix + "/"):
        rel = k[len(prefix) + 1:]
        if k.endswith(".parquet") and not any(p.startswith(("_", ".")) for p in rel.split("/")):
            parts.append(pq.read_table(io.BytesIO(get_bytes(s3, bucket, k))))
    return pa.concat_tables(parts) if parts else pa.table({})


def manifest(s3: str, bucket: str, run: str, artifacts: str = "artifacts") -> dict:
    return json.loads(get_bytes(s3, bucket, f"{artifacts}/{run}/model/manifest.json"))


def checkpoint_snapshot(s3: str, bucket: str, run: str) -> Optional[dict]:
    """Ray Train's snapshot of the run's checkpoints (what a new driver resumes from), or None before it is
    written (or while it is being written)."""
    key = f"artifacts/{run}/train/{run}/checkpoint_manager_snapshot.json"
    if key not in keys(s3, bucket, f"artifacts/{run}/train/"):
        return None
    try:
        return json.loads(get_bytes(s3, bucket, key))
    except ValueError:  # caught mid-write
        return None


def checkpoint_registered(s3: str, bucket: str, run: str) -> bool:
    """A checkpoint is resumable by a new driver once Ray Train's snapshot of the run lists it."""
    snap = checkpoint_snapshot(s3, bucket, run)
    return bool(snap and snap.get("latest_checkpoint_result"))


def latest_checkpoint(s3: str, bucket: str, run: str) -> Optional[dict]:
    """The newest checkpoint Ray Train registered for the run (its state file, loaded), or None."""
    import torch

    snap = checkpoint_snapshot(s3, bucket, run)
    try:
        path = snap["latest_checkpoint_result"]["checkpoint_dir_name"]
    except (TypeError, KeyError):
        return None
    body = get_bytes(s3, bucket, f"artifacts/{run}/train/{run}/{path}/state.pt")
    return torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)


def read_parquet_dir(storage, uri: str):
    """Every `.parquet` file under `uri` (local or S3, through the job's Storage), as one table in file order."""
    import pyarrow as pa

    parts = []
    for f in storage.list_files(uri, suffix=".parquet"):
        with storage.open_parquet(f) as pf:
            t = pf.read()
        # an input's shards may differ in integer width or dictionary encoding (the same values)
        parts.append(t.cast(pa.schema([pa.field(c.name, c.type.value_type if pa.types.is_dictionary(c.type)
                                                 else c.type) for c in t.schema])))
    return pa.concat_tables(parts, promote_options="permissive")


def two_ranks(target: Callable, *args, timeout: float = 120) -> object:
    """Runs `target(rank, world, port, *args, out)` in two fresh processes (a gloo group on a free loopback
    port) and returns what rank 0 put on `out`; both must exit cleanly.

    The processes fork from a server process that imported torch once, for every call this test process makes
    (Python's `forkserver`): a spawned process would import torch again each time (about 3 s per call), and a
    fork of this one would inherit its thread pools."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", target.__module__])  # before its first start only
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, 2, port, *args, out)) for r in range(2)]
    for p in procs:
        p.start()
    result = out.get(timeout=timeout)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return result
