"""The planted anomaly types of `benchmarks/anomaly_types.py`: each is what its name says, fitted to the normal
rows it is planted among, and a table keeps every normal row beside its planted ones."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.anomaly_types import SHARE, TYPES, plant, planted_table, summary


@pytest.fixture(scope="module")
def normal():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(600, 2))  # two latent factors; column 2 follows column 0, column 3 column 1
    x = np.c_[h, h[:, 0] + 0.05 * rng.normal(size=600), h[:, 1] + 0.05 * rng.normal(size=600)]
    return x * [1.0, 10.0, 1.0, 10.0] + [0.0, 100.0, 0.0, 100.0]  # columns of different units


def test_global_anomalies_are_uniform_over_a_tenth_more_than_each_range(normal):
    a = plant(normal, "global", 4000, np.random.default_rng(1))
    lo, hi = normal.min(0), normal.max(0)
    span, mid = hi - lo, (lo + hi) / 2
    assert (np.abs(a - mid) <= 0.55 * span + 1e-9).all()
    assert (a.max(0) > hi).all() and (a.min(0) < lo).all()  # some beyond the range, in every column


def test_few_extreme_anomalies_are_ordinary_rows_with_one_or_two_columns_past_the_range(normal):
    a = plant(normal, "few_extreme", 500, np.random.default_rng(2))
    lo, hi = normal.min(0), normal.max(0)
    span = hi - lo
    out = (a > hi + 0.1 * span - 1e-9) | (a < lo - 0.1 * span + 1e-9)
    assert set(out.sum(1)) == {1, 2}
    assert ((a <= hi + 0.6 * span + 1e-9) & (a >= lo - 0.6 * span - 1e-9)).all()
    # the other columns are a normal row's own values
    assert all((normal[:, ~o] == a_[~o]).all(1).any() for a_, o in zip(a, out))


def test_dependency_anomalies_keep_each_columns_values_and_break_their_relations(normal):
    a = plant(normal, "dependency", 2000, np.random.default_rng(3))
    for j in range(normal.shape[1]):
        assert np.isin(a[:, j], normal[:, j]).all()
    assert np.corrcoef(normal[:, 0], normal[:, 2])[0, 1] > 0.99
    assert abs(np.corrcoef(a[:, 0], a[:, 2])[0, 1]) < 0.1


def test_local_anomalies_spread_wider_and_clustered_ones_sit_away_from_the_bulk(normal):
    z = (normal - normal.mean(0)) / normal.std(0)
    loc = (plant(normal, "local", 2000, np.random.default_rng(4)) - normal.mean(0)) / normal.std(0)
    assert 1.8 < loc.std(0).mean() / z.std(0).mean() < 2.6  # sqrt(5) as wide, about the same centre
    assert np.abs(loc.mean(0)).max() < 0.3
    cl = (plant(normal, "clustered", 2000, np.random.default_rng(5)) - normal.mean(0)) / normal.std(0)
    assert cl.std(0).mean() < 1.3  # the mixture's own spread, its means moved out


def test_a_planted_table_keeps_the_normal_rows_and_plants_its_share():
    t = planted_table("45_wine", "few_extreme")
    assert t.name == "45_wine:few_extreme" and t.X.shape[1] == 13
    assert t.y.sum() == max(5, round(SHARE * (t.y == 0).sum())) and (t.y == 0).sum() == 119
    assert (planted_table("45_wine", "few_extreme").X == t.X).all()  # the same rows every time
    with pytest.raises(ValueError, match="--types: nope"):
        plant(t.X, "nope", 5, np.random.default_rng(0))


def test_the_summary_counts_wins_and_losses_by_type():
    r = {"a:global": {"pipeline": {"auroc": 0.9, "ap": 0.5}, "iforest": {"auroc": 0.8, "ap": 0.4},
                      "pca": {"auroc": 0.7, "ap": 0.3}},
         "b:global": {"pipeline": {"auroc": 0.6, "ap": 0.2}, "iforest": {"auroc": 0.7, "ap": 0.3},
                      "pca": {"auroc": 0.5, "ap": 0.1}}}
    lines = summary(r, list(TYPES))
    assert len(lines) == 3 and lines[2].startswith("| global | 2 | 0.750 | 0.750 | 0.600 | 1 / 1 | b -0.100 |")
