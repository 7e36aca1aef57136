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
