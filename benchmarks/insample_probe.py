"""Probe (no Ray, no training): how the defaults score the rows they were trained on. `make eval` ranks unseen
test rows; a user's `jobs.run` trains on a table and then scores that same table, so most of its rows are
scored in-sample (the training split) and the rest out of sample (the validation split). Where the model
fits its training rows more closely than unseen ones, the two parts score on different scales and the
ranking of the user's own table mixes them.

From the models `python -m benchmarks.rank_probe --save-train --out DIR --tag TAG` saved (their training,
validation and test rows' codes and per-column errors), each member's four terms are the pipeline's own
(ScoreCalibration fed the validation rows), weighted as the pipeline weights them (spread_weights over the
validation rows' histograms), and averaged over the members. Per table and seed:
- test AUROC (the unseen rows: `make eval`'s figure) against the AUROC over the training input (the training
  and validation rows together, labels included: what scoring the same table ranks);
- the share of training rows and of test rows above the threshold (the validation scores' q0.99);
- the share of the normal training and test rows flagged (the threshold's promise: about 1%), and the test
  flags' precision;
- the normal training rows' median score over the normal validation rows' (1: no in-sample shift).
Each under both RULES for scoring the validation rows (the weights and the threshold come from them): with the
statistics they are part of, and held out (the pipeline's `held_out_rows`, since issue 24's thirteenth round).

    python -m benchmarks.insample_probe --out /tmp/rp --tags TA,TB
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from benchmarks.rank_probe import protocol_validation
from benchmarks.spread_probe import member_terms
from pipeline.calibration import spread_weights, term_histogram
from pipeline.evaluation import load_table, ranking_metrics

PARTS = ("val", "test", "train")
RULES = ("in-sample", "held out")
"""How the validation rows are scored for the term weights and the threshold: with the statistics they are
part of (before issue 24's thirteenth round), or each without its own share (`held_out_rows`, since)."""


def part_scores(saved: dict, rule: str) -> dict[str, np.ndarray]:
    """The ensemble's score of each saved part's rows (PARTS) under `rule`: each member's terms at the spread
    weights its validation terms give, averaged over the members."""
    out: dict[str, list[np.ndarray]] = {p: [] for p in PARTS}
    for members in zip(*(saved["scores"][p]["members"] for p in PARTS)):
        terms = member_terms(*members, held_out=rule == "held out")
        w = spread_weights(term_histogram(torch.as_tensor(terms[0]))).numpy()
        for part, t in zip(PARTS, terms):
            out[part].append(t @ w)
    return {p: np.mean(s, 0) for p, s in out.items()}


def _share(x: np.ndarray) -> float:
    return float(np.mean(x)) if len(x) else float("nan")


def table_rows(name: str, saved: dict, rule: str) -> dict[str, float]:
    t = load_table(name)
    train, _, val, _ = protocol_validation(t)
    y_fit, y_val, y_test = t.y[train][~val], t.y[train][val], saved["y"]
    s = part_scores(saved, rule)
    threshold = np.quantile(s["val"], 0.99)
    flagged = s["test"] > threshold
    y_input = np.r_[y_fit, y_val]  # a novelty task's training rows are all normal: no AUROC over them
    test = ranking_metrics(s["test"], y_test)
    return {"test_auroc": test["auroc"], "test_ap": test["ap"],
            "input_auroc": ranking_metrics(np.r_[s["train"], s["val"]], y_input)["auroc"]
            if 0 < y_input.sum() < len(y_input) else float("nan"),
            "flagged_train": _share(s["train"] > threshold), "flagged_test": _share(flagged),
            "normal_flagged_train": _share(s["train"][y_fit == 0] > threshold),
            "normal_flagged_test": _share(flagged[y_test == 0]),
            "precision": _share(y_test[flagged]),
            "normal_shift": float(np.median(s["train"][y_fit == 0]) / np.median(s["val"][y_val == 0]))}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/rank_probe", help="rank_probe's --out")
    p.add_argument("--tags", default="", help="rank_probe --save-train runs' tags, comma-separated")
    a = p.parse_args()
    torch.set_num_threads(1)
    rows: dict[str, list[dict[str, float]]] = {rule: [] for rule in RULES}
    for tag in filter(None, a.tags.split(",")):
        for f in sorted(os.listdir(a.out)):
            if not (f.startswith(f"{tag}_") and f.endswith(".npy")):
                continue
            name = f[len(tag) + 1:-len(".npy")]
            for seed, saved in enumerate(np.load(os.path.join(a.out, f), allow_pickle=True)):
                if "train" not in saved["scores"]:
                    continue  # saved without --save-train
                for rule in RULES:
                    r = table_rows(name, saved, rule)
                    rows[rule].append(r)
                    print(f"{tag} {name:18s} run {seed} {rule:9s}: test AUROC {r['test_auroc']:.3f}, training input "
                          f"{r['input_auroc']:.3f}; normal rows flagged: training {r['normal_flagged_train']:.3f}, "
                          f"test {r['normal_flagged_test']:.3f}; precision {r['precision']:.3f}", flush=True)
    # the tables (anomalies among the training rows) and the novelty tasks (clean training rows) apart
    for rule in RULES:
        novelty = [np.isnan(r["input_auroc"]) for r in rows[rule]]
        for label, group in (("tables", [r for r, n in zip(rows[rule], novelty) if not n]),
                             ("novelty tasks", [r for r, n in zip(rows[rule], novelty) if n])):
            if group:
                m = {k: float(np.nanmean([r[k] for r in group])) for k in group[0]}
                print(f"{rule}, {label} ({len(group)} table x seed): test AUROC {m['test_auroc']:.3f} AP "
                      f"{m['test_ap']:.3f}, training input AUROC {m['input_auroc']:.3f}; flagged: training rows "
                      f"{m['flagged_train']:.3f}, test rows {m['flagged_test']:.3f}; normal rows flagged: training "
                      f"{m['normal_flagged_train']:.3f}, test {m['normal_flagged_test']:.3f}; precision "
                      f"{m['precision']:.3f}; normal rows' median score, training / validation "
                      f"{m['normal_shift']:.2f}")


if __name__ == "__main__":
    main()
