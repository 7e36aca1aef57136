"""Typed, validated job configuration loaded from YAML with dotted `--set key=value` overrides.

    cfg = load_config("jobs/configs/demo.yaml", ["train.epochs=5", "model.hidden_dims=[64,32]"])

Every section is a dataclass with a docstring per field; values are type-checked on load and range-checked
in `__post_init__`. Any problem is a `ConfigError` whose message names the dotted key.
Credentials never live here: they come from the standard AWS chain (env, profile, instance role).
Loads without torch (tests/test_layers.py checks it).

    pipeline/config/sections.py   run, data, score, artifacts, output, storage
    pipeline/config/model.py      model (the shared settings and each kind's own, from pipeline/kinds/)
    pipeline/config/training.py   train
    pipeline/config/load.py       YAML, overrides, type checks
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config.load import build, parse_override, read_tree
from pipeline.config.model import ModelSection, SharedModelSection, model_section
from pipeline.config.sections import (ArtifactsSection, DataSection, OutputSection, RunSection, ScoreSection,
                                      StorageSection)
from pipeline.config.training import TrainSection
from pipeline.errors import ConfigError
from pipeline.errors import check_config as _check
from pipeline.kinds import kinds_with
from pipeline.sizing import AUTO
from pipeline.tracking_section import TrackingSection
from pipeline.uri import join_uri

__all__ = ["AUTO", "ArtifactsSection", "Config", "DataSection", "ModelSection", "OutputSection", "RunSection",
           "ScoreSection", "SharedModelSection", "StorageSection", "TrainSection", "config_from_dict",
           "load_config", "model_section", "parse_override"]


@dataclass
class Config:
    """The whole job's config: one field per section, and the checks that span sections."""

    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    score: ScoreSection = field(default_factory=ScoreSection)
    artifacts: ArtifactsSection = field(default_factory=ArtifactsSection)
    output: OutputSection = field(default_factory=OutputSection)
    storage: StorageSection = field(default_factory=StorageSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)

    def __post_init__(self) -> None:
        m, t = self.model, self.train
        trainable = " or ".join(kinds_with("algorithms", t.algorithm))
        _check(t.algorithm in m.spec.algorithms, "model.kind", f"{m.kind}: train.algorithm {t.algorithm} trains "
               f"kind {trainable} only (kind {m.kind} trains with {' or '.join(m.spec.algorithms)})")
        if t.algorithm == "recirculation":  # the rule's own limits (pipeline/recirculation.py): one layer, one model
            _check(m.ensemble in (1, AUTO), "model.ensemble",
                   f"{m.ensemble}: train.algorithm recirculation trains one model (set model.ensemble: 1)")
            _check(m.hidden_dims in ([], AUTO), "model.hidden_dims",
                   f"{m.hidden_dims}: recirculation trains one hidden layer (the code); set model.hidden_dims: []")
        pretraining = m.pretrain_epochs_total
        if pretraining and t.epochs != AUTO:  # auto: sizing.step_budget leaves room for fine-tuning
            _check(t.epochs > pretraining, "train.epochs",
                   f"{t.epochs} leaves no fine-tuning after the {pretraining} pretraining epochs of kind {m.kind}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def run_uri(self) -> str:
        """`artifacts.uri/<run.name>`: the run's model, checkpoints and report."""
        return join_uri(self.artifacts.uri, self.run.name)


def config_from_dict(raw: dict[str, Any]) -> Config:
    try:
        return build(Config, raw, "")
    except TypeError as e:  # pragma: no cover - dataclass signature mismatch would be a bug
        raise ConfigError(f"config: {e}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load YAML at `path` (or defaults), apply dotted overrides, validate everything."""
    return config_from_dict(read_tree(path, overrides))
