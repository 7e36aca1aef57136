"""A mixed-type table with nulls through train and score on s3:// (loopback S3, a real local Ray): no
preprocessing by the user, scores explained in the table's own columns, categorical-only anomalies found.

One job pair on a few thousand rows; the bad-input checks reuse its model and fail before or inside the
scoring pass, each with one line, exit code 2 and nothing published.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.cli import run_main
from pipeline.config import DataSection, load_config
from pipeline.featurizer import Featurizer
from pipeline.jobs import score_job, train_job
from pipeline.models import build_model
from pipeline.metrics import auroc, evaluate_against_truth
from pipeline.prepare import BatchStats, merge_stat_rows
from pipeline.roles import column_roles
from pipeline.rows import batch_rows
from pipeline.sample import write_mixed_sample
from pipeline.stats import normalization_stats
from pipeline.tensors import Normalizer
from tests.procs import read_parquet_dir

pytestmark = pytest.mark.integration

ROWS = 4000
NUMERIC = ["amount", "items", "account_age_days", "risk_score", "latency_ms", "balance"]
CATEGORICAL = ["country", "currency", "channel", "merchant", "card_present"]
RUN_DATE = dt.date(2026, 3, 4)


def config(bucket: str, endpoint: str, data: str = "mixed", out: str = "out", *extra: str):
    return load_config("jobs/configs/tiny.yaml", [
        f"data.input=s3://{bucket}/{data}", f"artifacts.uri=s3://{bucket}/artifacts",
        f"output.uri=s3://{bucket}/{out}", f"storage.endpoint_url={endpoint}", "run.name=mixed", "data.id_columns=auto",
        "train.epochs=10", "train.lr=0.01", "train.patience=10", "train.checkpoint_every=10",
        "train.num_workers=1", "train.cpus_per_worker=0.5",
        "output.feature_errors=true", "output.top_k_features=2", *extra])


def numeric_only_auroc(table: pa.Table, hidden: list[int], latent: int, epochs: int) -> float:
    """The same model on the numeric columns alone (trained in-process: the comparison, not the pipeline)."""
    data = DataSection(features=NUMERIC, id_columns=["id"], validation_fraction=0.1)
    fz = Featurizer.unfitted(column_roles(table.schema, NUMERIC, [], "input"))
    stats, *_ = merge_stat_rows([{k: v[0] for k, v in BatchStats(data, fz)(table).items()}], fz, 64)
    fz = fz.fit(stats, *normalization_stats(stats.numeric), 64, "impute")
    x = Normalizer(fz.offset, fz.scale)(torch.from_numpy(batch_rows(table, data, fz).x))
    torch.manual_seed(0)
    model = build_model(fz.width, hidden_dims=hidden, latent_dim=min(latent, fz.width - 1), layout=fz.layout())
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(256):
            loss, _ = model.loss(x[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        err = model.score_and_latent(x)[2]
    y = table.column("is_anomaly_truth").to_numpy(zero_copy_only=False).astype(bool)
    score = (err / err[torch.from_numpy(~y)].mean(dim=0)).mean(dim=1).numpy()  # each column on its own scale
    kind = np.asarray(table.column("anomaly_kind").to_pylist(), dtype=object)
    sel = (kind == "categorical") | ~y
    return auroc(score[sel], y[sel])


def test_mixed_table_with_nulls_through_s3(ray_cluster, s3_server, bucket, storage, capsys):
    write_mixed_sample(f"s3://{bucket}/mixed", storage, rows=ROWS, shards=2, anomaly_fraction=0.04, seed=1)
    # a customer key (named as one, so data.id_columns auto takes it beside `id`: copied, no feature); the second
    # shard as another writer leaves it: the same values in narrower integers and dictionary-encoded strings (one
    # feature each across the shards: every read takes a shard in its own types)
    for shard in ("part-00000", "part-00001"):
        fs, path = storage.resolve(f"s3://{bucket}/mixed/{shard}.parquet")
        with fs.open_input_file(path) as f:
            table = pq.read_table(f)
        table = table.append_column("customerId", pa.array([f"c{i % 500}" for i in table.column("id").to_pylist()]))
        if shard == "part-00001":
            for name, column in (("items", table.column("items").cast(pa.int32())),
                                 ("merchant", table.column("merchant").dictionary_encode())):
                table = table.set_column(table.schema.get_field_index(name), name, column)
        with fs.open_output_stream(path) as f:
            pq.write_table(table, f)
    cfg = config(bucket, s3_server)
    torch.set_num_threads(1)  # the comparison model below; the shared 2-core box is busy enough

    t = train_job(cfg, storage)
    assert t.train_rows + t.validation_rows == ROWS and t.rejected_rows == 0
    manifest = t.manifest
    assert manifest["feature_names"] == NUMERIC + CATEGORICAL  # data.features auto, in the input's order
    assert "[train] ids: id, customerId (data.id_columns auto" in capsys.readouterr().out
    roles = {c["name"]: (c["role"], c.get("indicator"), len(c.get("levels", [])))
             for c in manifest["features"]["columns"]}
    assert roles["account_age_days"] == ("numeric", True, 0) and roles["amount"] == ("numeric", False, 0)
    assert roles["currency"][0] == roles["card_present"][0] == "categorical" and roles["card_present"][2] == 2
    assert 48 < roles["merchant"][2] <= 64  # 300 merchants: the most frequent, 64 at most (a tie at the cut: none)
    families = {c["name"]: c["family"] for c in manifest["features"]["columns"]}
    assert families["items"] == "integer" and families["merchant"] == "string"  # int64 and int32; plain and encoded

    s = score_job(cfg, storage, run_date=RUN_DATE)
    assert s.input_rows == s.scored_rows == ROWS and s.rejected_rows == 0
    out = read_parquet_dir(storage, s.output_uri)
    ids = out.column("id").to_numpy()
    assert len(np.unique(ids)) == ROWS == out.num_rows  # every row scored exactly once
    assert out.column_names[:2] == ["id", "customerId"]
    assert out.column("customerId").to_pylist() == [f"c{i % 500}" for i in ids]
    assert out.schema.field("feature_errors").type == pa.list_(pa.float32())
    assert {len(v) for v in out.column("feature_errors").to_pylist()} == {len(NUMERIC + CATEGORICAL)}
    assert set(sum(out.column("top_features").to_pylist(), [])) <= set(NUMERIC + CATEGORICAL)
    assert all(np.isfinite(out.column(c).to_numpy()).all() for c in ("recon_error", "anomaly_score"))

    ev = evaluate_against_truth(cfg, storage, s.output_uri)
    cat = ev["auroc_by_kind"]["categorical"]
    assert cat >= 0.9, ev
    # explained in the table's own columns: a planted categorical row's most unusual column (its error over
    # that column's mean on normal rows) is one of the columns that was tampered with or goes with them
    good = read_parquet_dir(storage, f"s3://{bucket}/mixed")
    kind = dict(zip(good.column("id").to_pylist(), good.column("anomaly_kind").to_pylist()))
    errs = np.asarray(out.column("feature_errors").to_pylist())
    normal = np.array([kind[i] == "" for i in ids])
    planted = np.array([kind[i] == "categorical" for i in ids])
    worst = (errs[planted] / errs[normal].mean(axis=0)).argmax(axis=1)
    names = np.asarray(NUMERIC + CATEGORICAL)[worst]
    assert np.isin(names, ["country", "currency", "channel", "card_present"]).mean() >= 0.8, names

    numeric = numeric_only_auroc(good, cfg.model.hidden_dims,
                                 cfg.model.latent_dim, epochs=10)
    assert numeric < 0.7 and numeric < cat - 0.2, (numeric, cat)

    # ---- bad input, scored with that model: one line each, exit 2, nothing published
    cases = {
        "typed": (good.set_column(good.schema.get_field_index("items"), "items",
                                  pa.array([str(v) for v in good.column("items").to_pylist()])),
                  "column 'items' is string (string), but the model was trained on it as integer"),
        "stamp": (good.set_column(good.schema.get_field_index("country"), "country",
                                  pa.array(np.zeros(ROWS, "datetime64[s]"))), "feature column 'country' is timestamp"),
        "infs": (good.set_column(good.schema.get_field_index("balance"), "balance",
                                 pa.array(np.where(np.arange(ROWS) == 7, np.inf, good.column("balance").to_numpy()))),
                 "column 'balance' has 1 rows with infinite values"),
    }
    for name, (table, message) in cases.items():
        uri = f"s3://{bucket}/bad-{name}/part-00000.parquet"
        fs, path = storage.resolve(uri)
        with fs.open_output_stream(path) as f:
            pq.write_table(table, f)
        bad = config(bucket, s3_server, data=f"bad-{name}", out=f"out-{name}")
        capsys.readouterr()
        assert run_main(lambda: score_job(bad, storage, run_date=RUN_DATE)) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and message in err[-1], (name, err[-3:])
        assert not storage.list_files(f"s3://{bucket}/out-{name}"), f"{name}: something was published"
