"""Sizes and budgets that follow from the table, and the calibrated score (no Ray)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.calibration import (BASE_WEIGHTS, KNN_WEIGHT, MAX_SPREAD, MAX_SUBSPACE_FEATURES, MIN_HELD_OUT_ROWS,
                                  REFERENCE_ROWS, TERMS, ScoreCalibration, SubspaceTerm, fitted_term_weights,
                                  held_out_rows, histogram_quantile, knn_distance, spread_weights, term_histogram)
from pipeline.config import ModelSection, load_config
from pipeline.errors import ConfigError
from pipeline.models import build_model
from pipeline.sizing import (auto_member_latents, auto_sizes, auto_steps, auto_validation_fraction, few_validation_rows,
                             resolve_model, resolve_validation, step_budget, still_improving)


@pytest.mark.parametrize("n_features", [2, 3, 6, 16, 100, 2_000])
def test_auto_sizes_fit_every_table_with_two_features_or_more(n_features):
    hidden, latent = auto_sizes(n_features)
    assert 1 <= latent < n_features  # undercomplete, so the dense check passes
    assert len(hidden) == 1 and latent < hidden[0]
    model = resolve_model(ModelSection(), n_features)
    assert (model.hidden_dims, model.latent_dim) == (hidden, latent)
    assert max(model.member_latent_dims) < hidden[0]  # every member's code narrower than the hidden layer
    build_model(n_features, **dataclasses.asdict(model))  # and the model builds


def test_a_one_column_input_gets_a_code_as_wide_as_the_input():
    """No code is narrower than one column: the auto sizes take a 1-wide one (the score's code terms rank the
    column's unusual values) where an explicit width is still checked."""
    model = resolve_model(ModelSection(), 1)
    assert (model.hidden_dims, model.latent_dim, model.member_latent_dims) == ([4], 1, [1] * model.ensemble)
    build_model(1, **dataclasses.asdict(model))
    with pytest.raises(ConfigError, match="model.latent_dim: 1 must be < the 1 input features"):
        resolve_model(ModelSection(latent_dim=1), 1)


def test_a_threshold_from_few_validation_rows_says_how_rough_it_is():
    assert few_validation_rows(100, 0.99) is None and few_validation_rows(5000, 0.99) is None
    note = few_validation_rows(3, 0.99)
    assert note.startswith("only 3 validation rows: the threshold (q0.99)") and "25% or more" in note



def test_a_scoring_run_flagging_far_more_rows_than_the_threshold_expects_says_so():
    from pipeline.metrics import flagged_share_note

    assert flagged_share_note(98, 20_000, 0.99) is None  # the demo: 0.5%
    assert flagged_share_note(900, 20_000, 0.99) is None  # 4.5%: under five times the threshold's 1%
    assert flagged_share_note(4, 10, 0.99) is None  # too few rows flagged to tell
    note = flagged_share_note(273, 400, 0.99)  # 400 rows x 3,000 columns of noise, scored in-sample
    assert note.startswith("68% of the rows flagged, where the threshold (q0.99 of the validation rows' scores) "
                           "flags about 1% of rows like those")
    assert "in-sample" in note and "shifted since training" in note
    assert flagged_share_note(60, 1000, 0.95) is None and flagged_share_note(300, 1000, 0.95)

def test_auto_sizes_follow_the_width():
    assert auto_sizes(2) == ([4], 1)                        # tiny width: a 1-wide code
    assert auto_sizes(100)[1] > auto_sizes(16)[1] > auto_sizes(6)[1]
    assert auto_sizes(2_000) == ([512], 32)                 # capped for very wide tables
    assert auto_sizes(6)[0] == [6] and auto_sizes(21)[0] == [20]  # hidden ~ the input width


def test_explicit_sizes_win_and_are_still_checked():
    m = resolve_model(ModelSection(hidden_dims=[7], latent_dim=3), 20)
    assert (m.hidden_dims, m.latent_dim) == ([7], 3)
    half = resolve_model(ModelSection(latent_dim=5), 20)
    assert half.latent_dim == 5 and half.hidden_dims == auto_sizes(20)[0]
    with pytest.raises(ConfigError, match="model.latent_dim: 8 must be < the 6 input features"):
        resolve_model(ModelSection(latent_dim=8), 6)
    assert resolve_model(ModelSection(), 6, algorithm="recirculation").hidden_dims == []


def test_ensemble_members_codes_spread_around_a_quarter_of_the_width():
    assert auto_member_latents(16, 5) == [4, 2, 8, 2, 8]          # d/4 (member 0: latent), d/8, d/2, ...
    assert auto_member_latents(2, 5) == [1] * 5                   # tiny: every code 1 wide (below the input)
    assert auto_member_latents(6, 3) == [2, 1, 3]
    assert auto_member_latents(2_000, 4) == [32, 250, 256, 250]   # latent capped at 32, the others at 256
    m = resolve_model(ModelSection(), 16)
    assert m.member_latent_dims == [4, 2, 8, 2, 8] and m.latent_dim == 4 and m.hidden_dims == auto_sizes(16)[0]
    ens = build_model(16, **dataclasses.asdict(m))
    assert [member.latent_dim for member in ens.members] == [4, 2, 8, 2, 8]
    assert ens.latent_dim == 4 and ens.latent(torch.zeros(3, 16)).shape == (3, 4)  # latent: member 0's code
    assert ens.score(torch.zeros(3, 16)).shape == (3,)
    # an explicit latent_dim: every member that width; explicit widths win and are checked
    assert resolve_model(ModelSection(latent_dim=3), 16).member_latent_dims == [3] * 5
    assert resolve_model(ModelSection(ensemble=1), 16).member_latent_dims == [4]
    assert resolve_model(ModelSection(ensemble=2, member_latent_dims=[5, 9]), 16).latent_dim == 5
    with pytest.raises(ConfigError, match=r"model.member_latent_dims: \[5, 9\] has not one width per model"):
        ModelSection(ensemble=3, member_latent_dims=[5, 9])
    with pytest.raises(ConfigError, match=r"model.member_latent_dims: \[2, 6\]: each must be < the 6 input"):
        resolve_model(ModelSection(ensemble=2, member_latent_dims=[2, 6]), 6)
    with pytest.raises(ConfigError, match="the first is member 0's code, model.latent_dim 4"):
        ModelSection(latent_dim=4, ensemble=2, member_latent_dims=[3, 3])
    # a manifest from before member_latent_dims: every member the manifest's latent_dim
    old = build_model(16, hidden_dims=[16], latent_dim=4, ensemble=3)
    assert [member.latent_dim for member in old.members] == [4, 4, 4]


def test_knn_term_sees_codes_in_the_gap_between_clusters():
    """Validation codes in two clusters (at -3 and +3): a code between them sits at their mean, so the
    standardized code distance calls it typical; its distance to the nearest validation codes does not."""
    torch.manual_seed(0)
    cal = ScoreCalibration(n_features=1, latent_dim=1)
    codes = torch.cat([torch.randn(1500, 1) * 0.3 - 3, torch.randn(1500, 1) * 0.3 + 3])
    for batch in codes[torch.randperm(3000)].split(500):
        cal.observe(torch.ones(len(batch), 1), batch)
    ref = cal.reference()
    assert ref.shape == (REFERENCE_ROWS, 1) and (ref < 0).any() and (ref > 0).any()  # a sample of both
    gap, inside = cal.knn_term(torch.tensor([[0.0]])), cal.knn_term(torch.tensor([[3.0]]))
    assert float(gap) > 100 * float(inside) and float(gap) > 10
    s = cal.score(torch.ones(2, 1), torch.tensor([[0.0], [3.0]]))
    assert s[0] > s[1] + KNN_WEIGHT * 10
    # the sample's own rows average 1 (the term skips each row's nearest, itself for a sampled row)
    assert float(cal.knn_term(ref).mean()) == pytest.approx(1.0, rel=1e-6)
    assert torch.allclose(knn_distance(ref[:5], ref), cal.knn_term(ref[:5]) * knn_distance(ref, ref).mean())
    # reset empties the sample (term 0); a model saved before the kNN term loads with an empty one
    state = {k: v.clone() for k, v in cal.state_dict().items() if not k.startswith("ref")}
    cal.reset()
    assert cal.reference().shape[0] == 0 and float(cal.knn_term(torch.tensor([[0.0]]))) == 0.0
    old = ScoreCalibration(n_features=1, latent_dim=1)
    old.load_state_dict(state)
    assert float(old.count) == 3000 and old.reference().shape[0] == 0


def test_knn_term_scores_unseen_rows_as_it_scores_the_sampled_rows():
    """A sampled row's term leaves its own code out (its 5 nearest other codes); an unseen row keeps its nearest
    (its 5 nearest codes), so both average about 1. Skipping every row's nearest scored unseen rows on their 2nd
    to 6th neighbours: about 29% higher here, and a threshold set on the (mostly sampled) validation rows of a small
    input flagged 1.2% to 3.7% of its other rows instead of 1%."""
    torch.manual_seed(0)
    cal = ScoreCalibration(n_features=1, latent_dim=2)
    cal.observe(torch.ones(300, 1), torch.randn(300, 2))
    ref, unseen = cal.reference(), torch.randn(4000, 2)
    exact = lambda a: torch.cdist(a.double(), ref.double(), compute_mode="donot_use_mm_for_euclid_dist").square()
    assert float(cal.knn_term(ref).mean()) == pytest.approx(1.0, rel=1e-6)
    term = float(cal.knn_term(unseen).mean())
    skipped = float((exact(unseen).topk(6, largest=False).values[:, 1:].mean(1) / knn_distance(ref, ref).mean()).mean())
    assert 0.8 < term < 1.1 and skipped > 1.2 * term  # every row's nearest skipped: unseen rows score higher
    torch.testing.assert_close(knn_distance(unseen, ref), exact(unseen).topk(5, largest=False).values.mean(1),
                               rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(knn_distance(ref, ref), exact(ref).topk(6, largest=False).values[:, 1:].mean(1),
                               rtol=1e-4, atol=1e-9)
    # a row whose code is a sampled one (a duplicate of a validation row) is scored as that row
    assert float(knn_distance(ref[7:8].clone(), ref)) == pytest.approx(float(knn_distance(ref, ref)[7]))


def test_ensemble_auto_is_five_models_with_backprop_and_one_with_recirculation():
    assert resolve_model(ModelSection(), 6).ensemble == 5
    assert resolve_model(ModelSection(ensemble=2), 6).ensemble == 2
    assert resolve_model(ModelSection(), 6, algorithm="recirculation").ensemble == 1
    with pytest.raises(ConfigError, match="model.ensemble: 3: train.algorithm recirculation trains one model"):
        load_config(None, ["train.algorithm=recirculation", "model.hidden_dims=[]", "model.ensemble=3"])
    with pytest.raises(ConfigError, match="model.ensemble: 0 must be >= 1"):
        ModelSection(ensemble=0)


def test_auto_is_the_default_and_parses():
    cfg = load_config(None, [])
    assert cfg.model.latent_dim == "auto" and cfg.model.hidden_dims == "auto" and cfg.model.score == "calibrated"
    assert cfg.train.epochs == "auto" and load_config(None, ["train.epochs=5"]).train.epochs == 5
    cfg = load_config(None, ["model.latent_dim=4", "model.hidden_dims=[16]"])
    assert cfg.model.latent_dim == 4 and cfg.model.hidden_dims == [16]
    with pytest.raises(ConfigError, match="model.latent_dim"):
        load_config(None, ["model.latent_dim=big"])
    with pytest.raises(ConfigError, match="model.score"):
        load_config(None, ["model.score=elbo"])  # elbo belongs to the variational kind


def test_step_budget_lowers_the_batch_then_raises_the_epochs():
    assert step_budget(1024, 1_000_000, "auto", 2000) == (1024, 20)     # a big table keeps its settings
    # a very large one: the epochs that reach 10x the steps, at least one (2M rows: 1,954 steps an epoch)
    assert step_budget(1024, 2_000_000, "auto", 2000) == (1024, 11)
    assert step_budget(1024, 100_000_000, "auto", 2000) == (1024, 1)
    assert step_budget(1024, 100_000_000, "auto", 0) == (1024, 20)      # steps 0: no step budget, no cap
    assert step_budget(1024, 100_000_000, 20, 2000) == (1024, 20)       # explicit epochs: as set
    batch, epochs = step_budget(1024, 4_000, "auto", 2000)             # pendigits-sized: smaller batches
    assert batch == 40 and epochs == 20 and epochs * (4_000 // batch) >= 2000
    batch, epochs = step_budget(1024, 900, "auto", 2000)               # tiny: batch floor 16, more epochs
    assert batch == 16 and epochs == 36
    assert step_budget(1024, 4_000, "auto", 0) == (200, 20)            # steps 0: 20 epochs of >= 20 steps
    assert step_budget(1024, 900, 3, 2000) == (45, 3)                  # explicit epochs: a hard limit


def test_auto_steps_are_more_on_an_input_with_categorical_columns():
    assert auto_steps("auto") == auto_steps("auto", categorical=False) == 2000
    assert auto_steps("auto", categorical=True) == 4000    # the levels' dependencies are learned late
    assert auto_steps(3000, categorical=True) == 3000 and auto_steps(0, categorical=True) == 0  # a number wins
    # the demo's size (18,042 training rows, 2 workers): the same 20 epochs, half the batch, twice the steps
    assert step_budget(1024, 9_021, "auto", "auto") == (90, 20)
    assert step_budget(1024, 9_021, "auto", "auto", categorical=True) == (45, 20)
    assert step_budget(1024, 9_021, "auto", 2000, categorical=True) == (90, 20)
    assert load_config(None, []).train.steps == "auto" and load_config(None, ["train.steps=500"]).train.steps == 500
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(None, ["train.steps=-1"])


def test_validation_share_holds_out_about_256_rows_of_a_small_input(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.inputs import inspect_input
    from pipeline.rows import validation_mask
    from pipeline.config import StorageSection
    from pipeline.dryrun import dry_run
    from pipeline.storage import Storage

    assert auto_validation_fraction(10**9) == auto_validation_fraction(2_560) == 0.1  # large inputs: 10%
    assert auto_validation_fraction(1_000) == pytest.approx(0.256)                      # 256 rows
    assert auto_validation_fraction(853) == auto_validation_fraction(35) == 0.3         # at most 30%
    data = load_config(None, []).data
    assert data.validation_fraction == "auto" and resolve_validation(data, 1_000).validation_fraction == 0.256
    fixed = load_config(None, ["data.validation_fraction=0.5"]).data
    assert resolve_validation(fixed, 100).validation_fraction == 0.5                    # a number is kept
    with pytest.raises(ConfigError, match="data.validation_fraction"):
        load_config(None, ["data.validation_fraction=most"])
    with pytest.raises(ValueError, match="auto is resolved"):  # nothing splits rows on an unresolved share
        validation_mask(pa.table({"id": [1, 2]}), data)
    # the job resolves it from the input's row count when it inspects the input
    for rows, share in ((400, 0.3), (1_000, 0.256), (5_000, 0.1)):
        path = tmp_path / str(rows)
        path.mkdir()
        pq.write_table(pa.table({"id": range(rows), "a": np.ones(rows)}), path / "part.parquet")
        spec = inspect_input(load_config(None, [f"data.input={path}", "data.features=[a]"]).data,
                             Storage(StorageSection()))
        assert spec.data.validation_fraction == pytest.approx(share)
    # and the training dry run says what it will hold out
    lines = dry_run(load_config(None, [f"data.input={tmp_path / '400'}", "data.features=[a]",
                                       f"artifacts.uri={tmp_path / 'art'}", f"output.uri={tmp_path / 'out'}"]))
    assert any(line.endswith("1 features, 30% held out for validation") for line in lines), lines


def _history(losses, best_each_time=True):
    best, out = float("inf"), []
    for e, v in enumerate(losses):
        best_epoch = e if v < best else out[-1]["best_epoch"]
        best = min(best, v)
        out.append({"epoch": e, "val_loss": v, "best_epoch": best_epoch})
    return out


def test_still_improving_only_at_the_epoch_limit_with_a_falling_loss():
    falling = _history([0.2, 0.1, 0.088, 0.076])
    note = still_improving(falling, epoch_limit=4, min_delta=1e-4)
    assert note and "train.epochs" in note and "0.08800 -> 0.07600" in note
    assert still_improving(falling, epoch_limit=10, min_delta=1e-4) is None      # stopped early: fine
    assert still_improving(_history([0.2, 0.1, 0.1, 0.11]), epoch_limit=4, min_delta=1e-4) is None  # flat
    assert still_improving(_history([0.2, 0.1, 0.09999999]), epoch_limit=3, min_delta=1e-4) is None  # tiny
    # a gain early stopping counts but that is not worth a warning: 0.5% in the last epoch
    assert still_improving(_history([0.2, 0.1, 0.0995]), epoch_limit=3, min_delta=1e-4) is None
    assert still_improving(_history([0.2, 0.1, 0.098]), epoch_limit=3, min_delta=1e-4) is not None  # 2%


def test_calibrated_score_puts_features_on_one_scale_and_sees_far_out_codes():
    torch.manual_seed(0)
    cal = ScoreCalibration(n_features=2, latent_dim=1)
    # validation: feature 0 is reconstructed with errors 100x those of feature 1; codes ~ N(0, 1)
    sq = torch.stack([torch.full((1000,), 100.0), torch.full((1000,), 1.0)], dim=1)
    cal.observe(sq, torch.randn(1000, 1))
    # a row 10x off on the well-reconstructed feature outranks one 2x off on the noisy feature ...
    rows = torch.tensor([[200.0, 1.0], [100.0, 10.0]])
    s = cal.score(rows, torch.zeros(2, 1))
    assert s[1] > s[0]
    # per-feature term 0.5 * (2 + 1), plus plain MSE over its validation mean (100.5 / 50.5), plus the
    # code's kNN term (the code 0 sits where the validation codes are densest: far below their mean of 1)
    knn = float(cal.knn_term(torch.zeros(1, 1)))
    assert knn < 0.5
    assert float(s[0]) == pytest.approx(0.5 * (2 + 1) + 100.5 / 50.5 + KNN_WEIGHT * knn, rel=0.02)
    # ... which plain MSE ranks the other way round
    assert rows.mean(dim=1)[0] > rows.mean(dim=1)[1]
    # a row reconstructed as well as any but with its code 6 standard deviations out scores high
    far = cal.score(torch.tensor([[100.0, 1.0]]), torch.tensor([[6.0]]))
    assert float(far) > 30
    cal.reset()
    assert float(cal.count) == 0
    # before any validation row: plain MSE twice (per feature and as a whole), no code term
    assert float(cal.score(torch.tensor([[4.0, 2.0]]), torch.zeros(1, 1))) == pytest.approx(6.0)



def test_the_terms_histogram_gives_their_quantiles_within_a_bin():
    values = torch.from_numpy(np.random.default_rng(0).lognormal(0, 2, 20_000))
    terms = torch.stack([values, torch.zeros_like(values)], dim=1)  # the second term 0 in every row
    counts = term_histogram(terms)
    assert counts.sum(dim=1).tolist() == [20_000, 20_000] and counts[1, 0] == 20_000
    for q in (0.5, 0.99):
        got = histogram_quantile(counts, q)
        assert float(got[0]) == pytest.approx(float(np.quantile(values.numpy(), q)), rel=0.05)
        assert float(got[1]) == 0.0
    # histograms of parts add up to the whole's (what the workers' all-reduce relies on)
    torch.testing.assert_close(term_histogram(terms[:7000]) + term_histogram(terms[7000:]), counts)


def test_the_term_whose_top_rows_stand_furthest_from_its_bulk_weighs_most():
    rng = np.random.default_rng(1)
    bulk = rng.gamma(20, 1 / 20, size=(5000, 4))  # every term about 1, narrow
    heavy = bulk.copy()
    heavy[:100, 1] = 30.0  # the code term: 2% of the rows far out
    counts = term_histogram(torch.from_numpy(heavy))
    w = spread_weights(counts)
    assert float(w.sum()) == pytest.approx(sum(BASE_WEIGHTS))
    assert int(w.argmax()) == TERMS.index("code")
    # a term whose median is about 0 (rows whose codes coincide) has its spread capped at MAX_SPREAD
    dup = bulk.copy()
    dup[:4000, 3] = 1e-9
    counts = term_histogram(torch.from_numpy(dup))
    spread = (histogram_quantile(counts, 0.99) / histogram_quantile(counts, 0.5))
    assert float(spread[3]) > 1e6
    ratio = spread_weights(counts) / torch.tensor(BASE_WEIGHTS, dtype=torch.float64)  # proportional to spreads
    assert float(ratio[3] / ratio[0]) == pytest.approx(MAX_SPREAD / float(spread[0]))
    # terms spread alike keep the base weights; beside a term 0 everywhere (the kNN term without a sample),
    # the others keep their base ratios
    base = torch.tensor(BASE_WEIGHTS, dtype=torch.float64)
    torch.testing.assert_close(spread_weights(term_histogram(torch.from_numpy(bulk[:, [0, 0, 0, 0]]))), base)
    no_knn = bulk[:, [0, 0, 0, 0]].copy()
    no_knn[:, 3] = 0.0
    w = spread_weights(term_histogram(torch.from_numpy(no_knn)))
    torch.testing.assert_close(w[:3] / w[0], base[:3] / base[0])


def test_fitted_weights_score_the_terms_travel_in_the_state_and_an_older_model_keeps_the_base_weights():
    torch.manual_seed(0)
    cal = ScoreCalibration(n_features=3, latent_dim=2)
    sq, h = torch.rand(400, 3), torch.randn(400, 2)
    sq[:8, 0] = 500.0  # a few rows far out on one feature's error
    cal.observe(sq, h)
    base = cal.score(sq, h)
    cal.count_terms()
    cal.score(sq[:200], h[:200])
    cal.score(sq[200:], h[200:])
    counts = cal.take_counts()
    assert counts.sum(dim=1).tolist() == [400] * 4
    cal.fit_weights(counts)
    terms = cal.terms(sq, h)
    torch.testing.assert_close(cal.score(sq, h), (terms @ cal.term_weight).float())
    assert not torch.allclose(cal.score(sq, h), base)
    # the weights are state: a model loaded from it scores alike; one saved before them scores as before
    loaded = ScoreCalibration(n_features=3, latent_dim=2)
    loaded.load_state_dict(cal.state_dict())
    torch.testing.assert_close(loaded.score(sq, h), cal.score(sq, h))
    older = {k: v for k, v in cal.state_dict().items() if k != "term_weight"}
    old_model = ScoreCalibration(n_features=3, latent_dim=2)
    old_model.load_state_dict(older)
    torch.testing.assert_close(old_model.score(sq, h), base)
    # the manifest's figures: the members' mean weight per term
    state = {"members.0.calibration.term_weight": torch.tensor([1.0, 2.0, 0.25, 0.25], dtype=torch.float64),
             "members.1.calibration.term_weight": torch.tensor([2.0, 1.0, 0.25, 0.25], dtype=torch.float64)}
    assert fitted_term_weights(state) == {"recon": 1.5, "code": 1.5, "mse": 0.25, "knn": 0.25}
    assert fitted_term_weights({"encoder.0.weight": torch.zeros(1)}) is None

def test_held_out_rows_are_scored_without_their_own_statistics_as_unseen_rows_are():
    rng = np.random.default_rng(5)
    sq, h = torch.from_numpy(rng.gamma(2, 0.5, (12, 3))), torch.from_numpy(rng.normal(size=(12, 2)))
    cal = ScoreCalibration(n_features=3, latent_dim=2)
    cal.observe(sq, h)
    plain = cal.terms(sq, h)
    with held_out_rows(cal):
        held = cal.terms(sq, h)
    assert not cal.held_out  # only while the block is open
    torch.testing.assert_close(cal.terms(sq, h), plain)
    for i in (0, 7):  # row i's terms equal those of a calibration that never saw it
        others = ScoreCalibration(n_features=3, latent_dim=2)
        keep = torch.arange(12) != i
        others.observe(sq[keep], h[keep])
        alone = others.terms(sq[i:i + 1], h[i:i + 1])
        torch.testing.assert_close(held[i, :3], alone[0, :3])  # the kNN term skips each row's nearest already
    torch.testing.assert_close(held[:, 3], plain[:, 3])
    # on 12 rows a row's own code pulls the mean and variance its way: scored as unseen, its code term grows
    assert float(held[:, 1].mean()) > 1.2 * float(plain[:, 1].mean())
    with held_out_rows(cal, on=False):
        torch.testing.assert_close(cal.terms(sq, h), plain)
    # under MIN_HELD_OUT_ROWS observed rows the rows score in-sample (from one other row, a variance of 0)
    few = ScoreCalibration(n_features=3, latent_dim=2)
    few.observe(sq[:MIN_HELD_OUT_ROWS - 1], h[:MIN_HELD_OUT_ROWS - 1])
    with held_out_rows(few):
        held_few = few.terms(sq[:MIN_HELD_OUT_ROWS - 1], h[:MIN_HELD_OUT_ROWS - 1])
    torch.testing.assert_close(held_few, few.terms(sq[:MIN_HELD_OUT_ROWS - 1], h[:MIN_HELD_OUT_ROWS - 1]))


def test_calibrated_model_ranks_far_out_rows_that_mse_misses():
    """A linear 1-D manifold in 2-D: rows far out ALONG it reconstruct well (MSE misses them), off it do not."""
    torch.manual_seed(0)
    t = torch.randn(2000, 1)
    x = torch.cat([t, 2 * t], dim=1) + 0.05 * torch.randn(2000, 2)
    outliers = torch.tensor([[8.0, 16.0], [-7.0, -14.0]])  # on the line, 7-8 standard deviations out
    for score in ("recon", "calibrated"):
        torch.manual_seed(0)
        model = build_model(2, hidden_dims=[8], latent_dim=1, activation="linear", score=score)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(300):
            loss, _ = model.loss(x)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        model.begin_epoch(0)
        with torch.inference_mode():
            model.eval_loss(x[:1000])  # the validation pass gathers the statistics
            normal = model.score(x[1000:]).numpy()
            out = model.score(outliers).numpy()
        rank = (normal[:, None] < out[None, :]).mean()  # share of normal rows each outlier outranks
        if score == "recon":
            assert rank < 0.99
        else:
            assert rank > 0.999
    assert np.isfinite(out).all()


def _plane_rows(rows: int, seed: int = 0, spread: float = 2.0) -> torch.Tensor:
    """Rows near a 3-dimensional linear subspace of 8 features (`spread` along it, small noise off it)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(8, 3, generator=torch.Generator().manual_seed(99)))[0]
    return torch.randn(rows, 3, generator=g) * spread @ basis.T + 0.05 * torch.randn(rows, 8, generator=g)


def _fitted_subspace(x: torch.Tensor) -> SubspaceTerm:
    sub = SubspaceTerm(x.shape[1])
    for i in range(0, len(x), 256):  # the first epoch's batches
        sub.observe_training(x[i:i + 256])
    sub.fit()
    return sub


def test_subspace_term_scores_rows_off_the_training_rows_subspace_not_far_out_along_it():
    x = _plane_rows(4000)
    sub = SubspaceTerm(8)
    assert torch.equal(sub.term(x[:5]), torch.zeros(5, dtype=torch.float64))  # nothing fitted: no term
    sub = _fitted_subspace(x[:3000])
    assert sub.minor.shape == (8, 5)  # three directions hold 99% of the variance; the noise is the other five
    assert float(sub.term(x[:5]).abs().max()) == 0.0  # components, but no validation mean yet
    sub.observe(x[3000:3500])  # the validation pass
    normal = sub.term(x[3500:])
    # log1p of each row's residual over the validation mean: about log 2 for a typical row
    assert float(normal.mean()) == pytest.approx(np.log(2), abs=0.15)
    off = x[3500:3520] + 1.0 * torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(5)))[0][:, 5]
    along = _plane_rows(20, seed=1, spread=8.0)  # far out along the subspace (4x its spread)
    assert (sub.term(off)[:, None] > normal[None, :]).double().mean() > 0.99
    assert float(sub.term(along).mean()) < float(sub.term(off).mean()) / 2
    sub.reset()
    assert float(sub.val_count) == 0 and float(sub.term(off).abs().max()) == 0.0


def test_subspace_term_adds_nothing_where_the_training_rows_fill_every_direction_or_keep_an_exact_relation():
    g = torch.Generator().manual_seed(0)
    full = torch.randn(3000, 3, generator=g)  # three independent columns: 99% of the variance needs all three
    sub = _fitted_subspace(full[:2000])
    sub.observe(full[2000:2500])
    assert sub.minor.shape == (3, 0) and float(sub.term(full[2500:] * 5).abs().max()) == 0.0
    # a column that is exactly the sum of two others: its direction has no variance but rounding, and normal
    # rows must not get that noise as a score; a row that breaks the relation must stand out
    exact = torch.cat([full, (full[:, :1] + full[:, 1:2])], dim=1)
    sub = _fitted_subspace(exact[:2000])
    sub.observe(exact[2000:2500])
    normal = sub.term(exact[2500:])
    broken = exact[2500:2510].clone()
    broken[:, 3] += 0.5
    assert float(normal.max()) < 1e-3 and float(sub.term(broken).min()) > 5


def test_the_scoring_model_carries_one_subspace_term_through_its_state_dict():
    model = build_model(8, hidden_dims=[6], latent_dim=2, ensemble=3, score="calibrated", subspace_weight=1.0)
    assert model.subspace is not None and all(m.subspace is None for m in model.members)  # one, not per member
    assert build_model(8, hidden_dims=[6], latent_dim=2, ensemble=3, score="calibrated").subspace is None  # default
    assert build_model(MAX_SUBSPACE_FEATURES + 1, hidden_dims=[6], latent_dim=2, score="calibrated",
                       subspace_weight=1.0).subspace is None  # too wide: the job's log says so
    with pytest.raises(ConfigError, match="model.subspace_weight.*calibrated score, not recon"):
        ModelSection(score="recon", subspace_weight=1.0)
    x = _plane_rows(2000)
    model.subspace = _fitted_subspace(x[:1500])
    model.eval()
    model.begin_epoch(0)
    with torch.inference_mode():
        model.eval_loss(x[1500:1800])  # gathers every term's validation statistics, this one's too
        plain = torch.stack([m.score(x[1800:]) for m in model.members]).mean(0)
        scored = model.score(x[1800:])
        assert torch.allclose(scored.double(), plain.double() + model.subspace.term(x[1800:]), atol=1e-4)
    clone = build_model(8, hidden_dims=[6], latent_dim=2, ensemble=3, score="calibrated", subspace_weight=1.0)
    clone.load_state_dict(model.state_dict())  # the component count is the saved model's
    old = build_model(8, hidden_dims=[6], latent_dim=2, ensemble=3, score="calibrated", subspace_weight=1.0)
    old.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("subspace.")})
    clone.eval()
    old.eval()
    with torch.inference_mode():
        assert torch.allclose(clone.score(x[1800:]), scored)
        assert torch.allclose(old.score(x[1800:]), plain, atol=1e-5)  # saved before the term: none


def _subspace_worker(rank: int, world: int, port: int, x: torch.Tensor, out) -> None:
    import torch.distributed as dist

    from pipeline.train.collective import all_reduce_tensor

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        sub = SubspaceTerm(8)
        if rank == 0:  # rank 1 saw no rows at all: it still takes part in the sum
            for i in range(0, len(x), 256):
                sub.observe_training(x[i:i + 256][::2] if i % 512 else x[i:i + 256])
        else:
            for i in range(256, len(x), 512):
                sub.observe_training(x[i:i + 256][1::2])
        sub.fit(all_reduce_tensor)
        if rank == 0:
            out.put((sub.center.numpy().copy(), (sub.minor @ sub.minor.T).numpy().copy()))
    finally:
        dist.destroy_process_group()


def test_workers_fit_the_subspace_from_their_summed_rows_as_one_process_would():
    from tests.procs import two_ranks

    x = _plane_rows(2048)
    one = _fitted_subspace(x)
    center, projector = two_ranks(_subspace_worker, x)
    assert np.allclose(center, one.center.numpy(), atol=1e-5)
    assert np.allclose(projector, (one.minor @ one.minor.T).numpy(), atol=1e-4)  # the same subspace
