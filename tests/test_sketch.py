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


@pytest.mark.parametrize("subspace_weight", [0.0, 1.0])
def test_the_workers_validation_pass_sketches_what_the_predictor_scores_with_rank_0s_model(subspace_weight):
    """The last validation passes (no Ray here: the broadcast, the reduction and the gather are given): every
    rank takes rank 0's best model, fits its term weights from every rank's term counts, and scores its rows;
    both ranks keep the same weighted model, and rank 0's merged sketch gives the scores the predictor gives
    that model row by row, the optional subspace term included."""
    import dataclasses

    import torch

    from pipeline.config import ModelSection, TrainSection
    from pipeline.featurizer import Featurizer
    from pipeline.models import build_model
    from pipeline.predictor import Predictor
    from pipeline.tensors import Normalizer
    from pipeline.calibration import BASE_WEIGHTS, spread_weights
    from pipeline.train.state import EarlyStopping, TrainState, WorkerConfig
    from pipeline.train.validate import finish_validation, score_sketch

    n_features = 6
    model = ModelSection(hidden_dims=[8], latent_dim=2, ensemble=1, subspace_weight=subspace_weight)
    settings = dataclasses.asdict(model)
    mean, scale = np.full(n_features, 0.5), np.full(n_features, 2.0)
    fz = Featurizer.numeric([f"f{j}" for j in range(n_features)], mean, scale)
    wc = WorkerConfig(model=model, train=TrainSection(), n_features=n_features, mean=mean.tolist(),
                      scale=scale.tolist(), batch_size=64, epochs=1, seed=0)
    torch.manual_seed(0)
    x = np.random.default_rng(4).normal(size=(1000, n_features)).astype(np.float32)
    x[:, 5] = x[:, :5].sum(axis=1) + 0.1 * x[:, 5]  # a near-linear relation for the subspace term to see
    rank0 = build_model(n_features, **settings)
    if subspace_weight:  # rank 0's best model: the term fitted on training rows
        rank0.subspace.observe_training((torch.from_numpy(x) - 0.5) / 2.0)
        rank0.subspace.fit()
        assert rank0.subspace.minor.shape[1] >= 1
    rank0.eval_loss((torch.from_numpy(x[:200]) - 0.5) / 2.0)  # its calibration statistics (and subspace mean)
    rank0_state = rank0.state_dict()
    other_state = build_model(n_features, **settings).state_dict()  # rank 1's own best: not what it scores with
    norm = Normalizer(mean, scale)

    def batches(rows):
        return lambda: (norm(torch.from_numpy(rows[i:i + 256])) for i in range(0, len(rows), 256))

    def counts(rows):  # what a rank's weighting pass hands to the reduction: its rows' term histograms
        m = build_model(n_features, **settings)
        m.load_state_dict(rank0_state)
        m.calibration.count_terms()
        m.score(norm(torch.from_numpy(rows)))
        return m.calibration.take_counts()[None]

    total = counts(x[:700]) + counts(x[700:])  # the reduction's sum over both ranks
    states = [TrainState(EarlyStopping(1, 0.0), best_state=s) for s in (rank0_state, other_state)]
    rank1 = []  # rank 1: scores its 300 rows with what rank 0 broadcast, hands its summary to the gather
    # two ranks: rank 0's statistics are its first 200 rows, so neither rank scores its rows as held out
    finish_validation(wc, states[1], batches(x[700:]), torch.device("cpu"), rank=1,
                      gather=lambda mine: rank1.append(mine) or [], broadcast=lambda _: rank0_state,
                      reduce=lambda _: total, held_out=False)
    finish_validation(wc, states[0], batches(x[:700]), torch.device("cpu"), rank=0,
                      gather=lambda mine: [mine, *rank1], broadcast=lambda s: s, reduce=lambda _: total,
                      held_out=False)
    assert states[1].validation is None
    weights = [s.best_state["calibration.term_weight"] for s in states]
    torch.testing.assert_close(weights[0], weights[1])
    torch.testing.assert_close(weights[0], spread_weights(total[0]))
    assert not torch.allclose(weights[0], torch.tensor(BASE_WEIGHTS, dtype=torch.float64))
    exact = Predictor.from_state(settings, states[0].best_state, fz)(x)
    summary = states[0].validation
    assert all(isinstance(v, (torch.Tensor, int, float)) for v in summary.values())  # a weights_only payload
    sk = ScoreSketch.merged(n_features, [summary])
    assert sk.rows == 1000 and len(sk.sample) == 1000
    np.testing.assert_allclose(sk.sq_sum, exact.errors.astype(np.float64).sum(axis=0), rtol=1e-5)
    assert sk.quantile(0.99) == pytest.approx(float(np.quantile(exact.score, 0.99)), rel=2 ** -10)
    assert (sk.lo, sk.hi) == (pytest.approx(float(exact.score.min())), pytest.approx(float(exact.score.max())))
    # a rank without validation rows adds nothing
    empty = score_sketch(build_model(n_features, **settings), iter(()), n_features)
    assert ScoreSketch.merged(n_features, [empty.summary(), summary]).rows == 1000


def test_one_rank_scores_its_validation_rows_as_held_out_for_the_weights_and_the_threshold():
    """One rank (no group): its validation rows are the rows its calibration observed, so the last passes score
    each without its own statistics, as an unseen row is scored; the threshold comes from those scores."""
    import dataclasses

    import torch

    from pipeline.calibration import held_out_rows, spread_weights, term_histogram
    from pipeline.config import ModelSection, TrainSection
    from pipeline.models import build_model
    from pipeline.train.state import EarlyStopping, TrainState, WorkerConfig
    from pipeline.train.validate import finish_validation

    n_features, rows = 5, 24  # a small table's validation split, where a row's own statistics weigh most
    model = ModelSection(hidden_dims=[8], latent_dim=2, ensemble=1)
    wc = WorkerConfig(model=model, train=TrainSection(), n_features=n_features, mean=[0.0] * n_features,
                      scale=[1.0] * n_features, batch_size=8, epochs=1, seed=0)
    torch.manual_seed(0)
    x = torch.from_numpy(np.random.default_rng(6).normal(size=(rows, n_features)).astype(np.float32))
    best = build_model(n_features, **dataclasses.asdict(model))
    best.eval_loss(x)  # the best epoch's validation pass: the calibration observes these rows
    state = TrainState(EarlyStopping(1, 0.0), best_state=best.state_dict())
    finish_validation(wc, state, lambda: iter([x[:10], x[10:]]), torch.device("cpu"), rank=0)
    kept = build_model(n_features, **dataclasses.asdict(model))
    kept.load_state_dict(state.best_state)
    with torch.inference_mode(), held_out_rows(kept):
        held = kept.score(x).numpy()
        terms = kept.calibration.terms(*reversed(kept.score_and_latent(x)[1:]))
    torch.testing.assert_close(kept.calibration.term_weight, spread_weights(term_histogram(terms)))
    with torch.inference_mode():
        plain = kept.score(x).numpy()  # the same rows scored with statistics they are part of
    sk = ScoreSketch.merged(n_features, [state.validation])
    assert sk.rows == rows and sk.hi == pytest.approx(float(held.max()), rel=1e-5)
    assert float(np.median(held)) > float(np.median(plain))
