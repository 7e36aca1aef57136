"""The run's last validation passes, in the training workers. First the best model's calibrated score fits its
terms' weights (`fit_term_weights`: each term's histogram over the validation rows, summed over the ranks;
pipeline/calibration.py); then it scores every validation row, and the ranks' score sketches
(pipeline/sketch.py) merge into one, which the last checkpoint carries to the driver with the weighted model.
The anomaly threshold and the manifest's per-column errors come from it.

The workers hold the validation split already (in memory when the splits are cached, else as their Ray Data
shard), so this costs two forward passes over it: no second read of the input and no Ray Data job of its own.
Every rank scores with rank 0's best weights and calibration statistics, the ones the stored model carries, so
each row gets the score that scoring will give it. Streamed with several workers, the ranks' shards are Ray
Train's equal splits of the validation rows, which leave out fewer rows than there are workers (the per-epoch
validation loss sees the same rows); cached, every validation row is scored.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch

from pipeline.calibration import ScoreCalibration, held_out_rows
from pipeline.models import build_model
from pipeline.sketch import ScoreSketch, summarize_block
from pipeline.tensors import autocast_for
from pipeline.train.collective import all_gather_objects, all_reduce_tensor, broadcast_object, world_size
from pipeline.train.state import TrainState, WorkerConfig
from pipeline.train.step import state_to_cpu


def score_sketch(model: torch.nn.Module, batches: Iterable[torch.Tensor], n_columns: int) -> ScoreSketch:
    """The sketch of `model`'s scores and per-column errors over normalized `batches`, one batch at a time."""
    sketch = ScoreSketch(n_columns)
    model.eval()
    with torch.inference_mode():
        for x in batches:
            with autocast_for(x.device):
                score, _, sq = model.score_and_latent(x)
            sketch.add(summarize_block(score.float().cpu().numpy(), sq.float().cpu().numpy()))
    return sketch


def fit_term_weights(model: torch.nn.Module, batches: Iterable[torch.Tensor],
                     reduce: Callable[[torch.Tensor], torch.Tensor] = all_reduce_tensor) -> None:
    """Score `batches` with `model` and fit each calibrated score's term weights from its terms' histograms,
    summed over the ranks by `reduce` (every rank must call it). A model without the calibrated score is left
    as it is."""
    calibrations = [m for m in model.modules() if isinstance(m, ScoreCalibration)]
    if not calibrations:
        return
    for c in calibrations:
        c.count_terms()
    model.eval()
    with torch.inference_mode():
        for x in batches:
            with autocast_for(x.device):
                model.score_and_latent(x)
    counts = reduce(torch.stack([c.take_counts() for c in calibrations]))
    for c, k in zip(calibrations, counts):
        c.fit_weights(k)


def finish_validation(wc: WorkerConfig, state: TrainState, val_batches: Callable[[], Iterable[torch.Tensor]],
                      device: torch.device, rank: int,
                      gather: Callable[[Any], list[Any]] = all_gather_objects,
                      broadcast: Callable[[Any], Any] = broadcast_object,
                      reduce: Callable[[torch.Tensor], torch.Tensor] = all_reduce_tensor,
                      held_out: Optional[bool] = None) -> None:
    """The run's end, on every rank: rank 0's best model (`state.best_state`) gets its term weights from the
    validation rows of all ranks, and scores them; `state.best_state` becomes that weighted model and
    `state.validation` its score sketch (rank 0; None on the others). Fitting again gives the same weights, so
    a resumed run may repeat it.

    `held_out` (default: one rank, whose rows are the ones the calibration observed): each validation row is
    scored with the calibration's statistics less itself (pipeline/calibration.py, `held_out_rows`), so the
    weights and the threshold come from scores like those of rows the model has not seen. With several ranks
    the statistics are rank 0's rows only: the other ranks' rows are unseen already, and a streamed rank 0 may
    hold other rows than the ones it observed, so the scores stay as they are."""
    model = build_model(wc.n_features, layout=wc.layout, **dataclasses.asdict(wc.model))
    model.load_state_dict(broadcast(state.best_state))  # rank 0's on every rank
    model.to(device)
    with held_out_rows(model, world_size() == 1 if held_out is None else held_out):
        fit_term_weights(model, val_batches(), reduce)
        state.validation = validation_sketch(model, val_batches, wc, rank, gather)
    state.best_state = state_to_cpu(model)


def validation_sketch(model: torch.nn.Module, val_batches: Callable[[], Iterable[torch.Tensor]], wc: WorkerConfig,
                      rank: int, gather: Callable[[Any], list[Any]] = all_gather_objects) -> Optional[dict[str, Any]]:
    """Every rank scores its validation rows with `model` (the same on every rank); rank 0 returns the merged
    sketch's summary as tensors (what the checkpoint payload holds), the other ranks None. All ranks must call
    it."""
    n_columns = wc.layout.n_columns if wc.layout is not None else wc.n_features
    mine = score_sketch(model, val_batches(), n_columns).summary()
    everyone = gather(mine)
    if rank != 0:
        return None
    merged = ScoreSketch.merged(n_columns, everyone).summary()
    return {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
            for k, v in merged.items()}
