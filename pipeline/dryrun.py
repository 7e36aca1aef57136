"""The dry run: check what a job would touch (config, storage access, input footers, the model's features)
without Ray, without torch, and without writing anything but probe files."""

from __future__ import annotations

import datetime as dt
from typing import Optional

from pipeline.config import Config
from pipeline.inputs import input_notes, inspect_input
from pipeline.manifest import read_manifest
from pipeline.preflight import check_features_match, for_model
from pipeline.schedule import model_run_uri, parse_run_date, plan_incremental, run_date_uri
from pipeline.storage import Storage


def dry_run(cfg: Config, storage: Optional[Storage] = None, model_run: Optional[str] = None,
            train: bool = True, run_date: Optional[dt.date] = None) -> list[str]:
    """Check what a run would touch, without Ray and without writing anything but probe files.

    Config (already validated on load), write access to artifacts.uri and output.uri, every input footer,
    and with `model_run` (or `train=False`) the model and its feature list. Returns the lines it printed.
    """
    storage = storage or Storage(cfg.storage)
    run_date = run_date or parse_run_date(None)
    lines = [f"config ok: run {cfg.run.name}, model {cfg.model.kind}"]
    for uri in (cfg.run_uri, cfg.output.uri):
        storage.check_writable(uri)
        lines.append(f"storage ok: {uri} is writable")
    spec = inspect_input(cfg.data, storage)
    held = f", {spec.data.validation_fraction:.0%} held out for validation" if train else ""
    lines.append(f"input ok: {spec.uri}: {spec.num_rows} rows in {len(spec.files)} files, "
                 f"{spec.num_features} features{held}")
    lines += [f"input: {note}" for note in input_notes(cfg.data, spec)]
    if model_run or not train:
        run_uri = model_run_uri(cfg, storage, model_run)
        manifest = read_manifest(storage, run_uri)
        spec = inspect_input(for_model(cfg, manifest).data, storage)
        check_features_match(manifest, spec)
        lines.append(f"model ok: {manifest['model_version']} ({run_uri}) matches the input's features")
        if cfg.score.incremental:
            plan = plan_incremental(storage, spec.uri, spec.files, cfg.output.uri, manifest["model_version"],
                                    run_date)
            lines.append(f"incremental: {len(plan.partitions)} partitions to score, {len(plan.skipped)} done")
    lines.append(f"output: {run_date_uri(cfg.output.uri, run_date)}")
    for line in lines:
        print(f"[dry-run] {line}", flush=True)
    return lines
