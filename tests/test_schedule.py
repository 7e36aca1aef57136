"""Unit tests (no Ray) for scheduled runs: run dates, partitions, incremental state, "latest", the optional
explanation columns and the report's numbers. Storage is the real local filesystem under tmp_path."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pyarrow as pa
import pytest

from pipeline.config import DataSection, OutputSection, StorageSection, load_config
from pipeline.errors import ArtifactError, ConfigError, InputError
from pipeline.report import decile_counts, error_histogram, histogram_counts, pca_2d, population_stability_index
from pipeline.schedule import (input_partitions, parse_run_date, plan_incremental, record_scored,
                               resolve_model_run, run_date_uri)
from pipeline.output import explanation_columns, scored_table
from pipeline.storage import Storage


@pytest.fixture
def local():
    return Storage(StorageSection())


def test_run_date_parsing_and_partition_uri(tmp_path):
    assert parse_run_date("2026-01-02") == dt.date(2026, 1, 2)
    assert parse_run_date(None) == dt.datetime.now(dt.timezone.utc).date()
    with pytest.raises(ConfigError, match=r"--run-date '2026-13-01': expected a date as YYYY-MM-DD"):
        parse_run_date("2026-13-01")
    assert run_date_uri("s3://b/scores/", dt.date(2026, 1, 2)) == "s3://b/scores/run_date=2026-01-02"
    assert run_date_uri(str(tmp_path / "o"), dt.date(2026, 1, 2)) == f"{tmp_path}/o/run_date=2026-01-02"


def test_input_partitions_groups_by_first_level_directory():
    files = ["s3://b/in/date=2026-01-02/part-1.parquet", "s3://b/in/date=2026-01-01/part-0.parquet",
             "s3://b/in/date=2026-01-01/hour=3/part-2.parquet"]
    parts = input_partitions("s3://b/in/", files)
    assert list(parts) == ["date=2026-01-01", "date=2026-01-02"]
    assert parts["date=2026-01-01"] == [files[1], files[2]]
    with pytest.raises(InputError, match=r"file s3://b/in/part-9.parquet: not inside a key=value partition"):
        input_partitions("s3://b/in", files + ["s3://b/in/part-9.parquet"])


def test_incremental_plan_skips_scored_partitions_and_redoes_the_same_run_date(tmp_path, local):
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    files = {p: [f"{inp}/{p}/part-0.parquet"] for p in ("date=1", "date=2")}
    all_files = [f for fs in files.values() for f in fs]
    d1, d2 = dt.date(2026, 1, 1), dt.date(2026, 1, 2)

    plan = plan_incremental(local, inp, all_files, out, "m@abc", d1)
    assert list(plan.partitions) == ["date=1", "date=2"] and plan.skipped == []
    record_scored(local, plan, d1, {f: 10 for f in all_files})
    state = json.loads((tmp_path / "out" / "_state" / "m_abc.json").read_text())
    assert state["partitions"]["date=2"] == {"run_date": "2026-01-01", "files": 1, "rows": 10}

    files["date=3"] = [f"{inp}/date=3/part-0.parquet"]
    all_files += files["date=3"]
    plan2 = plan_incremental(local, inp, all_files, out, "m@abc", d2)
    assert list(plan2.partitions) == ["date=3"] and plan2.skipped == ["date=1", "date=2"]
    record_scored(local, plan2, d2, {f: 10 for f in all_files})
    # rerunning d1 gives back d1's partitions (the output partition is replaced, so they must be in it)
    assert list(plan_incremental(local, inp, all_files, out, "m@abc", d1).partitions) == ["date=1", "date=2"]
    # another model version has scored nothing yet
    assert len(plan_incremental(local, inp, all_files, out, "m@def", d2).partitions) == 3


def test_corrupt_state_file_is_a_one_line_error(tmp_path, local):
    (tmp_path / "out" / "_state").mkdir(parents=True)
    (tmp_path / "out" / "_state" / "m_abc.json").write_text("{not json")
    with pytest.raises(InputError, match=r"state file .*m_abc.json: not valid JSON"):
        plan_incremental(local, str(tmp_path / "in"), [f"{tmp_path}/in/d=1/x.parquet"], str(tmp_path / "out"),
                         "m@abc", dt.date(2026, 1, 1))


def _fake_run(root, name, created):
    d = root / name / "model"
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps({"created_at": created}))


def test_latest_is_the_newest_finished_run(tmp_path, local):
    art = tmp_path / "art"
    with pytest.raises(ArtifactError, match=r"--model latest: no finished run under"):
        resolve_model_run(local, str(art), "latest")
    _fake_run(art, "weekly-2026-01-04", "2026-01-04T01:00:00+00:00")
    _fake_run(art, "weekly-2026-01-11", "2026-01-11T01:00:00+00:00")
    _fake_run(art, "a-renamed-old-run", "2025-12-01T00:00:00+00:00")
    (art / "still-training" / "train").mkdir(parents=True)  # no manifest: never "latest"
    assert resolve_model_run(local, str(art), "latest") == f"{art}/weekly-2026-01-11"
    assert resolve_model_run(local, str(art), "weekly-2026-01-04") == f"{art}/weekly-2026-01-04"
    with pytest.raises(ArtifactError, match=r"--model still-training: no finished run at"):
        resolve_model_run(local, str(art), "still-training")


def test_explanation_columns():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(50, 3)).astype(np.float32)
    sq = rng.random(size=(50, 6)).astype(np.float32)
    names = [f"f{i}" for i in range(6)]
    assert explanation_columns(h, sq, names, OutputSection()) == {}
    cols = explanation_columns(h, sq, names, OutputSection(flat_latent=True, feature_errors=True, top_k_features=3))
    assert [f"z_{i}" for i in range(3)] == [k for k in cols if k.startswith("z_")]
    np.testing.assert_array_equal(cols["z_1"].to_numpy(), h[:, 1])
    np.testing.assert_array_equal(np.array(cols["feature_errors"].to_pylist(), np.float32), sq)
    want = [[names[j] for j in np.argsort(-row)[:3]] for row in sq]
    assert cols["top_features"].to_pylist() == want
    # k larger than the feature count is clamped
    assert len(explanation_columns(h, sq, names, OutputSection(top_k_features=9))["top_features"][0]) == 6


def test_scored_rows_carry_their_reconstruction_error_and_their_score_apart():
    """recon_error is the row's mean per-column error; anomaly_score is the model's score, which alone sets
    is_anomaly (a row reconstructed well can still score high: its code lies far out)."""
    errors = np.array([[0.1, 0.3], [4.0, 2.0], [0.2, 0.2]], np.float32)
    score = np.array([0.5, 9.0, 7.0], np.float32)
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    t = scored_table(pa.table({"id": [1, 2, 3]}), score, np.zeros((3, 2), np.float32), errors, ["a", "b"],
                     np.float32(5.0), "m@0", DataSection(id_columns=["id"], timestamp_column=None), OutputSection(),
                     now, now)
    assert t.schema.names[:5] == ["id", "latent", "recon_error", "anomaly_score", "is_anomaly"]
    np.testing.assert_allclose(t.column("recon_error").to_numpy(), [0.2, 3.0, 0.2], rtol=1e-6)
    np.testing.assert_array_equal(t.column("anomaly_score").to_numpy(), score)
    assert t.column("is_anomaly").to_pylist() == [False, True, True]  # row 3: small error, high score


def test_output_config_fields_are_checked():
    with pytest.raises(ConfigError, match=r"config output.top_k_features: -1 must be >= 0"):
        load_config(None, ["output.top_k_features=-1"])
    with pytest.raises(ConfigError, match=r"config output.flat_latent: expected true or false"):
        load_config(None, ["output.flat_latent=3"])
    with pytest.raises(ConfigError, match=r"config output.file_mb: 0.0 must be > 0"):
        load_config(None, ["output.file_mb=0"])
    cfg = load_config("jobs/configs/prod.yaml")
    assert cfg.score.incremental and cfg.output.uri.startswith("s3://")


def test_report_numbers():
    rng = np.random.default_rng(1)
    s = rng.lognormal(mean=-2, sigma=0.5, size=5000)
    hist = error_histogram(s)
    assert sum(hist["counts"]) == 5000 and hist["edges"][0] < s.min() and hist["edges"][-1] > s.max()
    # values outside the edges land in the end bins rather than vanish
    c = histogram_counts(np.array([0.0, 1e9, np.median(s)]), hist["edges"])
    assert c.sum() == 3 and c[0] == 1 and c[-1] == 1
    # the drift index over the training deciles: small for a fresh sample of the same distribution even when
    # the training sample is small, large for a shifted one
    small = error_histogram(rng.lognormal(-2, 0.5, 400))
    assert decile_counts(rng.lognormal(-2, 0.5, 400), small["deciles"]).sum() == 400
    same = decile_counts(rng.lognormal(-2, 0.5, 5000), small["deciles"])
    shifted = decile_counts(rng.lognormal(-1.5, 0.5, 5000), small["deciles"])
    assert population_stability_index(np.ones(10), same) < 0.1
    assert population_stability_index(np.ones(10), shifted) > 0.25
    # PCA keeps the direction of largest variance on the first axis
    pts = np.c_[rng.normal(scale=10, size=500), rng.normal(scale=1, size=500), rng.normal(scale=0.1, size=500)]
    p = pca_2d(pts)
    assert p.shape == (500, 2) and p[:, 0].std() > 5 * p[:, 1].std()
    assert pca_2d(pts[:, :1]).shape == (500, 2)
