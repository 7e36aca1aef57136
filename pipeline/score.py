"""Scoring: a predictor that loads the model once per actor, and the job that writes and publishes output.

Output rows: one per input row, Parquet, with the columns `output_schema` declares (the README's
"Output schema" and "Feature-store ingestion" tables are checked against it by tests/test_docs.py).

Commit protocol: Ray writes to `<output>/_staging/<attempt>/`; only when the staged scored rows plus the
staged rejected rows equal the input's rows does `publish` swap the files into `<output>/` and write
`_SUCCESS` (with the counts) last. Readers take a directory only once `_SUCCESS` is there; `_`-prefixed
paths are hidden from them. A crash before `publish` leaves the published location as it was.

Rejects (data.nan_policy=drop, data.missing=drop): rows with infinite (or missing) features are not scored;
they are written, with the id columns, raw features, `source_file` and `reason`, to `<output>/_rejects/`
(published with the output, hidden from readers of it by the `_` prefix), and counted in `_SUCCESS` as
`rejected_rows`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline.artifacts import LoadedModel, load_artifact, read_manifest
from pipeline.config import Config, DataSection, OutputSection
from pipeline.artifacts import featurizer_of
from pipeline.data import InputSpec, RejectWriter, batch_rows, inspect_input, read_dataset
from pipeline.errors import InputError, PipelineError
from pipeline.resources import check_job, data_phase
from pipeline.storage import Storage, makes_dirs, map_io
from pipeline.uri import join_uri, normalize_uri
from pipeline.tensors import Normalizer, autocast_for
from pipeline.watchdog import beat, watch

SUCCESS = "_SUCCESS"
STAGING = "_staging"
REJECTS = "_rejects"
UTC_US = pa.timestamp("us", tz="UTC")


def output_schema(id_fields: Sequence[pa.Field], latent_dim: int, output: OutputSection) -> pa.Schema:
    """The scored output's columns, in order; the one declaration of the output format.

    <id columns>       as in the input, unchanged
    latent             list<float32> of length latent_dim (a plain list: feature stores read it)
    z_0 … z_{k-1}      float32, the latent code as scalar columns (only with output.flat_latent)
    recon_error        float32, the model's anomaly score (README, "recon_error"): per-column errors combined,
                       each input column counted once
    is_anomaly         bool, recon_error > the threshold stored in the model manifest
    feature_errors     list<float32>, the error of each input column, in data.features order (only with
                       output.feature_errors): squared normalized error, cross-entropy for a categorical
    top_features       list<string>, the output.top_k_features columns with the largest error, largest first
    model_version      string, `<run.name>@<weights sha256 prefix>`
    event_timestamp    timestamp[us, UTC]: `data.timestamp_column`, else the run's as-of time
    scored_at          timestamp[us, UTC]
    """
    fields = [pa.field(f.name, f.type) for f in id_fields]  # the type only: input field metadata stays behind
    fields.append(pa.field("latent", pa.list_(pa.float32())))
    if output.flat_latent:
        fields += [pa.field(f"z_{i}", pa.float32()) for i in range(latent_dim)]
    fields += [pa.field("recon_error", pa.float32()), pa.field("is_anomaly", pa.bool_())]
    if output.feature_errors:
        fields.append(pa.field("feature_errors", pa.list_(pa.float32())))
    if output.top_k_features:
        fields.append(pa.field("top_features", pa.list_(pa.string())))
    fields += [pa.field("model_version", pa.string()), pa.field("event_timestamp", UTC_US),
               pa.field("scored_at", UTC_US)]
    return pa.schema(fields)


def latent_list(h: np.ndarray) -> pa.ListArray:
    """(rows, k) float32 -> list<float32> (not fixed-size: Feast and most readers want a plain list)."""
    n, k = h.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(h, np.float32).reshape(-1)))


def to_utc(arr: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Any timestamp/date column as timestamp[us, UTC]; naive timestamps are taken to be UTC."""
    t = arr.type
    if pa.types.is_date(t):
        arr = arr.cast(pa.timestamp("us"))
        t = arr.type
    if pa.types.is_timestamp(t) and t.tz is None:
        arr = pc.assume_timezone(arr.cast(pa.timestamp("us")), "UTC")
    return arr.cast(UTC_US)


def explanation_columns(h: np.ndarray, sq: np.ndarray, feature_names: list[str],
                        output: OutputSection) -> dict[str, pa.Array]:
    """The optional columns: flat latent `z_i`, `feature_errors` and `top_features`, as `output` asks."""
    cols: dict[str, pa.Array] = {}
    if output.flat_latent:
        for i in range(h.shape[1]):
            cols[f"z_{i}"] = pa.array(np.ascontiguousarray(h[:, i], np.float32))
    if output.feature_errors:
        cols["feature_errors"] = latent_list(sq)
    k = min(output.top_k_features, sq.shape[1])
    if k:
        # argpartition finds the k largest in O(d); only those k are then sorted, largest first
        top = np.argpartition(-sq, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(sq, top, axis=1).argsort(axis=1)[:, ::-1]
        top = np.take_along_axis(top, order, axis=1)
        names = np.asarray(feature_names, dtype=object)[top.reshape(-1)]
        offsets = pa.array(np.arange(0, (len(sq) + 1) * k, k, dtype=np.int32))
        cols["top_features"] = pa.ListArray.from_arrays(offsets, pa.array(names, pa.string()))
    return cols


class Predictor:
    """Plain-PyTorch scoring of Arrow batches (no Ray): the core of the scoring actor, usable on a GPU box."""

    def __init__(self, loaded: LoadedModel, data: DataSection, as_of: dt.datetime, device: str = "cpu",
                 scored_at: Optional[dt.datetime] = None, on_reject: Optional[RejectWriter] = None,
                 output: Optional[OutputSection] = None):
        self.loaded, self.data, self.on_reject = loaded, data, on_reject
        self.output = output or OutputSection()
        self.device = torch.device(device)
        self.model = loaded.model.to(self.device).eval()
        fz = loaded.featurizer
        self.featurizer = None if fz.vector or data.vector_column else fz  # a vector: the float matrix as it is
        self.normalizer = Normalizer(fz.offset, fz.scale, self.device)
        self.n_features = fz.width
        self.names = fz.names
        self.threshold = np.float32(loaded.threshold)
        self.version = loaded.version
        self.as_of = as_of
        self.scored_at = scored_at

    @torch.inference_mode()
    def __call__(self, table: pa.Table) -> pa.Table:
        beat()  # progress for the driver's stall watch (pipeline/watchdog.py)
        rows = batch_rows(table, self.data, self.n_features, self.featurizer)
        x, keep = rows.x, rows.keep
        if not keep.all():
            if self.on_reject is not None:
                self.on_reject(table, x, keep, rows.reasons)
            table, x = table.filter(pa.array(keep)), x[keep]
        n = len(x)
        xt = torch.from_numpy(x)
        if self.device.type == "cuda":
            xt = xt.pin_memory().to(self.device, non_blocking=True)
        with autocast_for(self.device):
            score, h, sq = self.model.score_and_latent(self.normalizer(xt))
        err = score.float().cpu().numpy().astype(np.float32, copy=False)
        h = h.float().cpu().numpy()
        extra = explanation_columns(h, sq.float().cpu().numpy(), self.names, self.output)
        cols: dict[str, Any] = {c: table.column(c) for c in self.data.id_columns}
        cols["latent"] = latent_list(h)
        cols.update(extra)
        cols["recon_error"] = pa.array(err, pa.float32())
        cols["is_anomaly"] = pa.array(err > self.threshold)
        cols["model_version"] = pa.array([self.version] * n, pa.string())
        if self.data.timestamp_column:
            cols["event_timestamp"] = to_utc(table.column(self.data.timestamp_column))
        else:
            cols["event_timestamp"] = pa.array(np.full(n, _us(self.as_of), dtype=np.int64), UTC_US)
        scored_at = self.scored_at or dt.datetime.now(dt.timezone.utc)
        cols["scored_at"] = pa.array(np.full(n, _us(scored_at), dtype=np.int64), UTC_US)
        schema = output_schema([table.schema.field(c) for c in self.data.id_columns], h.shape[1], self.output)
        return pa.Table.from_arrays([cols[name] for name in schema.names], schema=schema)


def _us(t: dt.datetime) -> int:
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return int(t.timestamp() * 1_000_000)


def worker_predictor(storage: Storage, model_uri: str, data: DataSection, as_of: dt.datetime,
                     rejects_uri: Optional[str], output: Optional[OutputSection], device: str = "cpu") -> Predictor:
    """A scoring worker's predictor: the model loaded and checksum-verified, rejects written to `rejects_uri`."""
    on_reject = RejectWriter(storage, rejects_uri, data) if rejects_uri else None
    return Predictor(load_artifact(storage, model_uri, device), data, as_of, device, on_reject=on_reject,
                     output=output)


class ScoringActor:
    """Ray Data actor (GPU scoring, `score.compute: actors`): loads (and checksum-verifies) the model once,
    then scores batch after batch."""

    def __init__(self, storage: Storage, model_uri: str, data: DataSection, as_of: dt.datetime,
                 use_gpu: bool = False, torch_threads: int = 1, rejects_uri: Optional[str] = None,
                 output: Optional[OutputSection] = None):
        torch.set_num_threads(max(1, torch_threads))
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.predictor = worker_predictor(storage, model_uri, data, as_of, rejects_uri, output, device)

    def __call__(self, table: pa.Table) -> pa.Table:
        return self.predictor(table)


_WORKER_PREDICTOR: dict[tuple, Predictor] = {}
"""The scoring task's model, per worker process: loaded by the first task of a run that lands there."""


@dataclass(frozen=True)
class ScoreBatches:
    """Ray Data function (CPU scoring, `score.compute: tasks`): scores in plain tasks, so Ray fuses
    read -> score -> write into one task per file (no actor start to wait for, no block handed between
    processes). Each worker process loads and verifies the model once per run and keeps it."""

    storage: Storage
    model_uri: str
    data: DataSection
    as_of: dt.datetime
    torch_threads: int = 1
    rejects_uri: Optional[str] = None
    output: Optional[OutputSection] = None
    batch_size: int = 4096
    """Rows the model scores at a time."""
    run_id: str = ""
    """Names the run: a worker never reuses a model loaded for an earlier run (the artifact may have changed)."""

    def predictor(self) -> Predictor:
        key = (self.run_id, self.model_uri)
        if key not in _WORKER_PREDICTOR:
            _WORKER_PREDICTOR.clear()  # one model per worker process, the current run's
            _WORKER_PREDICTOR[key] = worker_predictor(self.storage, self.model_uri, self.data, self.as_of,
                                                      self.rejects_uri, self.output)
        return _WORKER_PREDICTOR[key]

    def __call__(self, table: pa.Table) -> pa.Table:
        # Ray hands over whole blocks (a `batch_size` on map_batches would stop it fusing the read into this
        # task); the model sees slices of `batch_size` rows.
        torch.set_num_threads(max(1, self.torch_threads))
        predict = self.predictor()
        if table.num_rows <= self.batch_size:
            return predict(table)
        # one chunk per block: the Parquet writer makes a row group of each chunk, and a file of many small
        # row groups is slower for every reader (the row verification here included)
        return pa.concat_tables([predict(table.slice(i, self.batch_size))
                                 for i in range(0, table.num_rows, self.batch_size)]).combine_chunks()




# ------------------------------------------------------------------------------------------ publishing


def count_rows(storage: Storage, files: list[str], true_column: Optional[str] = None) -> tuple[int, int]:
    """Rows of Parquet `files` (from the footers) and, with `true_column`, that bool column's true values."""
    def one(f: str) -> tuple[int, int]:
        with storage.open_parquet(f) as pf:
            if true_column is None:
                return pf.metadata.num_rows, 0
            col = pf.read(columns=[true_column]).column(true_column)
            return pf.metadata.num_rows, int(pc.sum(col).as_py() or 0)

    counts = map_io(one, files)
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


def publish(storage: Storage, staging: str, out: str, success: dict[str, Any]) -> list[str]:
    """Replace `out`'s data files with the staged ones and write `_SUCCESS` last. Returns the new files.

    `_SUCCESS` goes first, so during the swap readers see an incomplete partition (and skip it), never a
    mix of old and new rows presented as complete. Deletes and moves overlap (`map_io`).
    """
    storage.delete_file(join_uri(out, SUCCESS))
    map_io(storage.delete_file, storage.list_files(out))
    storage.delete_dir(join_uri(out, REJECTS))
    # list_files hides `_` names: the staged data files, then the staged rejects
    moves = [(f, join_uri(out, f[len(staging):].lstrip("/"))) for f in storage.list_files(staging)]
    published = [dst for _, dst in moves]
    staged_rejects = join_uri(staging, REJECTS)
    moves += [(f, join_uri(out, REJECTS, f[len(staged_rejects):].lstrip("/")))
              for f in storage.list_files(staged_rejects)]
    map_io(lambda m: storage.move(*m), moves)
    storage.write_json(join_uri(out, SUCCESS), {**success, "files": [p.rsplit("/", 1)[-1] for p in published]})
    storage.delete_dir(staging)
    return published


@dataclass
class ScoreResult:
    output_uri: str
    input_rows: int
    scored_rows: int
    rejected_rows: int
    anomalies: int
    model_version: str
    seconds: float
    files: list[str]
    phases: dict[str, float] = field(default_factory=dict)
    """Seconds per phase (checks, ray_start, plan, score_and_write, verify, publish): where a run's time went."""


def for_model(cfg: Config, manifest: dict[str, Any]) -> Config:
    """`data.features: auto` when scoring means the model's columns (new columns in the input are ignored)."""
    if cfg.data.features != "auto":
        return cfg
    fz = featurizer_of(manifest)
    features = fz.vector if fz.vector else fz.names
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, features=features))


def check_features_match(manifest: dict[str, Any], spec: InputSpec) -> None:
    """The input's features are the model's: the same columns in the same order, and for scalar columns the
    same kind of type (a column that was an integer in training and is a string now: one line naming it)."""
    fz = featurizer_of(manifest)
    want, got = fz.names, spec.feature_names
    if want == got:
        if spec.schema is not None:
            fz.check_types(spec.schema, f"data.input {spec.uri}")
        return
    if len(want) != len(got):
        raise InputError(f"data.input {spec.uri}: {len(got)} features, but the model was trained on {len(want)}")
    if sorted(want) == sorted(got):
        raise InputError(f"data.input {spec.uri}: feature order differs from the model's manifest")
    missing = [f for f in want if f not in got]
    raise InputError(f"data.input {spec.uri}: features differ from the model's manifest (missing {missing[:5]})")


def check_score(cfg: Config, storage: Storage, model_run_uri: str, output_uri: str) -> InputSpec:
    """Everything scoring can check before starting Ray: the model artifact (checksum included), the
    input's schema against the model's features, and that the output location is writable."""
    for uri in (model_run_uri, cfg.data.input, output_uri):
        storage.check_bucket(uri)
    manifest = load_artifact(storage, model_run_uri).manifest
    spec = inspect_input(cfg.data, storage)
    check_features_match(manifest, spec)
    storage.check_writable(normalize_uri(output_uri))
    return spec


def remove_abandoned_staging(storage: Storage, out: str) -> None:
    """Staging attempts left by crashed runs are hidden from readers; a new run of the partition clears them."""
    staging_root = join_uri(out, STAGING)
    if storage.exists(staging_root):
        print(f"[score] removing staging left by an earlier, unfinished run: {staging_root}", flush=True)
        storage.delete_dir(staging_root)


def scoring_dataset(cfg: Config, storage: Storage, spec: InputSpec, model_run_uri: str, as_of: dt.datetime,
                    rejects_uri: Optional[str] = None, run_id: str = "") -> tuple[Any, dict[str, Any]]:
    """The Ray Dataset of scored rows, and the arguments its write_parquet needs to stay fused with it."""
    import ray.data

    sc = cfg.score
    threads = int(max(1, sc.cpus_per_actor))
    if sc.uses_actors:
        ds = read_dataset(spec, storage).map_batches(
            ScoringActor,
            fn_constructor_kwargs=dict(storage=storage, model_uri=model_run_uri, data=cfg.data, as_of=as_of,
                                       use_gpu=sc.use_gpu, torch_threads=threads, rejects_uri=rejects_uri,
                                       output=cfg.output),
            batch_size=sc.batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=sc.concurrency),
            num_cpus=sc.cpus_per_actor, num_gpus=1 if sc.use_gpu else 0,
        )
        return ds, {}
    fn = ScoreBatches(storage, model_run_uri, cfg.data, as_of, threads, rejects_uri, cfg.output,
                      batch_size=sc.batch_size, run_id=run_id)
    # The same CPUs on read, score and write, no per-operator concurrency, whole blocks into the map: Ray
    # fuses the three into one task per file. `score.concurrency` caps the dataset's CPUs instead.
    cpus = {"num_cpus": sc.cpus_per_actor}
    ds = read_dataset(spec, storage, **cpus).map_batches(fn, batch_size=None, batch_format="pyarrow", **cpus)
    ds.context.execution_options.resource_limits = ray.data.ExecutionResources(cpu=sc.concurrency * sc.cpus_per_actor)
    return ds, {"ray_remote_args": cpus}


def score(cfg: Config, storage: Storage, model_run_uri: str, output_uri: str,
          as_of: Optional[dt.datetime] = None, spec: Optional[InputSpec] = None) -> ScoreResult:
    """Score every input row with the model at `model_run_uri`; publish to `output_uri` atomically."""
    start = time.perf_counter()
    phases: dict[str, float] = {}
    lap = Lap(phases)
    as_of = as_of or dt.datetime.now(dt.timezone.utc)
    manifest = read_manifest(storage, model_run_uri)
    cfg = for_model(cfg, manifest)
    spec = spec or check_score(cfg, storage, model_run_uri, output_uri)
    out = normalize_uri(output_uri)
    remove_abandoned_staging(storage, out)
    staging = join_uri(out, STAGING, f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}")
    rejects_uri = join_uri(staging, REJECTS) if cfg.data.drops_rows else None

    from pipeline.cluster import connect
    from pipeline.multinode import check_shared_storage

    lap("checks")
    connect(cfg.run.num_cpus)  # only once the cheap checks (model, storage, schema) have passed
    lap("ray_start")  # ~0 when the job has its Ray already (jobs.run, a cluster)
    cfg = check_job(cfg, "score")  # before any data is read: requests the cluster can never meet end here
    check_shared_storage(cfg)
    ds, write_args = scoring_dataset(cfg, storage, spec, model_run_uri, as_of, rejects_uri, run_id=staging)
    fs, staging_path = storage.resolve(staging)
    lap("plan")
    try:
        with watch(cfg.train.stall_timeout_s, "scoring", data_phase(cfg, "scoring", actors=cfg.score.uses_actors)):
            # on S3, making directories costs a round trip per file for nothing
            ds.write_parquet(staging_path, filesystem=fs, try_create_dir=makes_dirs(fs), **write_args)
        lap("score_and_write")
        staged = storage.list_files(staging, suffix=".parquet")
        scored, anomalies = count_rows(storage, staged, true_column="is_anomaly")
        rejected = count_rows(storage, storage.list_files(rejects_uri))[0] if rejects_uri else 0
        if scored + rejected != spec.num_rows:
            raise PipelineError(f"output {out}: staged {scored} scored + {rejected} rejected rows for "
                                f"{spec.num_rows} input rows; not published")
        lap("verify")
        success = {
            "input_rows": spec.num_rows, "scored_rows": scored, "rejected_rows": rejected,
            "anomalies": anomalies, "model_version": manifest["model_version"],
            "model_uri": model_run_uri, "input_uri": spec.uri, "as_of": as_of.isoformat(),
            "rejects": f"{REJECTS}/" if rejected else None,
            "completed_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        }
        files = publish(storage, staging, out, success)
        storage.delete_dir(join_uri(out, STAGING))  # earlier attempts were cleared at the start: it is empty
        lap("publish")
    except BaseException:
        _cleanup(storage, staging)
        raise
    return ScoreResult(out, spec.num_rows, scored, rejected, anomalies, manifest["model_version"],
                       time.perf_counter() - start, files, phases)


class Lap:
    """Records the seconds since the previous lap under a phase name."""

    def __init__(self, into: dict[str, float]):
        self.into, self.t = into, time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.into[name] = round(now - self.t, 3)
        self.t = now


def _cleanup(storage: Storage, staging: str) -> None:
    try:
        storage.delete_dir(staging)
    except Exception:  # noqa: BLE001 - best effort; the original error matters more
        pass
