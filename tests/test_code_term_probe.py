"""`benchmarks/code_term_probe.py` rescoring a saved run: every variant scores every test row, the pipeline's kNN
setting is left as it was, and runs are grouped as development tables, novelty tasks and planted types."""

from __future__ import annotations

import numpy as np

import pipeline.calibration as calibration
from benchmarks.code_term_probe import HINGES, NEIGHBOURS, groups, scores


def _run(rng, val_rows=80, test_rows=30, features=6, code=2, members=2):
    def part(n):
        return {"members": [{"sq": rng.random((n, features)) ** 2, "h": rng.normal(size=(n, code))}
                            for _ in range(members)]}
    return {"scores": {"val": part(val_rows), "test": part(test_rows)}, "y": np.r_[np.zeros(25), np.ones(5)]}


def test_every_variant_scores_every_test_row_and_the_knn_setting_is_restored():
    k = calibration.KNN
    out = scores(_run(np.random.default_rng(0)))
    assert calibration.KNN == k
    expected = {"pipe", "robcode", *(f"knn{n}" for n in NEIGHBOURS), *(f"h{c}{q}" for q in HINGES for c in "ca")}
    assert set(out) == expected
    assert all(s.shape == (30,) and np.isfinite(s).all() for s in out.values())
    # a hinge only lowers what the code terms add; hinging all four terms lowers the score further
    assert (out["hc0.5"] <= out["pipe"] + 1e-12).all() and (out["ha0.5"] <= out["hc0.5"] + 1e-12).all()


def test_runs_are_grouped_by_where_they_come_from():
    g = groups(["6_cardio", "digits_0-4", "iris_1", "38_thyroid-local", "14_glass-local", "14_glass-clustered"])
    assert g == {"tables": ["6_cardio"], "novelty": ["digits_0-4", "iris_1"],
                 "clustered": ["14_glass-clustered"], "local": ["38_thyroid-local", "14_glass-local"]}
