"""Rescoring probe (issue 24, fifteenth round, docs/evaluation.md): the default score with its code terms
changed, from models `benchmarks/rank_probe.py` or `benchmarks/anomaly_types.py --save` saved (no training).

Each member's four terms are the pipeline's own (`benchmarks/spread_probe.py`'s `member_terms`), weighted by their
spread as the pipeline weighs them (`pipe`). Variants: `knnK` the kNN term over K neighbours instead of
`pipeline.calibration.KNN`; `robcode` the code term on the median and MAD of the validation codes instead of
their mean and variance; `hcQ` / `haQ` the code terms (c) or all four (a) counted only above their
validation Q quantile. Per variant: mean test AUROC and AP, and tables better / worse than `pipe` by more than
0.005, over the development tables, the novelty tasks and each planted type apart.

    python -m benchmarks.code_term_probe --out /tmp/rp --tags NA,NB
    python -m benchmarks.code_term_probe --out /tmp/at --tags AT      # anomaly_types --save /tmp/at/AT
"""

from __future__ import annotations

import argparse
import os

import numpy as np

import pipeline.calibration as calibration
from benchmarks.spread_probe import STATISTICS, member_terms, weighted_score
from pipeline.evaluation import ranking_metrics

SPREAD = STATISTICS["q99cap100"]  # the pipeline's: the 99th percentile over the median, at most 100
NEIGHBOURS = (10, 20, 40)
HINGES = (0.5, 0.75, 0.9, 0.95)


def weighted(tv: np.ndarray, tt: np.ndarray) -> np.ndarray:
    return weighted_score(tv, tt, SPREAD)


def robust_code(hv: np.ndarray, ht: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    med = np.median(hv, 0)
    mad = np.median(np.abs(hv - med), 0) * 1.4826
    mad = np.maximum(mad, calibration.FLOOR * mad.mean() + 1e-12)
    v, t = ((((h - med) / mad) ** 2).mean(1) for h in (hv, ht))
    return v / v.mean(), t / v.mean()


def with_column(tv, tt, k, v, t):
    tv, tt = tv.copy(), tt.copy()
    tv[:, k], tt[:, k] = v, t
    return tv, tt


def scores(saved: dict) -> dict[str, np.ndarray]:
    """Test-row scores of one saved run (the members' mean) under each variant."""
    val, test = saved["scores"]["val"], saved["scores"]["test"]
    out: dict[str, list[np.ndarray]] = {}
    default_k = calibration.KNN
    for mv, mt in zip(val["members"], test["members"]):
        tv, tt = member_terms(mv, mt)
        out.setdefault("pipe", []).append(weighted(tv, tt))
        for k in NEIGHBOURS:
            calibration.KNN = k  # knn_distance reads it at call time
            try:
                kv, kt = member_terms(mv, mt)
            finally:
                calibration.KNN = default_k
            out.setdefault(f"knn{k}", []).append(weighted(*with_column(tv, tt, 3, kv[:, 3], kt[:, 3])))
        out.setdefault("robcode", []).append(weighted(*with_column(tv, tt, 1, *robust_code(mv["h"], mt["h"]))))
        for q in HINGES:
            for label, cols in (("c", (1, 3)), ("a", (0, 1, 2, 3))):
                h = tt.copy()
                for k in cols:
                    h[:, k] = np.maximum(tt[:, k] - np.quantile(tv[:, k], q), 0)
                out.setdefault(f"h{label}{q}", []).append(weighted(tv, h))
    return {name: np.mean(s, 0) for name, s in out.items()}


def groups(names: list[str]) -> dict[str, list[str]]:
    novelty = [t for t in names if t.startswith(("digits", "wine_", "iris"))]
    kinds = {t.rsplit("-", 1)[1] for t in names if "-" in t and not t.startswith("digits")}
    planted = {k: [t for t in names if t.endswith(f"-{k}")] for k in sorted(kinds)}
    rest = [t for t in names if t not in novelty and not any(t in v for v in planted.values())]
    return {"tables": rest, "novelty": novelty, **planted}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/rank_probe", help="the folder the runs were saved in")
    p.add_argument("--tags", required=True, help="the saved runs' tags, comma-separated")
    a = p.parse_args()
    res: dict[str, dict[str, tuple[float, float]]] = {}
    for tag in a.tags.split(","):
        for f in sorted(os.listdir(a.out)):
            if not (f.startswith(f"{tag}_") and f.endswith(".npy")):
                continue
            per: dict[str, list[tuple[float, float]]] = {}
            saved_runs = np.load(os.path.join(a.out, f), allow_pickle=True)
            for saved in saved_runs:  # one per seed
                for name, sc in scores(saved).items():
                    m = ranking_metrics(sc, saved["y"])
                    per.setdefault(name, []).append((m["auroc"], m["ap"]))
            res[f[len(tag) + 1:-len(".npy")]] = {k: tuple(np.mean(v, 0)) for k, v in per.items()}
    for group, tables in groups(list(res)).items():
        for name in res[tables[0]] if tables else ():
            moves = [res[t][name][0] - res[t]["pipe"][0] for t in tables]
            print(f"{group:12s} {name:8s} AUROC {np.mean([res[t][name][0] for t in tables]):.4f} "
                  f"AP {np.mean([res[t][name][1] for t in tables]):.4f} better/worse "
                  f"{sum(m > 0.005 for m in moves)}/{sum(m < -0.005 for m in moves)}", flush=True)


if __name__ == "__main__":
    main()
