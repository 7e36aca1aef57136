"""The model lifecycle against a real `mlflow server` on loopback (tests/loopback_mlflow.py) and a real local
Ray: train twice, register both, promote, score by alias and by version, the pyfunc model's numbers against
the batch output, refused promotion, an unreachable server at start, a server lost mid-training, and no
secret in anything logged.

MLflow credentials are set in MLflow's own variables for the whole module (the loopback server ignores them):
the last test looks for them, and for the fake AWS secret, in everything the runs printed and logged.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import StorageSection, load_config
from pipeline.jobs import score_job, train_job
from pipeline.sample import write_mixed_sample
from pipeline.storage import Storage
from tests.conftest import unit_tier_refuses
from tests.loopback_s3 import FAKE_SECRET, free_port
from tests.loopback_mlflow import LoopbackMlflow
from tests.procs import read_parquet_dir

if TYPE_CHECKING:
    from mlflow import MlflowClient
# MLflow is imported where a test needs it: at module level it cost `make test-unit`'s collection 2.7 s,
# and no test here is in the unit tier

pytestmark = pytest.mark.integration

MODEL = "lifecycle-ae"
MLFLOW_USER = "ci-bot"
MLFLOW_SECRET = "mlflowSecretDoNotLog/7c1e9b2a"
PRINTED: list[str] = []  # what every job run here printed, for the credentials check


class Tee(io.TextIOBase):
    def __init__(self, *outs):
        self.outs = outs

    def write(self, s):
        for o in self.outs:
            o.write(s)
        return len(s)

    def flush(self):
        for o in self.outs:
            o.flush()


@contextlib.contextmanager
def recorded():
    """Keep what the block prints (and still show it)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(Tee(sys.stdout, buf)), contextlib.redirect_stderr(Tee(sys.stderr, buf)):
        yield buf
    PRINTED.append(buf.getvalue())


@pytest.fixture(scope="module")
def mlflow_credentials():
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_USERNAME", MLFLOW_USER)
    mp.setenv("MLFLOW_TRACKING_PASSWORD", MLFLOW_SECRET)
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, mlflow_credentials):
    unit_tier_refuses("an MLflow server")
    with LoopbackMlflow(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tracked")
    write_mixed_sample(str(root / "input"), Storage(StorageSection()), rows=3000, shards=2, seed=5)
    return root


def overrides(root: Path, uri: str, name: str, *extra: str) -> list[str]:
    return [f"data.input={root / 'input'}", f"artifacts.uri={root / 'artifacts'}",
            f"output.uri={root / 'output' / name}", f"run.name={name}", "train.num_workers=1",
            "train.cpus_per_worker=1", "model.latent_dim=auto", f"tracking.uri={uri}",
            f"tracking.registered_model={MODEL}", "tracking.experiment=lifecycle", *extra]


def cli_sets(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def config(root: Path, uri: str, name: str, *extra: str):
    return load_config("jobs/configs/tiny.yaml", overrides(root, uri, name, *extra))


def promote(*args: str) -> tuple[int, str, str]:
    from jobs.promote import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    PRINTED.append(out.getvalue() + err.getvalue())
    return rc, out.getvalue(), err.getvalue()


def scored(path: str) -> pa.Table:
    """A local scoring output folder as one table (tests/procs.read_parquet_dir through a local Storage)."""
    return read_parquet_dir(Storage(StorageSection()), path)


@pytest.fixture(scope="module")
def lifecycle(ray_cluster, mlflow_server, sample):
    """Two tracked training runs (a poor one, then a good one), both registered; version 1 promoted to
    champion (no holder yet), then version 2 (better); then `jobs.score --model models:/NAME@champion`."""
    uri = mlflow_server.uri
    with recorded():
        poor = train_job(config(sample, uri, "poor", "train.epochs=1", "train.lr=0.00001"))
        good = train_job(config(sample, uri, "good", "train.epochs=4"))
    from mlflow import MlflowClient

    client = MlflowClient(uri, uri)
    first = promote(MODEL, "1", "--tracking-uri", uri)
    second = promote(MODEL, "2", "--tracking-uri", uri)
    from jobs.score import main as score_main

    with recorded() as printed:
        rc = score_main(["--config", "jobs/configs/tiny.yaml", *cli_sets(overrides(sample, uri, "by-alias")),
                         "--model", f"models:/{MODEL}@champion", "--run-date", "2026-02-01"])
    assert rc == 0, printed.getvalue()[-2000:]
    return SimpleNamespace(uri=uri, client=client, poor=poor, good=good, first=first, second=second,
                           alias_output=str(sample / "output" / "by-alias" / "run_date=2026-02-01"),
                           score_printed=printed.getvalue(), root=sample)


def runs(client: MlflowClient, job: str):
    exp = client.get_experiment_by_name("lifecycle")
    return client.search_runs([exp.experiment_id], f"tags.job = '{job}'", order_by=["attributes.start_time ASC"])


def test_training_runs_log_the_resolved_config_history_figures_artifacts_and_tags(lifecycle):
    client = lifecycle.client
    train_runs = runs(client, "train")
    assert [r.info.run_name for r in train_runs] == ["poor", "good"]
    run = train_runs[1]
    man = lifecycle.good.manifest
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["model.latent_dim"] == str(man["model"]["latent_dim"]) and p["model.latent_dim"].isdigit()
    assert p["train.epochs"] == "4" and p["train.lr"] == "0.003" and p["run.name"] == "good"
    assert p["train.batch_size"] == str(man["metrics"]["batch_size"])
    assert not any(k.startswith("tracking.") for k in p)
    for key in ("train_loss", "val_loss", "rows_per_s"):
        hist = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in hist] == [h["epoch"] for h in man["history"]], key
        assert [m.value for m in hist] == pytest.approx([h[key] for h in man["history"]])
    m = run.data.metrics
    assert m["best_epoch"] == lifecycle.good.best_epoch and m["threshold"] == pytest.approx(lifecycle.good.threshold)
    assert m["validation_score_q0.99"] == pytest.approx(man["metrics"]["validation_score_quantiles"]["0.99"])
    weights = man["metrics"]["score_term_weights"]  # the calibrated score's fitted term weights
    assert {f"score_weight_{k}": pytest.approx(v) for k, v in weights.items()} == \
        {k: v for k, v in m.items() if k.startswith("score_weight_")}
    assert sum(weights.values()) == pytest.approx(3.5, rel=1e-3)
    assert m["train_rows"] + m["validation_rows"] + m["rejected_rows"] == 3000
    t = run.data.tags
    assert t["model_version"] == man["model_version"] and t["input_uri"] == man["data"]["input"]
    assert t["train_rows"] == str(lifecycle.good.train_rows) and len(t["git_commit"]) == 40
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "manifest.json", "model"} <= names
    logged = json.loads(Path(client.download_artifacts(run.info.run_id, "manifest.json")).read_text())
    assert logged["model_version"] == man["model_version"]


def test_both_runs_are_registered_and_the_alias_follows_promotion(lifecycle):
    client = lifecycle.client
    v1, v2 = (client.get_model_version(MODEL, str(v)) for v in (1, 2))
    assert v1.tags["model_version"] == lifecycle.poor.model_version
    assert v2.tags["model_version"] == lifecycle.good.model_version
    assert v2.tags["artifact_uri"] == str(lifecycle.root / "artifacts" / "good")
    assert float(v2.tags["validation_loss"]) < float(v1.tags["validation_loss"])
    assert lifecycle.first[0] == 0 and "first holder" in lifecycle.first[1]
    assert lifecycle.second[0] == 0 and "from version 1" in lifecycle.second[1]
    assert client.get_model_version_by_alias(MODEL, "champion").version == "2"
    move = json.loads(client.get_model_version(MODEL, "2").tags["promoted.champion"])
    assert move["by"] == MLFLOW_USER and move["previous"] == "1" and move["at"].startswith("20")
    last = json.loads(client.get_registered_model(MODEL).tags["alias.champion.last_move"])
    assert last["version"] == "2"


def test_scoring_by_alias_uses_the_promoted_version_and_records_it(lifecycle):
    out = scored(lifecycle.alias_output)
    assert out.num_rows == 3000
    assert set(out.column("model_version").to_pylist()) == {lifecycle.good.model_version}
    assert f"models:/{MODEL}@champion is version 2" in lifecycle.score_printed
    run = runs(lifecycle.client, "score")[0]
    assert run.data.tags["registered_model_version"] == f"{MODEL}/2"
    assert run.data.tags["model_version"] == lifecycle.good.model_version
    assert run.data.tags["output_uri"] == lifecycle.alias_output
    m = run.data.metrics
    assert m["input_rows"] == m["scored_rows"] == 3000 and m["rejected_rows"] == 0
    assert m["anomaly_rate"] == pytest.approx(m["anomalies"] / 3000)
    assert 0 <= m["psi"] < 1 and m["truth_auroc"] > 0.5


def test_scoring_by_version_number(lifecycle):
    cfg = config(lifecycle.root, lifecycle.uri, "by-version")
    with recorded():
        res = score_job(cfg, model_run=f"models:/{MODEL}/1")
    assert res.model_version == lifecycle.poor.model_version
    assert set(scored(res.output_uri).column("model_version").to_pylist()) == {res.model_version}
    from pipeline.errors import ArtifactError
    from pipeline.dryrun import dry_run

    with pytest.raises(ArtifactError, match=f"^--model models:/{MODEL}@nope: no alias 'nope' on registered model"):
        score_job(cfg, model_run=f"models:/{MODEL}@nope")

    with recorded():
        lines = dry_run(cfg, model_run=f"models:/{MODEL}@champion", train=False)
    assert any(line.startswith(f"model ok: {lifecycle.good.model_version} ") for line in lines), lines


def test_promotion_of_a_worse_model_is_refused_in_one_line_unless_forced(lifecycle):
    rc, out, err = promote(MODEL, "1", "--tracking-uri", lifecycle.uri)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"error: not promoting {MODEL} version 1 to champion: ")
    assert "validation loss" in err and "--force" in err
    client = lifecycle.client
    assert client.get_model_version_by_alias(MODEL, "champion").version == "2"
    rc, out, _ = promote(MODEL, "1", "--alias", "champion", "--force", "--tracking-uri", lifecycle.uri)
    assert rc == 0 and "forced" in out and client.get_model_version_by_alias(MODEL, "champion").version == "1"
    assert json.loads(client.get_model_version(MODEL, "1").tags["promoted.champion"])["forced"] is True
    rc, _, _ = promote(MODEL, "2", "--tracking-uri", lifecycle.uri)  # better than the holder again: allowed
    assert rc == 0 and client.get_model_version_by_alias(MODEL, "champion").version == "2"


def test_pyfunc_model_returns_the_batch_jobs_numbers(lifecycle):
    import mlflow.pyfunc

    mlflow.set_tracking_uri(lifecycle.uri)
    mlflow.set_registry_uri(lifecycle.uri)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    rows = pq.read_table(sorted((lifecycle.root / "input").glob("*.parquet"))[0]).slice(0, 400)
    pred = model.predict(rows.to_pandas())
    assert list(pred.columns) == ["latent", "recon_error", "anomaly_score", "is_anomaly", "code_space"] and len(pred) == 400
    batch = scored(lifecycle.alias_output)
    by_id = {i: k for k, i in enumerate(batch.column("id").to_pylist())}
    idx = [by_id[i] for i in rows.column("id").to_pylist()]
    want = batch.take(pa.array(idx))
    for col in ("recon_error", "anomaly_score"):
        np.testing.assert_allclose(pred[col].to_numpy(np.float32), want.column(col).to_numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.stack(pred["latent"].to_list()), np.stack(want.column("latent").to_pylist()),
                               rtol=1e-5, atol=1e-6)
    assert pred["is_anomaly"].tolist() == want.column("is_anomaly").to_pylist()
    assert pred["code_space"].tolist() == want.column("code_space").to_pylist()  # the same map, the same space


def test_mlflow_models_serve_answers_with_the_batch_jobs_numbers(lifecycle, tmp_path):
    import os
    import signal
    import subprocess
    import urllib.request

    man = lifecycle.good.manifest
    rows = pq.read_table(sorted((lifecycle.root / "input").glob("*.parquet"))[0]).drop_null().slice(0, 20)
    feats = rows.select(man["feature_names"]).to_pandas()
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": lifecycle.uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
                             f"models:/{MODEL}@champion", "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        body = json.dumps({"dataframe_split": feats.to_dict(orient="split")}, default=str).encode()
        deadline, answer = time.time() + 180, None
        while time.time() < deadline and answer is None and proc.poll() is None:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body,
                                             {"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=30) as r:
                    answer = json.loads(r.read())["predictions"]
            except OSError:
                time.sleep(1)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
    assert answer is not None, (tmp_path / "serve.log").read_text()[-3000:]
    batch = scored(lifecycle.alias_output)
    by_id = {i: k for k, i in enumerate(batch.column("id").to_pylist())}
    want = batch.take(pa.array([by_id[i] for i in rows.column("id").to_pylist()]))
    for col in ("recon_error", "anomaly_score"):
        np.testing.assert_allclose([a[col] for a in answer], want.column(col).to_numpy(), rtol=1e-5)
    np.testing.assert_allclose([a["latent"] for a in answer], want.column("latent").to_pylist(), rtol=1e-5, atol=1e-6)
    assert [a["is_anomaly"] for a in answer] == want.column("is_anomaly").to_pylist()


def test_unreachable_server_at_start_is_one_line_and_nothing_is_trained(tmp_path, sample, mlflow_credentials):
    from jobs.train import main

    dead = f"http://127.0.0.1:{free_port()}"
    args = ["--config", "jobs/configs/tiny.yaml",
            *cli_sets(overrides(sample, dead, "never", f"artifacts.uri={tmp_path / 'artifacts'}"))]
    out, err = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(args)
    PRINTED.append(out.getvalue() + err.getvalue())
    assert rc == 2
    assert err.getvalue().count("\n") == 1, err.getvalue()
    assert err.getvalue().startswith(f"error: config tracking.uri: MLflow at {dead} cannot be reached")
    assert not (tmp_path / "artifacts").exists(), "the job wrote something before failing"
    assert time.perf_counter() - t0 < 60


def test_unreachable_server_from_the_environment_is_a_warning(monkeypatch, capsys, mlflow_credentials):
    from pipeline.tracking import start

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    assert start(load_config("jobs/configs/tiny.yaml"), "train", "demo", {}) is None
    out = capsys.readouterr().out
    PRINTED.append(out)
    assert out.count("[tracking] warning:") == 1 and "not tracked" in out


def test_server_stopped_mid_training_leaves_a_finished_model_and_one_warning(ray_cluster, sample, tmp_path,
                                                                            mlflow_credentials):
    from mlflow import MlflowClient

    server = LoopbackMlflow(tmp_path / "mlflow").start()
    try:
        client = MlflowClient(server.uri, server.uri)
        stopped = threading.Event()

        def stop_once_running():
            deadline = time.time() + 300
            while time.time() < deadline:
                try:
                    exp = client.get_experiment_by_name("lifecycle")
                    if exp and client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'"):
                        server.stop()
                        stopped.set()
                        return
                except Exception:  # noqa: BLE001 - the server may still be starting the experiment
                    pass
                time.sleep(0.2)

        watcher = threading.Thread(target=stop_once_running, daemon=True)
        watcher.start()
        cfg = config(sample, server.uri, "dropped", "train.epochs=3", f"artifacts.uri={tmp_path / 'artifacts'}")
        with recorded() as printed:
            summary = train_job(cfg)
        watcher.join(timeout=10)
    finally:
        server.stop()
    assert stopped.is_set(), "the server was never seen with a running run"
    assert (tmp_path / "artifacts" / "dropped" / "model" / "manifest.json").exists()
    assert summary.epochs_run >= 1
    warnings = [line for line in printed.getvalue().splitlines() if "[tracking] warning" in line]
    assert len(warnings) == 1, printed.getvalue()[-3000:]
    assert "not logged" in warnings[0] and "params" in warnings[0] and "model version" in warnings[0]
    assert "the model is at" in warnings[0]


def test_no_secret_in_anything_printed_or_logged(lifecycle, mlflow_server):
    """The MLflow password and the fake AWS secret appear in nothing the runs above printed, nor in any
    param, tag, metric name or artifact of any MLflow run, nor in any registered version's tags."""
    assert len(PRINTED) >= 5, "this test checks the runs above; run the whole module"
    secrets = [MLFLOW_SECRET, FAKE_SECRET]
    for text in PRINTED:
        assert not any(s in text for s in secrets)
    client = lifecycle.client
    exp = client.get_experiment_by_name("lifecycle")
    all_runs = client.search_runs([exp.experiment_id])
    assert len(all_runs) >= 4
    seen_artifacts = 0
    for run in all_runs:
        blob = json.dumps([run.data.params, run.data.tags, sorted(run.data.metrics)])
        assert not any(s in blob for s in secrets), run.info.run_id
        assert MLFLOW_USER not in json.dumps(run.data.params)
        root = Path(client.download_artifacts(run.info.run_id, ""))
        for f in root.rglob("*"):
            if f.is_file():
                seen_artifacts += 1
                data = f.read_bytes()
                assert not any(s.encode() in data for s in secrets), f
    assert seen_artifacts >= 8
    for mv in client.search_model_versions(f"name='{MODEL}'"):
        assert not any(s in json.dumps(mv.tags) for s in secrets)
    assert MLFLOW_SECRET not in mlflow_server.log_text()
