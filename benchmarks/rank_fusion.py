"""Rescoring probe (issue 24, eighth round, docs/evaluation.md): new ways to combine the default score's terms,
a PCA term on min-max scaled input, and robust statistics of the code and error terms, scored from the models
`python -m benchmarks.rank_probe --seeds 0,1 --out DIR --tag TAG` saved (no training; about a minute for the
26 tables on one core).

    python -m benchmarks.rank_fusion --out /tmp/rp24 --tag base [--tables ...] [--json res.json]

Per variant: the mean over the tables of the seeds' test AUROC and AP, each seed's mean change against the
default score (`w:1,1,0.5` of benchmarks/rank_probe.py), tables better / worse by more than 0.005 AUROC (0.01
AP), the tables more than 0.05 below the PCA baseline, and the worst AUROC moves.

The PCA terms (`pca<SHARE>`: fitted on all the training rows, as the baseline of pipeline/evaluation.py is;
`pcav<SHARE>`: on the validation rows only, what the score's validation pass sees) are the squared residual of
the min-max scaled input outside the components that keep SHARE % of the variance (0: no component, the
min-max distance from the mean), over its mean on the validation rows, so that it averages 1 there as the
score's other terms do. Forms: `def+W<term>` adds it at weight W; `cap` first clips it at its validation
maximum (so it can reorder the bulk but never lift a row above every validation row on its own); `log1p`
compresses it; `z:` puts both on their validation z scale; `rk:` adds validation ECDFs (rank fusion: each
term's share of validation rows below it, continued above the largest by the log ratio); `max:` takes the
larger ECDF. `rk:4` fuses the four terms' ECDFs with the default weights; `max:recon,code` the ECDFs of the
reconstruction terms and the code terms. `code=rob` / `feat=rob`: the code term standardized by the median
and MAD of the sampled validation codes (REFERENCE_ROWS, the kNN term's sample) instead of their mean and
variance, and the per-feature term divided by the median validation error instead of the mean (rescaled to
mean 1 on the validation rows): statistics a third of anomalous training rows cannot move as far.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pyarrow as pa
import torch

from benchmarks.rank_probe import TABLES
from pipeline.calibration import REFERENCE_ROWS, knn_distance
from pipeline.config import load_config
from pipeline.evaluation import BENCHMARK_DIR, load_npz, pca_scores, protocol_split, ranking_metrics
from pipeline.rows import validation_mask

GAP_TABLES = ("14_glass", "17_InternetAds", "18_Ionosphere", "39_vertebral", "47_yeast")
SHARES = (0.0, 0.8, 0.9, 0.95, 0.99)


def pca_residual(fit: np.ndarray, rows: list[np.ndarray], share: float = 0.95) -> list[np.ndarray]:
    """Squared residual of rows outside the components keeping `share` of fit's variance (0: none), min-max
    scaled on fit (pipeline/evaluation.py's pca_scores at share 0.95, fitted on `fit`)."""
    lo, hi = fit.min(0), fit.max(0)
    span = np.where(hi > lo, hi - lo, 1.0)
    a = (fit - lo) / span
    mu = a.mean(0)
    w, v = np.linalg.eigh(np.atleast_2d(np.cov(a, rowvar=False, bias=True)))
    w, v = w[::-1].clip(min=0), v[:, ::-1]
    k = 0
    if share > 0 and w.sum() > 0:
        k = min(len(w), int(np.searchsorted(np.cumsum(w) / w.sum(), share) + 1))
    vk = v[:, :k]
    out = []
    for r in rows:
        z = (r - lo) / span - mu
        out.append(np.maximum((z ** 2).sum(1) - ((z @ vk) ** 2).sum(1), 0.0))  # rounding can go below 0
    return out


def raw_split(name: str):
    """(training rows, their validation mask, test rows, test labels) as rank_probe.run_table splits them."""
    t = load_npz(BENCHMARK_DIR / f"{name}.npz")
    test = protocol_split(t.y)
    ids = np.arange(len(t.y))
    Xtr, idtr = t.X[~test], ids[~test]
    # the eighth round's models were saved with 10% of the training rows held out (before `auto`, tenth round)
    cfg = load_config(None, ["data.input=x", "data.id_columns=[row_id]", "data.validation_fraction=0.1"])
    val = validation_mask(pa.table({"row_id": pa.array(idtr, pa.int64())}), cfg.data)
    return Xtr, val, t.X[test], t.y[test]


def member_terms(mv, mp):
    """One member's terms for mp's rows (ScoreCalibration's, statistics from the validation rows mv), plus
    the robust code and per-feature terms."""
    pick = np.random.default_rng(0).permutation(len(mv["h"]))[:REFERENCE_ROWS]  # the pipeline's code sample
    ref = mv["h"][pick]
    rt = torch.as_tensor(ref)
    knn = (knn_distance(torch.as_tensor(mp["h"]), rt) / knn_distance(rt, rt).mean()).numpy()
    feat = mv["sq"].mean(0)
    feat = np.maximum(feat, 1e-3 * feat.mean() + 1e-12)
    mu, var = mv["h"].mean(0), mv["h"].var(0)
    var = np.maximum(var, 1e-3 * var.mean() + 1e-12)
    med = np.median(ref, 0)
    s2 = (1.4826 * np.median(np.abs(ref - med), 0)) ** 2
    s2 = np.maximum(s2, 1e-3 * s2.mean() + 1e-12)
    fmed = np.median(mv["sq"], 0)
    fmed = np.maximum(fmed, 1e-3 * fmed.mean() + 1e-12)
    return {"feat": (mp["sq"] / feat).mean(1), "code": ((mp["h"] - mu) ** 2 / var).mean(1),
            "mse": mp["sq"].mean(1) / feat.mean(), "knn": knn,
            "code_rob": ((mp["h"] - med) ** 2 / s2).mean(1) / ((mv["h"] - med) ** 2 / s2).mean(1).mean(),
            "feat_rob": (mp["sq"] / fmed).mean(1) / (mv["sq"] / fmed).mean(1).mean()}


def terms(r, extra):
    """{term: (validation rows' values, test rows' values)}: the members' means, plus `extra`."""
    v, t = r["scores"]["val"], r["scores"]["test"]
    out = {}
    for side, part in (("val", v), ("test", t)):
        ms = [member_terms(mv, mp) for mv, mp in zip(v["members"], part["members"])]
        for k in ms[0]:
            out.setdefault(k, {})[side] = np.mean([m[k] for m in ms], 0)
    out = {k: (x["val"], x["test"]) for k, x in out.items()}
    out.update(extra)
    return out


def ecdf(ref: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Share of the validation rows below s (mid-rank for ties), continued above the largest by log(s / max)
    so that rows beyond every validation row still rank among themselves."""
    ref = np.sort(ref)
    u = (np.searchsorted(ref, s, "left") + np.searchsorted(ref, s, "right")) / (2.0 * len(ref))
    top = max(ref[-1], 1e-300)
    return np.where(s > top, 1.0 + np.log(np.maximum(s, 1e-300) / top), u)


def zv(pair):
    v, t = pair
    return (t - v.mean()) / (v.std() + 1e-12)


def variants(T):
    """name -> test rows' scores."""
    f, c, m, k = (T[x] for x in ("feat", "code", "mse", "knn"))
    d = tuple(f[i] + c[i] + m[i] + 0.5 * k[i] for i in (0, 1))
    rec = tuple(f[i] + m[i] for i in (0, 1))
    cod = tuple(c[i] + 0.5 * k[i] for i in (0, 1))
    out = {"default": d[1], "recon (feat+mse)": rec[1]}
    for pn in [n for n in T if n.startswith("pca")]:
        p = T[pn]
        out[pn] = p[1]
        for w in (0.25, 0.5, 1.0, 2.0):
            out[f"def+{w}{pn}"] = d[1] + w * p[1]
            out[f"def+{w}cap{pn}"] = d[1] + w * np.minimum(p[1], p[0].max())
            out[f"def+{w}log1p{pn}"] = d[1] + w * np.log1p(p[1])
        for w in (0.5, 1.0):
            out[f"z:def+{w}{pn}"] = zv(d) + w * zv(p)
            out[f"rk:def+{w}{pn}"] = ecdf(*d) + w * ecdf(*p)
            out[f"log:def+{w}{pn}"] = np.log(d[1] + 1e-6) + w * np.log(p[1] + 1e-6)
        out[f"max:def,{pn}"] = np.maximum(ecdf(*d), ecdf(*p))
    out["rk:4"] = ecdf(*f) + ecdf(*c) + ecdf(*m) + 0.5 * ecdf(*k)
    out["rk:recon+code"] = ecdf(*rec) + ecdf(*cod)
    out["max:recon,code"] = np.maximum(ecdf(*rec), ecdf(*cod))
    out["code=rob"] = f[1] + T["code_rob"][1] + m[1] + 0.5 * k[1]
    out["feat=rob"] = T["feat_rob"][1] + c[1] + m[1] + 0.5 * k[1]
    out["code=rob,feat=rob"] = T["feat_rob"][1] + T["code_rob"][1] + m[1] + 0.5 * k[1]
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/rank_probe")
    p.add_argument("--tag", default="")
    p.add_argument("--tables", default=",".join(TABLES))
    p.add_argument("--json", default="", help="write per table, variant and seed: AUROC and AP")
    a = p.parse_args()
    torch.set_num_threads(1)
    tables = a.tables.split(",")
    res, pca = {}, {}
    for name in tables:
        rows = list(np.load(f"{a.out}/{a.tag}_{name}.npy", allow_pickle=True))
        Xtr, val, Xte, y = raw_split(name)
        assert np.array_equal(y, rows[0]["y"])
        extra = {}
        for src, fit in (("", Xtr), ("v", Xtr[val])):
            for share in SHARES:
                pv, pt = pca_residual(fit, [Xtr[val], Xte], share)
                extra[f"pca{src}{int(round(share * 100))}"] = (pv / (pv.mean() + 1e-12), pt / (pv.mean() + 1e-12))
        pca[name] = ranking_metrics(pca_scores(Xtr, Xte), y)["auroc"]
        res[name] = [{k: ranking_metrics(s, y) for k, s in variants(terms(r, extra)).items()} for r in rows]
        print(f"{name} PCA {pca[name]:.3f} default {np.mean([x['default']['auroc'] for x in res[name]]):.3f}",
              flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"pca": pca, "res": res}, fh)
    seeds = range(len(res[tables[0]]))
    print(f"\n{len(tables)} tables x {len(seeds)} seeds. AUROC AP | per seed: dAUROC.. dAP.. | better/worse AUROC "
          f"(>0.005) | AP (>0.01) | tables > 0.05 below PCA: n | {' '.join(g.split('_')[1][:6] for g in GAP_TABLES)} "
          f"| worst AUROC moves")
    base = np.array([[res[t][s]["default"]["auroc"] for s in seeds] for t in tables])
    base_ap = np.array([[res[t][s]["default"]["ap"] for s in seeds] for t in tables])
    for k in res[tables[0]][0]:
        A = np.array([[res[t][s][k]["auroc"] for s in seeds] for t in tables])
        P = np.array([[res[t][s][k]["ap"] for s in seeds] for t in tables])
        dA, dP = (A - base).mean(1), (P - base_ap).mean(1)
        gaps = [t for i, t in enumerate(tables) if A[i].mean() < pca[t] - 0.05]
        worst = sorted(zip(dA, tables))[:3]
        g = " ".join(f"{A[tables.index(t)].mean():.3f}" if t in tables else "-" for t in GAP_TABLES)
        print(f"{k:22s} {A.mean():.4f} {P.mean():.4f} | {' '.join(f'{x:+.4f}' for x in (A - base).mean(0))} "
              f"{' '.join(f'{x:+.4f}' for x in (P - base_ap).mean(0))} | {(dA > 0.005).sum():2d}/{(dA < -0.005).sum():<2d} "
              f"| {(dP > 0.01).sum():2d}/{(dP < -0.01).sum():<2d} | {len(gaps)} | {g} | "
              + " ".join(f"{n.split('_')[1][:8]} {x:+.3f}" for x, n in worst), flush=True)


if __name__ == "__main__":
    main()
