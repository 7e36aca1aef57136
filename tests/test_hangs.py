"""No silent hangs, end to end: the jobs that must run on an exact cluster shape run as subprocesses with a
local Ray of 2 CPUs of their own, on the loopback S3 server, under a wall-clock limit; a job that hangs fails
the test by timing out.

- the two-worker config a new user writes first (cpus_per_worker left at 1.0) finishes: the workers'
  reservation is lowered so Ray Data keeps a CPU to read with;
- requests the cluster can never meet end in one line, exit 2, before any data is read: the planner's
  refusal for a 2-CPU machine is a unit test (pipeline/resources.py), and the jobs' place for it (before the
  first read) is checked on the session's Ray;
- a job whose input read blocks (an S3 endpoint that stops answering) says what it waits for and ends at
  run.stall_timeout_s with exit 2, leaving nothing for readers.
"""

from __future__ import annotations

import select
import socket
import subprocess
import sys
import threading
import time

import pytest

from pipeline.sample import write_sample
from tests.models import base_args
from tests.procs import ROOT, assert_one_line_error, error_lines, in_process, job_env, keys, private_ray_tmpdir, run_job

# No module-wide marker: the planner's refusals are unit tests; tests/conftest.py marks the rest (they use the
# S3 server or Ray) as integration.

JOB_TIMEOUT_S = 900  # generous for a loaded 2-core machine (the training run took 394 s at load 14); a hang ends here


def job_args(bucket: str, endpoint: str, *extra: str, input_uri: str | None = None) -> list[str]:
    sets = [f"data.input={input_uri or f's3://{bucket}/input'}", f"artifacts.uri=s3://{bucket}/artifacts",
            f"output.uri=s3://{bucket}/output", f"storage.endpoint_url={endpoint}", "run.name=hangs",
            "run.num_cpus=2", "data.features=features", *extra]
    return [a for s in sets for a in ("--set", s)]


@pytest.fixture(scope="module")
def env():
    """A job's environment with a Ray temp dir of its own: `ray.init()` joins whatever cluster
    /tmp/ray/ray_current_cluster names (another `ray start` on the machine) instead of starting 2 CPUs."""
    with private_ray_tmpdir("r15-") as ray_tmp:
        yield job_env(ray_tmpdir=ray_tmp)


def test_two_workers_at_the_default_cpus_finish_on_two_cpus(s3_server, bucket, env):
    """The issue's config on 2 CPUs."""
    from pipeline.config import StorageSection
    from pipeline.storage import Storage

    write_sample(f"s3://{bucket}/input", Storage(StorageSection(endpoint_url=s3_server)), rows=1293, shards=2,
                 features=16, seed=5)
    t0 = time.monotonic()
    proc = run_job("jobs.train", *job_args(bucket, s3_server, "train.epochs=3", "train.batch_size=64",
                                           "train.num_workers=2"),
                   env=env, timeout=JOB_TIMEOUT_S)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert ("[resources] train.cpus_per_worker lowered from 1 to 0.5: 2 training workers x 1 CPU would leave "
            "Ray Data none of the cluster's 2 CPUs (it needs 1 to read the input)") in out
    assert "[resources] cluster: 2 CPUs, 0 GPUs on 1 node; 2 training workers x 0.5 CPU" in out
    assert "[train] epoch 3/3" in out and "[train] model hangs@" in out
    print(f"issue-15 config trained in {seconds:.0f}s")


def two_cpu_cluster():
    """A local Ray started with run.num_cpus=2 as `pipeline.resources.read_cluster` sees it: one alive node of
    2 CPUs, all free, no autoscaler."""
    from pipeline.resources import Cluster, Node

    return Cluster((Node(2.0, 0.0),), 2.0, 0.0, ())


def planned(job: str, *sets: str):
    """The job's config from its command line, fitted to a 2-CPU local Ray (what `check_job` does there)."""
    from pipeline.cli import base_parser, config_from_args
    from pipeline.resources import fit_job

    cfg = config_from_args(base_parser("").parse_args(job_args("b", "http://127.0.0.1:1", *sets)))
    return fit_job(cfg, two_cpu_cluster(), job, log=lambda line: None)


@pytest.mark.parametrize("sets, message", [
    (["train.use_gpu=true"],
     "error: config train.use_gpu: true, but the cluster has no GPUs (2 CPUs, 0 GPUs on 1 node) and no GPU "
     "node type to scale to; set train.use_gpu: false"),
    (["train.cpus_per_worker=4"],
     "error: config train.cpus_per_worker: 4 CPUs per worker, but the largest node has 2 CPUs (2 CPUs, 0 GPUs "
     "on 1 node); set train.cpus_per_worker to at most 2"),
], ids=["gpu-on-cpu-cluster", "cpus-above-node"])
def test_impossible_training_requests_end_in_one_line_before_any_data_is_read(sets, message):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        planned("train", *sets)
    assert f"error: {e.value}" == message


def test_scoring_concurrency_above_the_cluster_ends_in_one_line_before_any_data_is_read():
    from pipeline.errors import ConfigError

    # an actor pool waits for all its actors (plain scoring tasks above the cluster are only capped)
    with pytest.raises(ConfigError) as e:
        planned("score", "score.concurrency=4", "score.compute=actors")
    assert f"error: {e.value}" == (
        "error: config score.concurrency: 4 scoring workers x score.cpus_per_actor 1 = 4 CPUs, but the cluster "
        "has 2 CPUs (2 CPUs, 0 GPUs on 1 node); set score.concurrency to at most 2")
    assert planned("score", "score.concurrency=4").score.concurrency == 2  # tasks: capped, not refused


@pytest.mark.parametrize("job, sets, message", [
    ("jobs.train", ["train.use_gpu=true"],
     "error: config train.use_gpu: true, but the cluster has no GPUs (4 CPUs, 0 GPUs on 1 node) and no GPU node "
     "type to scale to; set train.use_gpu: false"),
    ("jobs.train", ["train.cpus_per_worker=8"],
     "error: config train.cpus_per_worker: 8 CPUs per worker, but the largest node has 4 CPUs (4 CPUs, 0 GPUs on 1 "
     "node); set train.cpus_per_worker to at most 4"),
    ("jobs.score", ["score.concurrency=5", "score.compute=actors"],
     "error: config score.concurrency: 5 scoring workers x score.cpus_per_actor 1 = 5 CPUs, but the cluster has "
     "4 CPUs (4 CPUs, 0 GPUs on 1 node); set score.concurrency to at most 4"),
], ids=["gpu-on-cpu-cluster", "cpus-above-node", "actor-pool-above-cluster"])
def test_a_running_job_refuses_impossible_requests_before_reading_any_data(trained_model, s3_server, capsys, job,
                                                                          sets, message):
    """The jobs ask the planner once they have a cluster and before their first read: on the session's Ray
    (4 CPUs, no GPUs) the same refusals end the job in one line, with nothing read or written."""
    base = trained_model("s3-vector")  # scoring needs a model to get as far as the cluster check
    run = "impossible-" + job.split(".")[1]
    argv = base_args(s3_server, base.bucket, run=run, out=f"out-{run}")
    argv += [a for s in sets for a in ("--set", s)] + (["--model", "base"] if job == "jobs.score" else [])
    rc, out, err = in_process(job, argv, capsys)
    assert_one_line_error(rc, err)
    assert error_lines(err) == [message]
    assert "[prepare]" not in out  # the normalization pass (the first read of the data) never started
    assert keys(s3_server, base.bucket, f"artifacts/{run}/") == keys(s3_server, base.bucket, f"out-{run}/") == []


class GoesSilent:
    """A TCP proxy to the S3 server that, once `silence()` is called, stops answering: open connections get
    nothing more, new ones are accepted and never answered (a hung endpoint, not a refused one)."""

    def __init__(self, upstream: str):
        host, port = upstream.split("://", 1)[1].rsplit(":", 1)
        self.upstream = (host, int(port))
        self.server = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.silent = threading.Event()
        self.closed = threading.Event()
        self.socks: list[socket.socket] = [self.server]
        threading.Thread(target=self._accept, daemon=True).start()

    def silence(self) -> None:
        self.silent.set()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            self.socks.append(client)
            if self.silent.is_set():
                continue  # accepted, never answered
            up = socket.create_connection(self.upstream)
            self.socks.append(up)
            threading.Thread(target=self._pump, args=(client, up), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        while not self.closed.is_set() and not self.silent.is_set():
            ready, _, _ = select.select([a, b], [], [], 0.2)
            for s in ready:
                try:
                    data = s.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                if self.silent.is_set():
                    return  # swallowed: the request is never answered
                peers[s].sendall(data)

    def close(self) -> None:
        self.closed.set()
        for s in self.socks:
            s.close()


def test_a_blocked_input_read_is_reported_and_ends_at_the_stall_timeout(s3_server, bucket, storage, env, tmp_path):
    write_sample(f"s3://{bucket}/input", storage, rows=2000, shards=2, features=16, seed=2)
    proxy = GoesSilent(s3_server)
    args = job_args(bucket, proxy.endpoint, "run.stall_timeout_s=10", "train.num_workers=1",
                    f"artifacts.uri={tmp_path / 'artifacts'}", f"output.uri={tmp_path / 'output'}")
    proc = subprocess.Popen([sys.executable, "-m", "jobs.train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    out: list[str] = []
    t0 = time.monotonic()
    t_silent = [0.0]

    def read_stdout() -> None:  # the checks read the input's footers through the proxy; then it goes silent
        for line in proc.stdout:
            out.append(line)
            if line.startswith("[resources] cluster:"):
                t_silent[0] = time.monotonic()
                proxy.silence()

    reader = threading.Thread(target=read_stdout, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=JOB_TIMEOUT_S)  # a job that hangs fails the test here
        stderr = proc.stderr.read()
        reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proxy.close()
    text = "".join(out)
    assert proxy.silent.is_set(), text + stderr[-3000:]
    assert rc == 2, stderr[-3000:]
    reports = [ln for ln in out if ln.startswith("[watchdog] prepare: no progress for ")]
    assert reports, text
    # the driver itself waits on the endpoint (Ray Data plans the read from the files' metadata): no task runs,
    # nothing waits for resources, and the line says so
    assert (f"waiting for the normalization pass: Ray Data reading s3://{bucket}/input at {proxy.endpoint}; "
            "cluster has 2 CPUs, ") in reports[0]
    assert reports[0].rstrip().endswith("free; nothing waits for resources, so the running work is slow or blocked "
                                        "(a storage endpoint that does not answer, a hung task)")
    [err] = error_lines(stderr)
    assert err.startswith("error: stalled: prepare: no progress for ")
    assert err.endswith("ended after run.stall_timeout_s 10s without progress")
    assert time.monotonic() - t_silent[0] < 10 + 60 + 60, "ended long after the stall timeout"
    assert not (tmp_path / "artifacts" / "hangs" / "model").exists()
    print(f"stall ended {time.monotonic() - t_silent[0]:.0f}s after the input went silent "
          f"(job ran {time.monotonic() - t0:.0f}s):", reports[0], err, sep="\n")


def test_beats_from_ray_workers_reach_the_driver_watchdog(ray_cluster):
    """The path a training worker's progress takes to the driver blocked in trainer.fit(): a Ray task's
    beat() lands in the job's heartbeat actor, which every phase's watchdog polls."""
    import ray

    from pipeline import watchdog

    @ray.remote(num_cpus=0.25)
    def work() -> None:
        watchdog.beat("a test batch")

    with watchdog.watch(0, "test", "a task") as w:
        before, _ = ray.get(w.heartbeat.read.remote())  # the session's earlier jobs beat here too
        ray.get(work.remote())
        deadline, count, what = time.monotonic() + 30, before, ""
        while count == before and time.monotonic() < deadline:  # the beat is sent without waiting for it
            count, what = ray.get(w.heartbeat.read.remote())
            time.sleep(0.2)
    assert (count, what) == (before + 1, "a test batch")
    # the job's next phase polls the same actor (one per job, not a process started per phase)
    with watchdog.watch(0, "next", "nothing") as w2:
        assert w2.heartbeat is w.heartbeat and ray.get(w2.heartbeat.read.remote()) == (count, what)
