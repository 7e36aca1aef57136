"""The benchmark's code path on tiny sizes, so `make bench` cannot rot. Figures are not checked: speed is
measured by `make bench`, not asserted in tests."""

from __future__ import annotations

import json
import os
import statistics

import psutil
import pytest

from benchmarks.bench import compare, preset, run_benchmark, tree_memory_mb


def test_tree_memory_counts_the_process_and_its_children():
    mb, kind = tree_memory_mb(psutil.Process(os.getpid()))
    assert kind in ("pss", "rss")
    assert mb > 10  # this interpreter alone holds torch and pyarrow


def test_compare_gives_the_medians_ratio_and_its_spread():
    # sides alternating repeat by repeat: the lowest and highest per-repeat ratio
    r = compare([100.0, 90.0, 120.0], [100.0, 100.0, 80.0])
    assert (r["pipeline_rows_per_s"], r["baseline_rows_per_s"], r["ratio"]) == (100.0, 100.0, 1.0)
    assert r["ratio_spread"] == [pytest.approx(0.9), pytest.approx(1.5)]
    # unpaired samples (a job's epochs against the plain loop's): the band between the sides' quartiles
    r = compare([8.0, 9.0, 10.0, 11.0, 12.0], [9.0, 10.0, 10.0, 10.0, 11.0], paired=False)
    assert r["ratio"] == 1.0 and r["ratio_spread"] == [pytest.approx(9 / 10), pytest.approx(11 / 10)]
    assert r["pipeline_samples"] == [8.0, 9.0, 10.0, 11.0, 12.0]


def test_the_ensemble_step_benchmark_times_both_sides_and_names_the_path_training_takes(capsys):
    from benchmarks.ensemble_step import main

    main(["--cases", "8x16,1555x16", "--rounds", "1", "--steps", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("sequential" in ln and "ms/step" in ln and "ratio" in ln for ln in lines)
    assert "(stacked in training)" in lines[0] and "(sequential in training)" in lines[1]


@pytest.mark.integration
def test_tiny_benchmark_writes_every_measure(tmp_path, ray_cluster):
    bc = preset("tiny")
    bc.out_json, bc.out_md, bc.workdir = str(tmp_path / "bench.json"), str(tmp_path / "bench.md"), str(tmp_path)
    run_benchmark(bc)

    res = json.loads((tmp_path / "bench.json").read_text())
    # each figure comes from what was measured: the median of the recorded samples, of the rows really read
    ing = res["ingest"]
    assert ing["rows"] == bc.rows and len(ing["pipeline_samples"]) == len(ing["baseline_samples"]) == bc.repeats
    assert ing["pipeline_rows_per_s"] == pytest.approx(statistics.median(ing["pipeline_samples"]))
    assert ing["baseline_rows_per_s"] == pytest.approx(statistics.median(ing["baseline_samples"]))
    assert ing["baseline_seconds"] == pytest.approx(bc.rows / ing["baseline_rows_per_s"])
    ratios = [p / b for p, b in zip(ing["pipeline_samples"], ing["baseline_samples"])]
    assert ing["ratio_spread"] == [pytest.approx(min(ratios)), pytest.approx(max(ratios))]
    for measure in ("training", "scoring"):
        r, by_model = res[measure], res[measure]["by_model"]
        assert set(by_model) == {m.name for m in bc.models}
        for m in by_model.values():
            by_bs = m["by_batch_size"]
            assert str(m["best_batch_size"]) == max(by_bs, key=lambda bs: by_bs[bs]["pipeline_rows_per_s"]) and \
                all(v["pipeline_rows_per_s"] > 0 and v["baseline_rows_per_s"] > 0 for v in by_bs.values())
        # the headline is one model's best batch size, both sides from that same run
        best = by_model[r["model"]]["by_batch_size"][str(r["batch_size"])]
        assert (r["pipeline_rows_per_s"], r["baseline_rows_per_s"]) == (best["pipeline_rows_per_s"],
                                                                        best["baseline_rows_per_s"]), measure
        assert r["ratio"] == pytest.approx(best["pipeline_rows_per_s"] / best["baseline_rows_per_s"])
        assert r["ratio_spread"] == best["ratio_spread"]
    # training: every epoch of every job a sample, as many of the plain loop's; the ratio inside its band
    for ms in bc.models:
        for r in res["training"]["by_model"][ms.name]["by_batch_size"].values():
            n = ms.epochs * ms.jobs
            assert len(r["pipeline_samples"]) == len(r["baseline_samples"]) == n == len(r["epoch_seconds"])
            assert r["pipeline_rows_per_s"] == pytest.approx(statistics.median(r["pipeline_samples"]))
            assert r["ratio_spread"][0] <= r["ratio"] <= r["ratio_spread"][1]
    # the scoring ratio of each model at its best batch size, from that batch size's figures
    for m in res["scoring"]["by_model"].values():
        best = m["by_batch_size"][str(m["best_batch_size"])]
        assert m["ratio"] == pytest.approx(best["pipeline_rows_per_s"] / best["baseline_rows_per_s"])
    lg = res["ingest_large_shards"]
    assert lg["rows"] == bc.large_shard_rows and lg["shard_mb"] == bc.large_shard_mb and lg["files"] >= 1
    assert lg["pipeline_rows_per_s"] == pytest.approx(statistics.median(lg["pipeline_samples"]))
    assert lg["ratio"] == pytest.approx(lg["pipeline_rows_per_s"] / lg["baseline_rows_per_s"])
    assert lg["v2_ratio"] == pytest.approx(lg["v2_rows_per_s"] / lg["baseline_rows_per_s"]) and lg["v2_rows_per_s"] > 0
    e2e = res["training_end_to_end"]
    assert set(e2e) == set(bc.e2e_rows) == {"medium"}  # the full preset has "small" too
    for r in e2e.values():  # seconds of each side from the same run; ratio > 1 would mean faster than plain
        assert r["epochs"] == bc.e2e_epochs == len(r["fixed_seconds"])
        assert r["ratio"] == pytest.approx(r["baseline_seconds"] / r["pipeline_seconds"])
        assert r["per_epoch_fixed_seconds"] == pytest.approx(statistics.median(r["fixed_seconds"]))
        assert 0 <= r["per_epoch_fixed_seconds"] and sum(r["epoch_seconds"]) < r["pipeline_seconds"]
    mem = res["memory"]
    assert mem["rows_4x"] == mem["scale"] * mem["rows_1x"] == 4 * bc.rows  # the larger run had 4x the rows
    assert mem["peak_mb_1x"] > 50 and mem["peak_mb_4x"] > 50  # a job process tree holds torch and Ray
    table = (tmp_path / "bench.md").read_text()
    for measure, mark in (("ingest (", "Ray Data"), ("training", "(best)"), ("scoring", "(best)")):
        row = next(line for line in table.splitlines() if line.startswith(f"| {measure}") and mark in line)
        r = res[measure.split()[0]]
        lo, hi = r["ratio_spread"]
        assert f"| {r['ratio']:.2f} | {lo:.2f}-{hi:.2f} |" in row, row
    assert "peak MB" in table
    assert "Ray Data V2 reader" in table and f"| {lg['v2_ratio']:.2f} |" in table
    assert f"| {e2e['medium']['ratio']:.2f} | >= 0.7 |" in table


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
    # the steps alone: every batch's wait excluded (the per-epoch fixed cost is the epoch's time beyond them)
    assert 0 < stats.step_seconds <= stats.seconds - stats.data_wait_seconds


def test_gpu_check_refuses_bad_arguments_and_runs_its_measures_on_any_device(capsys):
    """`make bench-gpu`'s code path on the CPU (no GPU here): argument checks, then every measure's figures."""
    import argparse

    import torch

    from benchmarks import gpu

    with pytest.raises(SystemExit) as e:
        gpu.parse_args(["--rows", "100", "--batch-size", "200"])
    assert e.value.code == 2 and "error: --batch-size 200 must be <= --rows 100" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert gpu.main(["--rows", "256", "--batch-size", "64"]) == 2
        assert capsys.readouterr().err.startswith("error: no CUDA device here")
    res = gpu.measure(argparse.Namespace(rows=512, features=8, batch_size=128, repeats=1), torch.device("cpu"))
    for model in ("small", "large"):
        for step in ("train", "score"):
            r = res[model][step]
            assert r["pipeline_rows_per_s"] > 0 and r["ratio"] == pytest.approx(
                r["pipeline_rows_per_s"] / r["baseline_rows_per_s"])
    # no Ray on its import path (Ray's wheel need not be on the GPU box): tests/test_layers.py checks it
