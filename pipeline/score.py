"""The scoring job's core: every input row scored with a stored model, written to staging, verified and
published atomically (pipeline/publish.py).

    score(cfg, storage, model_run_uri, output_uri) -> ScoreResult
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from pipeline.manifest import read_manifest
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.inputs import InputSpec
from pipeline.phases import Lap
from pipeline.preflight import check_score, for_model
from pipeline.publish import (REJECTS, STAGING, count_rows, discard_staging, new_staging, publish,
                              remove_abandoned_staging)
from pipeline.read import read_dataset
from pipeline.resources import check_job, data_phase
from pipeline.scorer import ScoreBatches, ScoringActor
from pipeline.storage import Storage, makes_dirs
from pipeline.uri import join_uri, normalize_uri
from pipeline.watchdog import watch


WRITE_CPUS = 0.25
"""CPUs a write task asks for (encoding the scored rows is light next to scoring them)."""


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
    flagged_note: Optional[str] = None
    """Set by score_job when far more rows are flagged than the threshold expects (metrics.flagged_share_note)."""


def scoring_dataset(cfg: Config, storage: Storage, spec: InputSpec, model_run_uri: str, as_of: dt.datetime,
                    rejects_uri: Optional[str] = None, run_id: str = "") -> tuple[Any, dict[str, Any]]:
    """The Ray Dataset of scored rows, and the arguments its write_parquet takes."""
    import ray.data

    sc = cfg.score
    # scored rows (in memory, before Parquet's encoding) a write task gathers into one file: bounds a write
    # task's memory whatever the shard size, and keeps files few on a large input
    file_bytes = {"min_bytes_per_file": int(cfg.output.file_mb * 2**20)}
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
        return ds, file_bytes
    fn = ScoreBatches(storage, model_run_uri, cfg.data, as_of, threads, rejects_uri, cfg.output,
                      batch_size=sc.batch_size, run_id=run_id)
    # The same CPUs on read and score, no per-operator concurrency, whole blocks into the map: Ray fuses the
    # two into one task per file. The write is NOT fused with them (it asks for other CPUs): Ray's Parquet
    # write holds every block of its task before writing, so a fused task held a whole input file's output
    # (memory growing with the shard); apart, a write task gets about output.file_mb of scored rows.
    # `score.concurrency` caps the dataset's CPUs instead, one write beside the scoring tasks.
    cpus = {"num_cpus": sc.cpus_per_actor}
    ds = read_dataset(spec, storage, **cpus).map_batches(fn, batch_size=None, batch_format="pyarrow", **cpus)
    ds.context.execution_options.resource_limits = ray.data.ExecutionResources(
        cpu=sc.concurrency * sc.cpus_per_actor + WRITE_CPUS)
    return ds, {"ray_remote_args": {"num_cpus": WRITE_CPUS}, **file_bytes}


def _verify_and_publish(storage: Storage, spec: InputSpec, staging: str, out: str, rejects_uri: Optional[str],
                        success: dict[str, Any], lap: Lap) -> tuple[int, int, int, list[str]]:
    """Count the staged rows against the input's, then publish: (scored, rejected, anomalies, files)."""
    staged = storage.list_files(staging, suffix=".parquet")
    scored, anomalies = count_rows(storage, staged, true_column="is_anomaly")
    rejected = count_rows(storage, storage.list_files(rejects_uri))[0] if rejects_uri else 0
    if scored + rejected != spec.num_rows:
        raise PipelineError(f"output {out}: staged {scored} scored + {rejected} rejected rows for "
                            f"{spec.num_rows} input rows; not published")
    lap("verify")
    success = {"input_rows": spec.num_rows, "scored_rows": scored, "rejected_rows": rejected,
               "anomalies": anomalies, **success, "rejects": f"{REJECTS}/" if rejected else None,
               "completed_at": dt.datetime.now(dt.timezone.utc).isoformat()}
    files = publish(storage, staging, out, success)
    storage.delete_dir(join_uri(out, STAGING))  # earlier attempts were cleared at the start: it is empty
    lap("publish")
    return scored, rejected, anomalies, files


def score(cfg: Config, storage: Storage, model_run_uri: str, output_uri: str,
          as_of: Optional[dt.datetime] = None, spec: Optional[InputSpec] = None) -> ScoreResult:
    """Score every input row with the model at `model_run_uri`; publish to `output_uri` atomically."""
    from pipeline.cluster import connect
    from pipeline.multinode import check_shared_storage

    start = time.perf_counter()
    phases: dict[str, float] = {}
    lap = Lap(phases)
    as_of = as_of or dt.datetime.now(dt.timezone.utc)
    manifest = read_manifest(storage, model_run_uri)
    cfg = for_model(cfg, manifest)
    spec = spec or check_score(cfg, storage, model_run_uri, output_uri)
    cfg = dataclasses.replace(cfg, data=spec.data or cfg.data)  # `auto` resolved from the input (id columns)
    out = normalize_uri(output_uri)
    remove_abandoned_staging(storage, out)
    staging = new_staging(out)
    rejects_uri = join_uri(staging, REJECTS) if cfg.data.drops_rows else None
    lap("checks")
    connect(cfg.run.num_cpus)  # only once the cheap checks (model, storage, schema) have passed
    lap("ray_start")  # ~0 when the job has its Ray already (jobs.run, a cluster)
    cfg = check_job(cfg, "score")  # before any data is read: requests the cluster can never meet end here
    check_shared_storage(cfg)
    ds, write_args = scoring_dataset(cfg, storage, spec, model_run_uri, as_of, rejects_uri, run_id=staging)
    fs, staging_path = storage.resolve(staging)
    lap("plan")
    try:
        with watch(cfg.run.stall_timeout_s, "scoring", data_phase(cfg, "scoring", actors=cfg.score.uses_actors)):
            # on S3, making directories costs a round trip per file for nothing
            ds.write_parquet(staging_path, filesystem=fs, try_create_dir=makes_dirs(fs), **write_args)
        lap("score_and_write")
        scored, rejected, anomalies, files = _verify_and_publish(
            storage, spec, staging, out, rejects_uri,
            {"model_version": manifest["model_version"], "model_uri": model_run_uri, "input_uri": spec.uri,
             "as_of": as_of.isoformat()}, lap)
    except BaseException:
        discard_staging(storage, staging)
        raise
    return ScoreResult(out, spec.num_rows, scored, rejected, anomalies, manifest["model_version"],
                       time.perf_counter() - start, files, phases)
