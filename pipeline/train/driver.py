"""The training driver (`fit`): builds the train/validation datasets (or, when the splits fit the cache, tells
the workers which files to read themselves: `DirectSplits`), `ScalingConfig`, `RunConfig(name,
storage_path)` and a `TorchTrainer`; the run's checkpoints live in artifact storage, so rerunning the same
`run.name` resumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from pipeline.cluster import ray_log_level, torch_trainer_class, train_loop_with_ray_log_level
from pipeline.read import read_dataset, stream_execution_options
from pipeline.rows import SplitFeatures
from pipeline.sizing import AUTO_EPOCHS, LARGE_TABLE_STEPS, auto_steps, step_budget
from pipeline.sketch import ScoreSketch
from pipeline.train.batches import DirectSplits
from pipeline.train.state import VALIDATION_KEY, WorkerConfig
from pipeline.train.worker import WORKER_CONFIG, load_payload, train_loop_per_worker
from pipeline.uri import join_uri


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
    validation: ScoreSketch
    """The best model's scores and per-column errors over every validation row (pipeline/train/validate.py)."""


def fit(cfg, storage, spec, featurizer, n_train: int) -> FitResult:
    """Run the TorchTrainer over the train/validation splits; checkpoints go to `<run>/train/`."""
    tr = cfg.train
    cache = cache_splits(spec, tr.cache_fraction, featurizer.width)
    direct, datasets = _inputs(cfg.data, storage, spec, featurizer, cache)
    steps = auto_steps(tr.steps, bool(featurizer.categorical_columns))
    batch_size, epochs = step_budget(tr.batch_size, n_train // tr.num_workers, tr.epochs, steps)
    if batch_size != tr.batch_size or tr.epochs == "auto":
        capped = (f"; a very large table: the epochs that reach {LARGE_TABLE_STEPS}x the steps"
                  if tr.epochs == "auto" and epochs < AUTO_EPOCHS else "")  # sizing.large_table_epochs
        print(f"[train] batch size {batch_size}, up to {epochs} epochs (train.epochs {tr.epochs}, train.steps "
              f"{steps}{' (auto)' if tr.steps == 'auto' else ''}; {n_train:,} training "
              f"rows, {tr.num_workers} worker{'s' if tr.num_workers > 1 else ''}{capped})", flush=True)
    worker = WorkerConfig(model=cfg.model, train=tr, n_features=featurizer.width, mean=featurizer.offset.tolist(),
                          scale=featurizer.scale.tolist(), batch_size=batch_size, epochs=epochs, seed=cfg.run.seed,
                          layout=featurizer.layout(),
                          # resume from the newest complete checkpoint in storage, registered or not (state.py)
                          storage=storage, checkpoints_uri=join_uri(cfg.run_uri, "train", cfg.run.name),
                          cache=cache, direct=direct)
    result = _trainer(cfg, storage, worker, datasets).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {cfg.run.name} finished without a checkpoint")
    state = load_payload(result.checkpoint)
    n_columns = len(featurizer.columns)
    return FitResult(best_state=state["best_model"], history=list(state["history"]),
                     best_epoch=int(state["best_epoch"]), best_val_loss=float(state["best_val"]),
                     batch_size=batch_size, epochs=epochs,
                     validation=ScoreSketch.merged(n_columns, [state[VALIDATION_KEY]]))


def _inputs(data, storage, spec, featurizer, cache: bool) -> tuple[Optional[DirectSplits], Optional[dict[str, Any]]]:
    """(DirectSplits, None) when the workers read their cached rows themselves, else (None, the Ray Data
    train and validation datasets)."""
    # Cached: the workers read their rows themselves (DirectSplits), unless a column read is not in the files
    # (e.g. a hive partition key, which only Ray Data's reader adds).
    if cache and spec.schema is not None and set(spec.columns) <= set(spec.schema.names):
        return DirectSplits(list(spec.files), list(spec.columns), data, spec.num_features, featurizer), None
    # Streamed epochs read the files in a new order each time; cached ones shuffle every row in the worker.
    return None, {
        "train": read_dataset(spec, storage, shuffle_files=not cache, row_keys=True).map_batches(
            SplitFeatures(data, spec.num_features, "train", featurizer), batch_format="pyarrow", batch_size=None),
        "validation": read_dataset(spec, storage, row_keys=True).map_batches(
            SplitFeatures(data, spec.num_features, "validation", featurizer), batch_format="pyarrow", batch_size=None)}


def _trainer(cfg, storage, worker: WorkerConfig, datasets: Optional[dict[str, Any]]):
    """The TorchTrainer: one worker per train.num_workers (a range when elastic), checkpoints under the run."""
    import ray.train

    tr = cfg.train
    resources = {"CPU": tr.cpus_per_worker}
    if tr.use_gpu:
        resources["GPU"] = 1
    fs, train_path = storage.resolve(join_uri(cfg.run_uri, "train"))
    return torch_trainer_class()(
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
        dataset_config=ray.train.DataConfig(execution_options=stream_execution_options(tr.num_workers)),
    )


def _num_workers(tr) -> int | tuple[int, int]:
    """Ray Train's `num_workers`: a fixed count, or a (min, max) range for elastic training."""
    if tr.min_workers is None or tr.min_workers == tr.num_workers:
        return tr.num_workers
    return (tr.min_workers, tr.num_workers)
