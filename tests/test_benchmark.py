"""The benchmark's code path on tiny sizes, so `make bench` cannot rot. Figures are not checked: speed is
measured by `make bench`, not asserted in tests."""

from __future__ import annotations

import json
import os

import psutil
import pytest

from pipeline.bench import preset, run_benchmark, tree_memory_mb


def test_tree_memory_counts_the_process_and_its_children():
    mb, kind = tree_memory_mb(psutil.Process(os.getpid()))
    assert kind in ("pss", "rss")
    assert mb > 10  # this interpreter alone holds torch and pyarrow


@pytest.mark.integration
def test_tiny_benchmark_writes_every_measure(tmp_path, ray_cluster):
    bc = preset("tiny")
    bc.out_json, bc.out_md, bc.workdir = str(tmp_path / "bench.json"), str(tmp_path / "bench.md"), str(tmp_path)
    run_benchmark(bc)

    res = json.loads((tmp_path / "bench.json").read_text())
    for measure in ("ingest", "training", "scoring"):
        r = res[measure]
        assert r["pipeline_rows_per_s"] > 0 and r["baseline_rows_per_s"] > 0, measure
        assert r["ratio"] == pytest.approx(r["pipeline_rows_per_s"] / r["baseline_rows_per_s"])
    for measure in ("training", "scoring"):
        by_model = res[measure]["by_model"]
        assert set(by_model) == {m.name for m in bc.models}
        for m in by_model.values():
            assert str(m["best_batch_size"]) in m["by_batch_size"]
    mem = res["memory"]
    assert mem["peak_mb_1x"] > 0 and mem["peak_mb_4x"] > 0
    assert mem["ratio"] == pytest.approx(mem["peak_mb_4x"] / mem["peak_mb_1x"])
    table = (tmp_path / "bench.md").read_text()
    assert "| ingest" in table and "| training" in table and "| scoring" in table and "peak MB" in table


def test_train_epoch_times_the_first_batch_and_the_data_wait_apart():
    import time

    import torch

    from pipeline.models import build_model
    from pipeline.train import train_epoch

    torch.manual_seed(0)
    x = torch.randn(8 * 32, 6)

    def slow_batches():
        for i in range(8):
            if i:
                time.sleep(0.02)  # a data pipeline that keeps the step waiting
            yield x[i * 32:(i + 1) * 32]

    model = build_model(6, hidden_dims=[8], latent_dim=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every batch sees the same model
    with torch.no_grad():
        want = sum(float(model.loss(x[i * 32:(i + 1) * 32])[0]) for i in range(8)) / 8
    stats = train_epoch(slow_batches(), model, opt)
    assert stats.rows == 256 and stats.first_batch_rows == 32 and stats.steady_rows == 224
    assert stats.loss == pytest.approx(want, rel=1e-5)
    assert 7 * 0.02 <= stats.data_wait_seconds < stats.steady_seconds
    assert stats.steady_seconds == pytest.approx(stats.seconds - stats.first_batch_seconds)
