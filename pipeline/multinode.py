"""What a multi-node Ray cluster needs from the job's storage: one place every node reads and writes.

On a single machine a local path is shared by every Ray worker. On a cluster each node has its own disk:
checkpoints, artifacts and output written to a local path land on whichever node ran the task, so the
driver's checks (row counts, `_SUCCESS`) and the next run see a part, or nothing. A local `data.input` is
read only where it exists. The job therefore refuses local paths once the cluster has more than one node,
unless `storage.shared_local_paths` says the path is the same shared filesystem (NFS, a CSI volume) on all.
"""

from __future__ import annotations

from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.uri import scheme_of


def alive_nodes() -> int:
    """Nodes of the connected Ray cluster that are alive (Ray must be initialized)."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def check_shared_storage(cfg: Config, keys: tuple[str, ...] = ("data.input", "artifacts.uri", "output.uri"),
                         nodes: int | None = None) -> None:
    """Refuse a local path under any of `keys` when the cluster has more than one node (ConfigError)."""
    if cfg.storage.shared_local_paths:
        return
    values = {"data.input": cfg.data.input, "artifacts.uri": cfg.artifacts.uri, "output.uri": cfg.output.uri}
    local = [k for k in keys if scheme_of(values[k]) in ("", "file", "local")]
    if not local:
        return
    nodes = alive_nodes() if nodes is None else nodes
    if nodes > 1:
        key = local[0]
        raise ConfigError(f"config {key}: {values[key]!r} is a local path, but the Ray cluster has {nodes} nodes "
                          "and each would write to its own disk; use shared storage (s3://..., gs://...) or "
                          "set storage.shared_local_paths=true if the path is one shared filesystem on every node")
