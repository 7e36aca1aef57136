"""`benchmarks/pca_cuts.py`: at min-max 95% it is `make eval`'s PCA baseline; each cut keeps as many components as
its share of the variance needs."""

from __future__ import annotations

from benchmarks.pca_cuts import cuts
from pipeline.evaluation import load_table, pca_scores, protocol_masks, ranking_metrics


def test_min_max_at_95_percent_is_the_baseline_and_more_variance_keeps_more_components():
    t = load_table("39_vertebral")
    train, test = protocol_masks(t)
    row = cuts(t.X, t.y, train, test)
    assert set(row) == {f"{s}{p}" for s in ("minmax", "z") for p in (90, 95, 99)}
    baseline = ranking_metrics(pca_scores(t.X[train], t.X[test]), t.y[test])["auroc"]
    assert abs(row["minmax95"][0] - baseline) < 1e-9
    for s in ("minmax", "z"):
        kept = [row[f"{s}{p}"][1] for p in (90, 95, 99)]
        assert kept == sorted(kept) and 1 <= kept[0] and kept[-1] <= t.X.shape[1]
