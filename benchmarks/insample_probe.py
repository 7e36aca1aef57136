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
- the normal training rows' median score over the normal validation rows' (1: no in-sample shift).

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


def part_scores(saved: dict) -> dict[str, np.ndarray]:
    """The ensemble's score of each saved part's rows (PARTS), each member's terms at its spread weights."""
    out: dict[str, list[np.ndarray]] = {p: [] for p in PARTS}
    for mv, mt, mf in zip(*(saved["scores"][p]["members"] for p in PARTS)):
        tv, tt = member_terms(mv, mt)
        _, tf = member_terms(mv, mf)
        w = spread_weights(term_histogram(torch.as_tensor(tv / tv.mean(0)))).numpy()
        for part, terms in zip(PARTS, (tv, tt, tf)):
            out[part].append(terms @ w)
    return {p: np.mean(s, 0) for p, s in out.items()}


def table_rows(name: str, saved: dict) -> dict[str, float]:
    t = load_table(name)
    train, _, val, _ = protocol_validation(t)
    y_fit, y_val = t.y[train][~val], t.y[train][val]
    s = part_scores(saved)
    threshold = np.quantile(s["val"], 0.99)
    normal_shift = np.median(s["train"][y_fit == 0]) / np.median(s["val"][y_val == 0])
    y_input = np.r_[y_fit, y_val]  # a novelty task's training rows are all normal: no AUROC over them
    return {"test_auroc": ranking_metrics(s["test"], saved["y"])["auroc"],
            "input_auroc": ranking_metrics(np.r_[s["train"], s["val"]], y_input)["auroc"]
            if 0 < y_input.sum() < len(y_input) else float("nan"),
            "flagged_train": float(np.mean(s["train"] > threshold)),
            "flagged_test": float(np.mean(s["test"] > threshold)), "normal_shift": float(normal_shift)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/rank_probe", help="rank_probe's --out")
    p.add_argument("--tags", default="", help="rank_probe --save-train runs' tags, comma-separated")
    a = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for tag in filter(None, a.tags.split(",")):
        for f in sorted(os.listdir(a.out)):
            if not (f.startswith(f"{tag}_") and f.endswith(".npy")):
                continue
            name = f[len(tag) + 1:-len(".npy")]
            for seed, saved in enumerate(np.load(os.path.join(a.out, f), allow_pickle=True)):
                if "train" not in saved["scores"]:
                    continue  # saved without --save-train
                r = table_rows(name, saved)
                rows.append(r)
                print(f"{tag} {name:18s} run {seed}: test AUROC {r['test_auroc']:.3f}, training input "
                      f"{r['input_auroc']:.3f}; flagged: training rows {r['flagged_train']:.3f}, test rows "
                      f"{r['flagged_test']:.3f}; normal rows' median score, training / validation "
                      f"{r['normal_shift']:.2f}", flush=True)
    # the tables (anomalies among the training rows) and the novelty tasks (clean training rows) apart
    for label, group in (("tables", [r for r in rows if r["input_auroc"] == r["input_auroc"]]),
                         ("novelty tasks", [r for r in rows if r["input_auroc"] != r["input_auroc"]])):
        if group:
            mean = {k: np.mean([r[k] for r in group]) for k in group[0]}
            print(f"{label}, mean over {len(group)} (table, seed): test AUROC {mean['test_auroc']:.3f}, training "
                  f"input {mean['input_auroc']:.3f}; flagged: training rows {mean['flagged_train']:.3f}, test rows "
                  f"{mean['flagged_test']:.3f}; normal rows' median score, training / validation "
                  f"{mean['normal_shift']:.2f}")


if __name__ == "__main__":
    main()
