"""The multi-node storage rule (pipeline/multinode.py) without a cluster: the node count is given."""

from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.multinode import check_shared_storage


def cfg(**sets):
    return load_config(None, [f"{k}={v}" for k, v in sets.items()])


@pytest.mark.parametrize("key", ["artifacts.uri", "output.uri", "data.input"])
def test_a_local_path_is_refused_on_more_than_one_node_naming_the_key(key):
    c = cfg(**{"data.input": "s3://b/in", "artifacts.uri": "s3://b/art", "output.uri": "gs://b/out", key: "/mnt/x"})
    with pytest.raises(ConfigError, match=rf"^config {key}: '/mnt/x' is a local path, but the Ray cluster has 3 nodes"):
        check_shared_storage(c, nodes=3)
    check_shared_storage(c, nodes=1)  # one node: a local path is shared by every worker
    check_shared_storage(c, keys=tuple(k for k in ("data.input", "artifacts.uri", "output.uri") if k != key), nodes=3)


def test_object_storage_passes_and_a_declared_shared_mount_is_allowed():
    check_shared_storage(cfg(**{"data.input": "s3://b/in", "artifacts.uri": "s3://b/a", "output.uri": "s3://b/o"}),
                         nodes=5)
    check_shared_storage(cfg(**{"storage.shared_local_paths": "true", "artifacts.uri": "file:///nfs/a"}), nodes=5)
    with pytest.raises(ConfigError, match="artifacts.uri"):
        check_shared_storage(cfg(**{"data.input": "s3://b/in", "artifacts.uri": "file:///nfs/a"}), nodes=2)


def test_min_workers_is_checked_against_num_workers_and_needs_gpus():
    assert cfg(**{"train.num_workers": 4, "train.min_workers": 2, "train.use_gpu": "true"}).train.min_workers == 2
    assert cfg(**{"train.num_workers": 2, "train.min_workers": 2}).train.min_workers == 2  # not elastic
    with pytest.raises(ConfigError, match="train.min_workers"):
        cfg(**{"train.num_workers": 2, "train.min_workers": 3, "train.use_gpu": "true"})
    # CPU workers: Ray Train's elastic restart takes every CPU and Ray Data waits forever (test_multinode setup)
    with pytest.raises(ConfigError, match="train.min_workers: elastic training needs train.use_gpu"):
        cfg(**{"train.num_workers": 2, "train.min_workers": 1})
