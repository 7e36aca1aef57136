"""Probe (no Ray, no training): does a rank (quantile) scaling of the input reach the tables whose anomalies sit
inside the data (issue 24: 39_vertebral and 47_yeast stay more than 0.05 below PCA)? Per table, the test AUROC
of three model-free scores, the squared distance from the training rows' centre, PCA's residual outside 95% of
the training variance and the distance to the 5th nearest training row, on three scalings fitted on the
training rows: z-scores (the pipeline's), min-max (the PCA baseline's) and each column's empirical quantile
mapped to a standard normal (a Gaussian copula: a skewed column's short tail becomes as far out as its long
one). The protocol's split, constant training columns dropped; the mean over the tables at the end.

    python -m benchmarks.scaling_probe                                  # the 26 small tables: about a minute
    python -m benchmarks.scaling_probe --tables 39_vertebral,47_yeast
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.pca_cuts import zscore
from pipeline.evaluation import load_table, minmax, protocol_masks, ranking_metrics, suite_tables


def quantile_normal(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.preprocessing import QuantileTransformer

    qt = QuantileTransformer(n_quantiles=min(1000, len(train)), output_distribution="normal", random_state=0)
    return qt.fit_transform(train), qt.transform(test)


SCALINGS = {"z": zscore, "minmax": minmax, "quantile": quantile_normal}


def scores(a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """The test rows' scores from training rows `a` (scaled): centre distance, PCA 95% residual, 5-NN distance."""
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors

    pca = PCA(n_components=0.95, svd_solver="full", random_state=0).fit(a)
    knn = NearestNeighbors(n_neighbors=5).fit(a).kneighbors(b)[0][:, -1]
    return {"centre": ((b - a.mean(axis=0)) ** 2).sum(axis=1),
            "pca95": ((b - pca.inverse_transform(pca.transform(b))) ** 2).sum(axis=1), "knn5": knn}


def probe(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """{'z/centre': test AUROC, ...} for each scaling and score."""
    x = x[:, x[train].std(axis=0) > 0].astype(np.float64)
    out = {}
    for name, scale in SCALINGS.items():
        a, b = scale(x[train], x[test])
        for score, s in scores(a, b).items():
            out[f"{name}/{score}"] = ranking_metrics(s, y[test])["auroc"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tables", default="", help="comma-separated table names (default: the small suite)")
    args = p.parse_args(argv)
    rows = {}
    for name in args.tables.split(",") if args.tables else suite_tables("small"):
        t = load_table(name)
        train, test = protocol_masks(t)
        rows[name] = probe(t.X, t.y, train, test)
        print(f"{name:20s} " + "  ".join(f"{k} {a:.3f}" for k, a in rows[name].items()), flush=True)
    keys = next(iter(rows.values()))
    print(f"{'mean':20s} " + "  ".join(f"{k} {np.mean([r[k] for r in rows.values()]):.3f}" for k in keys))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
