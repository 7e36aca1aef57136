"""Training: pure step functions (tested without Ray), the per-worker loop, and the driver that runs it.

Driver (`fit`): builds the train/validation datasets (or, when the splits fit the cache, tells the workers
which files to read themselves: `DirectSplits`), `ScalingConfig`, `RunConfig(name, storage_path)` and
a `TorchTrainer`; the run's checkpoints live in artifact storage, so rerunning the same `run.name` resumes.
Worker (`train_loop_per_worker`, told a typed `WorkerConfig`): builds the model and learning rule
(`build_trainee`, restored from the last checkpoint), then `run_training` per epoch trains, evaluates,
all-reduces the losses, and on checkpoint epochs reports to Ray Train with a checkpoint holding the latest
and the best weights and the history.
Early stopping is decided from all-reduced validation loss, so every rank stops at the same epoch.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
import torch

from pipeline.config import ModelSection, TrainSection
from pipeline.kinds import build_model
from pipeline.models import Autoencoder, Ensemble, SlotLayout
from pipeline.resume import CHECKPOINT_FILE, resume_state
from pipeline.tensors import Normalizer, arrow_to_tensor, autocast_for
from pipeline.watchdog import beat


# ------------------------------------------------------------------------------------------ pure steps


def tensor_batches(tables: Iterable[pa.Table], normalizer: Normalizer, device: torch.device,
                   column: str = "x") -> Iterator[torch.Tensor]:
    non_blocking = device.type == "cuda"
    for t in tables:
        beat()  # progress for the driver's stall watch (pipeline/watchdog.py)
        if t.num_rows == 0:
            continue
        x = arrow_to_tensor(t, column)
        if non_blocking:
            x = x.pin_memory()
        yield normalizer(x.to(device, non_blocking=non_blocking))


class EpochCache:
    """A worker's shard of a split, kept in the worker's memory: given up front (`rows`, read by
    `DirectSplits`), or read from Ray Data once.

    Given a stream, the first pass streams (`stream()`: the normalized batches) and keeps every batch; each
    later pass draws a fresh permutation of all the kept rows and batches it: a full row-level shuffle of the
    shard every epoch (streaming shuffles only the block order, plus an optional local buffer), and no dataset
    execution, split coordinator round trip or re-read per epoch. Only a pass that ran to its end is kept.
    On a GPU the rows are kept in host memory and each batch is copied over as it is used.
    """

    def __init__(self, stream: Optional[Callable[[], Iterable[torch.Tensor]]], batch_size: int,
                 device: torch.device, shuffle: bool, seed: int, rows: Optional[torch.Tensor] = None,
                 limit: Optional[int] = None):
        self.stream, self.batch_size, self.device, self.shuffle = stream, batch_size, device, shuffle
        self.rows: Optional[torch.Tensor] = None
        self.limit = limit
        """Rows used per pass (the first `limit` of each permutation); None: all."""
        self.generator = torch.Generator().manual_seed(seed)
        if rows is not None:
            self._keep(rows)

    def _keep(self, rows: torch.Tensor) -> None:
        self.rows = rows.pin_memory() if self.device.type == "cuda" else rows

    def __call__(self) -> Iterator[torch.Tensor]:
        return self._first_pass() if self.rows is None else self._from_memory(self.rows)

    def _first_pass(self) -> Iterator[torch.Tensor]:
        kept = []
        for x in self.stream():
            kept.append(x.to("cpu"))
            yield x
        if kept:
            self._keep(torch.cat(kept))

    def _from_memory(self, rows: torch.Tensor) -> Iterator[torch.Tensor]:
        n, non_blocking = rows.shape[0], self.device.type == "cuda"
        if self.limit is not None:
            n = min(n, self.limit)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else None
        for i in range(0, n, self.batch_size):
            beat()
            x = rows[order[i:i + self.batch_size]] if order is not None else rows[i:i + self.batch_size]
            yield x.to(self.device, non_blocking=non_blocking)


@dataclass(frozen=True)
class DirectSplits:
    """Cached epochs' input without Ray Data: each training worker reads its share of the input's row groups
    itself, once, and splits them into training and validation rows as the Ray Data path does (SplitFeatures).

    Through Ray Data, a training run started a DatasetManager and a SplitCoordinator per split (each a
    process importing torch and Ray Data) and ran a dataset execution per split before the first step: 11 s of
    the 30 s the ADBench pendigits job (4,312 training rows, 20 epochs) spent in training on this 2-core machine.
    Used only when the splits fit the cache (`cache_splits`) and every column read is in the files.
    """

    files: list[str]
    columns: list[str]
    data: Any
    """The data section (DataSection), `features` resolved."""
    num_features: int
    featurizer: Optional[Any] = None
    """The fitted Featurizer of scalar columns; None for a vector column."""

    def read(self, storage, rank: int, world: int) -> tuple[list[pa.Table], list[pa.Table]]:
        """This rank's training and validation rows (one `x` table per row group read). Row groups go round
        robin over the ranks; with fewer row groups than ranks, every rank reads them all and keeps every
        world-th row, so no rank is left without rows."""
        from pipeline.rows import SplitFeatures
        from pipeline.shards import PATH_COLUMN

        groups = []
        for f in self.files:
            with storage.open_parquet(f) as pf:
                groups += [(f, g) for g in range(pf.num_row_groups)]
        few = len(groups) < world
        mine: dict[str, list[int]] = {}
        for f, g in (groups if few else groups[rank::world]):
            mine.setdefault(f, []).append(g)
        splits = {s: SplitFeatures(self.data, self.num_features, s, self.featurizer) for s in ("train", "validation")}
        out: dict[str, list[pa.Table]] = {s: [] for s in splits}
        for f, gs in mine.items():
            path = storage.resolve(f)[1]  # the shard's name for error messages, as Ray Data's include_paths gives it
            with storage.open_parquet(f) as pf:
                for g in gs:
                    beat()
                    t = pf.read_row_group(g, columns=self.columns)
                    if few:
                        t = t.take(np.arange(rank, t.num_rows, world))
                    t = t.append_column(PATH_COLUMN, pa.array([path] * t.num_rows, pa.string()))
                    for s, split in splits.items():
                        out[s].append(split(t))
        return out["train"], out["validation"]


def direct_epochs(wc: "WorkerConfig", rank: int, world: int, device: torch.device):
    """(train_batches, val_batches) over this rank's rows read once (DirectSplits). Every rank trains on the
    same number of rows per epoch (the smallest share; each epoch's permutation picks which), since DDP's
    all-reduce in every step needs the same number of steps on every rank."""
    cpu = torch.device("cpu")
    normalizer = Normalizer(wc.mean, wc.scale, cpu)
    train, val = wc.direct.read(wc.storage, rank, world)

    def rows(tables: list[pa.Table]) -> torch.Tensor:
        parts = list(tensor_batches(tables, normalizer, cpu))
        return torch.cat(parts) if parts else torch.zeros((0, wc.n_features))

    train_rows, val_rows = rows(train), rows(val)
    limit = int(_all_reduce([train_rows.shape[0]], "MIN")[0])
    return (EpochCache(None, wc.batch_size, device, shuffle=True, seed=wc.seed + rank, rows=train_rows, limit=limit),
            EpochCache(None, wc.batch_size * 4, device, shuffle=False, seed=0, rows=val_rows))


@dataclass
class EpochStats:
    loss_sum: float = 0.0
    rows: int = 0
    seconds: float = 0.0
    first_batch_seconds: float = 0.0
    first_batch_rows: int = 0
    data_wait_seconds: float = 0.0
    """Time spent waiting for the next batch after the first: where the GPU/CPU sat idle for want of data."""
    step_seconds: float = 0.0
    """Time in the training steps themselves (forward, backward, optimizer), every batch's wait excluded."""
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.rows, 1)

    @property
    def steady_rows(self) -> int:
        """Rows after the first batch (whose time includes warm-up and the pipeline filling up)."""
        return self.rows - self.first_batch_rows

    @property
    def steady_seconds(self) -> float:
        return self.seconds - self.first_batch_seconds


def trimmed_rows(ae: Autoencoder, x: torch.Tensor, trim_fraction: float) -> torch.Tensor:
    """The rows of `x` without the `trim_fraction` the model reconstructs worst (a trimmed loss).

    Ranked by the per-column reconstruction error (squared error; cross-entropy for a categorical column)
    in a gradient-free forward pass, so it works for every kind whatever its loss adds (penalties, KL): the
    kept rows then go through the kind's own loss.
    """
    n = x.shape[0]
    keep = n - int(trim_fraction * n)
    if trim_fraction <= 0 or keep >= n or keep < 1:
        return x
    with torch.no_grad():
        err = ae.row_errors(x)
    return x[torch.topk(err, keep, largest=False).indices]


class LossForward(torch.nn.Module):
    """Makes the autoencoder's loss() the forward pass, so DDP's gradient all-reduce covers it; with
    `trim_fraction`, the loss of the batch's best-reconstructed rows only (`trimmed_rows`)."""

    def __init__(self, ae: Autoencoder, trim_fraction: float = 0.0):
        super().__init__()
        self.ae = ae
        self.trim_fraction = trim_fraction

    def forward(self, x: torch.Tensor):
        return self.ae.loss(trimmed_rows(self.ae, x, self.trim_fraction))


def unwrap(model: torch.nn.Module) -> Autoencoder:
    """The autoencoder inside DDP and/or LossForward wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "ae", model)


def train_epoch(batches: Iterable[torch.Tensor], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                device: torch.device | None = None, step_fn: Optional[Callable] = None) -> EpochStats:
    """One pass of minibatch gradient descent. Returns the row-weighted mean loss and timings.

    `model` is an Autoencoder or Ensemble, or a (DDP-wrapped) LossForward; `step_fn(x) -> (loss, parts)` replaces the
    gradient step for learning rules without a backward pass.
    """
    device = device or torch.device("cpu")
    model.train()
    stats = EpochStats()
    start = time.perf_counter()
    # Sums stay on the device until the epoch ends: a float() per step would make the CPU wait for the GPU
    # to finish each step before it could queue the next one.
    loss_sum: Any = 0.0
    parts_sum: dict[str, Any] = {}
    step_done = start
    for i, x in enumerate(batches):
        step_start = time.perf_counter()
        if i:  # the first batch's wait is warm-up, reported apart
            stats.data_wait_seconds += step_start - step_done
        if step_fn is not None:
            loss, parts = step_fn(x)
        else:
            with autocast_for(device):
                loss, parts = model.loss(x) if isinstance(model, (Autoencoder, Ensemble)) else model(x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        n = x.shape[0]
        loss_sum = loss_sum + _weighted(loss, n)
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + _weighted(v, n)
        stats.rows += n
        if i == 0:
            stats.first_batch_seconds, stats.first_batch_rows = time.perf_counter() - start, n
        step_done = time.perf_counter()
        stats.step_seconds += step_done - step_start
    stats.loss_sum = float(loss_sum)
    stats.parts = {k: float(v) / max(stats.rows, 1) for k, v in parts_sum.items()}
    stats.seconds = time.perf_counter() - start
    return stats


def _weighted(v: Any, n: int) -> Any:
    """`v * n` as a float64 device tensor (no host sync) for tensors, as a float for plain numbers."""
    if isinstance(v, torch.Tensor):
        return v.detach().to(torch.float64) * n
    return float(v) * n


@torch.inference_mode()
def evaluate(batches: Iterable[torch.Tensor], model: torch.nn.Module) -> tuple[float, int]:
    """(sum of per-row validation scores, rows)."""
    core = unwrap(model)
    core.eval()
    total, rows = 0.0, 0
    for x in batches:
        total = total + _weighted(core.eval_loss(x), 1)  # on the device: no host sync per batch
        rows += x.shape[0]
    return float(total), rows


def effective_batch_size(requested: int, rows_per_worker: int, min_steps: int = 20, floor: int = 16) -> int:
    """The configured batch size, lowered on small data so each worker still takes `min_steps` steps."""
    if rows_per_worker <= 0:
        return requested
    return int(max(min(floor, requested), min(requested, rows_per_worker // min_steps)))


@dataclass
class EarlyStopping:
    patience: int
    min_delta: float
    best: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record this epoch's validation loss; True when it is the new best."""
        if not math.isfinite(value):
            self.bad_epochs += 1
            return False
        if value < self.best - self.min_delta * abs(self.best if math.isfinite(self.best) else value):
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience


# ------------------------------------------------------------------------------------------ worker loop


def _all_reduce(values: list[float], op: str = "SUM") -> list[float]:
    """`values` reduced over the ranks (`op`: a torch.distributed.ReduceOp name); as they are without one."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return t.tolist()


def _all_reduce_sum(values: list[float]) -> list[float]:
    return _all_reduce(values)


def _worker_nodes() -> list[str]:
    """The Ray node id of every rank, in rank order (the history records where training ran)."""
    import ray
    import torch.distributed as dist

    mine = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    nodes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, mine)
    return nodes


def _state_to_cpu(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    core = unwrap(model)
    return {k: v.detach().to("cpu").clone() for k, v in core.state_dict().items()}


# The worker's parts, in the order it runs them: WorkerConfig (what it is told), build_trainee (model,
# optimizer and learning rule, restored from a checkpoint), run_training (the epoch loop: train, evaluate,
# reduce, decide, log, checkpoint). run_training takes the Ray-specific pieces (all-reduce, report) as
# arguments, so it also runs in a plain process (tests/test_model_kinds.py trains a new kind through it).


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


@dataclass
class TrainState:
    """Where a run is, beyond the weights; checkpointed every epoch with them."""

    stopper: EarlyStopping
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_state: Optional[dict[str, torch.Tensor]] = None

    @classmethod
    def restore(cls, saved: Optional[dict[str, Any]], ae: Autoencoder, optimizer: torch.optim.Optimizer,
                train: TrainSection) -> "TrainState":
        """A fresh state, or the one in a checkpoint's payload (weights and optimizer loaded in place)."""
        if saved is None:
            return cls(EarlyStopping(train.patience, train.min_delta))
        ae.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        stopper = EarlyStopping(train.patience, train.min_delta, best=float(saved["best_val"]),
                                best_epoch=int(saved["best_epoch"]), bad_epochs=int(saved["bad_epochs"]))
        return cls(stopper, int(saved["epoch"]) + 1, list(saved["history"]), saved["best_model"])

    def finished(self, epochs: int) -> bool:
        """True when a restored run has nothing left to train (stopped early, or past its last epoch)."""
        return self.stopper.should_stop or self.start_epoch >= epochs

    def checkpoint(self, trainee: Trainee, epoch: int) -> dict[str, Any]:
        """The checkpoint payload (saved as CHECKPOINT_FILE) after `epoch`."""
        return {
            "model": _state_to_cpu(trainee.model), "optimizer": trainee.optimizer.state_dict(),
            "best_model": self.best_state, "epoch": epoch, "best_val": self.stopper.best,
            "best_epoch": self.stopper.best_epoch, "bad_epochs": self.stopper.bad_epochs, "history": self.history,
        }


def build_trainee(wc: WorkerConfig, device: torch.device, wrap: Wrap,
                  saved: Optional[dict[str, Any]] = None) -> tuple[Trainee, TrainState]:
    """Model, optimizer and learning rule for `wc`, restored from a checkpoint payload if there is one."""
    ae = build_model(wc.n_features, layout=wc.layout, **dataclasses.asdict(wc.model))
    optimizer = torch.optim.AdamW(ae.parameters(), lr=wc.train.lr, weight_decay=wc.train.weight_decay)
    state = TrainState.restore(saved, ae, optimizer, wc.train)  # before wrapping: DDP broadcasts rank 0's weights
    model, step_fn = ALGORITHMS[wc.train.algorithm](ae, wc, device, wrap)
    return Trainee(ae, model, optimizer, step_fn), state


@dataclass
class EpochTotals:
    """One epoch's sums over every worker (one all-reduce)."""

    train_loss_sum: float
    train_rows: float
    val_loss_sum: float
    val_rows: float
    steady_rows: float
    steady_seconds: float
    data_wait_seconds: float

    @classmethod
    def of(cls, stats: EpochStats, val_sum: float, val_rows: int) -> "EpochTotals":
        return cls(stats.loss_sum, stats.rows, val_sum, val_rows, stats.steady_rows, stats.steady_seconds,
                   stats.data_wait_seconds)

    def reduced(self, all_reduce_sum: Callable[[list[float]], list[float]]) -> "EpochTotals":
        return EpochTotals(*all_reduce_sum(list(dataclasses.astuple(self))))

    @property
    def train_loss(self) -> float:
        return self.train_loss_sum / max(self.train_rows, 1)

    @property
    def val_loss(self) -> float:
        return self.val_loss_sum / max(self.val_rows, 1) if self.val_rows else self.train_loss


def epoch_metrics(epoch: int, totals: EpochTotals, stats: EpochStats, stopper: EarlyStopping,
                  stage: Optional[str], elapsed: float, last_report_seconds: float = 0.0,
                  validation_seconds: float = 0.0) -> dict[str, Any]:
    """The metrics reported (and kept in the history) for one epoch.

    `fixed_seconds` is what the epoch cost besides its training steps: reading and waiting for data,
    validation, the all-reduce, and the previous epoch's report (+ checkpoint), counted here because an
    epoch's metrics travel in its own report, before that report's time is known. `validation_seconds` is
    the validation pass's part of it (a forward pass over the rank's validation rows: it grows with them).
    """
    steady = totals.steady_seconds
    return {
        "epoch": epoch, "train_loss": totals.train_loss, "val_loss": totals.val_loss, "best_val_loss": stopper.best,
        "best_epoch": stopper.best_epoch, "train_rows": int(totals.train_rows), "val_rows": int(totals.val_rows),
        "rows_per_s": totals.train_rows / max(elapsed, 1e-9), "epoch_seconds": elapsed,
        "first_batch_seconds": stats.first_batch_seconds, "step_seconds": stats.step_seconds,
        "fixed_seconds": max(elapsed + last_report_seconds - stats.step_seconds, 0.0),
        "last_report_seconds": last_report_seconds, "validation_seconds": validation_seconds,
        # steady state per worker: training steps only, the first batch (warm-up) excluded
        "worker_rows_per_s": totals.steady_rows / steady if steady > 0 else 0.0,
        "data_wait_fraction": totals.data_wait_seconds / steady if steady > 0 else 0.0,
        **{f"train_{k}": v for k, v in stats.parts.items() if k != "recon"},
        **({"stage": stage} if stage is not None else {}),
    }


def epoch_line(metrics: dict[str, Any], epochs: int, stopper: EarlyStopping, eta: float, stop: bool) -> str:
    """The epoch's log line (rank 0 prints it)."""
    stage = metrics.get("stage")
    return (f"[train] epoch {metrics['epoch'] + 1}/{epochs} train_loss={metrics['train_loss']:.5f}"
            f" val_loss={metrics['val_loss']:.5f} best={stopper.best:.5f}@{stopper.best_epoch + 1}"
            f" rows={metrics['train_rows']} {metrics['rows_per_s']:,.0f} rows/s"
            f" epoch={metrics['epoch_seconds']:.1f}s eta={eta:.0f}s"
            + (f" stage={stage}" if stage is not None else "")
            + ("  (early stop)" if stop else ""))


Report = Callable[[dict[str, Any], Optional[dict[str, Any]]], None]
"""(metrics, checkpoint payload or None) -> None; every rank calls it on the checkpoint epochs (a barrier
under Ray): those train.checkpoint_every or train.checkpoint_interval_s pick, the last and the early-stopping
one; rank 0 passes the payload, the others None."""


def run_training(wc: WorkerConfig, trainee: Trainee, state: TrainState,
                 train_batches: Callable[[], Iterable[torch.Tensor]],
                 val_batches: Callable[[], Iterable[torch.Tensor]], device: torch.device, rank: int,
                 report: Report, all_reduce_sum: Callable[[list[float]], list[float]] = _all_reduce_sum,
                 extra_metrics: Optional[dict[str, Any]] = None) -> None:
    """The epoch loop from `state.start_epoch`: train, evaluate, all-reduce, early-stop, log, report.

    Early stopping is decided from all-reduced validation loss, so every rank stops at the same epoch.
    `extra_metrics` go into every epoch's metrics (e.g. the nodes the workers ran on).
    """
    epochs = wc.epochs
    if state.finished(epochs):
        epochs = state.start_epoch  # a finished run resumed: nothing left to do
    pretraining = wc.model.pretrain_epochs_total
    run_start = last_save = time.perf_counter()
    report_seconds = 0.0
    for epoch in range(state.start_epoch, epochs):
        t0 = time.perf_counter()
        stage = trainee.ae.begin_epoch(epoch)  # None, or e.g. "pretrain-1/3" / "finetune" for a staged kind
        stats = train_epoch(train_batches(), trainee.model, trainee.optimizer, device, step_fn=trainee.step_fn)
        t_val = time.perf_counter()
        val_sum, val_rows = evaluate(val_batches(), trainee.model)
        validation_seconds = time.perf_counter() - t_val
        totals = EpochTotals.of(stats, val_sum, val_rows).reduced(all_reduce_sum)
        # the full model is not what pretraining optimizes: early stopping and the best model wait for it
        improved = epoch >= pretraining and state.stopper.update(totals.val_loss, epoch)
        if improved or state.best_state is None:
            state.best_state = _state_to_cpu(trainee.model)
        metrics = {**epoch_metrics(epoch, totals, stats, state.stopper, stage, time.perf_counter() - t0,
                                   report_seconds, validation_seconds), **(extra_metrics or {})}
        state.history.append(metrics)
        stop = state.stopper.should_stop
        if rank == 0:
            done, left = epoch + 1 - state.start_epoch, (epochs - epoch - 1) if not stop else 0
            eta = (time.perf_counter() - run_start) / done * left
            print(epoch_line(metrics, epochs, state.stopper, eta, stop), flush=True)
        # Only checkpoint epochs report: Ray's report is a barrier with a round trip to the controller, the
        # costliest part of a small table's epoch, and the history travels in the checkpoint anyway. All
        # ranks decide alike: the epoch counter, the all-reduced stop, and rank 0's clock (all-reduced).
        report_seconds = 0.0
        if stop or epoch == epochs - 1 or checkpoint_due(wc.train, epoch, all_reduce_sum, rank, last_save):
            t_report = time.perf_counter()
            report(metrics, state.checkpoint(trainee, epoch) if rank == 0 else None)
            last_save = time.perf_counter()
            report_seconds = last_save - t_report
        if stop:
            break


def checkpoint_due(train, epoch: int, all_reduce_sum: Callable[[list[float]], list[float]], rank: int,
                   last_save: float) -> bool:
    """Whether `epoch` (not the last) gets a checkpoint: every train.checkpoint_every epochs, or with 0
    once train.checkpoint_interval_s have passed since the previous one on rank 0's clock."""
    if train.checkpoint_every:
        return (epoch + 1) % train.checkpoint_every == 0
    since = time.perf_counter() - last_save if rank == 0 else 0.0
    return all_reduce_sum([since])[0] >= train.checkpoint_interval_s


# ------------------------------------------------------------------------------------------ Ray worker

WORKER_CONFIG = "worker"
"""The one key of Ray's train_loop_config: the WorkerConfig."""


def _prepare_ddp(module: torch.nn.Module, find_unused_parameters: bool) -> torch.nn.Module:
    import ray.train.torch

    kw = {"find_unused_parameters": True} if find_unused_parameters else None
    return ray.train.torch.prepare_model(module, parallel_strategy_kwargs=kw)


def _ray_report(metrics: dict[str, Any], payload: Optional[dict[str, Any]]) -> None:
    import ray.train

    if payload is None:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(payload, os.path.join(d, CHECKPOINT_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _load_payload(ckpt) -> Optional[dict[str, Any]]:
    """The payload of a Ray checkpoint (TrainState.checkpoint's dict), or None without one."""
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return torch.load(os.path.join(d, CHECKPOINT_FILE), map_location="cpu", weights_only=True)


def train_loop_per_worker(config: dict[str, WorkerConfig]) -> None:
    """Runs on every Ray Train worker: seeds, restores, builds the model, feeds run_training its shards."""
    import ray.train
    import ray.train.torch

    wc = config[WORKER_CONFIG]
    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(wc.torch_threads)
    torch.manual_seed(wc.seed + rank)
    device = ray.train.torch.get_device()
    saved, source = resume_state(_load_payload(ray.train.get_checkpoint()), wc.storage, wc.checkpoints_uri, rank)
    trainee, state = build_trainee(wc, device, _prepare_ddp, saved)
    if saved is not None and rank == 0:
        where = "" if source == "registered" else f" (newest in storage, not yet registered by Ray Train: {source})"
        print(f"[train] resumed from checkpoint after epoch {state.start_epoch - 1}{where}", flush=True)
    if saved is not None and source != "registered" and state.finished(wc.epochs):
        # a finished run Ray Train has not seen the end of: report its last checkpoint as the result
        _ray_report(state.history[-1], state.checkpoint(trainee, state.start_epoch - 1) if rank == 0 else None)

    if wc.direct is not None:
        train_batches, val_batches = direct_epochs(wc, rank, ray.train.get_context().get_world_size(), device)
    else:
        train_batches, val_batches = dataset_epochs(wc, rank, device)
    run_training(wc, trainee, state, train_batches, val_batches,
                 device, rank, _ray_report, extra_metrics={"worker_nodes": _worker_nodes()})


def dataset_epochs(wc: WorkerConfig, rank: int, device: torch.device):
    """(train_batches, val_batches) over this rank's Ray Data shards: streamed each epoch, or read once
    (EpochCache) when `wc.cache`."""
    import ray.train

    normalizer = Normalizer(wc.mean, wc.scale, device)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation")
    iter_kw = dict(batch_size=wc.batch_size, batch_format="pyarrow", prefetch_batches=2)
    if wc.train.shuffle_buffer_rows:
        iter_kw["local_shuffle_buffer_size"] = wc.train.shuffle_buffer_rows
    val_kw = dict(batch_size=wc.batch_size * 4, batch_format="pyarrow", prefetch_batches=2)
    train_batches = lambda: tensor_batches(train_shard.iter_batches(**iter_kw), normalizer, device)  # noqa: E731
    val_batches = lambda: tensor_batches(val_shard.iter_batches(**val_kw), normalizer, device)  # noqa: E731
    if wc.cache:
        train_batches = EpochCache(train_batches, wc.batch_size, device, shuffle=True, seed=wc.seed + rank)
        val_batches = EpochCache(val_batches, wc.batch_size * 4, device, shuffle=False, seed=0)
    return train_batches, val_batches


# ------------------------------------------------------------------------------------------ driver


def split_bytes(spec, width: Optional[int] = None) -> int:
    """What the training and validation splits take in memory: one float32 per input slot per row."""
    return spec.num_rows * (width or spec.num_features) * 4


def cache_splits(spec, cache_fraction: float, width: Optional[int] = None) -> bool:
    """Whether the splits fit `cache_fraction` of the cluster's object store (the yardstick of what the
    cluster's memory can spare; the cache itself lives in the training workers); says which in one line."""
    import ray

    size, store = split_bytes(spec, width), float(ray.cluster_resources().get("object_store_memory", 0.0))
    cache = cache_fraction > 0 and size <= cache_fraction * store
    what = ("each training worker reads its part of the splits once and keeps it in memory" if cache
            else "streaming the input each epoch")
    print(f"[train] {what} ({size / 1e6:,.1f} MB of {store / 1e6:,.0f} MB; train.cache_fraction="
          f"{cache_fraction:g})", flush=True)
    return cache


@dataclass
class FitResult:
    best_state: dict[str, torch.Tensor]
    history: list[dict[str, Any]]
    best_epoch: int
    best_val_loss: float
    batch_size: int
    epochs: int
    """The epoch limit the run had (train.epochs, or with `auto` what train.steps needed)."""


def fit(cfg, storage, spec, featurizer, n_train: int) -> FitResult:
    """Run the TorchTrainer over the train/validation splits; checkpoints go to `<run>/train/`."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.cluster import ray_log_level, train_loop_with_ray_log_level
    from pipeline.read import read_dataset
    from pipeline.rows import SplitFeatures
    from pipeline.uri import join_uri

    data, tr = cfg.data, cfg.train
    fz = None if featurizer.vector else featurizer  # a vector column: the float matrix as it is
    cache = cache_splits(spec, tr.cache_fraction, featurizer.width)
    # Cached: the workers read their rows themselves (DirectSplits), unless a column read is not in the files
    # (e.g. a hive partition key, which only Ray Data's reader adds).
    direct = (DirectSplits(list(spec.files), list(spec.columns), data, spec.num_features, fz)
              if cache and spec.schema is not None and set(spec.columns) <= set(spec.schema.names) else None)
    datasets = None
    if direct is None:
        # Streamed epochs read the files in a new order each time; cached ones shuffle every row in the worker.
        datasets = {
            "train": read_dataset(spec, storage, shuffle_files=not cache).map_batches(
                SplitFeatures(data, spec.num_features, "train", fz), batch_format="pyarrow", batch_size=None),
            "validation": read_dataset(spec, storage).map_batches(
                SplitFeatures(data, spec.num_features, "validation", fz), batch_format="pyarrow", batch_size=None)}

    from pipeline.sizing import step_budget

    batch_size, epochs = step_budget(tr.batch_size, n_train // tr.num_workers, tr.epochs, tr.steps)
    if batch_size != tr.batch_size or tr.epochs == "auto":
        print(f"[train] batch size {batch_size}, up to {epochs} epochs (train.epochs {tr.epochs}, train.steps "
              f"{tr.steps}; {n_train} training rows, {tr.num_workers} workers)", flush=True)
    worker = WorkerConfig(model=cfg.model, train=tr, n_features=featurizer.width, mean=featurizer.offset.tolist(),
                          scale=featurizer.scale.tolist(), batch_size=batch_size, epochs=epochs, seed=cfg.run.seed,
                          layout=featurizer.layout(),
                          # resume from the newest complete checkpoint in storage, registered or not (resume.py)
                          storage=storage, checkpoints_uri=join_uri(cfg.run_uri, "train", cfg.run.name),
                          cache=cache, direct=direct)
    resources = {"CPU": tr.cpus_per_worker}
    if tr.use_gpu:
        resources["GPU"] = 1
    train_uri = join_uri(cfg.run_uri, "train")
    fs, train_path = storage.resolve(train_uri)
    trainer = TorchTrainer(
        train_loop_with_ray_log_level(train_loop_per_worker),
        train_loop_config={WORKER_CONFIG: worker},
        scaling_config=ray.train.ScalingConfig(num_workers=_num_workers(tr), use_gpu=tr.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=train_path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=tr.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # Ray Train's per-report and per-checkpoint info lines: session logs only, unless --verbose
            logging_config=ray.train.LoggingConfig(log_level=ray_log_level()),
        ),
        datasets=datasets,
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {cfg.run.name} finished without a checkpoint")
    state = _load_payload(result.checkpoint)
    return FitResult(best_state=state["best_model"], history=list(state["history"]),
                     best_epoch=int(state["best_epoch"]), best_val_loss=float(state["best_val"]),
                     batch_size=batch_size, epochs=epochs)


def _num_workers(tr) -> int | tuple[int, int]:
    """Ray Train's `num_workers`: a fixed count, or a (min, max) range for elastic training."""
    if tr.min_workers is None or tr.min_workers == tr.num_workers:
        return tr.num_workers
    return (tr.min_workers, tr.num_workers)
