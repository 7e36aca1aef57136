"""Model-behaviour tests for each autoencoder kind and for recirculation, in plain PyTorch (no Ray).

Each test trains a small model on small in-memory data and asserts the property that makes the kind what it
claims to be (PCA subspace, denoising, sparsity, contraction, ELBO, layer-wise pretraining, recirculation).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from pipeline.config import ModelSection, config_from_dict
from pipeline.errors import ConfigError
from pipeline.kinds import KINDS
from pipeline.models import Ensemble, build_model
from pipeline.models.contractive import encoder_jacobian_sq_norm
from pipeline.recirculation import make_step_fn, recirculation_update
from pipeline.sample import generate
from pipeline.train import evaluate, train_epoch


def manifold_data(rows: int = 3000, features: int = 16, seed: int = 0) -> torch.Tensor:
    """The sample generator's rows (no anomalies), standardized per feature as the pipeline does."""
    x, _ = generate(rows, features=features, latent=3, anomaly_fraction=0.0, seed=seed)
    x = (x - x.mean(0)) / x.std(0)
    return torch.from_numpy(x.astype(np.float32))


def batches(x: torch.Tensor, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(len(x), generator=gen)
    return [x[perm[i:i + batch_size]] for i in range(0, len(x), batch_size)]


def fit(model, x: torch.Tensor, epochs: int, lr: float = 3e-3, batch_size: int = 128, seed: int = 0,
        on_epoch=None) -> list[float]:
    """Minibatch Adam through the pipeline's own train_epoch; returns the training loss per epoch."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for epoch in range(epochs):
        if on_epoch:
            on_epoch(epoch)
        losses.append(train_epoch(batches(x, batch_size, gen), model, opt).loss)
    return losses


def make(kind: str, n_features: int = 16, seed: int = 0, **settings):
    torch.manual_seed(seed)
    section = dataclasses.asdict(ModelSection(kind=kind, **settings))
    return build_model(n_features, **section)


# ------------------------------------------------------------------------------------------- every kind


@pytest.mark.parametrize("ensemble", [1, 2])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_keeps_the_interface(kind, ensemble):
    model = make(kind, hidden_dims=[12, 8], latent_dim=4, ensemble=ensemble)
    x = manifold_data(64)
    loss, parts = model.loss(x)
    assert loss.ndim == 0 and math.isfinite(float(loss)) and "recon" in parts
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.inference_mode():
        score, h, sq = model.score_and_latent(x)
        assert score.shape == (64,) and h.shape == (64, 4) and sq.shape == (64, 16)
        assert torch.allclose(model.score(x), score) and torch.allclose(model.latent(x), h)
        # the validation objective is the mean squared error (variational: -ELBO) whatever the score
        assert float(model.eval_loss(x)) == pytest.approx(float(sq.mean(dim=1).sum()), rel=1e-5) \
            or kind == "variational"
    clone = make(kind, hidden_dims=[12, 8], latent_dim=4, seed=1, ensemble=ensemble)
    clone.load_state_dict(model.state_dict())
    clone.eval()
    with torch.inference_mode():
        # eval_loss gathered the calibrated score's statistics: the state dict carries them to the clone
        assert torch.allclose(clone.score_and_latent(x)[0], model.score_and_latent(x)[0])


@pytest.mark.parametrize("hidden_dims,code_activation,categorical", [
    ([12], None, False),        # the default shape: one hidden layer, codes of three widths
    ([], "sigmoid", False),     # no hidden layer; act(0) = 0.5 in the padded code units
    ([12, 8], "tanh", True),    # two hidden layers; a categorical column's cross-entropy among the errors
])
def test_plain_members_train_as_one_stacked_network_with_the_members_loss_and_gradients(
        hidden_dims, code_activation, categorical):
    from pipeline.layout import SlotLayout

    # 16 slots: 13 numeric columns and one categorical column over slots 13-15
    layout = SlotLayout(14, tuple((i, i) for i in range(13)), ((13, 16, 13),)) if categorical else None
    model = make("dense", hidden_dims=hidden_dims, latent_dim=4, member_latent_dims=[4, 2, 8], ensemble=3,
                 code_activation=code_activation)
    if layout is not None:
        model = Ensemble([type(m)(16, hidden_dims=hidden_dims, latent_dim=m.latent_dim, layout=layout,
                                  code_activation=code_activation) for m in model.members])
    assert model.stacked
    x = manifold_data(32)

    def loss_and_grads(stacked: bool):
        model.stacked = stacked
        model.zero_grad()
        loss, parts = model.loss(x)
        loss.backward()
        return loss.detach(), parts["recon"], [p.grad.clone() for p in model.parameters()]

    loss, recon, grads = loss_and_grads(True)
    ref_loss, ref_recon, ref_grads = loss_and_grads(False)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5) and float(recon) == pytest.approx(float(ref_recon))
    assert all(torch.allclose(g, r, rtol=1e-4, atol=1e-6) for g, r in zip(grads, ref_grads))


def test_only_plain_members_without_dropout_are_stacked_and_only_small_steps():
    from pipeline.models.stack import STACK_MAX_WORK, member_weights, worth_stacking

    for kind in sorted(set(KINDS) - {"dense"}):  # their losses add penalties, noise or stages
        assert not make(kind, hidden_dims=[12], latent_dim=4, ensemble=3).stacked, kind
    assert not make("dense", hidden_dims=[12], latent_dim=4, ensemble=3, dropout=0.1).stacked
    model = make("dense", hidden_dims=[12], latent_dim=4, ensemble=3)
    assert model.stacked and member_weights(model.members) == 3 * (16 * 12 + 12 * 4 + 4 * 12 + 12 * 16)
    rows = STACK_MAX_WORK // member_weights(model.members)
    assert worth_stacking(rows, member_weights(model.members))
    assert not worth_stacking(rows + 1, member_weights(model.members))


def test_build_model_ignores_other_kinds_settings_and_names_unknown_kind():
    m = build_model(8, kind="dense", hidden_dims=[4], latent_dim=2, noise_level=0.3, kl_weight=2.0)
    assert type(m).__name__ == "Autoencoder"
    with pytest.raises(ValueError, match="model.kind 'nope'"):
        build_model(8, kind="nope")


def test_build_model_rejects_a_setting_no_kind_declares():
    """Nothing is dropped silently: a name that is neither shared nor any kind's setting is an error."""
    with pytest.raises(ValueError, match="noise_levl: declared by no model kind"):
        build_model(8, kind="denoising", noise_levl=0.3)


# ------------------------------------------------------------------------------------------- dense = PCA


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angles (radians) between the column spaces of a and b."""
    qa, _ = torch.linalg.qr(a.double())
    qb, _ = torch.linalg.qr(b.double())
    cos = torch.linalg.svdvals(qa.T @ qb).clamp(-1, 1)
    return torch.arccos(cos)


@pytest.mark.parametrize("hidden_dims", [[], [6]])
def test_linear_dense_learns_the_pca_subspace(hidden_dims):
    rows, d, k = 2000, 10, 3
    g = torch.Generator().manual_seed(0)
    # rank 5 with distinct variances: the top-3 subspace is well defined and the code must choose it
    z = torch.randn(rows, 5, generator=g) * torch.tensor([3.0, 2.0, 1.5, 0.5, 0.3])
    x = z @ torch.randn(5, d, generator=g)
    x = (x - x.mean(0)) / x.std(0)  # as the pipeline normalizes
    model = make("dense", d, hidden_dims=hidden_dims, latent_dim=k, activation="linear")
    fit(model, x, epochs=40, lr=1e-2, batch_size=200)
    pca = torch.linalg.svd(x, full_matrices=False).Vh[:k].T  # (d, k)
    with torch.no_grad():  # the decoder is affine: its columns are g(e_i) - g(0)
        cols = (model.decode(torch.eye(k)) - model.decode(torch.zeros(1, k))).T
    angles = principal_angles(cols, pca)
    assert float(angles.max()) < 0.05, angles


# ------------------------------------------------------------------------------------------- denoising


@pytest.mark.parametrize("noise,level", [("gaussian", 0.5), ("mask", 0.25)])
def test_denoising_reconstructs_clean_input_from_corrupted(noise, level):
    x = manifold_data(3000)
    model = make("denoising", hidden_dims=[32], latent_dim=4, noise=noise, noise_level=level)
    fit(model, x, epochs=25)
    test = manifold_data(1000, seed=7)
    torch.manual_seed(3)
    corrupted = model.corrupt(test)
    model.eval()
    with torch.no_grad():
        recon = model(corrupted)
    before = float(torch.mean((corrupted - test) ** 2))
    after = float(torch.mean((recon - test) ** 2))
    assert after < 0.5 * before, (before, after)


# ------------------------------------------------------------------------------------------- sparse


@pytest.mark.parametrize("sparsity,weights", [("l1", [0.0, 0.03, 0.3]), ("kl", [0.0, 0.01, 0.1])])
def test_sparse_code_activation_falls_as_the_penalty_rises(sparsity, weights):
    x = manifold_data(2000)
    means = []
    for w in weights:  # overcomplete: a 24-unit code for 16 features
        model = make("sparse", hidden_dims=[32], latent_dim=24, sparsity=sparsity, sparsity_weight=w)
        fit(model, x, epochs=15)
        model.eval()
        with torch.no_grad():
            means.append(float(model.latent(x).abs().mean()))
    assert means[0] > means[1] > means[2], means


def test_sparse_kl_penalty_is_zero_at_the_target():
    model = make("sparse", latent_dim=4, sparsity="kl", sparsity_target=0.2)
    assert float(model.penalty(torch.full((10, 4), 0.2))) == pytest.approx(0.0, abs=1e-6)
    assert float(model.penalty(torch.full((10, 4), 0.6))) > 0


# ------------------------------------------------------------------------------------------- contractive


@pytest.mark.parametrize("activation", ["gelu", "tanh", "sigmoid", "relu"])
def test_closed_form_jacobian_matches_autograd(activation):
    model = make("contractive", 6, hidden_dims=[7, 5], latent_dim=3, activation=activation, code_activation="tanh")
    x = torch.randn(5, 6)
    _, fro = encoder_jacobian_sq_norm(model, x)
    ref = torch.stack([torch.autograd.functional.jacobian(model.encode, x[i]).pow(2).sum() for i in range(5)])
    assert torch.allclose(fro, ref, rtol=1e-4, atol=1e-6)


def test_contractive_encoder_is_flatter_than_dense():
    x = manifold_data(2000)
    norms = {}
    for kind in ("dense", "contractive"):
        model = make(kind, hidden_dims=[32], latent_dim=6, activation="tanh", contractive_weight=0.1)
        fit(model, x, epochs=15)
        model.eval()
        with torch.no_grad():
            norms[kind] = float(encoder_jacobian_sq_norm(model, x)[1].mean())
    assert norms["contractive"] < 0.5 * norms["dense"], norms


# ------------------------------------------------------------------------------------------- variational


def test_variational_elbo_improves_and_prior_samples_have_the_data_scale():
    x, val = manifold_data(3000), manifold_data(1000, seed=5)
    model = make("variational", hidden_dims=[32], latent_dim=4, kl_weight=1.0)

    def val_neg_elbo() -> float:
        model.eval()
        with torch.no_grad():
            return float(model.neg_elbo(val).mean())

    before = val_neg_elbo()
    fit(model, x, epochs=25)
    after = val_neg_elbo()
    assert after < before - 10, (before, after)  # nats per row on 16 features
    model.train()
    _, parts = model.loss(val)
    assert 0 < float(parts["kl"]) < 1e3
    model.eval()
    samples = model.sample(5000, generator=torch.Generator().manual_seed(0))
    ratio = samples.std(0) / val.std(0)
    assert 0.7 < float(ratio.mean()) < 1.3, ratio
    assert float(samples.mean(0).abs().max()) < 0.5


def test_variational_score_by_config():
    x = manifold_data(64)
    recon = make("variational", latent_dim=4, score="recon").eval()
    elbo = make("variational", latent_dim=4, score="elbo").eval()
    with torch.no_grad():
        assert torch.allclose(recon.score(x), ((recon(x) - x) ** 2).mean(1), atol=1e-6)
        assert torch.allclose(elbo.score(x), elbo.neg_elbo(x), atol=1e-5)
        assert torch.allclose(elbo.latent(x), elbo.posterior(x)[0])


# ------------------------------------------------------------------------------------------- stacked


def test_stacked_pretrains_layer_by_layer_then_finetuning_beats_it():
    x, val = manifold_data(3000), manifold_data(1000, seed=5)
    model = make("stacked", hidden_dims=[32, 16], latent_dim=4, pretrain_epochs=3)
    stages, val_losses = [], []

    def on_epoch(epoch):
        stages.append(model.begin_epoch(epoch))

    losses = []
    for epoch in range(9 + 10):
        losses += fit(model, x, epochs=1, seed=epoch, on_epoch=lambda _e, e=epoch: on_epoch(e))
        s, n = evaluate([val], model)
        val_losses.append(s / n)
    assert stages[:9] == ["pretrain-1/3"] * 3 + ["pretrain-2/3"] * 3 + ["pretrain-3/3"] * 3
    assert stages[9:] == ["finetune"] * 10
    pretrained = val_losses[8]
    assert val_losses[0] > pretrained  # the greedy stages alone already build a working stack
    assert min(val_losses[9:]) < 0.8 * pretrained, val_losses


def test_stacked_stage_is_a_function_of_the_epoch():
    a = make("stacked", hidden_dims=[8], latent_dim=2, pretrain_epochs=2)
    assert [a.begin_epoch(e) for e in range(6)] == ["pretrain-1/2", "pretrain-1/2", "pretrain-2/2",
                                                    "pretrain-2/2", "finetune", "finetune"]


# ------------------------------------------------------------------------------------------- recirculation


def recirc_model(n_features: int, latent: int, seed: int = 0, **kw):
    # score recon: the learning rule's tests compare weights, and the state dict stays weights only
    return make("dense", n_features, seed=seed, hidden_dims=[], latent_dim=latent, activation="linear",
                score="recon", **kw)


def test_recirculation_update_matches_hand_computation():
    model = recirc_model(2, 1, code_activation="sigmoid")
    with torch.no_grad():
        model.encoder[0].weight.copy_(torch.tensor([[0.5, -1.0]]))
        model.encoder[0].bias.fill_(0.1)
        model.decoder[0].weight.copy_(torch.tensor([[2.0], [1.0]]))
        model.decoder[0].bias.copy_(torch.tensor([0.0, -0.5]))
    x = torch.tensor([[1.0, 2.0]])
    lam, lr = 0.75, 0.1
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    # by hand: hidden, reconstruction, regressed visible, recirculated hidden
    y1 = sig(0.5 * 1 - 1.0 * 2 + 0.1)                       # sigmoid(-1.4)
    r = [2.0 * y1 + 0.0, 1.0 * y1 - 0.5]
    y2 = [lam * 1 + (1 - lam) * r[0], lam * 2 + (1 - lam) * r[1]]
    y3 = sig(0.5 * y2[0] - 1.0 * y2[1] + 0.1)
    want = {
        "decoder.weight": [[(1 - y2[0]) * y1], [(2 - y2[1]) * y1]],
        "decoder.bias": [1 - y2[0], 2 - y2[1]],
        "encoder.weight": [[(y1 - y3) * y2[0], (y1 - y3) * y2[1]]],
        "encoder.bias": [y1 - y3],
    }
    updates, mse = recirculation_update(model, x, lam)
    for k, v in want.items():
        assert torch.allclose(updates[k], torch.tensor(v), atol=1e-6), k
    assert float(mse) == pytest.approx(((r[0] - 1) ** 2 + (r[1] - 2) ** 2) / 2, rel=1e-6)
    before = {k: p.clone() for k, p in model.state_dict().items()}
    make_step_fn(model, lr=lr, lam=lam)(x)
    for k, v in want.items():
        key = k.replace("encoder.", "encoder.0.").replace("decoder.", "decoder.0.")
        assert torch.allclose(model.state_dict()[key] - before[key], lr * torch.tensor(v), atol=1e-6), k


@pytest.mark.parametrize("code_activation", ["linear", "sigmoid"])
def test_recirculation_learns_without_autograd(code_activation):
    x = manifold_data(3000)
    model = recirc_model(16, 6, code_activation=code_activation)
    step = make_step_fn(model, lr=0.05, lam=0.75)
    gen = torch.Generator().manual_seed(0)
    losses = []
    with torch.autograd.set_grad_enabled(False):
        for _ in range(15):
            losses.append(train_epoch(batches(x, 64, gen), model, optimizer=None, step_fn=step).loss)
            assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        final = float(torch.mean((model(x) - x) ** 2))
    assert losses[-1] < 0.5 * losses[0], losses
    assert final < 0.5 * float(torch.mean(x ** 2))  # better than reconstructing the mean
    loss, _ = step(x[:8])
    assert not loss.requires_grad


def _recirculation_train(model, shard: torch.Tensor, batch_size: int, epochs: int) -> None:
    step = make_step_fn(model, lr=0.05, lam=0.5)
    for _ in range(epochs):
        train_epoch(batches(shard, batch_size, torch.Generator().manual_seed(1)), model, None, step_fn=step)


def _recirculation_worker(rank: int, world: int, port: int, x: torch.Tensor, out) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # each rank starts from its own random weights, as Ray Train seeds ranks apart: rank 0's must win
        one_step = recirc_model(x.shape[1], 3, seed=rank, code_activation="tanh")
        make_step_fn(one_step, lr=0.05, lam=0.5)(x[:64].chunk(world)[rank])
        trained = recirc_model(x.shape[1], 3, seed=rank, code_activation="tanh")
        # as Ray Train shards: each worker its own half, half the rows per step (same rows per update)
        _recirculation_train(trained, x.chunk(world)[rank], 64 // world, epochs=3)
        if rank == 0:
            with torch.no_grad():
                # numpy, not tensors: torch's queue shares tensors through files this process removes on exit
                out.put(({k: v.numpy().copy() for k, v in one_step.state_dict().items()},
                         float(torch.mean((trained(x) - x) ** 2))))
    finally:
        dist.destroy_process_group()


def test_recirculation_on_two_workers_averages_updates_and_matches_one_worker():
    from tests.procs import two_ranks

    x = manifold_data(2048, features=8)
    single = recirc_model(8, 3, code_activation="tanh")
    make_step_fn(single, lr=0.05, lam=0.5)(x[:64])
    trained = recirc_model(8, 3, code_activation="tanh")
    _recirculation_train(trained, x, 64, epochs=3)
    with torch.no_grad():
        start = float(torch.mean((recirc_model(8, 3, code_activation="tanh")(x) - x) ** 2))
        loss_one = float(torch.mean((trained(x) - x) ** 2))

    state, loss_two = two_ranks(_recirculation_worker, x)
    # one step: the all-reduced update is exactly the single-worker update on the combined batch
    for k, v in single.state_dict().items():
        assert torch.allclose(torch.from_numpy(state[k]), v, atol=1e-6), k
    # training: the same loss up to minibatch noise (the workers' batches are other rows)
    assert loss_one < 0.6 * start and loss_two == pytest.approx(loss_one, rel=0.1), (start, loss_one, loss_two)


# ------------------------------------------------------------------------------------------- config


BASE = {"data": {"input": "x"}}


@pytest.mark.parametrize("raw,key", [
    ({"train": {"algorithm": "recirculation"}, "model": {"hidden_dims": [8]}}, "model.hidden_dims"),
    ({"train": {"algorithm": "recirculation"}, "model": {"kind": "sparse", "hidden_dims": []}}, "model.kind"),
    ({"train": {"epochs": 6}, "model": {"kind": "stacked", "hidden_dims": [8, 4], "pretrain_epochs": 2}},
     "train.epochs"),
    ({"model": {"kind": "stacked", "hidden_dims": []}}, "model.hidden_dims"),
    ({"model": {"kind": "sparse", "sparsity": "kl", "code_activation": "relu"}}, "model.code_activation"),
    ({"model": {"kind": "variational", "code_activation": "relu"}}, "model.code_activation"),
    ({"model": {"noise": "mask", "noise_level": 1.0}}, "model.noise_level"),
    ({"model": {"sparsity_target": 0.0}}, "model.sparsity_target"),
    ({"model": {"kl_weight": 0}}, "model.kl_weight"),
    ({"model": {"score": "likelihood"}}, "model.score"),
    ({"train": {"recirculation_lambda": 1.0}}, "train.recirculation_lambda"),
])
def test_kind_settings_are_validated_with_the_key_named(raw, key):
    with pytest.raises(ConfigError, match=f"config {key}"):
        config_from_dict({**BASE, **raw})


def test_recirculation_config_is_accepted_for_one_hidden_layer():
    """The config passes its checks, sizes one model of one hidden layer (what the rule trains: an ensemble
    or deeper model is refused by make_step_fn), and the rule at the config's rate and lambda learns it."""
    from pipeline.sizing import resolve_model

    cfg = config_from_dict({**BASE, "train": {"algorithm": "recirculation", "lr": 0.05}, "model": {"hidden_dims": []}})
    sized = resolve_model(cfg.model, 16, cfg.train.algorithm)
    assert (sized.ensemble, sized.hidden_dims) == (1, [])
    torch.manual_seed(0)
    model = build_model(16, **dataclasses.asdict(sized))
    step = make_step_fn(model, cfg.train.lr, cfg.train.recirculation_lambda)
    x = manifold_data(2000)
    gen = torch.Generator().manual_seed(0)
    losses = [train_epoch(batches(x, 64, gen), model, optimizer=None, step_fn=step).loss for _ in range(6)]
    assert losses[-1] < 0.5 * losses[0], losses


def test_dense_code_must_be_narrower_than_the_input():
    with pytest.raises(ConfigError, match="config model.latent_dim: 16 must be < the 16 input features"):
        ModelSection(kind="dense", latent_dim=16).check_features(16)
    ModelSection(kind="sparse", latent_dim=32).check_features(16)  # overcomplete is the point of sparse
