"""The epoch loop a training worker runs (`run_training`) and what it logs: per-epoch sums over the ranks
(`EpochTotals`), the metrics reported and kept in the history (`epoch_metrics`), the log line (`epoch_line`) and
which epochs print one (`EpochLog`), and when a checkpoint is due (`checkpoint_due`).

It takes the Ray-specific pieces (the all-reduce and the report) as arguments, so it also runs in a plain
process: tests/test_kinds.py trains a new kind through it, checkpoint and resume included.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

from pipeline.calibration import SubspaceTerm
from pipeline.train.collective import all_reduce_sum as _all_reduce_sum
from pipeline.train.collective import all_reduce_tensor
from pipeline.train.state import Trainee, TrainState, WorkerConfig
from pipeline.train.step import EarlyStopping, EpochStats, evaluate, state_to_cpu, train_epoch
from pipeline.train.validate import finish_validation


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


EPOCH_LINE_SECONDS = 5.0
"""Rank 0 prints an epoch's line once this long has passed since its last one, and always the run's first and
last epochs, a stage's first and a checkpoint's. A small table's epochs take milliseconds (iris: 740 of them in
15 s): one line each filled the log, and Ray's driver folded lines alike within its 5 s window into "[repeated
Nx across cluster]" anyway. Every epoch is in the history (the report's and MLflow's curves) either way."""


def epoch_line_due(epoch: int, first_epoch: int, stage_changed: bool, last: bool, checkpoint: bool,
                   since_last_line: float) -> bool:
    """Whether rank 0 prints this epoch's line (EPOCH_LINE_SECONDS)."""
    return (epoch == first_epoch or stage_changed or last or checkpoint
            or since_last_line >= EPOCH_LINE_SECONDS)


class EpochLog:
    """Rank 0's epoch lines from `first_epoch` on: which epochs print (`epoch_line_due`), with their ETA."""

    def __init__(self, rank: int, first_epoch: int, epochs: int):
        self.rank, self.first_epoch, self.epochs = rank, first_epoch, epochs
        self.start = self.last_line = time.perf_counter()
        self.stage: Optional[str] = None

    def epoch(self, metrics: dict[str, Any], stopper: EarlyStopping, last: bool, checkpoint: bool) -> None:
        epoch, stage, stop = metrics["epoch"], metrics.get("stage"), stopper.should_stop
        now = time.perf_counter()
        changed, self.stage = stage != self.stage, stage
        if self.rank != 0 or not epoch_line_due(epoch, self.first_epoch, changed, last, checkpoint,
                                                now - self.last_line):
            return
        done, left = epoch + 1 - self.first_epoch, (self.epochs - epoch - 1) if not stop else 0
        print(epoch_line(metrics, self.epochs, stopper, (now - self.start) / done * left, stop), flush=True)
        self.last_line = now


Report = Callable[[dict[str, Any], Optional[dict[str, Any]]], None]
"""(metrics, checkpoint payload or None) -> None; every rank calls it on the checkpoint epochs (a barrier
under Ray): those train.checkpoint_every or train.checkpoint_interval_s pick, the last and the early-stopping
one; rank 0 passes the payload, the others None."""


def run_training(wc: WorkerConfig, trainee: Trainee, state: TrainState,
                 train_batches: Callable[[], Iterable[torch.Tensor]],
                 val_batches: Callable[[], Iterable[torch.Tensor]], device: torch.device, rank: int,
                 report: Report, all_reduce_sum: Callable[[list[float]], list[float]] = _all_reduce_sum,
                 extra_metrics: Optional[dict[str, Any]] = None) -> None:
    """The epoch loop from `state.start_epoch`: train, evaluate, all-reduce, early-stop, log, report; at the
    end, the best model's score sketch over the validation rows (`state.validation`, in the last checkpoint).
    With the score's subspace term, the first epoch's training batches also fit its components.

    Early stopping is decided from all-reduced validation loss, so every rank stops at the same epoch.
    `extra_metrics` go into every epoch's metrics (e.g. the nodes the workers ran on).
    """
    epochs = wc.epochs
    if state.finished(epochs):
        epochs = state.start_epoch  # a finished run resumed: nothing left to do
    pretraining = wc.model.pretrain_epochs_total
    last_save = time.perf_counter()
    report_seconds = 0.0
    log = EpochLog(rank, state.start_epoch, epochs)
    for epoch in range(state.start_epoch, epochs):
        t0 = time.perf_counter()
        stage = trainee.ae.begin_epoch(epoch)  # None, or e.g. "pretrain-1/3" / "finetune" for a staged kind
        fitting = _unfitted_subspace(trainee.ae)
        batches = train_batches() if fitting is None else _observed(train_batches(), fitting)
        stats = train_epoch(batches, trainee.model, trainee.optimizer, device, step_fn=trainee.step_fn)
        if fitting is not None:  # the first epoch's rows, from every rank, fix the score's subspace term
            fitting.fit(all_reduce_tensor)
        t_val = time.perf_counter()
        val_sum, val_rows = evaluate(val_batches(), trainee.model)
        validation_seconds = time.perf_counter() - t_val
        totals = EpochTotals.of(stats, val_sum, val_rows).reduced(all_reduce_sum)
        # the full model is not what pretraining optimizes: early stopping and the best model wait for it
        improved = epoch >= pretraining and state.stopper.update(totals.val_loss, epoch)
        if improved or state.best_state is None:
            state.best_state = state_to_cpu(trainee.model)
        metrics = {**epoch_metrics(epoch, totals, stats, state.stopper, stage, time.perf_counter() - t0,
                                   report_seconds, validation_seconds), **(extra_metrics or {})}
        state.history.append(metrics)
        stop = state.stopper.should_stop
        # Only checkpoint epochs report: Ray's report is a barrier with a round trip to the controller, the
        # costliest part of a small table's epoch, and the history travels in the checkpoint anyway. All
        # ranks decide alike: the epoch counter, the all-reduced stop, and rank 0's clock (all-reduced).
        report_seconds = 0.0
        last = stop or epoch == epochs - 1
        checkpoint = last or checkpoint_due(wc.train, epoch, all_reduce_sum, rank, last_save)
        log.epoch(metrics, state.stopper, last, checkpoint)
        if last:  # the run's end: the best model over every validation row, for the threshold
            t_sketch = time.perf_counter()
            finish_validation(wc, state, val_batches, device, rank)
            metrics["threshold_seconds"] = time.perf_counter() - t_sketch
        if checkpoint:
            t_report = time.perf_counter()
            report(metrics, state.checkpoint(trainee, epoch) if rank == 0 else None)
            last_save = time.perf_counter()
            report_seconds = last_save - t_report
        if stop:
            break


def _unfitted_subspace(ae: torch.nn.Module) -> Optional[SubspaceTerm]:
    """The model's subspace term (model.subspace_weight) while it still needs its components: in a run's first
    epoch, or the first after resuming from a checkpoint saved without them."""
    sub = ae.subspace
    return sub if sub is not None and not bool(sub.fitted) else None


def _observed(batches: Iterable[torch.Tensor], subspace: SubspaceTerm) -> Iterator[torch.Tensor]:
    """`batches`, each shown to the subspace term's sums on its way to the training step."""
    for x in batches:
        subspace.observe_training(x)
        yield x


def checkpoint_due(train, epoch: int, all_reduce_sum: Callable[[list[float]], list[float]], rank: int,
                   last_save: float) -> bool:
    """Whether `epoch` (not the last) gets a checkpoint: every train.checkpoint_every epochs, or with 0
    once train.checkpoint_interval_s have passed since the previous one on rank 0's clock."""
    if train.checkpoint_every:
        return (epoch + 1) % train.checkpoint_every == 0
    since = time.perf_counter() - last_save if rank == 0 else 0.0
    return all_reduce_sum([since])[0] >= train.checkpoint_interval_s
