"""The structure the benchmark's figures rest on: how data is read and how scoring is planned on a real local
Ray, and what a scoring worker loads. Speed itself is measured by `make bench`, not asserted here."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
from contextlib import redirect_stdout

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import predictor as predictor_mod
from pipeline import score as score_mod
from pipeline import scorer as scorer_mod
from pipeline.artifacts import save_artifact
from pipeline.config import Config, DataSection, ModelSection, ScoreSection, StorageSection
from pipeline.inputs import inspect_input
from pipeline.read import read_dataset
from pipeline.errors import ConfigError
from pipeline.models import build_model
from pipeline.sample import write_sample
from pipeline.shards import PATH_COLUMN
from pipeline.storage import Storage

DATA = dict(features="features", id_columns=["id"], timestamp_column="event_time")


def _spec(tmp_path, rows=4000, shards=4):
    storage = Storage(StorageSection())
    uri = str(tmp_path / "in")
    write_sample(uri, storage, rows=rows, shards=shards, features=8)
    data = DataSection(input=uri, **DATA)
    return storage, data, inspect_input(data, storage)


@pytest.mark.integration
def test_read_dataset_reads_each_file_in_its_own_task_and_block(tmp_path, ray_cluster):
    # Ray 2.60's default reader planned every file into one task and one block (no parallel reads, memory
    # growing with the input); the pipeline's reader must give a block per file.
    storage, _, spec = _spec(tmp_path, rows=4000, shards=4)
    ds = read_dataset(spec, storage).materialize()
    assert ds.num_blocks() == 4
    assert ds.count() == 4000
    assert set(ds.columns()) == set(spec.columns) | {PATH_COLUMN}
    files = {r[PATH_COLUMN] for r in ds.select_columns([PATH_COLUMN]).take_all()}
    assert len(files) == 4
    assert set(read_dataset(spec, storage, with_paths=False).columns()) == set(spec.columns)


@pytest.mark.integration
def test_read_dataset_returns_once_its_sampling_tasks_have_freed_their_cpus(tmp_path, ray_cluster):
    """read_parquet samples two files in 1-CPU tasks. A dataset started right after saw their CPUs still taken,
    and Ray Data warned that the cluster had no CPUs and the job would hang (4 tries in 25 on `make run`'s 2
    CPUs). read_dataset returns once the CPUs free before it are free again."""
    import ray

    storage, _, spec = _spec(tmp_path, rows=400, shards=4)
    for _ in range(10):
        before = ray.available_resources().get("CPU", 0.0)
        read_dataset(spec, storage)
        assert ray.available_resources().get("CPU", 0.0) >= before


def _plan(ds) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        ds.explain()
    text = out.getvalue()
    return text[text.index("Physical Plan (Optimized)"):]


def _save_model(storage, spec, run_uri: str) -> None:
    settings = dataclasses.asdict(ModelSection(hidden_dims=[8], latent_dim=2))
    save_artifact(storage, run_uri, build_model(spec.num_features, **settings), {
        "run_name": "perf", "n_features": spec.num_features, "feature_names": spec.feature_names,
        "latent_dim": 2, "model": settings,
        "normalization": {"mean": [0.0] * spec.num_features, "scale": [1.0] * spec.num_features},
        "threshold": 1.0,
    })


@pytest.mark.integration
def test_cpu_scoring_runs_read_and_score_in_one_task_and_gpu_scoring_in_actors(tmp_path, ray_cluster):
    storage, data, spec = _spec(tmp_path)
    cfg = Config(data=data, score=ScoreSection(concurrency=2, cpus_per_actor=0.5))
    now = dt.datetime.now(dt.timezone.utc)
    run_uri = str(tmp_path / "model-run")
    _save_model(storage, spec, run_uri)
    ds, write_args = score_mod.scoring_dataset(cfg, storage, spec, run_uri, now)
    # concurrency x CPUs for scoring, and one write beside it
    assert ds.context.execution_options.resource_limits.cpu == pytest.approx(1.0 + score_mod.WRITE_CPUS)
    # the plan that ran: read and score fused into one operator (one task per file); the write apart, so a
    # write task holds about output.file_mb of scored rows, not a whole input file's
    ds.write_parquet(str(tmp_path / "out"), **write_args)
    ran = [line for line in ds.stats().splitlines() if line.startswith("Operator ")]
    assert len(ran) == 2 and "ReadParquet->MapBatches(ScoreBatches):" in ran[0] and "Write:" in ran[1], ds.stats()
    assert pq.read_table(tmp_path / "out").num_rows == spec.num_rows
    # small scored blocks are gathered into files of about output.file_mb, not one file per block
    assert len(list((tmp_path / "out").glob("*.parquet"))) < len(spec.files)

    actors = dataclasses.replace(cfg, score=ScoreSection(compute="actors"))
    ds, write_args = score_mod.scoring_dataset(actors, storage, spec, str(tmp_path / "model-run"), now)
    assert "ActorPoolMapOperator" in _plan(ds)
    assert write_args == {"min_bytes_per_file": int(cfg.output.file_mb * 2**20)}  # the write: Ray's own tasks


def test_score_compute_setting_is_checked():
    assert ScoreSection().uses_actors is False
    assert ScoreSection(use_gpu=True).uses_actors is True
    assert ScoreSection(compute="actors").uses_actors is True
    with pytest.raises(ConfigError, match="score.compute"):
        ScoreSection(compute="threads")
    with pytest.raises(ConfigError, match="score.compute"):
        ScoreSection(compute="tasks", use_gpu=True)


def test_a_scoring_worker_loads_the_model_once_per_run(tmp_path, monkeypatch):
    storage, data, spec = _spec(tmp_path, rows=1000, shards=1)
    run_uri = str(tmp_path / "run")
    _save_model(storage, spec, run_uri)
    loads = []
    real_load = predictor_mod.load_artifact
    monkeypatch.setattr(predictor_mod, "load_artifact", lambda *a, **k: loads.append(a[1]) or real_load(*a, **k))
    monkeypatch.setattr(predictor_mod, "_CACHED", {})
    table = pq.read_table(spec.files[0], columns=spec.columns)
    now = dt.datetime.now(dt.timezone.utc)

    fn = scorer_mod.ScoreBatches(storage, run_uri, data, now, batch_size=300, run_id="run-1")
    out = [fn(table), fn(table)]
    assert loads == [run_uri]  # the second block reuses the loaded model
    assert all(o.num_rows == table.num_rows for o in out)  # sliced into batches of 300, put back in order
    assert all(c.num_chunks == 1 for c in out[0].columns)  # one chunk: one Parquet row group, not one per slice
    assert out[0].column("id").to_pylist() == table.column("id").to_pylist()
    for col in ("recon_error", "anomaly_score"):
        np.testing.assert_allclose(out[0].column(col).to_numpy(), out[1].column(col).to_numpy())

    scorer_mod.ScoreBatches(storage, run_uri, data, now, batch_size=300, run_id="run-2")(table)
    assert loads == [run_uri, run_uri]  # a new run never reuses an earlier run's model
    assert len(predictor_mod._CACHED) == 1
