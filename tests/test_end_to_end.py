"""The whole path through s3:// on the loopback S3 server and a real local Ray: train, score, check output."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.errors import InputError
from pipeline.jobs import score_job, train_job
from pipeline.metrics import auroc, evaluate_against_truth
from pipeline.sample import write_sample
from tests.procs import job_env, read_parquet_dir, run_job

pytestmark = pytest.mark.integration


def s3_config(bucket: str, endpoint: str, *extra: str):
    return load_config("jobs/configs/tiny.yaml", [
        f"data.input=s3://{bucket}/input", f"artifacts.uri=s3://{bucket}/artifacts",
        f"output.uri=s3://{bucket}/output", f"storage.endpoint_url={endpoint}", "run.name=e2e",
        "train.epochs=6", "train.num_workers=2", "train.cpus_per_worker=0.5", *extra])


def test_train_and_score_through_s3(ray_cluster, s3_server, bucket, storage):
    write_sample(f"s3://{bucket}/input", storage, rows=6000, shards=3, features=16, seed=3)
    cfg = s3_config(bucket, s3_server)

    t = train_job(cfg, storage)
    assert t.train_rows + t.validation_rows == 6000
    assert 450 < t.validation_rows < 750
    assert t.best_val_loss < t.first_val_loss * 0.7, "validation loss did not fall"
    manifest = storage.read_json(f"s3://{bucket}/artifacts/e2e/model/manifest.json")
    assert manifest["feature_names"] == [f"features[{i}]" for i in range(16)]
    assert len(manifest["normalization"]["mean"]) == 16 and manifest["threshold"] == pytest.approx(t.threshold)
    assert manifest["threshold_quantile"] == 0.99 and manifest["versions"]["ray"].startswith("2.60")
    assert len(manifest["history"]) == t.epochs_run
    assert storage.list_files(f"s3://{bucket}/artifacts/e2e/train"), "no checkpoints in artifact storage"

    s = score_job(cfg, storage)
    assert s.input_rows == s.scored_rows == 6000 and s.rejected_rows == 0
    out = read_parquet_dir(storage, f"s3://{bucket}/output")
    assert out.num_rows == 6000
    assert out.schema.field("latent").type == pa.list_(pa.float32())
    assert out.schema.field("recon_error").type == out.schema.field("anomaly_score").type == pa.float32()
    assert out.schema.field("is_anomaly").type == pa.bool_()
    assert out.schema.field("model_version").type == pa.string()
    assert out.schema.field("event_timestamp").type == pa.timestamp("us", tz="UTC")
    assert out.schema.field("scored_at").type == pa.timestamp("us", tz="UTC")
    assert out.column_names[0] == "id"
    ids = out.column("id").to_numpy()
    assert len(np.unique(ids)) == 6000 and ids.min() == 0 and ids.max() == 5999  # every row exactly once
    assert set(len(v) for v in out.column("latent").to_pylist()[:100]) == {cfg.model.latent_dim}
    assert set(out.column("model_version").to_pylist()) == {manifest["model_version"]}
    # event_timestamp is the input's own event time
    inp = read_parquet_dir(storage, f"s3://{bucket}/input").select(["id", "event_time"]).join(
        out.select(["id", "event_timestamp"]), keys="id")
    assert inp.column("event_time").equals(inp.column("event_timestamp"))

    assert s.output_uri.startswith(f"s3://{bucket}/output/run_date=")
    success = storage.read_json(f"{s.output_uri}/_SUCCESS")
    assert success["input_rows"] == success["scored_rows"] + success["rejected_rows"] == 6000
    assert success["model_version"] == manifest["model_version"]
    assert not storage.exists(f"{s.output_uri}/_staging")

    ev = evaluate_against_truth(cfg, storage, s.output_uri)
    assert ev["planted"] > 20
    assert ev["auroc"] >= 0.9, ev


def test_scalar_columns_without_timestamp_locally(ray_cluster, storage, tmp_path):
    """Features as separate numeric columns, local paths, no event-time column: as-of time is used."""
    write_sample(str(tmp_path / "in"), storage, rows=3000, shards=2, features=8, layout="columns", seed=5)
    cfg = load_config("jobs/configs/tiny.yaml", [
        f"data.input={tmp_path / 'in'}", f"data.features=[{', '.join(f'f{j:02d}' for j in range(8))}]",
        "data.timestamp_column=null", f"artifacts.uri={tmp_path / 'art'}", f"output.uri={tmp_path / 'out'}",
        "run.name=cols", "train.epochs=4", "train.num_workers=1", "train.cpus_per_worker=0.5",
        "model.hidden_dims=[16]", "model.latent_dim=3"])
    train_job(cfg, storage)
    s = score_job(cfg, storage)
    out = pq.read_table(tmp_path / "out")
    assert out.num_rows == s.scored_rows == 3000
    assert len(set(out.column("event_timestamp").to_pylist())) == 1
    truth = pq.read_table(tmp_path / "in", columns=["id", "is_anomaly_truth"]).join(
        out.select(["id", "anomaly_score"]), keys="id")
    assert auroc(truth.column("anomaly_score").to_numpy(), truth.column("is_anomaly_truth").to_numpy()) >= 0.85


def test_cli_run_through_s3(s3_server, bucket, storage, tmp_path):
    """`python -m jobs.run` as a user runs it: its own local Ray, s3:// everywhere, endpoint from the env."""
    write_sample(f"s3://{bucket}/input", storage, rows=3000, shards=2, features=8, seed=9)
    env = job_env(s3_server)
    args = ["--config", "jobs/configs/tiny.yaml", "--set", f"data.input=s3://{bucket}/input",
            "--set", f"artifacts.uri=s3://{bucket}/artifacts", "--set", f"output.uri=s3://{bucket}/output",
            "--set", "run.name=cli", "--set", "train.epochs=3", "--set", "train.num_workers=1",
            "--set", "model.latent_dim=4"]  # dense must be undercomplete: 8 features
    p = run_job("jobs.run", *args, "--run-date", "2026-03-04", env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "== summary ==" in p.stdout and "AUROC" in p.stdout
    assert "[train] epoch 3/3" in p.stdout + p.stderr
    assert json.loads(storage.read_bytes(f"s3://{bucket}/output/run_date=2026-03-04/_SUCCESS"))["scored_rows"] == 3000

    again = run_job("jobs.train", *args, env=env)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines()[-1].startswith("error: run cli: already trained")

    bad = run_job("jobs.train", *args, "--set", "train.epochz=3", env=env)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("error: config train.epochz: unknown key (known: algorithm, batch_size,")
    assert len(bad.stderr.strip().splitlines()) == 1


def test_only_the_input_set_on_a_one_feature_table_without_ids(ray_cluster, storage, tmp_path, capsys):
    """A user sets the input and nothing else, on the narrowest table: one numeric column, no id column, and
    columns that cannot be features (two dates, so no event time either, bytes, and a DataFrame index pandas
    wrote). Those are left out and named, the rows are split by their place, the code is as wide as the input,
    and the planted extreme values rank first."""
    from pipeline.config import config_from_dict

    rng = np.random.default_rng(1)
    x, truth = rng.normal(size=3000), np.zeros(3000, bool)
    planted = rng.choice(3000, 30, replace=False)
    truth[planted], x[planted] = True, rng.choice([-1, 1], 30) * rng.uniform(3.5, 6, 30)
    (tmp_path / "in").mkdir()
    days = pa.array(rng.integers(0, 9000, 3000).astype("datetime64[D]"))
    seen = pa.array(rng.integers(0, 10**12, 3000), pa.timestamp("ms"))
    # and the index pandas writes beside a filtered frame's columns, as its metadata lists it
    table = pa.table({"x": x, "opened": days, "seen": seen, "blob": pa.array([b"\x00"] * 3000),
                      "__index_level_0__": np.arange(3000) * 2})
    pandas_meta = {"index_columns": ["__index_level_0__"], "columns": [], "pandas_version": "3.0.0"}
    pq.write_table(table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()}),
                   tmp_path / "in" / "part-0.parquet")
    cfg = config_from_dict({"data": {"input": str(tmp_path / "in")}, "artifacts": {"uri": str(tmp_path / "a")},
                            "output": {"uri": str(tmp_path / "o")}, "train": {"cpus_per_worker": 0.5}})
    t = train_job(cfg, storage)
    assert t.manifest["feature_names"] == ["x"] and t.manifest["latent_dim"] == 1
    assert 0.07 < t.manifest["data"]["validation_rows"] / 3000 < 0.13  # about 10%, not clumped
    printed = capsys.readouterr().out
    assert ("[train] left out of the features: opened (date32[day]), seen (timestamp[ms]), blob (binary), "
            "__index_level_0__ (pandas index)") in printed
    assert "[train] event time: the run's as-of time (data.timestamp_column auto: the input has 2" in printed
    s = score_job(cfg, storage)
    assert s.scored_rows == 3000 and s.flagged_note is None  # about the threshold's 1% flagged, and the planted 1%
    out = read_parquet_dir(storage, str(tmp_path / "o"))
    assert out.column_names[0] == "latent"  # no id columns to copy
    assert len(set(out.column("event_timestamp").to_pylist())) == 1  # the run's as-of time, not a column's
    assert auroc(out.column("anomaly_score").to_numpy(), truth) > 0.99  # one file, so the output keeps its order
    # an input shifted since training: far more rows flagged than the threshold expects, and the job says so
    (tmp_path / "shifted").mkdir()
    pq.write_table(pa.table({"x": x + 8.0}), tmp_path / "shifted" / "part-0.parquet")
    shifted = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, input=str(tmp_path / "shifted")),
                                  output=dataclasses.replace(cfg.output, uri=str(tmp_path / "o2")))
    s = score_job(shifted, storage)
    assert s.anomalies > 0.5 * 3000 and s.flagged_note.startswith(f"{s.anomalies / 3000:.0%} of the rows flagged")
    assert "about 1% of rows like those" in s.flagged_note and "shifted since training" in s.flagged_note


def test_defaults_work_on_a_few_hundred_rows(ray_cluster, storage, tmp_path):
    """Untuned defaults on tiny data: the batch size drops so training still takes enough steps."""
    from pipeline.config import config_from_dict

    write_sample(str(tmp_path / "in"), storage, rows=400, shards=1, features=12, seed=11)
    cfg = config_from_dict({"data": {"input": str(tmp_path / "in"), "features": "features"},
                            "artifacts": {"uri": str(tmp_path / "a")}, "output": {"uri": str(tmp_path / "o")},
                            "run": {"name": "tiny"},
                            "train": {"cpus_per_worker": 0.5, "epochs": 5}})
    t = train_job(cfg, storage)
    assert t.manifest["metrics"]["batch_size"] < cfg.train.batch_size
    assert t.best_val_loss < t.first_val_loss
    assert score_job(cfg, storage).scored_rows == 400
    # three rows whose ids all hash to training (the default's 30%): the row at the split's end is held out for
    # validation instead, and the job trains and scores them; a single row has nothing to split and is refused
    (tmp_path / "three").mkdir()
    pq.write_table(pa.table({"id": [0, 1, 2], "x": [1.0, 2.0, 4.0], "y": [2.0, 1.0, 0.0]}),
                   tmp_path / "three" / "part-0.parquet")
    three = config_from_dict({"data": {"input": str(tmp_path / "three")}, "artifacts": {"uri": str(tmp_path / "a3")},
                              "output": {"uri": str(tmp_path / "o3")}, "train": {"cpus_per_worker": 0.5, "epochs": 2}})
    t3 = train_job(three, storage)
    assert (t3.manifest["data"]["train_rows"], t3.manifest["data"]["validation_rows"]) == (2, 1)
    assert 0.3 < t3.manifest["data"]["validation_fraction"] < 1
    assert score_job(three, storage).scored_rows == 3
    (tmp_path / "one").mkdir()
    pq.write_table(pa.table({"id": [0], "x": [1.0], "y": [2.0]}), tmp_path / "one" / "part-0.parquet")
    one = config_from_dict({"data": {"input": str(tmp_path / "one")}, "artifacts": {"uri": str(tmp_path / "a1")},
                            "output": {"uri": str(tmp_path / "o1")}, "train": {"cpus_per_worker": 0.5}})
    with pytest.raises(InputError, match=r"one: 1 row to learn from \(0 rejected\); the job needs two or more, at "
                                         r"least one to train on and one to validate on"):
        train_job(one, storage)
    pq.write_table(pa.table({"id": [4, 4, 4], "x": [1.0, 2.0, 4.0]}), tmp_path / "one" / "part-0.parquet")
    with pytest.raises(InputError, match=r"one: all 3 rows share one key in data.id_columns \(id\), so the split "
                                         r"cannot hold any out; set data.id_columns"):
        train_job(one, storage)
    assert not storage.exists(str(tmp_path / "a1" / one.run.name / "model"))
