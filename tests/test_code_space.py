"""Codes comparable across model versions, for real: two trainings with different seeds on the sample table
(loopback S3, the session's local Ray), the second aligned to the first (`model.align_to: latest`).

The labelled tables and the figures belong to `make eval` (`--suite codes`, pipeline/codes_evaluation.py).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.alignment import r2_score
from pipeline.config import load_config
from pipeline.jobs import score_job, train_job
from pipeline.manifest import MANIFEST, WEIGHTS
from pipeline.sample import write_sample
from tests.procs import read_parquet_dir

pytestmark = pytest.mark.integration


def config(bucket: str, endpoint: str, run: str, *extra: str):
    return load_config("jobs/configs/tiny.yaml", [
        f"data.input=s3://{bucket}/input", f"artifacts.uri=s3://{bucket}/artifacts",
        f"output.uri=s3://{bucket}/output-{run}", f"storage.endpoint_url={endpoint}", f"run.name={run}",
        "model.latent_dim=3", "model.hidden_dims=[32]", "model.ensemble=1", "train.epochs=8",
        "train.num_workers=1", "train.cpus_per_worker=1", *extra])


def scored(storage, uri: str) -> pa.Table:
    return read_parquet_dir(storage, uri).sort_by("id")


def test_a_retrain_aligned_to_the_previous_model_keeps_a_downstream_model_working(ray_cluster, s3_server, bucket,
                                                                                 storage):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    write_sample(f"s3://{bucket}/input", storage, rows=6000, shards=2, features=16, seed=3)
    t1 = train_job(config(bucket, s3_server, "v1", "run.seed=0"), storage)
    assert t1.code_space == t1.model_version and t1.alignment_r2 is None  # the first model starts the space
    t2 = train_job(config(bucket, s3_server, "v2", "run.seed=1"), storage)
    assert t2.manifest["code_alignment"]["aligned_to"].endswith("/artifacts/v1")
    assert t2.code_space == t1.model_version and t2.alignment_r2 >= 0.9, t2.manifest["code_alignment"]["line"]

    s1 = score_job(config(bucket, s3_server, "v1"), storage)
    s2 = score_job(config(bucket, s3_server, "v2"), storage)
    o1, o2 = scored(storage, s1.output_uri), scored(storage, s2.output_uri)
    assert set(o1.column("code_space").to_pylist()) == set(o2.column("code_space").to_pylist()) == {t1.model_version}
    assert set(o2.column("model_version").to_pylist()) == {t2.model_version}
    h1, h2 = (np.asarray(o.column("latent").to_pylist()) for o in (o1, o2))
    assert r2_score(h2, h1) >= 0.9  # the same rows' codes agree

    # a downstream model trained on v1's codes: a tercile of the first feature, from the code
    inp = scored(storage, f"s3://{bucket}/input")  # rows in id order, as both outputs
    assert inp.column("id").equals(o1.column("id")) and o1.column("id").equals(o2.column("id"))
    feats = np.asarray(inp.column("features").to_pylist())[:, 0]
    y = np.digitize(feats, np.quantile(feats, [1 / 3, 2 / 3]))
    train = np.arange(len(y)) % 10 < 7
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(h1[train], y[train])
    on_v1 = balanced_accuracy_score(y[~train], probe.predict(h1[~train]))
    on_v2 = balanced_accuracy_score(y[~train], probe.predict(h2[~train]))
    assert on_v1 > 0.6 and on_v2 >= 0.95 * on_v1, (on_v1, on_v2)

    # the same model without its map: the same anomaly scores, its own code, its own code space
    for name in (WEIGHTS, MANIFEST):
        blob = storage.read_bytes(f"s3://{bucket}/artifacts/v2/model/{name}")
        storage.write_bytes(f"s3://{bucket}/artifacts/v2-own/model/{name}", blob)
    own = storage.read_json(f"s3://{bucket}/artifacts/v2-own/model/{MANIFEST}")
    own.pop("code_space"), own.pop("code_alignment")  # what a model saved before alignment holds
    storage.write_json(f"s3://{bucket}/artifacts/v2-own/model/{MANIFEST}", own)
    s3 = score_job(config(bucket, s3_server, "v2-own"), storage, model_run="v2-own")
    o3 = scored(storage, s3.output_uri)
    np.testing.assert_array_equal(o3.column("recon_error").to_numpy(), o2.column("recon_error").to_numpy())
    assert o3.column("is_anomaly").equals(o2.column("is_anomaly"))
    assert set(o3.column("code_space").to_pylist()) == {t2.model_version}
    assert r2_score(np.asarray(o3.column("latent").to_pylist()), h1) < r2_score(h2, h1)
