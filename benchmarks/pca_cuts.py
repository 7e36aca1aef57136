"""Probe (no Ray, no training): how `make eval`'s PCA baseline moves with its own two choices, the share of the
training variance its components keep and the input's scaling (issue 24: the target holds the defaults within
0.05 of PCA on every table). Per table, the test AUROC of PCA's reconstruction error at 90 / 95 / 99% of the
variance on min-max scaling (`pipeline.evaluation.pca_scores` is min-max at 95%) and on z-scores, with the
components kept; the protocol's split, constant training columns dropped.

    python -m benchmarks.pca_cuts --tables 39_vertebral,47_yeast      # seconds; the 26 small tables: a minute
"""

from __future__ import annotations

import argparse

import numpy as np

from pipeline.evaluation import load_table, minmax, protocol_masks, ranking_metrics, suite_tables

SHARES = (0.90, 0.95, 0.99)


def zscore(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, sd = train.mean(axis=0), train.std(axis=0)
    return (train - mean) / sd, (test - mean) / sd


def cuts(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray) -> dict[str, tuple[float, int]]:
    """{'minmax95': (test AUROC, components kept), ...} for each scaling and share."""
    from sklearn.decomposition import PCA

    x = x[:, x[train].std(axis=0) > 0].astype(np.float64)
    out = {}
    for scaling, scale in (("minmax", minmax), ("z", zscore)):
        a, b = scale(x[train], x[test])
        for share in SHARES:
            pca = PCA(n_components=share, svd_solver="full", random_state=0).fit(a)
            err = ((b - pca.inverse_transform(pca.transform(b))) ** 2).sum(axis=1)
            out[f"{scaling}{round(share * 100)}"] = (ranking_metrics(err, y[test])["auroc"], int(pca.n_components_))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tables", default="", help="comma-separated table names (default: the small suite)")
    args = p.parse_args(argv)
    for name in args.tables.split(",") if args.tables else suite_tables("small"):
        t = load_table(name)
        train, test = protocol_masks(t)
        row = cuts(t.X, t.y, train, test)
        print(f"{name:20s} " + "  ".join(f"{k} {a:.3f} ({n})" for k, (a, n) in row.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
