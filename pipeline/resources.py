"""What the job asks of the cluster, checked before Ray Train or Ray Data waits on it.

A Ray job that asks for resources the cluster cannot give does not fail: it waits, silently and forever
(a placement group that never fits, an actor pool that never starts, a read task with no CPU left to run on).
So every job compares its requests with a snapshot of the cluster first:

- impossible requests (more CPUs or GPUs per worker than any node has or can be scaled to; GPUs on a
  cluster without any; more scoring workers than the cluster holds) stop the job with one line naming the
  config keys and the figures (`ConfigError`, exit 2) before any data is read;
- requests that would leave Ray Data no CPU are lowered, with one line saying what was asked, what is used
  and why. The rule: Ray Data reads (and splits) the input in tasks of DATA_CPUS CPU each, so the CPUs
  reserved by training workers (or by a scoring actor pool) may use at most the cluster's CPUs minus
  DATA_CPUS; above that, the reservation per worker is lowered to (cluster CPUs - DATA_CPUS) / workers.

    cluster = read_cluster()                      # needs a connected Ray
    cfg = fit_job(cfg, cluster, "train")          # -> the config to run (lowered where needed), or raises

Everything but `read_cluster` is pure arithmetic over a `Cluster`, tested without Ray.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from pipeline.errors import ConfigError

DATA_CPUS = 1.0
"""CPUs a Ray Data read or map task asks for (Ray's default): with less free, the input is never read."""


@dataclass(frozen=True)
class Node:
    cpus: float
    gpus: float = 0.0


@dataclass(frozen=True)
class Cluster:
    """A snapshot: the alive nodes, and the node types an autoscaler may add (with their max counts)."""

    nodes: tuple[Node, ...]
    available_cpus: float = 0.0
    available_gpus: float = 0.0
    scalable: tuple[tuple[Node, Optional[int]], ...] = ()
    """(node shape, max count or None when unbounded/unknown) per node type the autoscaler may start."""

    @property
    def autoscaling(self) -> bool:
        return bool(self.scalable)

    @property
    def shapes(self) -> list[Node]:
        """Every node shape the job may land on: the alive nodes and the types it may scale to."""
        return list(self.nodes) + [n for n, _ in self.scalable]

    @property
    def cpus(self) -> float:
        return sum(n.cpus for n in self.nodes)

    @property
    def gpus(self) -> float:
        return sum(n.gpus for n in self.nodes)

    def max_cpus(self) -> Optional[float]:
        """CPUs the cluster may grow to; None when the autoscaler gives no bound."""
        if any(count is None for _, count in self.scalable):
            return None
        return self.cpus + sum(n.cpus * count for n, count in self.scalable)

    def max_gpus(self) -> Optional[float]:
        if any(count is None and n.gpus > 0 for n, count in self.scalable):
            return None
        return self.gpus + sum(n.gpus * (count or 0) for n, count in self.scalable)

    def describe(self) -> str:
        grow = ""
        if self.autoscaling:
            mc = self.max_cpus()
            grow = f", autoscaling to {_num(mc)} CPUs" if mc is not None else ", autoscaling (no upper bound)"
        return (f"{_num(self.cpus)} CPUs, {_num(self.gpus)} GPUs on {len(self.nodes)} "
                f"node{'s' if len(self.nodes) != 1 else ''}{grow}")


def _num(x: Optional[float]) -> str:
    if x is None:
        return "?"
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _plural(n: float, word: str) -> str:
    return f"{_num(n)} {word}{'s' if n > 1 else ''}"


def _lowered(budget: float, workers: int) -> float:
    """budget / workers, rounded down to 0.01 CPU (Ray's resource granularity is finer; this is readable)."""
    return math.floor(budget / workers * 100) / 100


def _check_gpus(key: str, workers: int, cluster: Cluster, what: str) -> None:
    """One GPU per worker: some node (or node type) must have one, and the cluster enough of them."""
    if not any(n.gpus >= 1 for n in cluster.shapes):
        raise ConfigError(f"config {key}: true, but the cluster has no GPUs ({cluster.describe()}) and no GPU "
                          f"node type to scale to; set {key}: false")
    max_gpus = cluster.max_gpus()
    if max_gpus is not None and workers > max_gpus:
        raise ConfigError(f"config {key}: {_plural(workers, what)} x 1 GPU, but the cluster has "
                          f"{_plural(max_gpus, 'GPU')} ({cluster.describe()}); lower the number of {what}s "
                          f"to {_num(math.floor(max_gpus))}")


def _check_per_node(key: str, cpus: float, use_gpu: bool, cluster: Cluster) -> None:
    """A worker lives on one node: its CPUs (and GPU) must fit the largest node it may land on."""
    shapes = [n for n in cluster.shapes if n.gpus >= 1] if use_gpu else cluster.shapes
    largest = max((n.cpus for n in shapes), default=0.0)
    if cpus > largest:
        where = "GPU node" if use_gpu else "node"
        raise ConfigError(f"config {key}: {_num(cpus)} CPUs per worker, but the largest {where} has "
                          f"{_plural(largest, 'CPU')} ({cluster.describe()}); set {key} to at most {_num(largest)}")


def plan_training(num_workers: int, cpus_per_worker: float, use_gpu: bool,
                  cluster: Cluster) -> tuple[float, Optional[str]]:
    """(CPUs per training worker to use, a line saying why it was lowered or None); raises ConfigError.

    Ray Train reserves `num_workers` x `cpus_per_worker` for the whole run, and Ray Data excludes that
    reservation from what it may use to feed the workers: it must keep at least DATA_CPUS.
    """
    if use_gpu:
        _check_gpus("train.use_gpu", num_workers, cluster, "training worker")
    _check_per_node("train.cpus_per_worker", cpus_per_worker, use_gpu, cluster)
    total = cluster.max_cpus()
    if total is None:  # an autoscaler without a bound: the cluster grows to what is asked
        return cpus_per_worker, None
    budget = total - DATA_CPUS
    if budget <= 0:
        raise ConfigError(f"config run.num_cpus: the cluster has {_plural(total, 'CPU')}; training needs more "
                          f"than {_num(DATA_CPUS)} (Ray Data reads the input with {_num(DATA_CPUS)} CPU while "
                          f"the workers train): set run.num_cpus: 2 or more, or use a larger cluster")
    return _share("train.cpus_per_worker", num_workers, "training worker", cpus_per_worker, total, budget)


def _share(key: str, count: int, noun: str, per: float, total: float, budget: float) -> tuple[float, Optional[str]]:
    """`per` as asked when `count` x `per` fits `budget`; else budget / count, with a line saying why."""
    asked = count * per
    if asked <= budget:
        return per, None
    used = _lowered(budget, count)
    return used, (f"{key} lowered from {_num(per)} to {_num(used)}: {_plural(count, noun)} x {_plural(per, 'CPU')} "
                  f"would leave Ray Data {'none' if asked >= total else _num(total - asked)} of the cluster's "
                  f"{_plural(total, 'CPU')} (it needs {_num(DATA_CPUS)} to read the input)")


def plan_actor_pool(concurrency: int, cpus_per_actor: float, use_gpu: bool, cluster: Cluster,
                    fused: bool = False, what: str = "scoring") -> tuple[float, int, Optional[str]]:
    """(CPUs per scoring worker, workers at once, a line saying what was lowered or None); raises ConfigError.

    `fused`: read, score and write run in plain tasks (score.compute tasks, and the validation pass), so no CPU
    is kept for reading and score.concurrency is only a cap: above the cluster it is lowered (a cluster that
    lost a node goes on with fewer tasks at once). An actor pool waits for all its actors: above the cluster
    it could never start, so it is refused; the actors hold their CPUs and Ray Data reads beside them.
    """
    if use_gpu:
        _check_gpus("score.use_gpu", concurrency, cluster, "scoring worker")
    _check_per_node("score.cpus_per_actor", cpus_per_actor, use_gpu, cluster)
    total = cluster.max_cpus()
    if total is None:
        return cpus_per_actor, concurrency, None
    asked = concurrency * cpus_per_actor
    if asked > total:
        fits = max(1, math.floor(total / cpus_per_actor))
        if fused:
            return cpus_per_actor, fits, (
                f"score.concurrency lowered from {concurrency} to {fits}: {what} tasks x score.cpus_per_actor "
                f"{_num(cpus_per_actor)} = {_num(asked)} CPUs, but the cluster has {_plural(total, 'CPU')}")
        raise ConfigError(f"config score.concurrency: {concurrency} {what} workers x score.cpus_per_actor "
                          f"{_num(cpus_per_actor)} = {_num(asked)} CPUs, but the cluster has "
                          f"{_plural(total, 'CPU')} ({cluster.describe()}); set score.concurrency to at most {fits}")
    budget = total - (0.0 if fused else DATA_CPUS)
    if budget <= 0:
        raise ConfigError(f"config run.num_cpus: the cluster has {_plural(total, 'CPU')}; {what} with an actor "
                          f"pool needs more than {_num(DATA_CPUS)} (Ray Data reads beside the actors): set "
                          f"run.num_cpus: 2 or more, or score.compute: tasks")
    cpa, note = _share("score.cpus_per_actor", concurrency, f"{what} actor", cpus_per_actor, total, budget)
    return cpa, concurrency, note


def fit_job(cfg, cluster: Cluster, job: str, log=print):
    """The config to run on `cluster`: checked, with reservations lowered where Ray Data would starve.

    `job` "train": the training workers, then the validation pass (plain tasks of train.cpus_per_worker,
    started once training has released its workers); "score": the scoring pass. Prints one
    `[resources]` line per change; raises ConfigError on requests that can never be met.
    """
    tr, sc = cfg.train, cfg.score
    notes = []
    if job == "train":
        cpw, note = plan_training(tr.num_workers, tr.cpus_per_worker, tr.use_gpu, cluster)
        tr = dataclasses.replace(tr, cpus_per_worker=cpw)
        cpa, conc = sc.cpus_per_actor, sc.concurrency
    else:
        cpa, conc, note = plan_actor_pool(sc.concurrency, sc.cpus_per_actor, sc.use_gpu, cluster,
                                          fused=not sc.uses_actors)
    notes.append(note)
    for note in filter(None, notes):
        log(f"[resources] {note}")
    out = dataclasses.replace(cfg, train=tr, score=dataclasses.replace(sc, cpus_per_actor=cpa, concurrency=conc))
    log(f"[resources] cluster: {cluster.describe()}; "
        + (training_phase(out) if job == "train" else data_phase(out, "scoring", out.score.uses_actors)))
    return out


def training_phase(cfg) -> str:
    """What training holds and waits on, in words (for the resource summary and the stall report)."""
    tr = cfg.train
    return (f"{_plural(tr.num_workers, 'training worker')} x {_plural(tr.cpus_per_worker, 'CPU')}"
            + (" + 1 GPU" if tr.use_gpu else "") + f" + Ray Data reading {_input(cfg)}")


def data_phase(cfg, what: str, actors: bool = False) -> str:
    """What a Ray Data pass (prepare, validation, scoring) holds and waits on, in words."""
    sc = cfg.score
    pool = (f"{_plural(sc.concurrency, 'actor')} x {_plural(sc.cpus_per_actor, 'CPU')} + " if actors else "")
    return f"{what}: {pool}Ray Data reading {_input(cfg)}"


def _input(cfg) -> str:
    """data.input, with the endpoint it is read from when that is not AWS's own."""
    from pipeline.storage import endpoint_from
    from pipeline.uri import scheme_of

    endpoint = endpoint_from(cfg.storage) if scheme_of(cfg.data.input) in ("s3", "s3a") else None
    return cfg.data.input + (f" at {endpoint}" if endpoint else "")


# ------------------------------------------------------------------------------------------ from Ray


def check_job(cfg, job: str):
    """`fit_job` on the connected Ray cluster."""
    return fit_job(cfg, read_cluster(), job)


def read_cluster() -> Cluster:
    """The connected Ray cluster's alive nodes and free resources, and what its autoscaler may add."""
    import ray

    nodes = tuple(Node(float(n["Resources"].get("CPU", 0.0)), float(n["Resources"].get("GPU", 0.0)))
                  for n in ray.nodes() if n.get("Alive"))
    free = ray.available_resources()
    return Cluster(nodes, float(free.get("CPU", 0.0)), float(free.get("GPU", 0.0)), _scalable_node_types())


def _scalable_node_types() -> tuple[tuple[Node, Optional[int]], ...]:
    """Node types an autoscaler may start, from the cluster config the autoscaler publishes in the GCS.

    Ray 2.60 has no public API for it; this is where Ray Data's own autoscaling reads it. None there (a
    local or fixed cluster, the v1 autoscaler): the alive nodes are the whole cluster.
    """
    try:
        import ray._private.state

        config = ray._private.state.state.get_cluster_config()
    except Exception:  # noqa: BLE001 - no config: treat the cluster as fixed
        return ()
    out = []
    for group in getattr(config, "node_group_configs", None) or ():
        if group.max_count == 0 or not group.resources:
            continue
        out.append((Node(float(group.resources.get("CPU", 0)), float(group.resources.get("GPU", 0))),
                    None if group.max_count < 0 else int(group.max_count)))
    return tuple(out)
