"""Rescoring probe (issue 24, ninth round, docs/evaluation.md): the calibrated score's optional subspace term
(`model.subspace_weight`, pipeline/calibration.py's SubspaceTerm) at several weights and variance shares, in
the pipeline's own form (z-scores from the training split, components fitted on the training split only,
minor components, the validation mean floored at 1e-6 of the total variance), added to the default score of
the models `python -m benchmarks.rank_probe --seeds ... --out DIR --tag TAG` saved (no training; a minute).

    python -m benchmarks.subspace_probe --out /tmp/rp24 --tags base,s23

Prints, per variant, the mean test AUROC and AP over the 26 tables and the saved seeds, each seed's change
against the default, tables better / worse by more than 0.005 AUROC, the tables more than 0.05 below PCA,
and the largest moves.
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.rank_fusion import raw_split, terms
from benchmarks.rank_probe import TABLES
from pipeline.calibration import SUBSPACE_FLOOR
from pipeline.evaluation import pca_scores, ranking_metrics
from pipeline.stats import ColumnMoments, normalization_stats

SHARES = (0.95, 0.99)  # of the training variance the leading components keep (the pipeline's: 0.99)
WEIGHTS = (0.5, 1.0, 1.5, 2.0, 3.0)


def sub_term(fit, val, test, share):
    """(validation rows' term, test rows' term, minor components) at weight 1: SubspaceTerm's arithmetic."""
    off, sc = normalization_stats(ColumnMoments.of(fit))
    F, V, T = ((a - off) / sc for a in (fit, val, test))
    mu = F.mean(0)
    w, v = np.linalg.eigh(np.cov(F, rowvar=False, bias=True))
    w = w.clip(min=0)
    total = w.sum()
    minor = len(w) - min(len(w), int((np.cumsum(w[::-1]) < share * total).sum()) + 1)
    if minor == 0:
        return np.zeros(len(val)), np.zeros(len(test)), 0
    rv, rt = ((((a - mu) @ v[:, :minor]) ** 2).sum(1) for a in (V, T))
    mean = max(rv.mean(), SUBSPACE_FLOOR * total)
    return np.log1p(rv / mean), np.log1p(rt / mean), minor


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/rank_probe", help="the folder rank_probe saved its models in")
    p.add_argument("--tags", default="", help="rank_probe tags whose seeds to pool, e.g. base,s23")
    a = p.parse_args()
    res, pca = {}, {}
    for name in TABLES:
        rows = [r for tag in a.tags.split(",") for r in np.load(f"{a.out}/{tag}_{name}.npy", allow_pickle=True)]
        res[name], pca[name] = score_table(name, rows)
    report(list(TABLES), res, pca)


def score_table(name, rows):
    """(per saved seed: {variant: metrics}, the PCA baseline's AUROC)."""
    Xtr, val, Xte, y = raw_split(name)
    subs = {s: sub_term(Xtr[~val], Xtr[val], Xte, s) for s in SHARES}
    print(f"{name}: minor components " + " ".join(f"{s}: {subs[s][2]}" for s in SHARES), flush=True)
    out = []
    for r in rows:
        T = terms(r, {})
        default = T["feat"][1] + T["code"][1] + T["mse"][1] + 0.5 * T["knn"][1]
        V = {"default": default}
        for s, (_, test_term, _) in subs.items():
            for w in WEIGHTS:
                V[f"sub{s}w{w}"] = default + w * test_term
        out.append({k: ranking_metrics(x, y) for k, x in V.items()})
    return out, ranking_metrics(pca_scores(Xtr, Xte), y)["auroc"]


def report(tables, res, pca):
    base = np.array([[s["default"]["auroc"] for s in res[t]] for t in tables])
    base_ap = np.array([[s["default"]["ap"] for s in res[t]] for t in tables])
    for k in res[tables[0]][0]:
        A = np.array([[s[k]["auroc"] for s in res[t]] for t in tables])
        P = np.array([[s[k]["ap"] for s in res[t]] for t in tables])
        dA = (A - base).mean(1)
        gaps = [t for i, t in enumerate(tables) if A[i].mean() < pca[t] - 0.05]
        moves = sorted(zip(dA, tables))
        print(f"{k:14s} AUROC {A.mean():.4f} AP {P.mean():.4f} | per seed dAUROC "
              f"{' '.join(f'{x:+.4f}' for x in (A - base).mean(0))} "
              f"dAP {' '.join(f'{x:+.4f}' for x in (P - base_ap).mean(0))}"
              f" | better/worse {(dA > 0.005).sum()}/{(dA < -0.005).sum()} | {len(gaps)} below PCA - 0.05: "
              f"{','.join(g.split('_')[1][:8] for g in gaps)} | "
              + " ".join(f"{n.split('_')[1][:8]} {x:+.3f}" for x, n in moves[:3] + moves[-4:]), flush=True)


if __name__ == "__main__":
    main()
