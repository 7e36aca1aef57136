"""A training worker's state: what it is told (`WorkerConfig`), the model it trains (`Trainee`, built by
`build_trainee` with its learning rule), where the run is (`TrainState`), and the checkpoints it resumes from.

Resuming: Ray Train hands a restarted worker group the newest checkpoint its controller has *registered*.
The controller registers a report only when it polls the workers (every 2 s,
`RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`) and all ranks have reported that round; rank 0 has uploaded the
checkpoint to storage before it reports. So when a node is lost just after an epoch, the newest checkpoint,
and on short epochs the one before it too, can be complete in storage but unknown to the controller: the
workers would restart from an older checkpoint, or from scratch when none is registered yet. So rank 0 also
looks in the run's checkpoint directory in storage, takes the newest `state.pt` that loads (an upload cut
off half-way does not), and every rank resumes from the same one (`resume_state`).
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from pipeline.config import ModelSection, TrainSection
from pipeline.errors import StorageError
from pipeline.layout import SlotLayout
from pipeline.models import Autoencoder, build_model
from pipeline.storage import Storage
from pipeline.train.batches import DirectSplits
from pipeline.train.collective import broadcast_object
from pipeline.train.step import EarlyStopping, LossForward, make_optimizer, state_to_cpu


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a training worker is told, typed; Ray pickles it to every worker."""

    model: ModelSection
    train: TrainSection
    n_features: int
    mean: list[float]
    """Normalization statistics (per feature), as the manifest stores them."""
    scale: list[float]
    batch_size: int
    """Rows per minibatch per worker: train.batch_size, lowered on small tables (sizing.step_budget)."""
    epochs: int
    """The epoch limit: train.epochs, or with `auto` what train.steps needs (sizing.step_budget)."""
    seed: int
    """run.seed; each rank seeds torch with seed + rank."""
    storage: Optional[Any] = None
    """The run's Storage: rank 0 looks there for a newer complete checkpoint than Ray Train registered."""
    checkpoints_uri: Optional[str] = None
    """Where Ray Train writes this run's checkpoints (`<run>/train/<run.name>`)."""
    cache: bool = False
    """Keep each worker's shards in its memory after the first epoch (EpochCache; fit's cache_splits)."""
    direct: Optional[DirectSplits] = None
    """Set with `cache` when the workers read their rows themselves (no Ray Data datasets in the trainer)."""
    layout: Optional[SlotLayout] = None
    """Which input slots make which column (categoricals, missing indicators); None: one column per slot."""

    @property
    def torch_threads(self) -> int:
        return max(1, int(self.train.cpus_per_worker))


StepFn = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]
Wrap = Callable[[torch.nn.Module, bool], torch.nn.Module]
"""(module, find_unused_parameters) -> the module on the device, data-parallel (Ray: prepare_model -> DDP)."""


@dataclass
class Trainee:
    """The model as one worker trains it."""

    ae: Autoencoder
    model: torch.nn.Module
    """What train_epoch steps: the (DDP-wrapped) LossForward for backprop, the bare model for a step rule."""
    optimizer: torch.optim.Optimizer
    step_fn: Optional[StepFn] = None
    """A learning rule without a backward pass (replaces the optimizer step)."""


def _backprop(ae: Autoencoder, wc: WorkerConfig, device: torch.device, wrap: Wrap):
    return wrap(LossForward(ae, wc.train.trim_fraction), wc.model.spec.find_unused_parameters), None


def _recirculation(ae: Autoencoder, wc: WorkerConfig, device: torch.device, wrap: Wrap):
    from pipeline.recirculation import make_step_fn  # noqa: PLC0415 - only this rule needs it

    model = ae.to(device)
    return model, make_step_fn(model, wc.train.lr, wc.train.recirculation_lambda)


ALGORITHMS: dict[str, Callable[[Autoencoder, WorkerConfig, torch.device, Wrap],
                               tuple[torch.nn.Module, Optional[StepFn]]]] = {
    "backprop": _backprop,
    "recirculation": _recirculation,
}
"""train.algorithm -> (model, step_fn) for train_epoch."""


VALIDATION_KEY = "validation_sketch"
"""The checkpoint payload's key for TrainState.validation (None until the run's last checkpoint)."""


@dataclass
class TrainState:
    """Where a run is, beyond the weights; checkpointed every epoch with them."""

    stopper: EarlyStopping
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_state: Optional[dict[str, torch.Tensor]] = None
    validation: Optional[dict[str, Any]] = None
    """The best model's score sketch over every validation row (a ScoreSketch summary, pipeline/train/validate.py),
    set once the run has ended: the last checkpoint carries it."""

    @classmethod
    def restore(cls, saved: Optional[dict[str, Any]], ae: Autoencoder, train: TrainSection) -> "TrainState":
        """A fresh state, or the one in a checkpoint's payload (the weights loaded into `ae` in place; the
        optimizer's state is `saved["optimizer"]`, loaded by build_trainee once the model is on its device)."""
        if saved is None:
            return cls(EarlyStopping(train.patience, train.min_delta))
        ae.load_state_dict(saved["model"])
        stopper = EarlyStopping(train.patience, train.min_delta, best=float(saved["best_val"]),
                                best_epoch=int(saved["best_epoch"]), bad_epochs=int(saved["bad_epochs"]))
        return cls(stopper, int(saved["epoch"]) + 1, list(saved["history"]), saved["best_model"],
                   saved.get(VALIDATION_KEY))

    def finished(self, epochs: int) -> bool:
        """True when a restored run has nothing left to train (stopped early, or past its last epoch)."""
        return self.stopper.should_stop or self.start_epoch >= epochs

    def checkpoint(self, trainee: Trainee, epoch: int) -> dict[str, Any]:
        """The checkpoint payload (saved as CHECKPOINT_FILE) after `epoch`."""
        return {
            "model": state_to_cpu(trainee.model), "optimizer": trainee.optimizer.state_dict(),
            "best_model": self.best_state, "epoch": epoch, "best_val": self.stopper.best,
            "best_epoch": self.stopper.best_epoch, "bad_epochs": self.stopper.bad_epochs, "history": self.history,
            VALIDATION_KEY: self.validation,
        }


def build_trainee(wc: WorkerConfig, device: torch.device, wrap: Wrap,
                  saved: Optional[dict[str, Any]] = None) -> tuple[Trainee, TrainState]:
    """Model, optimizer and learning rule for `wc`, restored from a checkpoint payload if there is one.

    The weights load before wrapping (DDP broadcasts rank 0's), the optimizer is made once the model is on its
    device: its restored state (moments, and a fused kernel's step counts) must sit beside the parameters, and
    loading it into an optimizer of parameters still on the CPU left it there on a GPU."""
    ae = build_model(wc.n_features, layout=wc.layout, **dataclasses.asdict(wc.model))
    state = TrainState.restore(saved, ae, wc.train)
    model, step_fn = ALGORITHMS[wc.train.algorithm](ae, wc, device, wrap)
    optimizer = make_optimizer(ae.parameters(), wc.train.lr, wc.train.weight_decay)
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
    return Trainee(ae, model, optimizer, step_fn), state


# ------------------------------------------------------------------------------------------ resuming


CHECKPOINT_FILE = "state.pt"


def newest_stored_state(storage: Storage, checkpoints_uri: str) -> tuple[Optional[str], Optional[dict[str, Any]]]:
    """(URI, loaded state) of the newest complete checkpoint under `checkpoints_uri`, or (None, None).

    Ray Train names checkpoint directories `checkpoint_<UTC timestamp>`, so the names sort by age."""
    files = [f for f in storage.list_files(checkpoints_uri, suffix="/" + CHECKPOINT_FILE)
             if f.rsplit("/", 2)[-2].startswith("checkpoint_")]
    for uri in sorted(files, reverse=True):
        try:
            return uri, load_state(storage.read_bytes(uri))
        except Exception:  # noqa: BLE001 - a partial upload: try the next older one
            continue
    return None, None


def load_state(data: bytes) -> dict[str, Any]:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def resume_state(registered: Optional[dict[str, Any]], storage: Optional[Storage], checkpoints_uri: Optional[str],
                 rank: int) -> tuple[Optional[dict[str, Any]], str]:
    """The state to resume from and where it came from: Ray Train's registered checkpoint (`registered`, or
    None), unless storage holds a newer complete one. All ranks call this; rank 0 chooses for all."""
    choice: Optional[str] = None
    if rank == 0 and storage is not None and checkpoints_uri:
        try:
            uri, stored = newest_stored_state(storage, checkpoints_uri)
        except StorageError as e:  # the registered checkpoint (or none) still works: say why, go on
            print(f"[train] could not look for newer checkpoints in {checkpoints_uri}: {e}", flush=True)
            uri, stored = None, None
        if stored is not None and (registered is None or int(stored["epoch"]) > int(registered["epoch"])):
            choice = uri
    choice = broadcast_object(choice)
    if choice is None:
        return registered, "registered"
    return (load_state(storage.read_bytes(choice)) if storage is not None else registered), choice
