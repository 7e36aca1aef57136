"""Numbers computed over a run's published output (the report's drift counts, the planted-truth evaluation).

    output_error_counts(storage, files, hist)       `anomaly_score` counted on the training histogram's bins
    evaluate_against_truth(cfg, storage, out_uri)   precision, recall and AUROC against a planted-truth column
    auroc(scores, labels)                           area under the ROC curve
    flagged_share_note(anomalies, rows, quantile)   a note when far more rows are flagged than the threshold expects
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pyarrow as pa

from pipeline.config import Config
from pipeline.inputs import inspect_input
from pipeline.report import decile_counts, histogram_counts
from pipeline.storage import Storage

KIND_COLUMN = "anomaly_kind"  # the mixed sample's: which columns give a planted row away (numeric, categorical)
TRUTH_COLUMN = "is_anomaly_truth"  # a planted-truth column some inputs carry (the sample data does)


FLAGGED_EXCESS = 5  # a scoring run flagging more than this many times the threshold's share gets a note
MIN_FLAGGED = 5  # ... and at least this many rows


def flagged_share_note(anomalies: int, rows: int, quantile: float) -> Optional[str]:
    """A note when a scoring run flags more than FLAGGED_EXCESS times the share of rows the threshold flags of
    rows like the validation rows (1 - quantile), and at least MIN_FLAGGED rows; else None. Then the scored
    rows score unlike the validation rows: rows the model trained on score in-sample, and on a small or wide
    input it fits them apart from unseen ones (10 rows x 3 columns: 9 flagged; 400 rows x 3,000 columns of
    noise: 273); or the input has shifted since training."""
    expected = 1.0 - quantile
    if rows <= 0 or anomalies < MIN_FLAGGED or anomalies <= FLAGGED_EXCESS * expected * rows:
        return None
    return (f"{anomalies / rows:.0%} of the rows flagged, where the threshold (q{quantile} of the validation rows' "
            f"scores) flags about {expected:.0%} of rows like those: these rows score unlike the validation rows. "
            "Rows the model trained on score in-sample, and a small or wide input lets it fit them apart (read "
            "anomaly_score's ranking rather than is_anomaly); otherwise the input has shifted since training")


def output_error_counts(storage: Storage, files: list[str], hist: dict[str, Any]) -> dict[str, np.ndarray]:
    """`anomaly_score` of published files counted on the histogram's edges and on its deciles, streamed one
    column of one file at a time (the driver never holds more than one file's errors)."""
    counts = np.zeros(len(hist["edges"]) - 1, np.int64)
    deciles = np.zeros(len(hist["deciles"]) + 1, np.int64)
    for f in files:
        with storage.open_parquet(f) as pf:
            err = pf.read(columns=["anomaly_score"]).column("anomaly_score").to_numpy()
        counts += histogram_counts(err, hist["edges"])
        deciles += decile_counts(err, hist["deciles"])
    return {"counts": counts, "deciles": deciles}


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve via the rank-sum statistic (ties get their average rank)."""
    labels = labels.astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def evaluate_against_truth(cfg: Config, storage: Storage, output_uri: str,
                           truth_column: str = TRUTH_COLUMN) -> Optional[dict[str, float]]:
    """Precision, recall and AUROC of the published scores against a planted-truth column, if the input has one."""
    spec = inspect_input(cfg.data, storage)
    id_cols = (spec.data or cfg.data).ids
    if not id_cols:
        return None
    truth_parts = []
    for f in spec.files:
        with storage.open_parquet(f) as pf:
            if truth_column not in pf.schema_arrow.names:
                return None
            kinds = [KIND_COLUMN] if KIND_COLUMN in pf.schema_arrow.names else []
            truth_parts.append(pf.read(columns=id_cols + [truth_column] + kinds))
    truth = pa.concat_tables(truth_parts)
    out_parts = []
    for f in storage.list_files(output_uri, suffix=".parquet"):
        with storage.open_parquet(f) as pf:
            out_parts.append(pf.read(columns=id_cols + ["anomaly_score", "is_anomaly"]))
    joined = pa.concat_tables(out_parts).join(truth, keys=id_cols)
    y = joined.column(truth_column).to_numpy(zero_copy_only=False).astype(bool)
    s = joined.column("anomaly_score").to_numpy(zero_copy_only=False)
    flag = joined.column("is_anomaly").to_numpy(zero_copy_only=False).astype(bool)
    tp = int((flag & y).sum())
    out = {"auroc": auroc(s, y), "precision": tp / max(int(flag.sum()), 1), "recall": tp / max(int(y.sum()), 1),
           "planted": int(y.sum()), "rows": int(len(y))}
    if KIND_COLUMN in joined.column_names:  # the mixed sample: AUROC of each kind of planted row against normal ones
        kind = np.asarray(joined.column(KIND_COLUMN).to_pylist(), dtype=object)
        out["auroc_by_kind"] = {k: auroc(s[(kind == k) | ~y], y[(kind == k) | ~y])
                                for k in sorted(set(kind[y])) if k}
    return out
