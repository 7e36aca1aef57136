"""The bounded-memory score sketch behind the anomaly threshold (pipeline/sketch.py): no Ray needed."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.report import error_histogram
from pipeline.sketch import N_BUCKETS, SAMPLE_ROWS, ScoreSketch, error_histogram_of, summarize_block

QS = [0.0, 0.001, 0.1, 0.5, 0.9, 0.99, 0.999, 1.0]


def sketch_in_blocks(scores: np.ndarray, blocks: int, n_features: int = 3) -> ScoreSketch:
    rng = np.random.default_rng(0)
    sq = rng.random((len(scores), n_features)).astype(np.float32)
    sk = ScoreSketch(n_features)
    for part, sq_part in zip(np.array_split(scores, blocks), np.array_split(sq, blocks)):
        sk.add(summarize_block(part, sq_part))
    np.testing.assert_allclose(sk.sq_sum, sq.astype(np.float64).sum(axis=0), rtol=1e-9)
    return sk


@pytest.mark.parametrize("dist", ["lognormal", "normal", "ties", "tiny"])
def test_quantiles_match_numpy_to_the_bucket_width(dist):
    rng = np.random.default_rng(1)
    scores = {"lognormal": rng.lognormal(-3, 2, 300_000), "normal": rng.normal(0, 1, 50_000),
              "ties": np.r_[rng.exponential(1, 2000), np.full(500, 5.0), np.zeros(300)],
              "tiny": np.array([0.25])}[dist].astype(np.float32)
    sk = sketch_in_blocks(scores, blocks=min(7, len(scores)))
    exact = np.quantile(scores.astype(np.float64), QS)
    approx = sk.quantile(QS)
    # within a bucket (2**-11 relative) of np.quantile, or of the gap between neighbouring order statistics
    tol = np.maximum(np.abs(exact) * 2 ** -11, 1e-12)
    s = np.sort(scores.astype(np.float64))
    ranks = np.asarray(QS) * (len(s) - 1)
    gaps = s[np.ceil(ranks).astype(int)] - s[np.floor(ranks).astype(int)]
    assert np.all(np.abs(approx - exact) <= tol + gaps), (approx, exact)
    assert sk.rows == len(scores) and sk.quantile(0.0) == s[0] and sk.quantile(1.0) == s[-1]


def test_merging_blocks_equals_one_sketch_and_memory_is_fixed():
    scores = np.random.default_rng(2).lognormal(0, 1, 250_000).astype(np.float32)
    one, many = sketch_in_blocks(scores, 1), sketch_in_blocks(scores, 50)
    assert np.array_equal(one.counts, many.counts) and one.counts.size == N_BUCKETS
    assert np.array_equal(one.quantile(QS), many.quantile(QS))
    assert len(many.sample) == SAMPLE_ROWS and set(many.sample.tolist()) <= set(scores.tolist())


def test_non_finite_scores_are_left_out_and_an_empty_sketch_has_no_quantile():
    sk = ScoreSketch.of(np.array([1.0, np.nan, np.inf, 2.0, 3.0], np.float32))
    assert sk.rows == 5 and sk.finite_rows == 3 and sk.quantile(0.5) == pytest.approx(2.0, rel=2 ** -11)
    assert np.isnan(ScoreSketch(1).quantile(0.5))


def test_histogram_agrees_with_the_exact_one():
    scores = np.random.default_rng(3).lognormal(-2, 1, 100_000).astype(np.float32)
    exact, approx = error_histogram(scores), error_histogram_of(ScoreSketch.of(scores))
    assert np.allclose(exact["edges"], approx["edges"], rtol=1e-6)
    assert sum(approx["counts"]) == len(scores)
    assert np.abs(np.subtract(exact["counts"], approx["counts"])).sum() <= len(scores) * 0.002
    assert np.allclose(exact["deciles"], approx["deciles"], rtol=2 ** -10)


def test_validation_pass_function_summarizes_what_the_scorer_scores():
    """The task function of the threshold pass (no Ray here): its one-row summary per block, merged, gives
    the scores the predictor gives row by row, whatever the slice size."""
    import dataclasses

    import pyarrow as pa

    from pipeline.config import ModelSection
    from pipeline.featurizer import Featurizer
    from pipeline.models import build_model
    from pipeline.predictor import Predictor
    from pipeline.rows import to_fixed_size_list
    from pipeline.validation import ValidationSketch

    n_features, settings = 6, dataclasses.asdict(ModelSection(hidden_dims=[8], latent_dim=2))
    fz = Featurizer.numeric([f"f{j}" for j in range(n_features)], np.zeros(n_features), np.ones(n_features))
    state = build_model(n_features, **settings).state_dict()
    x = np.random.default_rng(4).normal(size=(1000, n_features)).astype(np.float32)
    table = pa.table({"x": to_fixed_size_list(x)})
    exact = Predictor.from_state(settings, state, fz)(x)
    sk = ScoreSketch(n_features)
    for block in (table.slice(0, 700), table.slice(700), table.slice(0, 0)):
        for row in ValidationSketch(settings, state, fz, batch_size=256, run_id="t")(block).to_pylist():
            sk.add(row)
    assert sk.rows == 1000
    np.testing.assert_allclose(sk.sq_sum, exact.errors.astype(np.float64).sum(axis=0), rtol=1e-5)
    assert sk.quantile(0.99) == pytest.approx(float(np.quantile(exact.score, 0.99)), rel=2 ** -10)
