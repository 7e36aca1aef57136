"""Probe (no Ray): the defaults' anomaly ranking on benchmarks/adbench/ with the project's own model,
train loop (run_training) and scores, in a few minutes. Variants are set with flags (`--set` config overrides, `--scaling`, `--shuffle`); prints per-table test AUROC
for each part of the score from the same trained models (`cal` is the default score) and for an ensemble of
the seeds' models. `--tables 40_vowels,6_cardio --seeds 0` reproduces `make eval`'s figures within noise.

    python -m benchmarks.rank_probe [--seeds 0,1] [--set model.score=recon] [--scaling minmax] ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import pyarrow as pa
import torch

from pipeline.config import load_config
from pipeline.data import Moments, normalization_stats, validation_mask
from pipeline.evaluation import BASELINES, BENCHMARK_DIR, load_npz, protocol_split, ranking_metrics
from pipeline.features import Normalizer
from pipeline.sizing import resolve_model, step_budget
from pipeline.train import WorkerConfig, build_trainee, run_training


def scaling_stats(x: np.ndarray, how: str):
    if how == "zscore":
        return normalization_stats(Moments.of(x))
    if how == "minmax":
        lo, hi = x.min(0), x.max(0)
        return lo, np.where(hi > lo, hi - lo, 1.0)
    if how == "robust":
        med = np.median(x, 0)
        q1, q3 = np.percentile(x, [25, 75], axis=0)
        iqr = q3 - q1
        return med, np.where(iqr > 0, iqr, np.where(x.std(0) > 0, x.std(0), 1.0))
    raise ValueError(how)


def run_table(name, overrides, seed, scaling, shuffle):
    t = load_npz(BENCHMARK_DIR / f"{name}.npz")
    test = protocol_split(t.y)
    ids = np.arange(len(t.y))
    Xtr, idtr = t.X[~test], ids[~test]
    cfg = load_config(None, ["data.input=x", "data.id_columns=[row_id]", *overrides])
    val = validation_mask(pa.table({"row_id": pa.array(idtr, pa.int64())}), cfg.data)
    fit_rows = Xtr[~val]
    mean, scale = scaling_stats(fit_rows, scaling)
    model = resolve_model(cfg.model, t.X.shape[1], cfg.train.algorithm)
    tr = cfg.train
    batch, epochs = step_budget(tr.batch_size, len(fit_rows), tr.epochs, tr.steps)
    wc = WorkerConfig(model=model, train=tr, n_features=t.X.shape[1], mean=list(mean), scale=list(scale),
                      batch_size=batch, epochs=epochs, seed=seed)
    torch.manual_seed(seed)
    device = torch.device("cpu")
    trainee, state = build_trainee(wc, device, lambda m, f: m)
    norm = Normalizer(np.asarray(mean), np.asarray(scale))
    a = torch.as_tensor(fit_rows, dtype=torch.float32)
    v = torch.as_tensor(Xtr[val], dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)

    def train_batches():
        order = torch.randperm(len(a), generator=g) if shuffle else torch.arange(len(a))
        for i in range(0, len(a), batch):
            yield norm(a[order[i:i + batch]])

    def val_batches():
        for i in range(0, len(v), batch * 4):
            yield norm(v[i:i + batch * 4])

    t0 = time.perf_counter()
    run_training(wc, trainee, state, train_batches, val_batches, device, 1, lambda m, p: None,
                 all_reduce_sum=lambda x: x)
    ae = trainee.ae
    ae.load_state_dict(state.best_state)
    ae.eval()
    out = {}
    with torch.inference_mode():
        for part, rows in (("val", Xtr[val]), ("test", t.X[test])):
            xx = norm(torch.as_tensor(rows, dtype=torch.float32))
            parts = []
            for m in getattr(ae, "members", [ae]):  # an ensemble: each score part averaged over its members
                h = m.encode(xx)
                sq = (m.decode(h).float() - xx) ** 2
                feat, mu, var = m.calibration.stats()
                feat = feat.clamp_min(1e-3 * float(feat.mean()) + 1e-12)
                var = var.clamp_min(1e-3 * float(var.mean()) + 1e-12)
                parts.append({"mse": sq.mean(1).double().numpy() / float(feat.mean()),
                              "feat": (sq.double() / feat).mean(1).numpy(),
                              "code": ((h.double() - mu) ** 2 / var).mean(1).numpy()})
            out[part] = {k: np.mean([p[k] for p in parts], axis=0) for k in parts[0]}
    return {"scores": out, "y": t.y[test], "epochs": len(state.history), "best": state.stopper.best_epoch + 1,
            "limit": epochs, "batch": batch, "sec": time.perf_counter() - t0}


def zval(val, test):
    """test scores on the validation rows' scale (median / IQR-ish robust z)."""
    med = np.median(val)
    s = np.std(val) or 1.0
    return (test - med) / s


def variants(r):
    v, t = r["scores"]["val"], r["scores"]["test"]
    cal = t["feat"] + t["code"] + t["mse"]
    return {"cal": cal, "mse": t["mse"], "feat": t["feat"], "code": t["code"],
            "cal+mse_z": zval(v["feat"] + v["code"], t["feat"] + t["code"]) + zval(v["mse"], t["mse"]),
            "feat+code.5": t["feat"] + 0.5 * t["code"],
            "max_z": np.maximum(zval(v["feat"] + v["code"], t["feat"] + t["code"]), zval(v["mse"], t["mse"]))}


def auc(s, y):
    return ranking_metrics(s, y)["auroc"]


TABLES = ["6_cardio", "38_thyroid", "28_pendigits", "30_satellite", "32_shuttle", "40_vowels",
          "22_magic.gamma", "24_mnist"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", default="0")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--scaling", default="zscore")
    p.add_argument("--shuffle", action="store_true")
    p.add_argument("--tables", default=",".join(TABLES))
    p.add_argument("--tag", default="")
    a = p.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in a.seeds.split(",")]
    res = {}
    for name in a.tables.split(","):
        rows = [run_table(name, a.set, s, a.scaling, a.shuffle) for s in seeds]
        y = rows[0]["y"]
        per = {k: [auc(variants(r)[k], y) for r in rows] for k in variants(rows[0])}
        # ensemble: average of the members' scores, each on its validation rows' scale
        ens = {}
        for k in ("cal", "mse", "cal+mse_z"):
            zs = []
            for r in rows:
                v, t = r["scores"]["val"], r["scores"]["test"]
                vv = {"cal": v["feat"] + v["code"] + v["mse"], "mse": v["mse"],
                      "cal+mse_z": zval(v["feat"] + v["code"], v["feat"] + v["code"]) + zval(v["mse"], v["mse"])}[k]
                zs.append(zval(vv, variants(r)[k]))
            ens[k] = auc(np.mean(zs, 0), y)
        res[name] = {**{k: float(np.mean(x)) for k, x in per.items()}, **{f"ens_{k}": x for k, x in ens.items()}}
        np.save(f"/tmp/i11r/{a.tag}_{name}.npy", np.array(rows, dtype=object), allow_pickle=True)
        print(f"{name:16s} " + " ".join(f"{k}={np.mean(x):.3f}" for k, x in per.items())
              + " | ens " + " ".join(f"{k}={x:.3f}" for k, x in ens.items())
              + f" | ep {rows[0]['epochs']}/{rows[0]['limit']} best {rows[0]['best']} batch {rows[0]['batch']} "
              f"{rows[0]['sec']:.0f}s cal-by-seed {' '.join(f'{x:.3f}' for x in per['cal'])}", flush=True)
    keys = list(next(iter(res.values())))
    for k in keys:
        print(f"MEAN {a.tag} {k:12s} {np.mean([r[k] for r in res.values()]):.3f} "
              + " ".join(f"{n.split('_')[1][:5]}={r[k]:.3f}" for n, r in res.items()), flush=True)


if __name__ == "__main__":
    main()
