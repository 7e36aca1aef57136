"""Every `model.kind` and `train.algorithm: recirculation` trained and scored through the distributed
pipeline (Ray Data ingest, Ray Train, map_batches scoring, publish) on a real local Ray, local storage."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.artifacts import load_artifact
from pipeline.config import load_config
from pipeline.jobs import score_job, train_job
from pipeline.metrics import evaluate_against_truth
from pipeline.sample import write_sample
from pipeline.storage import Storage
from tests.procs import read_parquet_dir

pytestmark = pytest.mark.integration

ROWS, FEATURES = 4000, 16

CASES = {
    # name: (overrides, workers); 2 workers where DDP has something to prove (stacked: unused parameters)
    "denoising": (["model.kind=denoising", "model.noise=mask", "model.noise_level=0.2"], 1),
    "sparse": (["model.kind=sparse", "model.latent_dim=24", "model.sparsity_weight=0.01"], 1),  # overcomplete
    "contractive": (["model.kind=contractive", "model.contractive_weight=0.01"], 1),
    "variational": (["model.kind=variational", "model.score=elbo", "model.latent_dim=4"], 1),
    "stacked": (["model.kind=stacked", "model.hidden_dims=[32]", "model.pretrain_epochs=1",
                 "train.epochs=5"], 2),
    "recirculation": (["train.algorithm=recirculation", "model.hidden_dims=[]", "model.latent_dim=6",
                       "train.lr=0.05"], 2),
    # the dense kind (every other integration test trains it too), with the calibrated score's optional
    # subspace term: fitted from both workers' rows, carried to scoring
    "dense-subspace": (["model.kind=dense", "model.ensemble=2", "model.subspace_weight=1"], 2),
}


@pytest.fixture(scope="module")
def sample_input(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    storage = Storage(load_config().storage)
    write_sample(str(root / "input"), storage, rows=ROWS, shards=2, features=FEATURES, seed=5)
    return root, storage


def config_for(root, name: str, overrides: list[str], workers: int):
    return load_config("jobs/configs/tiny.yaml", [
        f"data.input={root / 'input'}", f"artifacts.uri={root / 'artifacts'}", f"output.uri={root / 'out' / name}",
        f"run.name={name}", "train.epochs=4", "train.batch_size=128", f"train.num_workers={workers}",
        "train.cpus_per_worker=0.5", "train.patience=10", "model.hidden_dims=[32]", *overrides])


@pytest.mark.parametrize("name", list(CASES))
def test_kind_trains_and_scores_end_to_end(ray_cluster, sample_input, name):
    root, storage = sample_input
    overrides, workers = CASES[name]
    cfg = config_for(root, name, overrides, workers)

    t = train_job(cfg, storage)
    assert t.best_val_loss < t.first_val_loss, "validation loss did not fall"
    manifest = t.manifest
    assert manifest["model"]["kind"] == cfg.model.kind and manifest["config"]["train"]["algorithm"] == cfg.train.algorithm
    hist = manifest["history"]
    if name == "stacked":  # one pretraining stage per layer pair (2), then fine-tuning
        assert [h["stage"] for h in hist] == ["pretrain-1/2", "pretrain-2/2"] + ["finetune"] * 3
        assert t.best_epoch >= 2 and t.best_val_loss < hist[1]["val_loss"], "fine-tuning did not beat pretraining"
    if name == "variational":
        assert all(0 < h["train_kl"] < 1e3 for h in hist)

    if name == "dense-subspace":
        sub = load_artifact(storage, t.run_uri).model.subspace
        assert manifest["model"]["subspace_weight"] == 1 and bool(sub.fitted) and sub.minor.shape[1] >= 1
        assert 0 < float(sub.val_count) <= t.validation_rows  # rank 0's validation rows, the best epoch's pass

    s = score_job(cfg, storage)
    assert s.scored_rows == ROWS and s.rejected_rows == 0
    out = read_parquet_dir(storage, cfg.output.uri)
    assert out.num_rows == ROWS and len(np.unique(out.column("id").to_numpy())) == ROWS
    assert out.schema.field("latent").type == pa.list_(pa.float32())
    assert out.schema.field("recon_error").type == out.schema.field("anomaly_score").type == pa.float32()
    assert out.schema.field("is_anomaly").type == pa.bool_()
    assert {len(v) for v in out.column("latent").to_pylist()[:50]} == {cfg.model.latent_dim}
    assert all(np.isfinite(out.column(c).to_numpy()).all() for c in ("recon_error", "anomaly_score"))
    ev = evaluate_against_truth(cfg, storage, cfg.output.uri)
    assert ev["planted"] >= 20 and ev["auroc"] > 0.85, ev
