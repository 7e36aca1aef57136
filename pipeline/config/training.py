"""The config's `train` section: epochs and the step budget, the optimizer, workers, early stopping,
checkpoints and the learning rule. A dataclass with a docstring per field, range-checked on creation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from pipeline.errors import check_config as _check
from pipeline.sizing import AUTO


@dataclass
class TrainSection:
    epochs: Union[int, Literal["auto"]] = AUTO
    """Maximum passes over the training data (early stopping may end sooner). `auto`: 20, and on a small
    table enough to reach train.steps (the batch size is lowered first); on a very large table only those that
    reach 10x train.steps, at least one (pipeline/sizing.py `large_table_epochs`); a number is a hard limit."""
    steps: Union[int, Literal["auto"]] = AUTO
    """With epochs `auto`: optimizer steps per worker the run aims for; a small table gets smaller batches
    (down to 16 rows) and then more epochs until it reaches them. `auto`: 2000, or 4000 when the input has
    categorical columns (pipeline/sizing.py). 0: 20 epochs, no step budget."""
    batch_size: int = 1024
    """Rows per minibatch per worker; lowered on small tables (>= 20 steps an epoch, and train.steps)."""
    lr: float = 1e-3
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    trim_fraction: float = 0.0
    """Robust training (backprop): each step leaves out this share of its batch, the rows the model
    reconstructs worst, so the anomalies inside the training data pull the model less (0: every row). Off by
    default: on the 31 benchmark tables it is level with 0.1 (AUROC), and 0.1 kept minority modes of normal
    rows from being learned (the demo's flags: 4% right with 0.1, 63% with 0; docs/evaluation.md)."""
    num_workers: int = 1
    """Data-parallel training workers (one process each; one GPU each with use_gpu)."""
    min_workers: Optional[int] = None
    """Elastic training: start with as many workers as fit between this and num_workers, and after losing a
    node go on from the last checkpoint with fewer (never below this) instead of waiting for its resources;
    unset means exactly num_workers. GPU workers only (use_gpu): CPU workers would take the CPUs Ray Data
    needs."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per training worker; keep some free for Ray Data to feed them."""
    use_gpu: bool = False
    """Train on GPUs (one per worker), with bf16 mixed precision."""
    patience: int = 3
    """Early stopping: epochs without a validation improvement before stopping."""
    min_delta: float = 1e-4
    """Early stopping: relative improvement of validation loss that counts."""
    max_failures: int = 2
    """Times Ray Train restarts the workers from the last checkpoint after a failure."""
    algorithm: Literal["backprop", "recirculation"] = "backprop"
    """Learning rule: gradient descent on the loss, or recirculation (one hidden layer, no backward pass)."""
    shuffle_buffer_rows: int = 0
    """Rows in each worker's local shuffle buffer (0: block order is randomized, rows are not)."""
    recirculation_lambda: float = 0.75
    """recirculation: regression factor; the second visible state is lambda * x + (1 - lambda) * g(f(x))."""
    threshold_quantile: float = 0.99
    """Anomaly threshold, set when training ends: this quantile of the validation rows' anomaly scores (stored
    with the model; scoring flags rows above it)."""
    validation_batch_size: int = 4096
    """Rows per batch of the training workers' validation passes: after every epoch, and the last one, which
    scores every validation row with the best model to set the threshold."""
    cache_fraction: float = 0.25
    """Read the training and validation splits once and run later epochs from the training workers' memory
    (every row reshuffled each epoch) when their size (rows x features x 4 bytes, from the Parquet footers)
    is at most this share of Ray's object store; otherwise re-read the input each epoch. 0: always stream."""
    checkpoint_every: int = 0
    """Write a checkpoint every this many epochs; 0: by time instead (train.checkpoint_interval_s). The last
    epoch and the early-stopping epoch always get one, and each carries the best weights so far. A failure
    resumes from the newest checkpoint and redoes the epochs since."""
    checkpoint_interval_s: float = 60.0
    """With train.checkpoint_every 0: checkpoint after the first epoch that ends this many seconds after the
    previous checkpoint (or the run's start). On a small table that is just the last epoch: no per-epoch
    checkpoint and report cost."""

    def __post_init__(self) -> None:
        _check(0.0 < self.threshold_quantile < 1.0, "train.threshold_quantile", "must be in (0, 1)")
        _check(self.validation_batch_size >= 1, "train.validation_batch_size", "must be >= 1")
        _check(self.epochs == AUTO or self.epochs >= 1, "train.epochs", f"{self.epochs} must be >= 1")
        _check(self.steps == AUTO or self.steps >= 0, "train.steps", f"{self.steps} must be >= 0 or auto")
        _check(self.batch_size >= 1, "train.batch_size", f"{self.batch_size} must be >= 1")
        _check(self.lr > 0, "train.lr", f"{self.lr} must be > 0")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(0.0 <= self.trim_fraction < 1.0, "train.trim_fraction", f"{self.trim_fraction} must be in [0, 1)")
        _check(self.num_workers >= 1, "train.num_workers", f"{self.num_workers} must be >= 1")
        _check(self.min_workers is None or 1 <= self.min_workers <= self.num_workers, "train.min_workers",
               f"{self.min_workers} must be between 1 and train.num_workers ({self.num_workers})")
        # Measured on a 3-node loopback cluster (tests/test_multinode.py's setup): after a node loss Ray
        # Train's elastic policy restarted as many CPU workers as the remaining CPUs held and Ray Data's read
        # tasks waited for a CPU forever. With GPU workers the GPUs bound the group and the CPUs stay free.
        _check(self.min_workers is None or self.min_workers == self.num_workers or self.use_gpu,
               "train.min_workers", "elastic training needs train.use_gpu: with CPU workers Ray Train's restart "
               "takes every CPU the remaining nodes have and leaves Ray Data none to read the input")
        _check(self.cpus_per_worker > 0, "train.cpus_per_worker", "must be > 0")
        _check(self.patience >= 1, "train.patience", "must be >= 1")
        _check(self.min_delta >= 0, "train.min_delta", "must be >= 0")
        _check(self.max_failures >= 0, "train.max_failures", "must be >= 0")
        _check(self.shuffle_buffer_rows >= 0, "train.shuffle_buffer_rows", "must be >= 0")
        _check(0.0 <= self.cache_fraction <= 1.0, "train.cache_fraction", f"{self.cache_fraction} must be in [0, 1]")
        _check(self.checkpoint_every >= 0, "train.checkpoint_every", f"{self.checkpoint_every} must be >= 0")
        _check(self.checkpoint_interval_s > 0, "train.checkpoint_interval_s",
               f"{self.checkpoint_interval_s} must be > 0")
        _check(0.0 <= self.recirculation_lambda < 1.0, "train.recirculation_lambda",
               f"{self.recirculation_lambda} must be in [0, 1)")
