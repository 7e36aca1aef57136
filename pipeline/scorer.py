"""Scoring one batch: input rows -> output rows, and the two Ray Data forms that run it.

    BatchScorer     featurize (rejects written), predict, build the output columns (pipeline/output.py)
    ScoreBatches    CPU scoring (`score.compute: tasks`): plain tasks, read -> score fused per file
    ScoringActor    GPU scoring (`score.compute: actors`): an actor pool that keeps the model on the device

Both load the model once per worker process (predictor.cached_predictor / the actor's constructor).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Optional

import pyarrow as pa
import torch

from pipeline.config import DataSection, OutputSection
from pipeline.output import scored_table
from pipeline.predictor import Predictor, cached_predictor
from pipeline.rows import RejectWriter, batch_rows
from pipeline.storage import Storage
from pipeline.watchdog import beat


class BatchScorer:
    """Plain-PyTorch scoring of Arrow batches (no Ray): the core of both scoring forms, usable on a GPU box."""

    def __init__(self, predictor: Predictor, data: DataSection, as_of: dt.datetime,
                 scored_at: Optional[dt.datetime] = None, on_reject: Optional[RejectWriter] = None,
                 output: Optional[OutputSection] = None):
        self.predictor, self.data, self.on_reject = predictor, data, on_reject
        self.output = output or OutputSection()
        self.as_of, self.scored_at = as_of, scored_at

    def __call__(self, table: pa.Table) -> pa.Table:
        beat()  # progress for the driver's stall watch (pipeline/watchdog.py)
        p = self.predictor
        rows = batch_rows(table, self.data, p.featurizer)
        x = rows.x
        if not rows.keep.all():
            if self.on_reject is not None:
                self.on_reject(table, rows)
            table, x = table.filter(pa.array(rows.keep)), x[rows.keep]
        pred = p(x)
        return scored_table(table, pred.score, pred.latent, pred.errors, p.featurizer.names, p.threshold, p.version,
                            self.data, self.output, self.as_of, self.scored_at or dt.datetime.now(dt.timezone.utc),
                            p.code_space)


def batch_scorer(predictor: Predictor, storage: Storage, data: DataSection, as_of: dt.datetime,
                 rejects_uri: Optional[str], output: Optional[OutputSection]) -> BatchScorer:
    """A scoring worker's batch scorer: rejects written to `rejects_uri`."""
    on_reject = RejectWriter(storage, rejects_uri, data) if rejects_uri else None
    return BatchScorer(predictor, data, as_of, on_reject=on_reject, output=output)


class ScoringActor:
    """Ray Data actor (GPU scoring, `score.compute: actors`): loads (and checksum-verifies) the model once,
    then scores batch after batch."""

    def __init__(self, storage: Storage, model_uri: str, data: DataSection, as_of: dt.datetime,
                 use_gpu: bool = False, torch_threads: int = 1, rejects_uri: Optional[str] = None,
                 output: Optional[OutputSection] = None):
        torch.set_num_threads(max(1, torch_threads))
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.scorer = batch_scorer(Predictor.from_artifact(storage, model_uri, device), storage, data, as_of,
                                   rejects_uri, output)

    def __call__(self, table: pa.Table) -> pa.Table:
        return self.scorer(table)


@dataclass(frozen=True)
class ScoreBatches:
    """Ray Data function (CPU scoring, `score.compute: tasks`): scores in plain tasks, so Ray fuses
    read -> score into one task per file (no actor start to wait for, no input block handed between
    processes; only the scored rows go on to the write). Each worker process loads and verifies the model
    once per run and keeps it."""

    storage: Storage
    model_uri: str
    data: DataSection
    as_of: dt.datetime
    torch_threads: int = 1
    rejects_uri: Optional[str] = None
    output: Optional[OutputSection] = None
    batch_size: int = 4096
    """Rows the model scores at a time."""
    run_id: str = ""
    """Names the run: a worker never reuses a model loaded for an earlier run (the artifact may have changed)."""

    def scorer(self) -> BatchScorer:
        predictor = cached_predictor((self.run_id, self.model_uri),
                                     lambda: Predictor.from_artifact(self.storage, self.model_uri))
        return batch_scorer(predictor, self.storage, self.data, self.as_of, self.rejects_uri, self.output)

    def __call__(self, table: pa.Table) -> pa.Table:
        # Ray hands over whole blocks (a `batch_size` on map_batches would stop it fusing the read into this
        # task); the model sees slices of `batch_size` rows.
        torch.set_num_threads(max(1, self.torch_threads))
        score = self.scorer()
        if table.num_rows <= self.batch_size:
            return score(table)
        # one chunk per block: the Parquet writer makes a row group of each chunk, and a file of many small
        # row groups is slower for every reader (the row verification here included)
        return pa.concat_tables([score(table.slice(i, self.batch_size))
                                 for i in range(0, table.num_rows, self.batch_size)]).combine_chunks()
