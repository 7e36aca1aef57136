"""The run's last validation pass, in the training workers: the best model scores every validation row, and
the ranks' score sketches (pipeline/sketch.py) merge into one, which the last checkpoint carries to the driver.
The anomaly threshold and the manifest's per-column errors come from it.

The workers hold the validation split already (in memory when the splits are cached, else as their Ray Data
shard), so this costs one forward pass over it: no second read of the input and no Ray Data job of its own.
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

from pipeline.models import build_model
from pipeline.sketch import ScoreSketch, summarize_block
from pipeline.tensors import autocast_for
from pipeline.train.collective import all_gather_objects, broadcast_object
from pipeline.train.state import WorkerConfig


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


def validation_sketch(wc: WorkerConfig, best_state: Optional[dict[str, torch.Tensor]],
                      val_batches: Callable[[], Iterable[torch.Tensor]], device: torch.device, rank: int,
                      gather: Callable[[Any], list[Any]] = all_gather_objects,
                      broadcast: Callable[[Any], Any] = broadcast_object) -> Optional[dict[str, Any]]:
    """Every rank scores its validation rows with rank 0's `best_state`; rank 0 returns the merged sketch's
    summary as tensors (what the checkpoint payload holds), the other ranks None. All ranks must call it."""
    model = build_model(wc.n_features, layout=wc.layout, **dataclasses.asdict(wc.model))
    model.load_state_dict(broadcast(best_state))  # rank 0's on every rank
    n_columns = wc.layout.n_columns if wc.layout is not None else wc.n_features
    mine = score_sketch(model.to(device), val_batches(), n_columns).summary()
    everyone = gather(mine)
    if rank != 0:
        return None
    merged = ScoreSketch.merged(n_columns, everyone).summary()
    return {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
            for k, v in merged.items()}
