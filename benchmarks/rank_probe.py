"""Probe (no Ray): the defaults' anomaly ranking on benchmarks/adbench/ with the project's own model,
train loop (run_training) and scores, in a few minutes. Variants are set with flags (`--set` config overrides,
`--scaling`, `--shuffle`, `--latent-div`, `--hidden-mult`, `--bag`); prints per-table test AUROC for each
variant of the score from the same trained models (`pipeline` is the model's own score, the default: since
issue 24's twelfth round its four terms weighted by their spread over the validation rows; `w:1,1,0.5` is the
four per-member terms at their base weights, without the subspace term; `cal4` is those with the kNN term at
weight 1) and for an ensemble of the seeds' models. `--tables 40_vowels,6_cardio --seeds 0`
reproduces `make eval`'s figures within noise. Each table's models' codes and per-feature errors are saved
(`--out`, `--tag`), so `--load` scores new variants of them without training again, and `--mix` scores an
ensemble of models saved by several runs (e.g. members with different code widths).

    python -m benchmarks.rank_probe [--seeds 0,1] [--set model.score=recon] [--scaling minmax] ...
    python -m benchmarks.rank_probe --out /tmp/rp --mix k:0,lat8:0,lat2:0,lat8:1,lat2:1
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import pyarrow as pa
import torch
from sklearn.neighbors import NearestNeighbors

from pipeline.calibration import REFERENCE_ROWS, knn_distance
from pipeline.config import load_config
from pipeline.rows import validation_mask
from pipeline.stats import ColumnMoments, normalization_stats, std_scale
from pipeline.evaluation import Table, load_table, protocol_masks, ranking_metrics, suite_tables
from pipeline.tensors import Normalizer
from pipeline.sizing import resolve_model, resolve_validation, step_budget
from pipeline.train import WorkerConfig, build_trainee, run_training


def scaling_stats(x: np.ndarray, how: str):
    if how == "zscore":  # the pipeline's own (in a table of flags, rare flags by half their range)
        return normalization_stats(ColumnMoments.of(x))
    if how == "std":  # the pipeline's before the fourteenth round: every column by its standard deviation
        m = ColumnMoments.of(x)
        return m.mean, std_scale(m)
    if how == "minmax":
        lo, hi = x.min(0), x.max(0)
        return lo, np.where(hi > lo, hi - lo, 1.0)
    if how == "robust":
        med = np.median(x, 0)
        q1, q3 = np.percentile(x, [25, 75], axis=0)
        iqr = q3 - q1
        return med, np.where(iqr > 0, iqr, np.where(x.std(0) > 0, x.std(0), 1.0))
    raise ValueError(how)


def protocol_validation(t, overrides=()) -> tuple[np.ndarray, np.ndarray, np.ndarray, object]:
    """(train, test, val, cfg): the protocol's training and test masks over `t`'s rows, and over the training
    rows the pipeline's validation mask, resolved from their count as the job resolves it."""
    train, test = protocol_masks(t)
    cfg = load_config(None, ["data.input=x", "data.id_columns=[row_id]", *overrides])
    data = resolve_validation(cfg.data, int(train.sum()))
    ids = np.arange(len(t.y))[train]
    return train, test, validation_mask(pa.table({"row_id": pa.array(ids, pa.int64())}), data), cfg


def run_table(name, overrides, seed, scaling, shuffle, latent_div=0.0, hidden_mult=0.0, bag=0.0, save_train=False):
    t = name if isinstance(name, Table) else load_table(name)  # a Table: e.g. benchmarks/anomaly_types.py's
    d = t.X.shape[1]
    lat = max(1, min(d - 1, int(np.ceil(d / (latent_div or 4)))))  # uncapped, unlike the pipeline's auto rule
    if latent_div:  # sizing variants: code ceil(d / latent_div), one hidden layer hidden_mult x d
        overrides = [*overrides, f"model.latent_dim={lat}"]
    if hidden_mult:
        overrides = [*overrides, f"model.hidden_dims=[{max(2 * lat, 4, int(round(hidden_mult * d)))}]"]
    train, test, val, cfg = protocol_validation(t, overrides)
    Xtr = t.X[train]
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
    if bag:  # feature bagging: each member's encoder sees a random subset of the features, reconstructs all
        rng = np.random.default_rng(1000 + seed)
        for m in getattr(trainee.ae, "members", [trainee.ae]):
            keep = rng.choice(d, size=max(2, min(d, int(np.ceil(bag * d)))), replace=False)
            mask = torch.zeros(d)
            mask[torch.as_tensor(keep)] = 1.0
            m.encode = (lambda enc, mk: (lambda x: enc(x * mk)))(m.encode, mask)
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
        parts = (("val", Xtr[val]), ("test", t.X[test])) + ((("train", fit_rows),) if save_train else ())
        for part, rows in parts:
            xx = norm(torch.as_tensor(rows, dtype=torch.float32))
            members = []
            for m in getattr(ae, "members", [ae]):  # an ensemble: each score is the members' mean, as in Ensemble
                h = m.encode(xx)
                members.append({"h": h.double().numpy(), "sq": ((m.decode(h).float() - xx) ** 2).double().numpy()})
            # the pipeline's own anomaly_score (the model's score: the terms below plus the subspace term)
            out[part] = {"x": xx.double().numpy(), "members": members, "score": ae.score(xx).double().numpy()}
    return {"scores": out, "y": t.y[test], "epochs": len(state.history), "best": state.stopper.best_epoch + 1,
            "limit": epochs, "batch": batch, "sec": time.perf_counter() - t0}


def zval(val, test):
    """test scores on the validation rows' scale (median / IQR-ish robust z)."""
    med = np.median(val)
    s = np.std(val) or 1.0
    return (test - med) / s


RIDGE = 1e-3  # of the mean variance, added to a covariance's diagonal
KNN = 5


def knn(ref, rows, same):
    """Mean squared distance to the KNN nearest reference rows (a row is not its own neighbour when same)."""
    d, _ = NearestNeighbors(n_neighbors=min(KNN + same, len(ref))).fit(ref).kneighbors(rows)
    return (d[:, int(same):] ** 2).mean(1)


def mahalanobis(ref, rows):
    """Full-covariance squared Mahalanobis distance of rows from ref's mean, over the dimension."""
    mu = ref.mean(0)
    c = np.atleast_2d(np.cov(ref, rowvar=False, bias=True))
    c = c + RIDGE * max(np.trace(c) / len(c), 1e-12) * np.eye(len(c))
    d = rows - mu
    return np.einsum("ij,jk,ik->i", d, np.linalg.pinv(c), d) / len(mu)


def terms(val, part):
    """Each member's score terms for `part`'s rows, statistics from the validation rows (as ScoreCalibration):
    feat (per-feature error / its validation mean), mse (MSE / its validation mean), code (diagonal
    standardized code distance), codefull (full-covariance Mahalanobis of the code), in (full-covariance
    Mahalanobis of the normalized input, shared by the members), knn_in / knn_code (mean squared distance to
    the KNN nearest validation rows, input / code, over its validation mean; not a sum the pipeline could
    all-reduce, measured for what it could give)."""
    inp = mahalanobis(val["x"], part["x"])
    zin = (part["x"] ** 2).mean(1) / (val["x"] ** 2).mean()
    same = part is val
    kin = knn(val["x"], part["x"], same)
    kin = kin / knn(val["x"], val["x"], True).mean()
    # extreme values on a few features (what averaging over the features dilutes): the largest squared
    # normalized input value over the validation rows' mean of the same, and its top-3 mean
    xmax_v = (val["x"] ** 2).max(1).mean()
    xmax = (part["x"] ** 2).max(1) / (xmax_v + 1e-12)
    out = []
    pick = np.random.default_rng(0).permutation(len(val["x"]))[:REFERENCE_ROWS]  # the pipeline's code sample
    for mv, mp in zip(val["members"], part["members"]):
        ref = torch.as_tensor(mv["h"][pick])
        knn_ref = (knn_distance(torch.as_tensor(mp["h"]), ref) / knn_distance(ref, ref).mean()).numpy()
        feat = mv["sq"].mean(0)
        feat = np.maximum(feat, 1e-3 * feat.mean() + 1e-12)
        mu, var = mv["h"].mean(0), mv["h"].var(0)
        var = np.maximum(var, 1e-3 * var.mean() + 1e-12)
        ratio_v = mv["sq"] / feat
        fmax_v = ratio_v.max(1).mean() + 1e-12
        top3_v = np.sort(ratio_v, 1)[:, -3:].mean(1).mean() + 1e-12
        ratio = mp["sq"] / feat
        out.append({"feat": (mp["sq"] / feat).mean(1), "mse": mp["sq"].mean(1) / feat.mean(),
                    "fmax": ratio.max(1) / fmax_v, "ftop3": np.sort(ratio, 1)[:, -3:].mean(1) / top3_v, "xmax": xmax,
                    "code": ((mp["h"] - mu) ** 2 / var).mean(1), "codefull": mahalanobis(mv["h"], mp["h"]),
                    "in": inp, "knn_in": kin, "zin": zin, "knn_ref": knn_ref,
                    "knn_code": knn(mv["h"], mp["h"], same) / knn(mv["h"], mv["h"], True).mean()})
    return out


# plain sums of terms (cal4 = the default score's four terms with the kNN term at weight 1, where the pipeline
# weighs it 0.5 (`w:1,1,0.5`): the three terms and the kNN distance to a sample of the
# validation codes, computed as the pipeline does; cal = the three terms before it)
SUMS = {"cal4": ("feat", "code", "mse", "knn_ref"), "cal": ("feat", "code", "mse"), "cal2": ("feat", "code"), "mse": ("mse",), "feat": ("feat",), "code": ("code",),
        "codefull": ("codefull",), "in": ("in",), "cal_full": ("feat", "codefull", "mse"),
        "cal+in": ("feat", "code", "mse", "in"), "cal_full+in": ("feat", "codefull", "mse", "in"),
        "cal+codefull": ("feat", "code", "mse", "codefull"), "knn_in": ("knn_in",), "knn_code": ("knn_code",),
        "cal+knn_code": ("feat", "code", "mse", "knn_code"), "f+m+knn_code": ("feat", "mse", "knn_code"),
        "cal+knn_in": ("feat", "code", "mse", "knn_in"), "zin": ("zin",), "cal+zin": ("feat", "code", "mse", "zin"),
        "cal+2zin": ("feat", "code", "mse", "zin", "zin"), "cal+zin+knn_code": ("feat", "code", "mse", "zin", "knn_code"),
        "f+m+zin": ("feat", "mse", "zin"), "cal+knn_code+knn_in": ("feat", "code", "mse", "knn_code", "knn_in"),
        "cal+2knn_code": ("feat", "code", "mse", "knn_code", "knn_code"), "cal+zin+knn_in": ("feat", "code", "mse", "zin", "knn_in"),
        "cal+zin+knn_code+knn_in": ("feat", "code", "mse", "zin", "knn_code", "knn_in"), "cal2+zin": ("feat", "code", "zin"),
        "cal4+fmax": ("feat", "code", "mse", "knn_ref", "fmax"), "cal4+ftop3": ("feat", "code", "mse", "knn_ref", "ftop3"),
        "cal4+xmax": ("feat", "code", "mse", "knn_ref", "xmax"), "fmax": ("fmax",), "xmax": ("xmax",),
        "ftop3": ("ftop3",)}
# each term on its validation z scale (mean / std), then summed
ZSUMS = {"z:cal": ("feat", "code", "mse"), "z:cal+zin": ("feat", "code", "mse", "zin"), "z:cal_full": ("feat", "codefull", "mse"),
         "z:cal_full+in": ("feat", "codefull", "mse", "in")}


# sums of log terms (a geometric mean: no single heavy-tailed term dominates)
LOGSUMS = {"log:cal": ("feat", "code", "mse"), "log:cal+zin": ("feat", "code", "mse", "zin"),
           "log:cal+knn_code": ("feat", "code", "mse", "knn_code"), "log:cal+zin+knn_code": ("feat", "code", "mse", "zin", "knn_code"),
           "log:cal+knn_in": ("feat", "code", "mse", "knn_in"), "log:feat+code": ("feat", "code")}


def trval_score(mv, mp, mtr):
    """The default score (`w:1,1,0.5`) of one member with the code's mean, variance and the kNN term's sampled
    codes taken from the training and validation rows' codes; the per-column error means from the validation
    rows, as always (eleventh round)."""
    feat = mv["sq"].mean(0)
    feat = np.maximum(feat, 1e-3 * feat.mean() + 1e-12)
    pool = np.vstack([mv["h"], mtr["h"]])
    mu, var = pool.mean(0), pool.var(0)
    var = np.maximum(var, 1e-3 * var.mean() + 1e-12)
    ref = torch.as_tensor(pool[np.random.default_rng(0).permutation(len(pool))[:REFERENCE_ROWS]])
    knn_ref = (knn_distance(torch.as_tensor(mp["h"]), ref) / knn_distance(ref, ref).mean()).numpy()
    return ((mp["sq"] / feat).mean(1) + ((mp["h"] - mu) ** 2 / var).mean(1) + mp["sq"].mean(1) / feat.mean()
            + 0.5 * knn_ref)


def variants(r):
    """name -> (validation rows' scores, test rows' scores), each the members' mean."""
    v, t = r["scores"]["val"], r["scores"]["test"]
    tv, tt = terms(v, v), terms(v, t)
    out = {}
    if "score" in v:  # models saved before the subspace term have only the parts
        out["pipeline"] = (v["score"], t["score"])
    for name, keys in SUMS.items():
        out[name] = tuple(np.mean([sum(m[k] for k in keys) for m in side], 0) for side in (tv, tt))
    for w in (0.25, 0.5):  # the default score with the kNN term weighted w
        out[f"cal4w{w}"] = tuple(np.mean([m["feat"] + m["code"] + m["mse"] + w * m["knn_ref"] for m in side], 0)
                                 for side in (tv, tt))
    # weights of the four terms (feat fixed at 1): w:CODE,MSE,KNN[,EXTRA=weight]
    for wc, wm, wk in ((1, 1, 0.5), (0.5, 1, 0.5), (1, 2, 0.5), (1, 1, 0), (1, 1, 1), (0.5, 2, 0.5), (1, 2, 0),
                       (2, 1, 0.5), (1, 0, 0.5), (0.5, 1, 0), (0, 1, 0.5), (0, 1, 1), (0, 1, 1.5), (0, 1, 2),
                       (0, 2, 1), (0.5, 1, 1), (0.25, 1, 1), (0, 0, 1), (0, 1, 0)):
        for extra, we in (("", 0), ("fmax", 0.5), ("fmax", 1), ("ftop3", 1), ("xmax", 0.5)):
            name = f"w:{wc},{wm},{wk}" + (f",{extra}={we}" if extra else "")
            out[name] = tuple(np.mean([m["feat"] + wc * m["code"] + wm * m["mse"] + wk * m["knn_ref"]
                                       + (we * m[extra] if extra else 0) for m in side], 0) for side in (tv, tt))
    for extra in ("fmax", "ftop3", "xmax"):  # the default score (kNN at 0.5) plus one extremeness term
        out[f"def+{extra}"] = tuple(np.mean([m["feat"] + m["code"] + m["mse"] + 0.5 * m["knn_ref"] + m[extra]
                                             for m in side], 0) for side in (tv, tt))
    for w in (0.5, 1):  # the default score plus the input's kNN distance to the validation rows (eleventh round)
        out[f"def+{w}knn_in"] = tuple(np.mean([m["feat"] + m["code"] + m["mse"] + 0.5 * m["knn_ref"] + w * m["knn_in"]
                                               for m in side], 0) for side in (tv, tt))
    # the default's four terms, each as the square root over its validation mean: a long tail weighs less
    weights = {"feat": 1.0, "code": 1.0, "mse": 1.0, "knn_ref": 0.5}
    out["sqrt:def"] = tuple(np.mean([sum(w * np.sqrt(m[k]) / np.sqrt(mv[k]).mean() for k, w in weights.items())
                                     for mv, m in zip(tv, side)], 0) for side in (tv, tt))
    if "train" in r["scores"]:  # --save-train: the code's statistics from the training + validation rows' codes
        out["codes_trval"] = tuple(np.mean([trval_score(mv, mp, mtr) for mv, mp, mtr in zip(
            v["members"], side["members"], r["scores"]["train"]["members"])], 0) for side in (v, t))
    for name, keys in LOGSUMS.items():
        out[name] = tuple(np.mean([sum(np.log(m[k] + 1e-3) for k in keys) for m in side], 0) for side in (tv, tt))
    for name, keys in ZSUMS.items():
        z = [[sum((m[k] - a[k].mean()) / (a[k].std() + 1e-12) for k in keys) for a, m in zip(tv, side)]
             for side in (tv, tt)]
        out[name] = tuple(np.mean(side, 0) for side in z)
    return out


def auc(s, y):
    return ranking_metrics(s, y)["auroc"]


TABLES = suite_tables("small")  # the 26 development tables under 200,000 rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", default="0")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--scaling", default="zscore")
    p.add_argument("--shuffle", action="store_true")
    p.add_argument("--tables", default=",".join(TABLES))
    p.add_argument("--tag", default="")
    p.add_argument("--latent-div", type=float, default=0.0, help="code width ceil(d / this) (0: the auto rule)")
    p.add_argument("--bag", type=float, default=0.0, help="feature bagging: share of features each model's encoder sees")
    p.add_argument("--hidden-mult", type=float, default=0.0, help="one hidden layer this x d wide (0: auto)")
    p.add_argument("--out", default="/tmp/rank_probe", help="folder for each table's raw results (.npy)")
    p.add_argument("--mix", default="", help="score an ensemble of models saved by earlier runs (with --out): "
                   "TAG:INDEX,... (INDEX: the seed's position in that run's --seeds), e.g. k:0,lat8:0,lat2:0")
    p.add_argument("--save-train", action="store_true", help="also save the training rows' codes and errors "
                   "(the part `train`), for statistics gathered on them")
    p.add_argument("--load", action="store_true", help="score variants of the models a run with this --out and "
                   "--tag saved, without training")
    a = p.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in a.seeds.split(",")]
    res = {}
    for name in a.tables.split(","):
        saved = os.path.join(a.out, f"{a.tag}_{name}.npy")
        if a.mix:  # an ensemble of saved models from several runs: TAG:SEED_INDEX,...
            rows = [list(np.load(os.path.join(a.out, f"{t}_{name}.npy"), allow_pickle=True))[int(i)]
                    for t, i in (m.split(":") for m in a.mix.split(","))]
        else:
            rows = (list(np.load(saved, allow_pickle=True)) if a.load
                    else [run_table(name, a.set, s, a.scaling, a.shuffle, a.latent_div, a.hidden_mult, a.bag,
                                    a.save_train)
                          for s in seeds])
        y = rows[0]["y"]
        vs = [variants(r) for r in rows]
        per = {k: [auc(x[k][1], y) for x in vs] for k in vs[0]}
        # ensemble of the seeds: average of their scores, each on its validation rows' scale
        ens = {k: auc(np.mean([zval(*x[k]) for x in vs], 0), y) for k in vs[0]}
        aps = {f"ap:{k}": float(np.mean([ranking_metrics(x[k][1], y)["ap"] for x in vs])) for k in vs[0]}
        res[name] = {**{k: float(np.mean(x)) for k, x in per.items()}, **{f"ens_{k}": x for k, x in ens.items()},
                     **aps}
        if not (a.load or a.mix):
            os.makedirs(a.out, exist_ok=True)
            np.save(saved, np.array(rows, dtype=object), allow_pickle=True)
        with open(os.path.join(a.out, f"{a.tag}_results.json"), "w") as f:  # every table so far, per variant
            json.dump(res, f)
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
