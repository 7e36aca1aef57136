"""Probe (issue 24, eleventh round): benchmark tables with their two-valued numeric columns written as Parquet
booleans, which the featurizer then takes as categorical (a softmax head and a cross-entropy error each),
through `make eval`'s own path (`pipeline_scores`: train_job, then score_job, on one local Ray).

    python -m benchmarks.boolean_probe --tables 15_Hepatitis,47_yeast [--num-cpus 2]

A column counts as two-valued when the training rows hold exactly two values and the test rows no other;
it becomes `value == the larger of the two`. Prints each table's AUROC and AP, `recon_error`'s AUROC and the
wall time; compare with `make eval`'s figures for the same tables (the pipeline is deterministic).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import pipeline.evaluation as ev


def two_valued(X: np.ndarray, train: np.ndarray) -> dict[int, float]:
    """column -> its larger value, for the columns with two values in the training rows and no other."""
    out = {}
    for j in range(X.shape[1]):
        u = np.unique(X[train, j])
        if len(u) == 2 and set(np.unique(X[:, j])) <= set(u):
            out[j] = float(u.max())
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tables", required=True)
    p.add_argument("--num-cpus", type=int, default=2)
    a = p.parse_args()
    for name in a.tables.split(","):
        table = ev.load_table(name)
        train, test = ev.protocol_masks(table)
        flags = two_valued(table.X, train)

        def write_split(path: Path, X: np.ndarray, ids: np.ndarray) -> None:
            path.mkdir(parents=True, exist_ok=True)
            cols = {ev.ID: pa.array(ids, pa.int64())}
            for j, col in enumerate(ev.feature_names(X.shape[1])):
                cols[col] = pa.array(X[:, j] == flags[j]) if j in flags else pa.array(X[:, j])
            pq.write_table(pa.table(cols), path / "part-0.parquet")

        ev.write_split = write_split  # pipeline_scores writes the splits through it
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            scores, info = ev.pipeline_scores(table, train, test, Path(d), [], a.num_cpus)
        m = ev.ranking_metrics(scores, table.y[test])
        print(f"[boolean_probe] {name}: {len(flags)} boolean columns, AUROC {m['auroc']:.3f} AP {m['ap']:.3f}, "
              f"recon_error {info['recon_error']['auroc']:.3f}, {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
