"""What a scheduled (nightly) run needs: run-date partitions, incremental input, and picking a stored model.

Output layout, one committed partition per run date (rerunning a date replaces that partition only):

    <output.uri>/run_date=YYYY-MM-DD/part-*.parquet + _SUCCESS
    <output.uri>/_state/<model_version>.json     input partitions already scored by that model version
    <output.uri>/_reports/run_date=YYYY-MM-DD.html   the scoring report of that run

Incremental scoring (`score.incremental: true`) takes an input laid out as `<data.input>/<key>=<value>/…`
(Hive style, e.g. `date=2026-01-02/`). A run scores the partitions that this model version has not scored
yet, plus those it scored under the same run date (so rerunning a date gives the same partition back).
The state file is written after the output partition is published.

"latest" as a model name means the finished run (one with `model/manifest.json`) under `artifacts.uri`
whose manifest has the most recent `created_at`.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import pyarrow.fs as pafs

from pipeline.manifest import MANIFEST, model_dir
from pipeline.errors import ArtifactError, ConfigError, InputError
from pipeline.registry import registered_run_uri
from pipeline.storage import Storage
from pipeline.tracking_section import is_models_uri
from pipeline.uri import join_uri, normalize_uri

LATEST = "latest"
STATE_DIR = "_state"
REPORTS_DIR = "_reports"
_PARTITION = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=[^/]+$")


def parse_run_date(text: Optional[str]) -> dt.date:
    """`YYYY-MM-DD` -> date; None -> today in UTC (a nightly run started after midnight UTC gets its own day)."""
    if text is None:
        return dt.datetime.now(dt.timezone.utc).date()
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--run-date {text!r}: expected a date as YYYY-MM-DD") from None


def run_date_uri(output_uri: str, run_date: dt.date) -> str:
    return join_uri(normalize_uri(output_uri), f"run_date={run_date.isoformat()}")


def report_uri(output_uri: str, run_date: dt.date) -> str:
    return join_uri(normalize_uri(output_uri), REPORTS_DIR, f"run_date={run_date.isoformat()}.html")


def list_subdirs(storage: Storage, uri: str) -> list[str]:
    """Names of the directories directly under `uri` (S3: common prefixes), sorted; [] if there is none."""
    fs, path = storage.resolve(uri)
    infos = storage._wrap(uri, fs.get_file_info, pafs.FileSelector(path, recursive=False, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


# ------------------------------------------------------------------------------------------ models


def resolve_model_run(storage: Storage, artifacts_uri: str, name: str) -> str:
    """URI of the run named `name` under `artifacts_uri`, or of the latest finished run for "latest"."""
    if name != LATEST:
        run_uri = join_uri(normalize_uri(artifacts_uri), name)
        if not storage.exists(join_uri(model_dir(run_uri), MANIFEST)):
            raise ArtifactError(f"--model {name}: no finished run at {run_uri} (model/{MANIFEST} not found)")
        return run_uri
    best: Optional[tuple[str, str]] = None
    for run in list_subdirs(storage, artifacts_uri):
        run_uri = join_uri(normalize_uri(artifacts_uri), run)
        m_uri = join_uri(model_dir(run_uri), MANIFEST)
        if not storage.exists(m_uri):
            continue  # a run still training, or one that failed: never "latest"
        try:
            created = str(storage.read_json(m_uri).get("created_at", ""))
        except ValueError:
            continue
        if best is None or created > best[0]:
            best = (created, run_uri)
    if best is None:
        raise ArtifactError(f"--model latest: no finished run under {artifacts_uri} (no */model/{MANIFEST})")
    return best[1]


# ------------------------------------------------------------------------------------------ incremental


def input_partitions(input_uri: str, files: list[str]) -> dict[str, list[str]]:
    """Group input files by their first-level `key=value` directory under `input_uri`."""
    base = normalize_uri(input_uri).rstrip("/") + "/"
    out: dict[str, list[str]] = {}
    for f in files:
        rel = f[len(base):] if f.startswith(base) else f
        part = rel.split("/", 1)[0]
        if "/" not in rel or not _PARTITION.match(part):
            raise InputError(f"file {f}: not inside a key=value partition directory of {input_uri} "
                             "(score.incremental needs e.g. <input>/date=2026-01-02/part-0.parquet)")
        out.setdefault(part, []).append(f)
    return dict(sorted(out.items()))


def state_uri(output_uri: str, model_version: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", model_version)
    return join_uri(normalize_uri(output_uri), STATE_DIR, f"{safe}.json")


@dataclass
class IncrementalPlan:
    """Which input partitions this run scores, and the state it started from."""

    state_uri: str
    state: dict[str, Any]
    partitions: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[str]:
        return [f for fs in self.partitions.values() for f in fs]


def read_state(storage: Storage, uri: str, model_version: str) -> dict[str, Any]:
    if not storage.exists(uri):
        return {"model_version": model_version, "partitions": {}}
    try:
        state = storage.read_json(uri)
    except ValueError:
        raise InputError(f"state file {uri}: not valid JSON (delete it to rescore every partition)") from None
    if not isinstance(state, dict) or not isinstance(state.get("partitions"), dict):
        raise InputError(f"state file {uri}: no 'partitions' mapping (delete it to rescore every partition)")
    return state


def plan_incremental(storage: Storage, input_uri: str, files: list[str], output_uri: str, model_version: str,
                     run_date: dt.date) -> IncrementalPlan:
    """Partitions not yet scored by `model_version`, plus those it scored for this same run date."""
    s_uri = state_uri(output_uri, model_version)
    state = read_state(storage, s_uri, model_version)
    done = state["partitions"]
    plan = IncrementalPlan(s_uri, state)
    for name, part_files in input_partitions(input_uri, files).items():
        prev = done.get(name)
        if prev is None or prev.get("run_date") == run_date.isoformat():
            plan.partitions[name] = part_files
        else:
            plan.skipped.append(name)
    return plan


def record_scored(storage: Storage, plan: IncrementalPlan, run_date: dt.date, file_rows: dict[str, int]) -> None:
    """Mark the plan's partitions as scored for `run_date` (after the output partition is published)."""
    state = dict(plan.state)
    parts = dict(state.get("partitions", {}))
    for pa_name, part_files in plan.partitions.items():
        parts[pa_name] = {"run_date": run_date.isoformat(), "files": len(part_files),
                          "rows": int(sum(file_rows.get(f, 0) for f in part_files))}
    state["partitions"] = dict(sorted(parts.items()))
    state["updated_at"] = dt.datetime.now(dt.timezone.utc).isoformat()
    storage.write_json(plan.state_uri, state)


def model_run_uri(cfg, storage: Storage, model_run: Optional[str]) -> str:
    """The run whose model/ scoring loads: this config's run, a run.name or "latest" under artifacts.uri, or a
    registered version (`models:/NAME/VERSION`, `models:/NAME@ALIAS`: the artifact it was registered from)."""
    if is_models_uri(model_run):
        return registered_run_uri(cfg.tracking.resolved_uri()[0], storage, model_run)
    return resolve_model_run(storage, cfg.artifacts.uri, model_run) if model_run else cfg.run_uri
