"""Training, one concern per module; the names callers use are exported here.

    batches.py     tensor input: Arrow batches as tensors, the in-memory epoch cache, workers reading their rows
    step.py        the pure training step (plain PyTorch): the optimizer, train_epoch, evaluate, trimmed loss,
                   early stopping
    collective.py  reductions over the ranks (the identity in one process)
    state.py       a worker's config, model, learning rule and state; checkpoints and resuming
    loop.py        the epoch loop (run_training) and its metrics and log lines
    worker.py      the Ray Train glue: train_loop_per_worker, DDP, reports, dataset shards
    driver.py      fit: datasets, ScalingConfig, RunConfig, TorchTrainer

Early stopping is decided from all-reduced validation loss, so every rank stops at the same epoch. Importing
this package does not import Ray: only the worker's and the driver's functions do, when called.
"""

from __future__ import annotations

from pipeline.train.batches import DirectSplits, EpochCache, direct_epochs, tensor_batches
from pipeline.train.driver import FitResult, cache_splits, fit, split_bytes
from pipeline.train.loop import EpochTotals, checkpoint_due, epoch_line, epoch_metrics, run_training
from pipeline.train.state import (ALGORITHMS, CHECKPOINT_FILE, Trainee, TrainState, WorkerConfig, build_trainee,
                                  newest_stored_state, resume_state)
from pipeline.train.step import (EarlyStopping, EpochStats, LossForward, evaluate, make_optimizer, train_epoch,
                                 trimmed_rows, unwrap)
from pipeline.train.worker import dataset_epochs, train_loop_per_worker

__all__ = ["ALGORITHMS", "CHECKPOINT_FILE", "DirectSplits", "EarlyStopping", "EpochCache", "EpochStats",
           "EpochTotals", "FitResult", "LossForward", "TrainState", "Trainee", "WorkerConfig", "build_trainee",
           "cache_splits", "checkpoint_due", "dataset_epochs", "direct_epochs", "epoch_line", "epoch_metrics",
           "evaluate", "fit", "make_optimizer", "newest_stored_state", "resume_state", "run_training", "split_bytes",
           "tensor_batches", "train_epoch", "train_loop_per_worker", "trimmed_rows", "unwrap"]
