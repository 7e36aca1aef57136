"""The kind registry (pipeline/kinds/) and the training worker's parts, in plain PyTorch (no Ray).

Every registered kind builds from its flat config keys, receives each of its settings, and trains; old
configs and manifests keep loading; and a new kind needs a spec, a model class and two registration lines:
the tiny `shrink` kind below is defined here, registered, configured with its own key and trained through
the same worker parts Ray runs (build_trainee, run_training), checkpoint and resume included.
"""

from __future__ import annotations

import copy
import dataclasses
import pickle
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import pipeline.config as config_module
from pipeline.config import ModelSection, TrainSection, config_from_dict, load_config
from pipeline.errors import ConfigError, check_config
from pipeline.kinds import KINDS, kind_setting_names, register
from pipeline.kinds.spec import CODE_SPACE_SETTINGS, MLP_SETTINGS, KindSpec
from pipeline.models import MODELS, Autoencoder, build_model
from pipeline.train import ALGORITHMS, TrainState, WorkerConfig, build_trainee, evaluate, run_training

BASE = {"data": {"input": "x"}}
CPU = torch.device("cpu")


def worker_config(cfg, batch_size: int, seed: int) -> WorkerConfig:
    """What fit() tells the workers, for 6 standardized features."""
    return WorkerConfig(cfg.model, cfg.train, n_features=6, mean=[0.0] * 6, scale=[1.0] * 6, batch_size=batch_size,
                        epochs=cfg.train.epochs, seed=seed)


def no_ddp(module: torch.nn.Module, find_unused_parameters: bool) -> torch.nn.Module:
    """The worker's `wrap` outside Ray: one process, so no DistributedDataParallel."""
    return module


def other_value(default: Any, tp: Any) -> Any:
    """A valid value of type `tp` that differs from `default` (so a dropped setting cannot pass)."""
    if typing.get_origin(tp) is typing.Literal:
        return next(a for a in typing.get_args(tp) if a != default)
    if tp is bool:
        return not default
    if tp is int:
        return default + 1
    return default / 2


def non_default_settings(spec: KindSpec) -> dict[str, Any]:
    hints = typing.get_type_hints(spec.settings)
    return {f.name: other_value(f.default, hints[f.name]) for f in dataclasses.fields(spec.settings)}


def batches(n_features: int, rows: int = 256, batch_size: int = 64, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(3, n_features, generator=g)
    x = torch.randn(rows, 3, generator=g) @ basis + 0.05 * torch.randn(rows, n_features, generator=g)
    return list(((x - x.mean(0)) / x.std(0)).split(batch_size))


# ------------------------------------------------------------------------------------------- registry


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_builds_from_flat_keys_receives_each_setting_and_trains(kind):
    spec = KINDS[kind]
    values = non_default_settings(spec)
    model_raw = {"kind": kind, "hidden_dims": [8], "latent_dim": 3, **values}
    cfg = config_from_dict({**BASE, "model": model_raw, "train": {"epochs": 40}})
    assert dataclasses.asdict(cfg.model.kind_settings) == values
    torch.manual_seed(0)
    model = build_model(6, **dataclasses.asdict(cfg.model))
    assert isinstance(model, MODELS[kind]) and isinstance(model.settings, spec.settings)
    assert dataclasses.asdict(model.settings) == values  # every declared setting reached the model
    assert all(values[k] != f.default for k in values for f in dataclasses.fields(spec.settings) if f.name == k)
    x = batches(6)[0]
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss, _ = model.loss(x)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_unknown_kind_is_one_line_naming_the_key_and_the_kinds():
    with pytest.raises(ConfigError) as e:
        config_from_dict({**BASE, "model": {"kind": "nope"}})
    msg = str(e.value)
    assert msg.startswith("config model.kind: 'nope' is not one of ") and "\n" not in msg
    assert all(k in msg for k in KINDS)


def test_a_kind_setting_name_cannot_be_taken_twice():
    clash = KindSpec("clash", KINDS["denoising"].settings)
    with pytest.raises(ValueError, match="'noise' is already one of denoising's"):
        register(clash)
    assert "clash" not in KINDS


def test_model_section_is_the_shared_settings_plus_each_kinds_own():
    names = [f.name for f in dataclasses.fields(ModelSection)]
    kind_names = [n for spec in KINDS.values() for n in spec.setting_names]
    assert names == ["kind", *MLP_SETTINGS, "ensemble", "member_latent_dims", "subspace_weight", *CODE_SPACE_SETTINGS,
                     *kind_names]


def test_every_kind_has_a_model_class():
    assert list(MODELS) == list(KINDS) and all(issubclass(c, Autoencoder) for c in MODELS.values())


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_config_checks_a_kinds_scores_and_learning_rules_against_its_spec(kind):
    spec = KINDS[kind]
    for score in ("calibrated", "recon", "elbo"):
        model = {"kind": kind, "score": score}
        if score in spec.scores:
            assert config_from_dict({**BASE, "model": model}).model.score == score
        else:
            with pytest.raises(ConfigError, match=f"config model.score: {score} is the variational kind's score, "
                                                  f"not {kind}'s; use calibrated or recon"):
                config_from_dict({**BASE, "model": model})
    for algorithm in ("backprop", "recirculation"):
        raw = {**BASE, "model": {"kind": kind, "ensemble": 1}, "train": {"algorithm": algorithm}}
        if algorithm in spec.algorithms:
            assert config_from_dict(raw).train.algorithm == algorithm
        else:
            with pytest.raises(ConfigError, match=f"config model.kind: {kind}: train.algorithm {algorithm} trains "
                                                  f"kind dense only"):
                config_from_dict(raw)


def test_old_flat_config_keys_and_shipped_configs_still_load():
    for path in sorted(Path("jobs/configs").glob("*.yaml")):
        load_config(path)
    cfg = load_config("jobs/configs/tiny.yaml", ["model.kind=variational", "model.score=elbo",
                                                 "model.noise_level=0.3", "model.pretrain_epochs=3"])
    assert cfg.model.kind_settings == KINDS["variational"].settings() and cfg.model.score == "elbo"
    assert (cfg.model.noise_level, cfg.model.pretrain_epochs) == (0.3, 3)  # other kinds' keys: kept, unused
    with pytest.raises(ConfigError, match="config model.noise_levl: unknown key"):
        load_config("jobs/configs/tiny.yaml", ["model.noise_levl=0.3"])


# The `model` of a manifest written by main at 6ee9f6b (dataclasses.asdict of its ModelSection).
MAIN_MANIFEST_MODEL = {
    "kind": "dense", "hidden_dims": [8], "latent_dim": 3, "activation": "gelu", "dropout": 0.0,
    "code_activation": None, "noise": "gaussian", "noise_level": 0.2, "sparsity": "l1", "sparsity_weight": 1e-3,
    "sparsity_target": 0.05, "contractive_weight": 1e-3, "kl_weight": 1.0, "score": "recon", "pretrain_epochs": 2,
}


@pytest.mark.parametrize("kind", ["dense", "denoising", "sparse", "contractive", "variational", "stacked"])
def test_manifests_written_by_main_still_build_and_new_ones_keep_the_format(kind):
    old = {**MAIN_MANIFEST_MODEL, "kind": kind, "noise_level": 0.3, "score": "elbo"}
    model = build_model(6, **old)
    own = KINDS[kind].setting_names
    assert dataclasses.asdict(model.settings) == {k: old[k] for k in own}
    assert type(model).__name__ != "Ensemble"  # a manifest from before model.ensemble: one model
    keys = set(dataclasses.asdict(ModelSection()))
    assert keys == {"kind", *MLP_SETTINGS, "ensemble", "member_latent_dims", "subspace_weight",
                    *CODE_SPACE_SETTINGS} | kind_setting_names()
    assert type(build_model(6, **dataclasses.asdict(ModelSection(hidden_dims=[8], latent_dim=3)))).__name__ \
        == "Autoencoder"  # the code-space settings reach build_model in every manifest and are not the network's
    assert set(MAIN_MANIFEST_MODEL) <= keys  # an old manifest's keys all still exist


def test_training_settings_reach_the_workers_typed_and_picklable():
    cfg = config_from_dict({**BASE, "model": {"kind": "denoising", "noise_level": 0.4},
                            "train": {"algorithm": "backprop", "lr": 0.02, "cpus_per_worker": 2.5}})
    wc = worker_config(cfg, batch_size=32, seed=1)
    back = pickle.loads(pickle.dumps(wc))
    assert back == wc and back.model.kind_settings.noise_level == 0.4 and back.torch_threads == 2
    trainee, state = build_trainee(back, CPU, no_ddp)
    assert trainee.optimizer.param_groups[0]["lr"] == 0.02 and state.start_epoch == 0


def test_every_training_algorithm_has_an_entry():
    assert set(ALGORITHMS) == set(typing.get_args(typing.get_type_hints(TrainSection)["algorithm"]))


# ------------------------------------------------------------------------------------------- a new kind


@dataclass(frozen=True)
class ShrinkSettings:
    shrink_weight: float = 0.1
    """shrink: weight of the mean squared code in the loss."""

    def __post_init__(self) -> None:
        check_config(self.shrink_weight >= 0, "model.shrink_weight", f"{self.shrink_weight} must be >= 0")


class ShrinkAutoencoder(Autoencoder):
    settings: ShrinkSettings

    def __init__(self, n_features: int, settings: ShrinkSettings = ShrinkSettings(), **mlp: Any):
        super().__init__(n_features, settings=settings, **mlp)

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        h = self.encode(x)
        mse = torch.mean((self.decode(h) - x) ** 2)
        pen = torch.mean(h ** 2)
        return mse + self.settings.shrink_weight * pen, {"recon": mse.detach(), "shrink": pen.detach()}


SHRINK = KindSpec("shrink", ShrinkSettings, undercomplete=True)


@pytest.fixture
def shrink_registered(monkeypatch):
    """The two registration lines (the spec, the model class), undone afterwards; the config's model section is
    rebuilt to include the kind's settings."""
    register(SHRINK)
    monkeypatch.setitem(MODELS, "shrink", ShrinkAutoencoder)
    monkeypatch.setattr(config_module, "ModelSection", config_module.model_section())
    yield
    del KINDS["shrink"]


def test_a_new_kind_is_a_spec_a_model_class_and_two_registration_lines(shrink_registered):
    with pytest.raises(ConfigError, match="config model.shrink_weight: -1.0 must be >= 0"):
        config_from_dict({**BASE, "model": {"kind": "shrink", "shrink_weight": -1.0}})
    with pytest.raises(ConfigError, match="config model.latent_dim: 6 must be < the 6 input features"):
        config_from_dict({**BASE, "model": {"kind": "shrink", "latent_dim": 6}}).model.check_features(6)
    cfg = config_from_dict({**BASE, "model": {"kind": "shrink", "shrink_weight": 0.5, "hidden_dims": [8],
                                              "latent_dim": 3}, "train": {"epochs": 3, "lr": 1e-2}})
    wc = worker_config(cfg, batch_size=64, seed=0)
    data = batches(6)
    reports: list[tuple[dict, dict]] = []

    torch.manual_seed(0)
    trainee, state = build_trainee(wc, CPU, no_ddp)
    assert isinstance(trainee.ae, ShrinkAutoencoder) and trainee.ae.settings.shrink_weight == 0.5
    run_training(wc, trainee, state, lambda: data, lambda: data[:1], CPU, rank=0,
                 report=lambda m, payload: reports.append((m, payload)))
    assert [m["epoch"] for m, _ in reports] == [2]  # checkpoints by time: a short run saves its last epoch
    history = reports[-1][1]["history"]
    assert [m["epoch"] for m in history] == [0, 1, 2]
    assert all("train_shrink" in m for m in history)  # the kind's loss parts reach the metrics
    assert history[-1]["train_loss"] < history[0]["train_loss"]

    # resume from the last checkpoint payload with more epochs: picks up at epoch 3, history kept
    longer = dataclasses.replace(wc, epochs=5)
    trainee, state = build_trainee(longer, CPU, no_ddp, saved=reports[-1][1])
    assert state.start_epoch == 3 and len(state.history) == 3
    run_training(longer, trainee, state, lambda: data, lambda: data[:1], CPU, rank=0,
                 report=lambda m, payload: reports.append((m, payload)))
    assert [m["epoch"] for m, _ in reports] == [2, 4]
    final = TrainState.restore(reports[-1][1], build_model(6, **dataclasses.asdict(cfg.model)), cfg.train)
    assert len(final.history) == 5 and final.best_state is not None
    # the model a manifest describes rebuilds with the kind's settings
    assert build_model(6, **dataclasses.asdict(cfg.model)).settings == ShrinkSettings(0.5)


def saved(payload):
    """A checkpoint payload as Ray's report stores it (torch.save): a copy, not the live optimizer state."""
    return copy.deepcopy(payload)


def test_checkpoint_every_saves_some_epochs_always_the_last_and_the_stop_and_resumes_with_the_best():
    cfg = config_from_dict({**BASE, "model": {"hidden_dims": [8], "latent_dim": 3, "subspace_weight": 1.0},
                            "train": {"epochs": 5, "lr": 1e-2, "checkpoint_every": 2, "patience": 10}})
    wc = worker_config(cfg, batch_size=64, seed=0)
    data = batches(6)
    reports: list[tuple[dict, dict]] = []
    torch.manual_seed(0)
    trainee, state = build_trainee(wc, CPU, no_ddp)
    run_training(wc, trainee, state, lambda: data, lambda: data[:1], CPU, rank=0,
                 report=lambda m, payload: reports.append((m, saved(payload))))
    # only checkpoint epochs report (Ray's report is a barrier): epochs 2, 4 and the last (5)
    assert [m["epoch"] for m, p in reports] == [1, 3, 4] and all(p is not None for _, p in reports)
    history = reports[-1][1]["history"]
    assert [m["epoch"] for m in history] == [0, 1, 2, 3, 4]
    for m in history:  # the per-epoch fixed cost: wall time (+ the previous report) minus the steps
        assert 0 < m["step_seconds"] <= m["epoch_seconds"]
        assert m["fixed_seconds"] == pytest.approx(m["epoch_seconds"] + m["last_report_seconds"]
                                                   - m["step_seconds"])
    assert [m["last_report_seconds"] > 0 for m in history] == [False, False, True, False, True]
    # the score's subspace term was fitted from the first epoch's training rows, and every checkpoint has it
    rows = torch.cat(data)
    for _, p in reports:
        assert bool(p["best_model"]["subspace.fitted"])
        assert torch.allclose(p["best_model"]["subspace.center"], rows.mean(0), atol=1e-5)
    assert reports[0][1]["best_model"]["subspace.minor"].shape == (6, 3)  # all but the data's three directions

    # a failure after epoch 3 resumes from the checkpoint of epoch 2 (index 1): the epochs since are redone,
    # and the best weights are those of the best epoch the resumed run has seen
    trainee, state = build_trainee(wc, CPU, no_ddp, saved=reports[0][1])
    assert state.start_epoch == 2 and len(state.history) == 2
    resumed: list[tuple[dict, dict]] = []
    other = batches(6, seed=1)  # other training rows: a refit would give other components
    run_training(wc, trainee, state, lambda: other, lambda: data[:1], CPU, rank=0,
                 report=lambda m, payload: resumed.append((m, saved(payload))))
    assert [m["epoch"] for m, p in resumed] == [3, 4]
    final = resumed[-1][1]
    # the resumed run keeps the components it loaded (it fits them in a run's first epoch only)
    assert torch.equal(final["best_model"]["subspace.minor"], reports[0][1]["best_model"]["subspace.minor"])
    vals = [h["val_loss"] for h in final["history"]]
    assert [h["epoch"] for h in final["history"]] == [0, 1, 2, 3, 4]
    assert final["best_val"] == min(vals) and final["best_epoch"] == vals.index(min(vals))
    best = build_model(6, **dataclasses.asdict(cfg.model))
    best.load_state_dict(final["best_model"])
    assert evaluate(data[:1], best)[0] == pytest.approx(min(vals) * data[0].shape[0], rel=1e-5)

    # early stopping ends at an epoch checkpoint_every would skip: that epoch is checkpointed too
    stalled = dataclasses.replace(wc, epochs=10, train=dataclasses.replace(cfg.train, epochs=10, lr=1e-12, patience=1,
                                                                checkpoint_every=4))
    trainee, state = build_trainee(stalled, CPU, no_ddp)
    stops: list[tuple[dict, dict]] = []
    run_training(stalled, trainee, state, lambda: data, lambda: data[:1], CPU, rank=0,
                 report=lambda m, payload: stops.append((m, saved(payload))))
    assert [m["epoch"] for m, _ in stops] == [1]
    assert stops[-1][1] is not None and stops[-1][1]["epoch"] == 1


@pytest.mark.parametrize("interval_s, checkpointed", [(1e-9, [0, 1, 2]), (3600.0, [2])])
def test_checkpoints_by_time_by_default(interval_s, checkpointed):
    """train.checkpoint_every 0 (the default): a checkpoint once checkpoint_interval_s have passed since the
    previous one, and always the last epoch; rank 0's clock decides for all ranks (through the all-reduce)."""
    cfg = config_from_dict({**BASE, "model": {"hidden_dims": [8], "latent_dim": 3},
                            "train": {"epochs": 3, "patience": 10, "checkpoint_interval_s": interval_s}})
    assert cfg.train.checkpoint_every == 0
    wc = worker_config(cfg, batch_size=64, seed=0)
    data = batches(6)
    reports: list[tuple[dict, dict]] = []
    reduced: list[list[float]] = []
    trainee, state = build_trainee(wc, CPU, no_ddp)
    run_training(wc, trainee, state, lambda: data, lambda: data[:1], CPU, rank=0,
                 report=lambda m, payload: reports.append((m, saved(payload))),
                 all_reduce_sum=lambda v: reduced.append(v) or v)
    assert [m["epoch"] for m, _ in reports] == checkpointed
    assert [p["epoch"] for _, p in reports] == checkpointed
    # a rank other than 0 sends 0 seconds and follows rank 0's decision
    trainee, state = build_trainee(wc, CPU, no_ddp)
    other: list[dict] = []
    run_training(wc, trainee, state, lambda: data, lambda: data[:1], CPU, rank=1,
                 report=lambda m, payload: other.append(payload),
                 all_reduce_sum=lambda v: [interval_s] if len(v) == 1 else v)
    assert other == [None] * 3


def test_the_epoch_loop_prints_its_first_and_last_epochs_and_a_line_per_interval_between(monkeypatch, capsys):
    """A small table's epochs take milliseconds: rank 0 prints the first epoch, the last and one line per
    EPOCH_LINE_SECONDS between (every epoch is in the history all the same); other ranks print none."""
    import pipeline.train.loop as loop

    cfg = config_from_dict({**BASE, "model": {"hidden_dims": [8], "latent_dim": 3},
                            "train": {"epochs": 30, "patience": 100}})
    wc = worker_config(cfg, batch_size=64, seed=0)
    data = batches(6)

    def printed(rank: int, every: float) -> tuple[list[int], int]:
        monkeypatch.setattr(loop, "EPOCH_LINE_SECONDS", every)
        torch.manual_seed(0)
        trainee, state = build_trainee(wc, CPU, no_ddp)
        capsys.readouterr()
        run_training(wc, trainee, state, lambda: data, lambda: data[:1], CPU, rank=rank, report=lambda m, p: None)
        epochs = [int(n) for n in re.findall(r"\[train\] epoch (\d+)/30 ", capsys.readouterr().out)]
        return epochs, len(state.history)

    assert printed(0, 3600.0) == ([1, 30], 30)
    assert printed(0, 0.0) == (list(range(1, 31)), 30)
    assert printed(1, 0.0) == ([], 30)
    # a staged kind's new stage and a checkpoint's epoch print too
    monkeypatch.setattr(loop, "EPOCH_LINE_SECONDS", 5.0)
    assert loop.epoch_line_due(7, 0, True, False, False, 0.0) and loop.epoch_line_due(7, 0, False, False, True, 0.0)
    assert not loop.epoch_line_due(7, 0, False, False, False, 0.0) and loop.epoch_line_due(3, 3, False, False,
                                                                                            False, 0.0)


def test_a_resumed_optimizer_keeps_its_state_on_the_models_device():
    """On a GPU the model moves to the device after its weights load: the optimizer's restored moments must move
    with it. The meta device stands in for a GPU here (a move off the CPU that keeps every tensor's shape)."""
    cfg = config_from_dict({**BASE, "model": {"hidden_dims": [8], "latent_dim": 3}, "train": {"epochs": 2}})
    wc = worker_config(cfg, batch_size=64, seed=0)
    payloads: list[dict] = []
    trainee, state = build_trainee(wc, CPU, no_ddp)
    run_training(wc, trainee, state, lambda: batches(6), lambda: batches(6)[:1], CPU, rank=0,
                 report=lambda m, payload: payloads.append(saved(payload)))
    meta = torch.device("meta")
    resumed, _ = build_trainee(wc, meta, lambda module, _: module.to(meta), saved=payloads[-1])
    moments = [t for s in resumed.optimizer.state.values() for k, t in s.items() if k != "step"]
    assert moments and all(t.device == meta for t in moments)
    assert all(p.device == meta for p in resumed.ae.parameters())
