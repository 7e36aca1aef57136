"""Anomaly-ranking quality on labelled tables: the real pipeline against scikit-learn baselines.

    evaluate_tables(tables, workdir) -> dict   (what `python -m jobs.evaluate` writes to eval-results.json)

Protocol (ADBench's unsupervised setting, the one a real user is in): per class, a seed-0 numpy permutation;
the first 30% go to test, the rest to training. Training rows are written to Parquet WITHOUT their labels
(anomalies included, as in a real unlabeled table); the pipeline trains on them with its defaults
(`train_job`, then `score_job` on the test rows: the code path of `jobs.run`), and the test rows' scores
are compared with their labels (AUROC and average precision). The baselines see the same split, with
min-max scaling fitted on the training rows: scikit-learn's IsolationForest (defaults, random_state 0) and
PCA reconstruction error (the components that explain 95% of the training variance).

Novelty tasks (NOVELTY, `--suite novelty`): a classification table that ships with scikit-learn, some classes
normal and the others anomalies; the split stratifies on the class, and the pipeline and the baselines train on
the normal classes' training rows only (`protocol_masks`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cluster import connect
from pipeline.errors import InputError

BENCHMARK_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "adbench"
# the development set until issue 24; its figures are the ones the earlier rounds in docs/evaluation.md report
DEV8 = ("6_cardio", "38_thyroid", "28_pendigits", "30_satellite", "32_shuttle", "40_vowels", "22_magic.gamma",
        "24_mnist")
# over 200,000 rows: minutes each on 2 cores, so a quick run can leave them out
LARGE = ("8_celeba", "10_cover", "11_donors", "16_http", "33_skin")
SUITES = ("all", "small", "large", "dev8", "novelty")
TEST_FRACTION = 0.3
SEED = 0
ID = "row_id"


def suite_tables(suite: str) -> list[str]:
    """The tables a `--suite` names: all the shipped ones, all but the large ones, the large ones, the first eight;
    `novelty`: the one-class tasks (NOVELTY)."""
    shipped = sorted(p.stem for p in BENCHMARK_DIR.glob("*.npz"))
    chosen = {"all": shipped, "small": [n for n in shipped if n not in LARGE],
              "large": [n for n in shipped if n in LARGE], "dev8": [n for n in shipped if n in DEV8],
              "novelty": list(NOVELTY)}
    if suite not in chosen:
        raise InputError(f"--suite {suite}: one of {', '.join(SUITES)}")
    return chosen[suite]


@dataclass
class Table:
    name: str
    X: np.ndarray
    y: np.ndarray
    """(rows,) 1 = anomaly."""
    classes: Optional[np.ndarray] = None
    """novelty tasks: each row's source class, which the split stratifies on; the pipeline and the baselines then
    train on the normal rows only (clean training rows, anomalies of kinds never seen)."""


# Novelty tasks (the one-class setting of the deep anomaly-detection literature, and of issue 24's held-out
# digits table): a classification table that ships with scikit-learn, one class or a few taken as normal, every
# other class as anomalies. Tables nobody tuned the defaults on. name -> (scikit-learn loader, normal classes)
NOVELTY: dict[str, tuple[str, tuple[int, ...]]] = {
    **{f"digits_{c}": ("digits", (c,)) for c in range(10)},
    "digits_0-4": ("digits", (0, 1, 2, 3, 4)), "digits_5-9": ("digits", (5, 6, 7, 8, 9)),
    **{f"wine_{c}": ("wine", (c,)) for c in range(3)},
    **{f"iris_{c}": ("iris", (c,)) for c in range(3)},
}


def load_novelty(name: str) -> Table:
    """A NOVELTY task: the table's features, y = 1 for rows outside the normal classes."""
    import sklearn.datasets as ds

    source, normal = NOVELTY[name]
    bunch = getattr(ds, f"load_{source}")()
    classes = np.asarray(bunch.target, int)
    return Table(name, np.asarray(bunch.data, np.float64), (~np.isin(classes, normal)).astype(int), classes)


def load_table(name: str) -> Table:
    """A shipped table (benchmarks/adbench/NAME.npz) or a NOVELTY task, by name."""
    if name in NOVELTY:
        return load_novelty(name)
    path = BENCHMARK_DIR / f"{name}.npz"
    if not path.exists():
        raise InputError(f"--tables: {name} is neither in {BENCHMARK_DIR} nor a novelty task ({', '.join(NOVELTY)})")
    return load_npz(path)


def load_npz(path: Path) -> Table:
    with np.load(path, allow_pickle=False) as z:
        return Table(path.stem, np.asarray(z["X"], np.float64), np.asarray(z["y"]).astype(int))


def load_labelled(path: str, label_column: str) -> Table:
    """A user's own table (Parquet file or folder, CSV, or .npz): numeric columns except the label."""
    p = Path(path)
    if p.suffix == ".npz":
        return load_npz(p)
    if p.suffix == ".csv":
        import pyarrow.csv as pcsv

        t = pcsv.read_csv(p)
    elif p.exists():
        t = pq.read_table(p)
    else:
        raise InputError(f"--input {path}: not found")
    if label_column not in t.column_names:
        raise InputError(f"--input {path}: no column {label_column!r} (have: {', '.join(t.column_names)})")
    y = np.asarray(t.column(label_column).to_numpy(zero_copy_only=False)).astype(int)
    if not set(np.unique(y)) <= {0, 1} or len(np.unique(y)) != 2:
        raise InputError(f"--label-column {label_column}: must hold both 0 (normal) and 1 (anomaly)")
    cols = [c for c in t.column_names if c != label_column
            and (pa.types.is_integer(t.schema.field(c).type) or pa.types.is_floating(t.schema.field(c).type)
                 or pa.types.is_boolean(t.schema.field(c).type))]
    if not cols:
        raise InputError(f"--input {path}: no numeric feature columns besides {label_column!r}")
    X = np.column_stack([t.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in cols])
    return Table(p.stem, X, y)


def protocol_split(y: np.ndarray) -> np.ndarray:
    """Boolean test mask: per class, a seed-0 permutation, the first 30% to test (ADBench's stratified split)."""
    test = np.zeros(len(y), bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        perm = idx[np.random.RandomState(SEED).permutation(len(idx))]
        test[perm[: int(round(TEST_FRACTION * len(idx)))]] = True
    return test


def protocol_masks(table: Table) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) boolean masks: protocol_split on the label, or on a novelty task's classes, whose training
    rows are then the normal classes' only."""
    if table.classes is None:
        test = protocol_split(table.y)
        return ~test, test
    test = protocol_split(table.classes)
    return ~test & (table.y == 0), test


def feature_names(n: int) -> list[str]:
    return [f"f{j}" for j in range(n)]


def write_split(path: Path, X: np.ndarray, ids: np.ndarray) -> None:
    """Ids and one float64 column per feature; no label column (the pipeline never sees the labels)."""
    path.mkdir(parents=True, exist_ok=True)
    cols = {ID: pa.array(ids, pa.int64())}
    cols.update({name: pa.array(X[:, j]) for j, name in enumerate(feature_names(X.shape[1]))})
    pq.write_table(pa.table(cols), path / "part-0.parquet")


def ranking_metrics(scores: np.ndarray, y: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import average_precision_score, roc_auc_score

    return {"auroc": float(roc_auc_score(y, scores)), "ap": float(average_precision_score(y, scores))}


def minmax(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = train.min(axis=0), train.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    return (train - lo) / span, (test - lo) / span


def iforest_scores(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    from sklearn.ensemble import IsolationForest

    a, b = minmax(train, test)
    return -IsolationForest(random_state=SEED).fit(a).score_samples(b)


def pca_scores(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    from sklearn.decomposition import PCA

    a, b = minmax(train, test)
    pca = PCA(n_components=0.95, svd_solver="full", random_state=SEED).fit(a)
    return ((b - pca.inverse_transform(pca.transform(b))) ** 2).sum(axis=1)


BASELINES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "iforest": iforest_scores, "pca": pca_scores,
}


def pipeline_scores(table: Table, train: np.ndarray, test: np.ndarray, workdir: Path, overrides: list[str],
                    num_cpus: Optional[int]) -> tuple[np.ndarray, dict[str, Any]]:
    """Train with the defaults on the unlabeled training rows, score the test rows; test scores in row order."""
    from pipeline.config import load_config
    from pipeline.jobs import score_job, train_job
    from pipeline.storage import Storage

    ids = np.arange(len(table.y))
    base = workdir / table.name
    write_split(base / "train", table.X[train], ids[train])
    write_split(base / "test", table.X[test], ids[test])
    common = [f"run.name={table.name}", f"artifacts.uri={base / 'artifacts'}", f"output.uri={base / 'output'}",
              f"data.id_columns=[{ID}]", f"data.features={json.dumps(feature_names(table.X.shape[1]))}",
              *([f"run.num_cpus={num_cpus}"] if num_cpus else []), *overrides]
    train_cfg = load_config(None, [f"data.input={base / 'train'}", *common])
    storage = Storage(train_cfg.storage)
    t = train_job(train_cfg, storage, overwrite=True)
    score_cfg = load_config(None, [f"data.input={base / 'test'}", *common])
    res = score_job(score_cfg, storage)
    out = pa.concat_tables([pq.read_table(f, columns=[ID, "anomaly_score", "recon_error"]) for f in res.files])
    order = {i: k for k, i in enumerate(out.column(ID).to_pylist())}
    take = np.array([order[i] for i in ids[test]])
    scores = out.column("anomaly_score").to_numpy()[take].astype(np.float64)
    # the reconstruction error alone: how much of the ranking the codes' terms carry
    recon = ranking_metrics(out.column("recon_error").to_numpy()[take].astype(np.float64), table.y[test])
    m = t.manifest
    info = {"epochs_run": t.epochs_run, "best_epoch": t.best_epoch + 1,
            "model": {k: m["model"].get(k)
                      for k in ("kind", "hidden_dims", "latent_dim", "ensemble", "member_latent_dims")},
            "still_improving": bool(m["metrics"].get("still_improving", False)),
            "validation_fraction": m["data"].get("validation_fraction"),
            "recon_error": recon}
    return scores, info


def evaluate_table(table: Table, workdir: Path, overrides: list[str] = (),
                   num_cpus: Optional[int] = None) -> dict[str, Any]:
    train, test = protocol_masks(table)
    y_test = table.y[test]
    row: dict[str, Any] = {"rows": int(len(table.y)), "features": int(table.X.shape[1]),
                           "anomaly_share": float(table.y.mean()), "test_rows": int(test.sum())}
    if table.classes is not None:
        row["train_rows"] = int(train.sum())
    start = t0 = time.perf_counter()
    scores, info = pipeline_scores(table, train, test, workdir, list(overrides), num_cpus)
    row["pipeline"] = {**ranking_metrics(scores, y_test), "seconds": time.perf_counter() - t0, **info}
    for name, fn in BASELINES.items():
        t0 = time.perf_counter()
        s = fn(table.X[train], table.X[test])
        row[name] = {**ranking_metrics(s, y_test), "seconds": time.perf_counter() - t0}
    row["wall_seconds"] = time.perf_counter() - start  # the pipeline's train + score and both baselines
    print(f"[eval] {table.name}: pipeline AUROC {row['pipeline']['auroc']:.3f} AP {row['pipeline']['ap']:.3f} | "
          + " | ".join(f"{n} AUROC {row[n]['auroc']:.3f}" for n in BASELINES), flush=True)
    return row


METHODS = ("pipeline", *BASELINES)


def summarize(per: dict[str, Any], overrides: list[str], wall_seconds: float, complete: bool) -> dict[str, Any]:
    """eval-results.json's shape: per table, the mean per method, wins and losses, the protocol."""
    mean = {m: {k: float(np.mean([per[n][m][k] for n in per])) for k in ("auroc", "ap")} for m in METHODS}
    return {"tables": per, "mean": mean, "versus": versus(per), "overrides": list(overrides),
            "wall_seconds": wall_seconds, "complete": complete,
            "protocol": "stratified 70/30 (per class a seed-0 numpy permutation, first 30% to test); "
                        "training rows unlabeled; baselines on min-max scaling fitted on the training rows"}


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs over disjoint sets of tables (one long evaluation split into several) as one result."""
    if len({tuple(p["overrides"]) for p in parts}) > 1:
        raise InputError("the runs to merge used different --set overrides")
    per = {n: r for p in parts for n, r in p["tables"].items()}
    return summarize(per, parts[0]["overrides"], sum(p["wall_seconds"] for p in parts),
                     all(p.get("complete", True) for p in parts))


def evaluate_tables(tables: list[Table], workdir: Path, overrides: list[str] = (),
                    num_cpus: Optional[int] = None,
                    on_table: Optional[Callable[[dict[str, Any]], None]] = None) -> dict[str, Any]:
    """Every table in turn; `on_table(results so far)` after each, so a long run keeps what it measured."""
    start = time.perf_counter()
    connect(num_cpus)  # one Ray for every table: the job's own local one, or the cluster already joined
    per: dict[str, Any] = {}
    results: dict[str, Any] = {}
    for t in tables:
        per[t.name] = evaluate_table(t, workdir, overrides, num_cpus)
        results = summarize(per, list(overrides), time.perf_counter() - start, len(per) == len(tables))
        if on_table:
            on_table(results)
    return results


PCA_MARGIN = 0.05  # issue 24's target: no table below PCA by more than this


def versus(per: dict[str, Any]) -> dict[str, Any]:
    """Per baseline and measure: tables the pipeline wins and loses, and its worst loss (table, margin)."""
    out: dict[str, Any] = {}
    for base in BASELINES:
        for k in ("auroc", "ap"):
            diff = {n: r["pipeline"][k] - r[base][k] for n, r in per.items()}
            worst = min(diff, key=diff.get)
            out[f"{base}_{k}"] = {"wins": sum(d > 0 for d in diff.values()),
                                  "losses": sum(d < 0 for d in diff.values()), "worst": [worst, diff[worst]]}
    out["below_pca_by_over_margin"] = sorted(n for n, r in per.items()
                                             if r["pipeline"]["auroc"] < r["pca"]["auroc"] - PCA_MARGIN)
    return out


def markdown(results: dict[str, Any]) -> str:
    head = ("| table | rows | features | anomalies | pipeline AUROC | pipeline AP | IForest AUROC | IForest AP "
            "| PCA AUROC | PCA AP | - IForest | recon_error AUROC | pipeline s | table s |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for name, r in results["tables"].items():
        lines.append(f"| {name} | {r['rows']} | {r['features']} | {r['anomaly_share']:.{1 if r['anomaly_share'] >= 0.001 else 2}%} | "
                     f"{r['pipeline']['auroc']:.3f} | {r['pipeline']['ap']:.3f} | {r['iforest']['auroc']:.3f} | "
                     f"{r['iforest']['ap']:.3f} | {r['pca']['auroc']:.3f} | {r['pca']['ap']:.3f} | "
                     f"{r['pipeline']['auroc'] - r['iforest']['auroc']:+.3f} | "
                     f"{r['pipeline'].get('recon_error', {}).get('auroc', float('nan')):.3f} | "
                     f"{r['pipeline']['seconds']:.0f} | "
                     f"{r.get('wall_seconds', r['pipeline']['seconds']):.0f} |")
    m = results["mean"]
    lines.append(f"| **mean** ({len(results['tables'])} tables) | | | | **{m['pipeline']['auroc']:.3f}** | "
                 f"**{m['pipeline']['ap']:.3f}** | {m['iforest']['auroc']:.3f} | {m['iforest']['ap']:.3f} | "
                 f"{m['pca']['auroc']:.3f} | {m['pca']['ap']:.3f} | "
                 f"{m['pipeline']['auroc'] - m['iforest']['auroc']:+.3f} | | | |")
    lines.append("")
    v = results.get("versus") or versus(results["tables"])
    for base, label in (("iforest", "IsolationForest"), ("pca", "PCA")):
        parts = [(k.upper(), v[f"{base}_{k}"]) for k in ("auroc", "ap")]
        lines.append(f"Against {label}: " + "; ".join(
            f"{k} wins {c['wins']}, loses {c['losses']} (worst {c['worst'][0]} {c['worst'][1]:+.3f})"
            for k, c in parts) + ".")
    below = v["below_pca_by_over_margin"]
    lines.append(f"Below PCA's AUROC by more than {PCA_MARGIN}: {', '.join(below) if below else 'none'}.")
    done = "" if results.get("complete", True) else f" Incomplete: {len(results['tables'])} tables so far."
    lines.append(f"Wall time {results['wall_seconds']:.0f} s.{done} {results['protocol']}.")
    return "\n".join(lines) + "\n"
