"""The small job configurations the integration tests run, and how the session trains one model per
configuration (the `trained_model` fixture in tests/conftest.py): once, on the session's Ray, used read-only
by every test that scores with it, tampers with a copy of it, or compares a resumed run against it.

    s3-vector   `base_args`' config: 6000 rows x 16 features as one vector column on the loopback S3
                server, 1 training worker, 6 epochs (the fault, input-check and artifact tests)
    local-ops   `ops_config`: 3000 rows x 16 features in local files, a reconstruction score and every
                optional output column (tests/test_operations.py)
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import DataSection
from tests.procs import ROOT, create_bucket, manifest

ROWS, SHARDS, FEATURES = 6000, 4, 16
RUN_DATE = "2026-01-02"  # scoring output goes to <output.uri>/run_date=RUN_DATE/
PART = f"run_date={RUN_DATE}"


def vector_data(**kw) -> DataSection:
    """A data section for the vector layout (one `features` list column, `id` the key), set explicitly: the
    defaults (`auto`) are resolved from an input's schema, which the unit tests that use this skip."""
    return DataSection(**{"features": "features", "id_columns": ["id"], **kw})


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
    out_args = ["--config", str(ROOT / "jobs/configs/tiny.yaml")]
    for k, v in sets.items():
        out_args += ["--set", f"{k}={v}"]
    return out_args


def write_input(storage, bucket: str, prefix: str = "in", rows: int = ROWS, shards: int = SHARDS,
                features: int = FEATURES, layout: str = "vector") -> list[str]:
    from pipeline.sample import write_sample

    return write_sample(f"s3://{bucket}/{prefix}", storage, rows=rows, shards=shards, features=features,
                        layout=layout)


def ops_config(tmp: Path, **more: str):
    sets = {
        "run.name": "ops", "data.input": str(tmp / "data"), "data.features": "features",
        "data.timestamp_column": "event_time",
        "model.hidden_dims": "[32, 16]", "model.latent_dim": "4", "train.epochs": "3", "train.batch_size": "128",
        "model.score": "recon",  # the checks read anomaly_score as recon_error, the mean of feature_errors
        "train.lr": "0.003", "train.num_workers": "1", "train.cpus_per_worker": "1",
        "artifacts.uri": str(tmp / "artifacts"), "output.uri": str(tmp / "output"),
        "output.flat_latent": "true", "output.feature_errors": "true", "output.top_k_features": "3", **more,
    }
    from pipeline.config import load_config

    return load_config(None, [f"{k}={v}" for k, v in sets.items()])


@dataclass
class TrainedModel:
    """A finished training run the tests share: read it, score with it, copy it; never change it."""
    cfg: Any
    """The run's Config."""
    storage: Any
    """The Storage it was written with."""
    summary: Any
    """train_job's TrainSummary."""
    manifest: dict
    """The model's manifest, as stored."""
    bucket: str = ""
    """s3-vector: the bucket holding its input (`in/`) and artifacts (`artifacts/base/`)."""
    tmp: Path | None = None
    """local-ops: the folder holding its input (`data/`) and artifacts."""


def train_s3_vector(s3_server: str, tmp_path_factory) -> TrainedModel:
    from pipeline.cli import base_parser, config_from_args
    from pipeline.config import StorageSection
    from pipeline.jobs import train_job
    from pipeline.storage import Storage

    bucket = create_bucket(s3_server, "model")
    storage = Storage(StorageSection(endpoint_url=s3_server))
    write_input(storage, bucket)
    cfg = config_from_args(base_parser("").parse_args(base_args(s3_server, bucket)))
    summary = train_job(cfg, storage)
    return TrainedModel(cfg, storage, summary, manifest(s3_server, bucket, "base"), bucket=bucket)


def train_local_ops(s3_server: str, tmp_path_factory) -> TrainedModel:
    from pipeline.config import StorageSection
    from pipeline.jobs import train_job
    from pipeline.sample import write_sample
    from pipeline.storage import Storage

    tmp = tmp_path_factory.mktemp(f"ops-{uuid.uuid4().hex[:6]}")
    local = Storage(StorageSection())
    write_sample(str(tmp / "data"), local, rows=3000, shards=2, features=16, seed=3)
    cfg = ops_config(tmp)
    summary = train_job(cfg, local)
    return TrainedModel(cfg, local, summary, summary.manifest, tmp=tmp)


MODELS = {"s3-vector": train_s3_vector, "local-ops": train_local_ops}
