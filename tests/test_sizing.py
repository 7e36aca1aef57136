"""Sizes and budgets that follow from the table, and the calibrated score (no Ray)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.calibration import ScoreCalibration
from pipeline.config import ModelSection, load_config
from pipeline.errors import ConfigError
from pipeline.kinds import build_model
from pipeline.sizing import auto_sizes, resolve_model, step_budget, still_improving


@pytest.mark.parametrize("n_features", [2, 3, 6, 16, 100, 2_000])
def test_auto_sizes_fit_every_table_with_two_features_or_more(n_features):
    hidden, latent = auto_sizes(n_features)
    assert 1 <= latent < n_features  # undercomplete, so the dense check passes
    assert len(hidden) == 1 and latent < hidden[0]
    model = resolve_model(ModelSection(), n_features)
    assert (model.hidden_dims, model.latent_dim) == (hidden, latent)
    build_model(n_features, **dataclasses.asdict(model))  # and the model builds


def test_auto_sizes_follow_the_width():
    assert auto_sizes(2) == ([4], 1)                        # tiny width: a 1-wide code
    assert auto_sizes(100)[1] > auto_sizes(16)[1] > auto_sizes(6)[1]
    assert auto_sizes(2_000) == ([64], 32)                  # capped for very wide tables
    assert auto_sizes(6)[0] == [6] and auto_sizes(21)[0] == [20]  # hidden ~ the input width


def test_explicit_sizes_win_and_are_still_checked():
    m = resolve_model(ModelSection(hidden_dims=[7], latent_dim=3), 20)
    assert (m.hidden_dims, m.latent_dim) == ([7], 3)
    half = resolve_model(ModelSection(latent_dim=5), 20)
    assert half.latent_dim == 5 and half.hidden_dims == auto_sizes(20)[0]
    with pytest.raises(ConfigError, match="model.latent_dim: 8 must be < the 6 input features"):
        resolve_model(ModelSection(latent_dim=8), 6)
    assert resolve_model(ModelSection(), 6, algorithm="recirculation").hidden_dims == []


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
    assert step_budget(1024, 100_000_000, "auto", 2000) == (1024, 20)   # a big table keeps its settings
    batch, epochs = step_budget(1024, 4_000, "auto", 2000)             # pendigits-sized: smaller batches
    assert batch == 40 and epochs == 20 and epochs * (4_000 // batch) >= 2000
    batch, epochs = step_budget(1024, 900, "auto", 2000)               # tiny: batch floor 16, more epochs
    assert batch == 16 and epochs == 36
    assert step_budget(1024, 4_000, "auto", 0) == (200, 20)            # steps 0: 20 epochs of >= 20 steps
    assert step_budget(1024, 900, 3, 2000) == (45, 3)                  # explicit epochs: a hard limit


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
    # per-feature term 0.5 * (2 + 1), plus plain MSE over its validation mean (100.5 / 50.5)
    assert float(s[0]) == pytest.approx(0.5 * (2 + 1) + 100.5 / 50.5, rel=0.02)
    # ... which plain MSE ranks the other way round
    assert rows.mean(dim=1)[0] > rows.mean(dim=1)[1]
    # a row reconstructed as well as any but with its code 6 standard deviations out scores high
    far = cal.score(torch.tensor([[100.0, 1.0]]), torch.tensor([[6.0]]))
    assert float(far) > 30
    cal.reset()
    assert float(cal.count) == 0
    # before any validation row: plain MSE twice (per feature and as a whole), no code term
    assert float(cal.score(torch.tensor([[4.0, 2.0]]), torch.zeros(1, 1))) == pytest.approx(6.0)


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
