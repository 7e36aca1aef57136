"""Rescoring probe (issue 24, twelfth round, docs/evaluation.md): the default score's four terms, each weighted
by a statistic of its own distribution over the validation rows, scored from the models
`python -m benchmarks.rank_probe --seeds 0,1 --out DIR --tag TAG` saved (no training; a few minutes for the
26 tables and the 18 novelty tasks on one core).

    python -m benchmarks.spread_probe --out /tmp/rp --tags A,B [--tables ...] [--json res.json]

Each member's terms are the pipeline's own (pipeline/calibration.py's ScoreCalibration, fed the saved validation
rows' errors and codes: per-column error, code distance, MSE, kNN distance to 256 sampled validation codes),
then weighted by BASE_WEIGHTS times the term's statistic on the validation rows and rescaled to the base
weights' sum. Statistics (on the term over its validation
mean): `none` (the base weights: the score before the twelfth round), `std`, `var`, `sqrtstd`, `q99` (its 99th
percentile over its median: what the pipeline adopted, with `q99cap100`), `q95`, `q99capN` (the same, at most
N), `logq99` (1 + log of it), `mad` (median absolute deviation over the median), `skew`, `invstd` (the
opposite of `std`). Per statistic: the mean test AUROC and AP over the tables and seeds, tables better / worse
than `none` by more than 0.005 AUROC, and the novelty tasks (`digits_*`, `wine_*`, `iris_*`) apart.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Callable

import numpy as np
import torch

from pipeline.calibration import BASE_WEIGHTS, ScoreCalibration, held_out_rows
from pipeline.evaluation import ranking_metrics


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else 1.0


def _tail(x: np.ndarray, q: float, cap: float = np.inf) -> float:
    return min(_ratio(float(np.quantile(x, q)), float(np.median(x))), cap)


STATISTICS: dict[str, Callable[[np.ndarray], float]] = {
    "none": lambda x: 1.0,
    "std": lambda x: float(x.std()),
    "var": lambda x: float(x.var()),
    "sqrtstd": lambda x: float(np.sqrt(x.std())),
    "q99": lambda x: _tail(x, 0.99),
    "q95": lambda x: _tail(x, 0.95),
    "q99cap10": lambda x: _tail(x, 0.99, 10),
    "q99cap30": lambda x: _tail(x, 0.99, 30),
    "q99cap100": lambda x: _tail(x, 0.99, 100),
    "logq99": lambda x: 1 + float(np.log(_tail(x, 0.99))),
    "mad": lambda x: _ratio(float(np.median(np.abs(x - np.median(x)))), float(np.median(x))),
    "skew": lambda x: max(float(((x - x.mean()) ** 3).mean() / max(x.std(), 1e-9) ** 3), 0.1),
    "invstd": lambda x: 1 / max(float(x.std()), 1e-6),
}
"""Each maps a term's validation values (over their mean) to the factor on its base weight."""


def member_terms(val: dict, *parts: dict, held_out: bool = False) -> tuple[np.ndarray, ...]:
    """One member's four terms (rows, TERMS) on its validation rows and on each of `parts`' rows, computed by
    the pipeline's own ScoreCalibration from the validation rows' errors and codes (its statistics and kNN
    sample); with `held_out`, the validation rows' as the pipeline's last passes score them (held_out_rows)."""
    cal = ScoreCalibration(val["sq"].shape[1], val["h"].shape[1])
    cal.observe(torch.as_tensor(val["sq"]), torch.as_tensor(val["h"]))
    with held_out_rows(cal, held_out):
        own = cal.terms(torch.as_tensor(val["sq"]), torch.as_tensor(val["h"])).numpy()
    return own, *(cal.terms(torch.as_tensor(m["sq"]), torch.as_tensor(m["h"])).numpy() for m in parts)


def scores(saved: dict) -> dict[str, np.ndarray]:
    """Test-row scores of one saved run (an ensemble: the members' mean) under each statistic."""
    val, test = saved["scores"]["val"], saved["scores"]["test"]
    out: dict[str, list[np.ndarray]] = {name: [] for name in STATISTICS}
    for mv, mt in zip(val["members"], test["members"]):
        tv, tt = member_terms(mv, mt)
        for name, stat in STATISTICS.items():
            out[name].append(weighted_score(tv, tt, stat))
    return {name: np.mean(s, 0) for name, s in out.items()}


def weighted_score(tv: np.ndarray, tt: np.ndarray, stat: Callable[[np.ndarray], float]) -> np.ndarray:
    """`tt`'s rows scored by one member's four terms, each weighted by BASE_WEIGHTS times `stat` of the term's
    validation values `tv` (over their mean), rescaled to the base weights' sum."""
    w = np.array([b * stat(tv[:, k] / tv[:, k].mean()) for k, b in enumerate(BASE_WEIGHTS)])
    return tt @ (w * sum(BASE_WEIGHTS) / w.sum())


def summary(res: dict[str, dict[str, list[float]]]) -> list[str]:
    """One line per statistic: mean AUROC and AP, tables better / worse than `none`, on each group."""
    novelty = [t for t in res if t.startswith(("digits", "wine_", "iris"))]
    groups = (("tables", [t for t in res if t not in novelty]), ("novelty", novelty))
    lines = []
    for name in STATISTICS:
        parts = []
        for label, tables in groups:
            if not tables:
                continue
            moves = [res[t][name][0] - res[t]["none"][0] for t in tables]
            worst = sorted(zip(moves, tables))[:2]
            parts.append(f"{label} ({len(tables)}) AUROC {np.mean([res[t][name][0] for t in tables]):.4f} "
                         f"AP {np.mean([res[t][name][1] for t in tables]):.4f} better/worse "
                         f"{sum(m > 0.005 for m in moves)}/{sum(m < -0.005 for m in moves)} worst "
                         + ", ".join(f"{t} {m:+.3f}" for m, t in worst))
        lines.append(f"{name:10s} " + " | ".join(parts))
    return lines


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/rank_probe", help="rank_probe's --out")
    p.add_argument("--tags", default="", help="rank_probe runs' tags, comma-separated")
    p.add_argument("--tables", default="", help="only these tables (default: every table the tags saved)")
    p.add_argument("--json", default="", help="write per-table AUROC and AP per statistic here")
    a = p.parse_args()
    torch.set_num_threads(1)
    only = set(filter(None, a.tables.split(",")))
    res: dict[str, dict[str, list[float]]] = {}
    for tag in filter(None, a.tags.split(",")):
        for f in sorted(os.listdir(a.out)):
            name = f[len(tag) + 1:-len(".npy")]
            if not (f.startswith(f"{tag}_") and f.endswith(".npy")) or (only and name not in only):
                continue
            runs = list(np.load(os.path.join(a.out, f), allow_pickle=True))
            per = {s: [] for s in STATISTICS}
            for saved in runs:  # one per seed
                for s, sc in scores(saved).items():
                    m = ranking_metrics(sc, saved["y"])
                    per[s].append((m["auroc"], m["ap"]))
            res[name] = {s: np.mean(v, 0).tolist() for s, v in per.items()}
            print(f"{name:20s} " + " ".join(f"{s}={v[0]:.3f}" for s, v in res[name].items()), flush=True)
    print("\n".join(summary(res)), flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh)


if __name__ == "__main__":
    main()
