"""Integration: one small model trained on a real local Ray (the session's `local-ops` model), then what
operations need from it — the training and scoring reports, Feast-ready output read back by real Feast,
nightly incremental scoring on the loopback S3 server with `--model latest`, and the `--dry-run` / flag
errors of the entrypoints."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.jobs import score_job
from pipeline.metrics import TRUTH_COLUMN
from pipeline.sample import write_sample
from pipeline.schedule import report_uri
from pipeline.storage import Storage
from tests.models import ops_config
from tests.procs import ROOT, job_env, private_ray_tmpdir, run_job

# The first test waits on the module's training run; on a loaded 2-core CI box that can pass 10 minutes.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]
D1 = dt.date(2026, 1, 1)
FEAST_PYTHON = ROOT / ".venv-feast" / "bin" / "python"


@pytest.fixture(scope="module")
def trained(trained_model):
    """The session's local-ops model (tests/models.py), scored once here for the tests that read its output."""
    m = trained_model("local-ops")
    s = score_job(m.cfg, m.storage, run_date=D1)
    return {"tmp": m.tmp, "cfg": m.cfg, "train": m.summary, "score": s, "storage": m.storage}


def test_training_report_is_written_next_to_the_model_and_renders(trained, render_page):
    page = Path(trained["cfg"].run_uri) / "report.html"
    html = page.read_text()
    for heading in ("Loss per epoch", "Validation reconstruction errors", "Per-feature mean error",
                    "Latent codes (2-D PCA)", "planted truth"):
        assert heading in html
    assert trained["train"].model_version in html
    assert render_page(page) == {"images": "4", "loaded": "4", "errors": "0", "text": "rendered"}
    hist = trained["train"].manifest["validation_error_histogram"]
    assert sum(hist["counts"]) == trained["train"].validation_rows


def test_scoring_report_compares_with_training(trained, render_page):
    s = trained["score"]
    page = Path(report_uri(trained["cfg"].output.uri, D1))
    html = page.read_text()
    assert f"<th>anomalies</th><td>{s.anomalies} (" in html and "PSI" in html
    assert "against the validation rows the model was trained with" in html
    assert render_page(page) == {"images": "1", "loaded": "1", "errors": "0", "text": "rendered"}


def test_output_is_one_run_date_partition_with_feast_ready_columns(trained):
    s, cfg = trained["score"], trained["cfg"]
    assert s.output_uri.endswith("/output/run_date=2026-01-01")
    assert (Path(s.output_uri) / "_SUCCESS").exists()
    t = pq.read_table(s.output_uri)
    assert t.num_rows == 3000
    types = dict(zip(t.schema.names, t.schema.types))
    assert types["id"] == pa.int64() and types["latent"] == pa.list_(pa.float32())
    assert types["event_timestamp"] == pa.timestamp("us", tz="UTC") and types["scored_at"] == types["event_timestamp"]
    assert types["feature_errors"] == pa.list_(pa.float32()) and types["top_features"] == pa.list_(pa.string())
    assert [c for c in t.schema.names if c.startswith("z_")] == ["z_0", "z_1", "z_2", "z_3"]
    latent = np.array(t.column("latent").to_pylist(), np.float32)
    np.testing.assert_array_equal(latent[:, 2], t.column("z_2").to_numpy())
    fe = np.array(t.column("feature_errors").to_pylist(), np.float32)
    assert fe.shape == (3000, 16)
    # recon_error is the mean of the per-feature errors (with model.score: recon, the anomaly score too);
    # top_features are the largest of them, largest first
    np.testing.assert_allclose(fe.mean(axis=1), t.column("recon_error").to_numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(t.column("anomaly_score").to_numpy(), t.column("recon_error").to_numpy(), rtol=1e-5)
    names = trained["train"].manifest["feature_names"]
    want = [[names[j] for j in np.argsort(-row, kind="stable")[:3]] for row in fe[:200]]
    assert t.column("top_features").to_pylist()[:200] == want
    # what a person investigating an anomaly wants: the planted anomalies' top feature errors are large
    truth = pq.read_table(cfg.data.input, columns=["id", TRUTH_COLUMN]).join(t.select(["id", "recon_error"]), "id")
    flag = truth.column(TRUTH_COLUMN).to_numpy(zero_copy_only=False)
    err = truth.column("recon_error").to_numpy()
    assert err[flag].mean() > 3 * err[~flag].mean()


def test_feast_reads_back_what_the_pipeline_wrote(trained, tmp_path):
    assert FEAST_PYTHON.exists(), f"{FEAST_PYTHON} missing: run `make feast-env` (make test does)"
    repo = tmp_path / "feast"
    subprocess.run(["cp", "-r", str(ROOT / "infra" / "feast"), str(repo)], check=True)
    out = pq.read_table(trained["score"].output_uri)
    rows = out.slice(0, 40).to_pylist()
    req = {"ids": [r["id"] for r in rows], "event_timestamps": [r["event_timestamp"].isoformat() for r in rows],
           "materialize_start": "2025-01-01T00:00:00+00:00",
           "materialize_end": dt.datetime.now(dt.timezone.utc).isoformat()}
    (tmp_path / "req.json").write_text(json.dumps(req))
    env = job_env()
    env["SCORES_URI"] = str(Path(trained["cfg"].output.uri)) + "/"
    proc = subprocess.run([str(FEAST_PYTHON), str(ROOT / "tests" / "helpers" / "feast_roundtrip.py"), str(repo),
                           str(tmp_path / "req.json"), str(tmp_path / "res.json")], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "res.json").read_text())
    for kind in ("historical", "online"):
        got = res[kind]
        assert len(got) == len(rows), kind
        for r in rows:
            g = got[str(r["id"])]
            np.testing.assert_allclose(g["latent"], r["latent"], rtol=1e-6, err_msg=kind)
            assert g["recon_error"] == pytest.approx(r["recon_error"], rel=1e-6), kind
            assert g["anomaly_score"] == pytest.approx(r["anomaly_score"], rel=1e-6), kind
            assert g["is_anomaly"] == r["is_anomaly"] and g["top_features"] == r["top_features"], kind
            assert g["model_version"] == trained["train"].model_version, kind
            assert g["code_space"] == r["code_space"] == trained["train"].code_space, kind


# What Ray prints that a person running a job should not have to read: per-report and per-checkpoint lines
# of Ray Train, Ray Data's execution plan per dataset, and core-worker lines that read like failures.
RAY_NOISE = ["Reporting training result", "Checkpoint successfully created at", "Starting execution of Dataset",
             "Execution plan of Dataset", "has constructor arguments in the object store",
             "Estimated parquet encoding ratio", "Failed to query Ray Train Controller actor state"]


def test_a_training_run_prints_its_epochs_once_and_none_of_rays_chatter(trained, ray_address, tmp_path):
    cfg = trained["cfg"]
    args = ["--config", "jobs/configs/tiny.yaml", "--set", f"data.input={cfg.data.input}",
            "--set", f"artifacts.uri={tmp_path / 'artifacts'}", "--set", "run.name=logs", "--set", "run.num_cpus=2",
            "--set", "train.epochs=2", "--set", "train.cpus_per_worker=0.5", "--set", "model.hidden_dims=[16]",
            "--set", "model.latent_dim=4"]
    with private_ray_tmpdir("ops-ray-") as ray_tmp:
        env = job_env(ray_tmpdir=ray_tmp)
        p = run_job("jobs.train", *args, env=env, timeout=900)
        # (scoring joins the session's Ray: what --verbose shows is the driver's)
        verbose = run_job("jobs.score", *args, "--set", f"output.uri={tmp_path / 'out'}", "--verbose",
                          env={**env, "RAY_ADDRESS": ray_address}, timeout=900)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    for epoch in (1, 2):
        assert len(re.findall(rf"\[train\] epoch {epoch}/2 ", out)) == 1, out[-4000:]
    noise = [line for line in out.splitlines() if any(n in line for n in RAY_NOISE)]
    assert noise == [], noise[:5]
    # the job trained beside the session's Ray (a second Ray on the machine): Ray Train's placement group
    # cleaner must still find its own cluster, not die on "Found multiple active Ray instances"
    assert "Traceback" not in out and "multiple active Ray instances" not in out, out[-4000:]
    assert "[train] model logs@" in out
    # where the run's time went, in one line
    assert re.search(r"\[train\] done in [\d.]+s \(checks [\d.]+s, ray_start [\d.]+s, prepare [\d.]+s, training "
                     r"[\d.]+s \(2 epochs, [\d.]+s in training steps, [\d.]+s in the threshold pass\), "
                     r"artifact_and_report", out)

    # --verbose brings Ray's info logs back (a scoring run: Ray Data's plan of the scoring dataset)
    assert verbose.returncode == 0, (verbose.stdout + verbose.stderr)[-4000:]
    assert "Execution plan of Dataset" in verbose.stdout + verbose.stderr


def _partition_state(storage: Storage, uri: str) -> tuple[list[str], dict]:
    return storage.list_files(uri), storage.read_json(f"{uri}/_SUCCESS")


def test_nightly_incremental_scoring_on_s3_with_latest_model(trained, storage, bucket):
    inp, out = f"s3://{bucket}/events", f"s3://{bucket}/scores"
    write_sample(f"{inp}/date=2026-01-01", storage, rows=600, shards=2, features=16, seed=11)
    write_sample(f"{inp}/date=2026-01-02", storage, rows=500, shards=1, features=16, seed=12)
    cfg = ops_config(trained["tmp"], **{"data.input": inp, "output.uri": out, "score.incremental": "true",
                                          "run.name": "nightly"})
    version = trained["train"].model_version

    r1 = score_job(cfg, storage, model_run="latest", run_date=dt.date(2026, 1, 2))
    assert r1.scored_rows == 1100 and r1.model_version == version
    state = storage.read_json(f"{out}/_state/{version.replace('@', '_')}.json")
    assert {k: v["rows"] for k, v in state["partitions"].items()} == {"date=2026-01-01": 600, "date=2026-01-02": 500}
    before = _partition_state(storage, r1.output_uri)

    write_sample(f"{inp}/date=2026-01-03", storage, rows=300, shards=1, features=16, seed=13)
    r2 = score_job(cfg, storage, model_run="latest", run_date=dt.date(2026, 1, 3))
    assert r2.scored_rows == 300 and r2.output_uri.endswith("run_date=2026-01-03")
    # rerunning a date replaces that partition only, with the same partitions scored again
    r2b = score_job(cfg, storage, model_run="latest", run_date=dt.date(2026, 1, 3))
    assert r2b.scored_rows == 300
    assert storage.list_files(r2.output_uri) == r2b.files
    assert _partition_state(storage, r1.output_uri) == before
    assert storage.exists(report_uri(out, dt.date(2026, 1, 3)))
    # nothing new: nothing published
    assert score_job(cfg, storage, model_run="latest", run_date=dt.date(2026, 1, 4)) is None
    assert not storage.exists(f"{out}/run_date=2026-01-04")


def test_dry_run_checks_without_ray_and_flags_fail_in_one_line(trained, storage, bucket):
    cfg_path = trained["tmp"] / "ops.yaml"
    cfg_path.write_text(json.dumps(trained["cfg"].to_dict()))  # JSON is YAML
    env = job_env(storage.endpoint)

    # --verbose shows Ray's info logs, "Started a local Ray instance." among them: its absence means no Ray
    ok = run_job("jobs.run", "--config", str(cfg_path), "--dry-run", "--verbose", "--model", "latest",
                 "--run-date", "2026-01-05", env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "[dry-run] input ok:" in ok.stdout and "3000 rows in 2 files, 16 features" in ok.stdout
    assert "held out for validation" not in ok.stdout  # scoring a trained model: no split to announce
    assert f"model ok: {trained['train'].model_version}" in ok.stdout and "run_date=2026-01-05" in ok.stdout
    assert "Started a local Ray instance" not in ok.stdout + ok.stderr

    cases = [
        (["jobs.run", "--run-date", "2026-02-30"], "error: --run-date '2026-02-30': expected a date as YYYY-MM-DD"),
        (["jobs.score", "--dry-run", "--model", "nope"], "error: --model nope: no finished run at"),
        (["jobs.train", "--dry-run", "--set", f"output.uri=s3://{bucket}-missing/x"], f"s3://{bucket}-missing/x: bucket not found"),
        (["jobs.run", "--dry-run", "--set", "data.input=/nonexistent/in"], "error: data.input /nonexistent/in: no such"),
    ]
    for args, msg in cases:
        p = run_job(args[0], "--config", str(cfg_path), *args[1:], env=env, timeout=120)
        assert p.returncode == 2, (args, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and msg in lines[0], (args, p.stderr)


def test_the_trainer_leaves_out_the_callbacks_that_would_only_start_processes(ray_cluster):
    """The session's Ray, like a job's local one, has no dashboard, so no state API for Ray Train's placement
    group cleaner to ask; and a run without Ray Data datasets (the workers read their cached splits
    themselves) needs no datasets callback, whose DatasetManager actor would hand out shards of nothing. The
    trainer leaves both out (pipeline.cluster.torch_trainer_class), and keeps the datasets callback for a run
    that streams datasets."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from pipeline.cluster import torch_trainer_class

    def callbacks(cls, **datasets) -> list[type]:
        trainer = cls(lambda config: None, scaling_config=ray.train.ScalingConfig(num_workers=1),
                      datasets=datasets or None)
        return [type(c) for c in trainer._create_default_callbacks()]

    ours, rays = callbacks(torch_trainer_class()), callbacks(TorchTrainer)
    assert PlacementGroupCleanerCallback in rays and DatasetsCallback in rays  # Ray's own defaults
    assert [c for c in rays if c not in (PlacementGroupCleanerCallback, DatasetsCallback)] == ours
    streamed = callbacks(torch_trainer_class(), train=ray.data.range(4))
    assert [c for c in rays if c is not PlacementGroupCleanerCallback] == streamed
