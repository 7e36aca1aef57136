"""Multi-node: a real Ray cluster of several raylets on loopback (`ray.cluster_utils.Cluster`, which Ray's own
tests use), data and artifacts on the loopback S3 server, where no local path is shared between nodes.

The cluster: a head without CPUs (as on KubeRay) and three worker nodes, each its own raylet with 1 CPU and a
custom resource naming it (`node_head`, `node_w0`, ...). Jobs run as separate driver processes joined to it via RAY_ADDRESS, as
under `ray job submit`. A node is killed whole (raylet, object store, workers: every process it started, by
pid, SIGKILL) and a fresh node takes its place for the next test.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.procs import ROOT, free_port, job_env
from tests.procs import finish, get_bytes, keys, latest_checkpoint, manifest, s3_client, start_job
from tests.procs import wait_until as wait_for

pytestmark = pytest.mark.integration

ROWS, SHARDS, FEATURES = 6000, 6, 16
RUN_DATE = "2026-01-02"


HEALTH_CHECKS = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                 "health_check_failure_threshold": 2}


class LoopbackCluster:
    """A head (no CPUs) and `workers` worker nodes of 1 CPU; `kill` removes a node by pid, `add` adds one."""

    def __init__(self, workers: int = 3):
        from ray.cluster_utils import Cluster

        # no CPUs on the head (as on KubeRay); its dashboard for Ray's state API; a free port for its
        # dashboard agent (the default one may belong to another Ray on the machine); a lost node is declared
        # dead after 2 failed health checks 1 s apart (Ray's default: 5, 3 s apart), as Ray's own tests do
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "resources": {"node_head": 1}, "dashboard_agent_listen_port": free_port(),
            "dashboard_port": free_port(), "_system_config": HEALTH_CHECKS})
        self.workers = {}
        self._next = 0
        for _ in range(workers):
            self.add()
        self.cluster.wait_for_nodes()

    @property
    def address(self) -> str:
        return self.cluster.address

    def add(self):
        name = f"node_w{self._next}"
        self._next += 1
        node = self.cluster.add_node(num_cpus=1, resources={name: 1})
        self.workers[node.node_id] = (name, node)
        return node

    def node_ids(self) -> set[str]:
        return {self.cluster.head_node.node_id, *self.workers}

    def kill(self, node_id: str) -> list[int]:
        """SIGKILL every process of a worker node (raylet, object store, its workers). Returns the pids."""
        import psutil

        _, node = self.workers.pop(node_id)
        pids = [p.process.pid for procs in node.all_processes.values() for p in procs]
        # the node's Ray workers are children of its raylet: kill them too, as a lost machine would
        workers = [c.pid for pid in pids if psutil.pid_exists(pid) for c in psutil.Process(pid).children(True)]
        self.cluster.remove_node(node, allow_graceful=False)
        for pid in workers:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        return pids + workers

    def shutdown(self) -> None:
        self.cluster.shutdown()


@pytest.fixture(scope="module")
def cluster(s3_server):
    """Started after the S3 server: the raylets' workers inherit its (fake) credentials from the env."""
    c = LoopbackCluster(workers=3)
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def mbucket(s3_server, cluster):
    from pipeline.config import StorageSection
    from pipeline.sample import write_sample
    from pipeline.storage import Storage

    name = f"mn-{uuid.uuid4().hex[:10]}"
    s3_client(s3_server).create_bucket(Bucket=name)
    write_sample(f"s3://{name}/in", Storage(StorageSection(endpoint_url=s3_server)), rows=ROWS, shards=SHARDS,
                 features=FEATURES)
    return name


def args(s3: str, bucket: str, run: str, **sets) -> list[str]:
    base = {"run.name": run, "run.num_cpus": None, "data.input": f"s3://{bucket}/in",
            "artifacts.uri": f"s3://{bucket}/artifacts", "output.uri": f"s3://{bucket}/out-{run}",
            "storage.endpoint_url": s3, "train.epochs": 4, "train.patience": 4, "train.num_workers": 2,
            "train.cpus_per_worker": 0.5, "train.batch_size": 64, "train.lr": 0.003, "train.checkpoint_every": 1,
            "model.hidden_dims": "[32,16]",
            "model.latent_dim": 4, "score.batch_size": 256, "score.concurrency": 3, "score.cpus_per_actor": 1}
    base.update(sets)
    out = ["--config", str(ROOT / "jobs/configs/tiny.yaml")]
    for k, v in base.items():
        out += ["--set", f"{k}={'null' if v is None else v}"]
    return out


def start(module: str, argv: list[str], s3: str, log: Path, address: str | None) -> subprocess.Popen:
    if module in ("jobs.run", "jobs.score"):
        argv = [*argv, "--run-date", RUN_DATE]
    env = job_env(s3)
    if address:
        env["RAY_ADDRESS"] = address
    return start_job(module, argv, env, log)


def published_ids(s3: str, bucket: str, run: str) -> np.ndarray:
    """Ids of the published partition's rows; fails unless `_SUCCESS` is there."""
    prefix = f"out-{run}/run_date={RUN_DATE}/"
    ks = keys(s3, bucket, prefix)
    assert prefix + "_SUCCESS" in ks, ks
    parts = [pq.read_table(io.BytesIO(get_bytes(s3, bucket, k)), columns=["id"])
             for k in ks if k.endswith(".parquet") and "/_" not in k[len(prefix) - 1:]]
    return np.concatenate([t.column("id").to_numpy() for t in parts])


def assert_exactly_once(s3: str, bucket: str, run: str) -> None:
    ids = published_ids(s3, bucket, run)
    assert len(ids) == ROWS and np.array_equal(np.sort(ids), np.arange(ROWS)), (len(ids), len(np.unique(ids)))


def worker_node_of(ckpt: dict, cluster: LoopbackCluster) -> str:
    """A worker node (not the head) that ran a training rank, from the checkpoint's history."""
    nodes = [n for n in ckpt["history"][-1]["worker_nodes"] if n in cluster.workers]
    assert nodes, (ckpt["history"][-1]["worker_nodes"], list(cluster.workers))
    return nodes[0]


def task_nodes(address: str, name_part: str) -> set[str]:
    """Nodes that ran finished Ray tasks whose name contains `name_part` (Ray's state API)."""
    from ray.util.state import list_tasks

    tasks = list_tasks(address=address, filters=[("state", "=", "FINISHED")], limit=10_000, raise_on_missing_output=False)
    return {t.node_id for t in tasks if name_part in t.name}


# ------------------------------------------------------------------------------------------ tests


def test_training_and_scoring_spread_over_nodes_and_match_one_node(s3_server, mbucket, cluster, ray_cluster,
                                                                   storage, tmp_path):
    # 1 CPU per training worker on 1-CPU nodes: Ray must place the two ranks on two nodes
    log = tmp_path / "spread.log"
    text = finish(start("jobs.run", args(s3_server, mbucket, "spread", **{"train.cpus_per_worker": 1}), s3_server,
                        log, cluster.address), log)
    m = manifest(s3_server, mbucket, "spread")
    ranks = m["history"][-1]["worker_nodes"]
    assert len(ranks) == 2 and len(set(ranks)) == 2 and set(ranks) <= cluster.node_ids(), ranks
    assert_exactly_once(s3_server, mbucket, "spread")
    # scoring: read -> score -> write tasks ran on every node with CPUs (the head has none)
    assert task_nodes(cluster.address, "ScoreBatches") == set(cluster.workers), text[-2000:]

    # the same config on one node (the session's local Ray) reaches the same validation loss, within noise;
    # 0.5 CPU per worker leaves Ray Data a CPU (torch threads are 1 either way)
    from pipeline.cli import base_parser, config_from_args
    from pipeline.jobs import train_job

    train_job(config_from_args(base_parser("").parse_args(
        args(s3_server, mbucket, "one", **{"train.cpus_per_worker": 0.5}))), storage)
    one = manifest(s3_server, mbucket, "one")
    assert len(set(one["history"][-1]["worker_nodes"])) == 1
    a, b = m["metrics"]["best_val_loss"], one["metrics"]["best_val_loss"]
    assert abs(a - b) / b < 0.25, (a, b)


def test_local_paths_are_refused_on_a_multi_node_cluster(s3_server, mbucket, cluster, tmp_path):
    for key, sets in (("artifacts.uri", {"artifacts.uri": str(tmp_path / "art")}),
                      ("output.uri", {"output.uri": str(tmp_path / "out")})):
        log = tmp_path / f"local-{key}.log"
        proc = start("jobs.run", args(s3_server, mbucket, "local", **sets), s3_server, log, cluster.address)
        proc.wait(timeout=300)
        text = log.read_text()
        last = text.strip().splitlines()[-1]
        assert proc.returncode == 2 and "Traceback" not in text, text[-3000:]
        assert last.startswith(f"error: config {key}: ") and "nodes" in last, last
    # refused before anything was written there (the writability probes leave no file)
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".log"]


def test_node_loss_mid_training_resumes_from_the_last_checkpoint(s3_server, mbucket, cluster, tmp_path):
    """Issue 12's case: both training ranks (0.5 CPU each) packed on the node that is lost."""
    log = tmp_path / "nodeloss.log"
    proc = start("jobs.run", args(s3_server, mbucket, "nodeloss", **{"train.epochs": 6, "train.patience": 6}),
                 s3_server, log, cluster.address)
    ckpt = wait_for(lambda: (c := latest_checkpoint(s3_server, mbucket, "nodeloss")) and c["epoch"] >= 1 and c,
                    proc, log, "the second checkpoint")
    victim = worker_node_of(ckpt, cluster)
    cluster.kill(victim)
    text = finish(proc, log)
    cluster.add()  # the next test gets the same cluster shape
    resumed = [int(m.group(1)) for m in re.finditer(r"\[train\] resumed from checkpoint after epoch (\d+)", text)]
    assert resumed and resumed[0] >= ckpt["epoch"], text[-4000:]
    m = manifest(s3_server, mbucket, "nodeloss")
    assert [h["epoch"] for h in m["history"]] == list(range(6))
    assert victim not in m["history"][-1]["worker_nodes"]
    assert_exactly_once(s3_server, mbucket, "nodeloss")


def test_node_loss_mid_scoring_publishes_all_rows_once(s3_server, mbucket, cluster, tmp_path):
    """Scoring with the model of the first test; a node dies while staged files are being written."""
    log = tmp_path / "scoreloss.log"
    # small output files: staged files appear while other blocks are still being scored (mid-write)
    argv = args(s3_server, mbucket, "spread", **{"output.uri": f"s3://{mbucket}/out-scoreloss", "output.file_mb": 0.02})
    proc = start("jobs.score", argv, s3_server, log, cluster.address)
    staging = "out-scoreloss/run_date=2026-01-02/_staging/"
    wait_for(lambda: any(k.endswith(".parquet") for k in keys(s3_server, mbucket, staging)), proc, log,
             "the first staged output file", timeout=300)
    published_before = any(k.endswith("_SUCCESS") for k in keys(s3_server, mbucket, "out-scoreloss/"))
    cluster.kill(next(iter(cluster.workers)))
    proc.wait(timeout=600)
    cluster.add()
    assert not published_before
    if proc.returncode != 0:  # nothing published; a rerun completes it
        assert not any(k.endswith("_SUCCESS") for k in keys(s3_server, mbucket, "out-scoreloss/"))
        log2 = tmp_path / "scoreloss-rerun.log"
        finish(start("jobs.score", argv, s3_server, log2, cluster.address), log2)
    assert_exactly_once(s3_server, mbucket, "scoreloss")
