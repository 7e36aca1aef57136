"""Typed, validated job configuration loaded from YAML with dotted `--set key=value` overrides.

    cfg = load_config("jobs/configs/demo.yaml", ["train.epochs=5", "model.hidden_dims=[64,32]"])

Every section is a dataclass with a docstring per field; values are type-checked on load and range-checked
in `__post_init__`. Any problem is a `ConfigError` whose message names the dotted key.
Credentials never live here: they come from the standard AWS chain (env, profile, instance role).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from pipeline.errors import ConfigError
from pipeline.errors import check_config as _check
from pipeline.kinds import KINDS
from pipeline.kinds.spec import KindSpec
from pipeline.models import AUTO
from pipeline.tracking_section import TrackingSection
from pipeline.uri import join_uri


@dataclass
class RunSection:
    name: str = "demo"
    """Run id; artifacts go under `artifacts.uri/<run.name>/`. Letters, digits, `-`, `_`, `.` only."""
    seed: int = 0
    """Seed for weight init and data corruption; the split does not depend on it (it hashes the ids)."""
    num_cpus: Optional[int] = None
    """CPUs for a local Ray started by the job (ignored when connecting to a cluster via RAY_ADDRESS)."""

    def __post_init__(self) -> None:
        ok = bool(self.name) and all(c.isalnum() or c in "-_." for c in self.name) and self.name[0] != "."
        _check(ok, "run.name", f"{self.name!r} must be non-empty and use only letters, digits, '-', '_', '.'")
        _check(self.num_cpus is None or self.num_cpus >= 1, "run.num_cpus", "must be >= 1")


@dataclass
class DataSection:
    input: str = "data/sample"
    """URI prefix or local path of the Parquet shards (s3://bucket/prefix, other fsspec URIs, or a path)."""
    features: Union[str, list[str]] = "features"
    """One column of float vectors (list<float> or fixed_size_list<float>); a list of columns of any supported
    type (numeric, string, dictionary, boolean); or `auto`: every column but the id, timestamp and excluded
    ones. A column's role comes from its Arrow type (README, Column roles)."""
    exclude_columns: list[str] = field(default_factory=list)
    """With `features: auto`: columns that are not features either (labels, free text, raw timestamps)."""
    categorical_columns: list[str] = field(default_factory=list)
    """Integer columns to take as categories (codes) rather than numbers; strings, dictionaries and booleans
    are categorical anyway."""
    missing: Literal["impute", "error", "drop"] = "impute"
    """Nulls (and NaN in float columns) in scalar feature columns: `impute` fills a numeric one with its training
    mean and adds a missing-indicator input where training saw any, and gives a categorical its own `missing`
    level; `error` stops the job; `drop` skips the row (counted, written to the rejects table)."""
    max_categories: int = 64
    """Levels one-hot encoded per categorical column: the most frequent in training; rarer and unseen levels
    share an `other` level."""
    id_columns: list[str] = field(default_factory=lambda: ["id"])
    """Columns copied unchanged to the output; also hashed for the train/validation split."""
    timestamp_column: Optional[str] = None
    """Event-time column copied to the output's `event_timestamp`; unset means the run's as-of time."""
    validation_fraction: float = 0.1
    """Share of rows held out for validation (chosen by hashing the id columns, stable across reruns)."""
    nan_policy: Literal["error", "drop"] = "error"
    """Rows with infinite features (and NaN in a vector column): `error` stops the job; `drop` counts them and
    writes a rejects table. NaN and nulls in scalar columns follow `data.missing`."""

    def __post_init__(self) -> None:
        _check(bool(self.input), "data.input", "must be set")
        if isinstance(self.features, list):
            _check(len(self.features) > 0, "data.features", "an empty list of columns")
            _check(len(set(self.features)) == len(self.features), "data.features", "duplicate column names")
        _check(self.max_categories >= 1, "data.max_categories", f"{self.max_categories} must be >= 1")
        if isinstance(self.features, list):
            stray = [c for c in self.categorical_columns if c not in self.features]
            _check(not stray, "data.categorical_columns", f"{stray} are not in data.features")
        _check(0.0 < self.validation_fraction < 1.0, "data.validation_fraction",
               f"{self.validation_fraction} must be in (0, 1)")

    @property
    def feature_columns(self) -> list[str]:
        """The feature columns; with `auto`, only known once the input's schema is read (InputSpec.data)."""
        if self.features == AUTO:
            raise ValueError("data.features: auto is resolved from the input's schema (pipeline.data.inspect_input)")
        return [self.features] if isinstance(self.features, str) else list(self.features)

    @property
    def drops_rows(self) -> bool:
        """Bad rows are skipped into a rejects table (data.nan_policy or data.missing is `drop`)."""
        return self.nan_policy == "drop" or self.missing == "drop"

    @property
    def vector_column(self) -> bool:
        """True when the features are one list-typed column rather than several scalar columns."""
        return isinstance(self.features, str) and self.features != AUTO


@dataclass
class SharedModelSection:
    """The `model` settings every kind shares. `ModelSection` (below) adds each registered kind's own settings
    (declared, documented and range-checked in its module under pipeline/kinds/) as flat `model.<setting>` keys.
    A kind ignores the others' settings (their ranges are still checked), so `--set model.kind=...` alone
    switches kinds."""

    kind: str = "dense"
    """Which autoencoder (a kind registered in pipeline/kinds/); see the README's table of kinds."""
    hidden_dims: Union[list[int], Literal["auto"]] = AUTO
    """Widths of the encoder's hidden layers, input side first; the decoder mirrors them. `auto`: one layer,
    sized from the input's width and rows (pipeline/sizing.py); the manifest records the widths chosen."""
    latent_dim: Union[int, Literal["auto"]] = AUTO
    """Width of the code h = f(x); smaller than the input for an undercomplete model. `auto`: about a quarter
    of the input width (1 to 32), recorded in the manifest."""
    activation: Literal["relu", "gelu", "tanh", "sigmoid", "linear"] = "gelu"
    """Nonlinearity between layers; `linear` with MSE learns the PCA subspace."""
    dropout: float = 0.0
    """Dropout after each hidden layer while training."""
    code_activation: Optional[Literal["relu", "gelu", "tanh", "sigmoid", "linear"]] = None
    """Nonlinearity on the code itself; unset: linear, except sparse (relu for l1, sigmoid for kl)."""
    score: Literal["calibrated", "recon", "elbo"] = "calibrated"
    """The anomaly score. `calibrated`: each feature's squared error over its validation mean, plus the code's
    squared distance from the validation codes in standard deviations, plus mean squared error over its
    validation mean, plus the code's distance to its nearest sampled validation codes (pipeline/calibration.py);
    `recon`: mean squared reconstruction error; `elbo` (variational only): -ELBO. A variational code is its
    posterior mean."""
    ensemble: Union[int, Literal["auto"]] = AUTO
    """Models of the kind trained side by side in the same job (one optimizer, each from its own random
    start) whose scores are averaged; `latent` is the first one's code. `auto`: 5 with backprop, 1 with
    recirculation (pipeline/sizing.py); the manifest records the count."""
    member_latent_dims: Union[list[int], Literal["auto"]] = AUTO
    """Each ensemble member's code width, member 0 (whose code is `latent`) first. `auto`: with `latent_dim:
    auto`, the members' codes spread from an eighth to half of the input width around member 0's quarter
    (pipeline/sizing.py); with an explicit `latent_dim`, every member that width. Recorded in the manifest."""

    def __post_init__(self) -> None:
        _check(self.kind in KINDS, "model.kind", f"{self.kind!r} is not one of {', '.join(KINDS)}")
        _check(self.latent_dim == AUTO or self.latent_dim >= 1, "model.latent_dim", f"{self.latent_dim} must be >= 1")
        _check(self.hidden_dims == AUTO or all(h >= 1 for h in self.hidden_dims), "model.hidden_dims",
               "widths must be >= 1")
        _check(self.ensemble == AUTO or self.ensemble >= 1, "model.ensemble", f"{self.ensemble} must be >= 1")
        _check(self.member_latent_dims == AUTO or (len(self.member_latent_dims) >= 1
                                                   and all(w >= 1 for w in self.member_latent_dims)),
               "model.member_latent_dims", "widths must be >= 1 (one per ensemble member)")
        _check(self.member_latent_dims == AUTO or self.ensemble == AUTO
               or len(self.member_latent_dims) == self.ensemble, "model.member_latent_dims",
               f"{self.member_latent_dims} has not one width per model (model.ensemble: {self.ensemble})")
        _check(AUTO in (self.member_latent_dims, self.latent_dim) or self.member_latent_dims[0] == self.latent_dim,
               "model.member_latent_dims", f"{self.member_latent_dims}: the first is member 0's code, "
               f"model.latent_dim {self.latent_dim}")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", f"{self.dropout} must be in [0, 1)")
        _check(self.score != "elbo" or self.kind == "variational", "model.score",
               f"elbo is the variational kind's score, not {self.kind}'s; use calibrated or recon")
        for spec in KINDS.values():
            spec.settings_from(vars(self))  # range checks of every kind's settings, in its settings dataclass
        self.spec.check(self)

    @property
    def spec(self) -> KindSpec:
        """The kind's spec: its model class, settings dataclass and training hooks."""
        return KINDS[self.kind]

    @property
    def kind_settings(self) -> Any:
        """The kind's own settings dataclass, as its model receives it."""
        return self.spec.settings_from(vars(self))

    @property
    def pretrain_epochs_total(self) -> int:
        """Epochs before the whole model trains (stacked: one stage per layer pair); 0 for most kinds."""
        return self.spec.pretrain_epochs(self)

    def check_features(self, n_features: int) -> None:
        """Constraints that need the input width: an undercomplete kind's code must be narrower than the input."""
        if not self.spec.undercomplete:
            return
        wider = ", ".join(k for k, s in KINDS.items() if not s.undercomplete)
        if self.latent_dim != AUTO:
            _check(self.latent_dim < n_features, "model.latent_dim",
                   f"{self.latent_dim} must be < the {n_features} input features for kind {self.kind} "
                   f"(undercomplete); {wider} allow a wider code")
        if self.member_latent_dims != AUTO:
            _check(max(self.member_latent_dims) < n_features, "model.member_latent_dims",
                   f"{self.member_latent_dims}: each must be < the {n_features} input features for kind "
                   f"{self.kind} (undercomplete); {wider} allow a wider code")


def _model_section() -> type:
    """SharedModelSection plus every registered kind's settings fields (same names, types and defaults)."""
    extra = []
    for spec in KINDS.values():
        hints = typing.get_type_hints(spec.settings)
        for f in dataclasses.fields(spec.settings):
            extra.append((f.name, hints[f.name], field(default=f.default, default_factory=f.default_factory)))
    cls = dataclasses.make_dataclass("ModelSection", extra, bases=(SharedModelSection,))
    cls.__module__ = __name__  # pickled by reference (Ray ships configs to workers)
    cls.__doc__ = "The `model` section: the shared settings and, flat beside them, each kind's own."
    return cls


ModelSection = _model_section()


@dataclass
class TrainSection:
    epochs: Union[int, Literal["auto"]] = AUTO
    """Maximum passes over the training data (early stopping may end sooner). `auto`: 20, and on a small
    table enough to reach train.steps (the batch size is lowered first); a number is a hard limit."""
    steps: int = 2000
    """With epochs `auto`: optimizer steps per worker the run aims for; a small table gets smaller batches
    (down to 16 rows) and then more epochs until it reaches them. 0: 20 epochs, no step budget."""
    batch_size: int = 1024
    """Rows per minibatch per worker; lowered on small tables (>= 20 steps an epoch, and train.steps)."""
    lr: float = 1e-3
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    trim_fraction: float = 0.1
    """Robust training (backprop): each step leaves out this share of its batch, the rows the model
    reconstructs worst, so the anomalies inside the training data pull the model less (0: every row)."""
    num_workers: int = 1
    """Data-parallel training workers (one process each; one GPU each with use_gpu)."""
    min_workers: Optional[int] = None
    """Elastic training: start with as many workers as fit between this and num_workers, and after losing a
    node go on from the last checkpoint with fewer (never below this) instead of waiting for its resources;
    unset means exactly num_workers. GPU workers only (use_gpu): CPU workers would take the CPUs Ray Data
    needs."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per training worker; keep some free for Ray Data to feed them."""
    use_gpu: bool = False
    """Train on GPUs (one per worker), with bf16 mixed precision."""
    patience: int = 3
    """Early stopping: epochs without a validation improvement before stopping."""
    min_delta: float = 1e-4
    """Early stopping: relative improvement of validation loss that counts."""
    max_failures: int = 2
    """Times Ray Train restarts the workers from the last checkpoint after a failure."""
    algorithm: Literal["backprop", "recirculation"] = "backprop"
    """Learning rule: gradient descent on the loss, or recirculation (one hidden layer, no backward pass)."""
    shuffle_buffer_rows: int = 0
    """Rows in each worker's local shuffle buffer (0: block order is randomized, rows are not)."""
    recirculation_lambda: float = 0.75
    """recirculation: regression factor; the second visible state is lambda * x + (1 - lambda) * g(f(x))."""
    stall_timeout_s: float = 1800.0
    """End the job (exit 2) after this long without progress in any Ray phase: prepare, training, validation,
    scoring (0: never). A job without progress says what it waits for every minute before that."""
    cache_fraction: float = 0.25
    """Read the training and validation splits once and run later epochs from the training workers' memory
    (every row reshuffled each epoch) when their size (rows x features x 4 bytes, from the Parquet footers)
    is at most this share of Ray's object store; otherwise re-read the input each epoch. 0: always stream."""
    checkpoint_every: int = 0
    """Write a checkpoint every this many epochs; 0: by time instead (train.checkpoint_interval_s). The last
    epoch and the early-stopping epoch always get one, and each carries the best weights so far. A failure
    resumes from the newest checkpoint and redoes the epochs since."""
    checkpoint_interval_s: float = 60.0
    """With train.checkpoint_every 0: checkpoint after the first epoch that ends this many seconds after the
    previous checkpoint (or the run's start). On a small table that is just the last epoch: no per-epoch
    checkpoint and report cost."""

    def __post_init__(self) -> None:
        _check(self.epochs == AUTO or self.epochs >= 1, "train.epochs", f"{self.epochs} must be >= 1")
        _check(self.steps >= 0, "train.steps", f"{self.steps} must be >= 0")
        _check(self.batch_size >= 1, "train.batch_size", f"{self.batch_size} must be >= 1")
        _check(self.lr > 0, "train.lr", f"{self.lr} must be > 0")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(0.0 <= self.trim_fraction < 1.0, "train.trim_fraction", f"{self.trim_fraction} must be in [0, 1)")
        _check(self.num_workers >= 1, "train.num_workers", f"{self.num_workers} must be >= 1")
        _check(self.min_workers is None or 1 <= self.min_workers <= self.num_workers, "train.min_workers",
               f"{self.min_workers} must be between 1 and train.num_workers ({self.num_workers})")
        # Measured on a 3-node loopback cluster (tests/test_multinode.py's setup): after a node loss Ray
        # Train's elastic policy restarted as many CPU workers as the remaining CPUs held and Ray Data's read
        # tasks waited for a CPU forever. With GPU workers the GPUs bound the group and the CPUs stay free.
        _check(self.min_workers is None or self.min_workers == self.num_workers or self.use_gpu,
               "train.min_workers", "elastic training needs train.use_gpu: with CPU workers Ray Train's restart "
               "takes every CPU the remaining nodes have and leaves Ray Data none to read the input")
        _check(self.cpus_per_worker > 0, "train.cpus_per_worker", "must be > 0")
        _check(self.patience >= 1, "train.patience", "must be >= 1")
        _check(self.min_delta >= 0, "train.min_delta", "must be >= 0")
        _check(self.max_failures >= 0, "train.max_failures", "must be >= 0")
        _check(self.shuffle_buffer_rows >= 0, "train.shuffle_buffer_rows", "must be >= 0")
        _check(0.0 <= self.cache_fraction <= 1.0, "train.cache_fraction", f"{self.cache_fraction} must be in [0, 1]")
        _check(self.checkpoint_every >= 0, "train.checkpoint_every", f"{self.checkpoint_every} must be >= 0")
        _check(self.checkpoint_interval_s > 0, "train.checkpoint_interval_s",
               f"{self.checkpoint_interval_s} must be > 0")
        _check(0.0 <= self.recirculation_lambda < 1.0, "train.recirculation_lambda",
               f"{self.recirculation_lambda} must be in [0, 1)")
        _check(self.stall_timeout_s >= 0, "train.stall_timeout_s", f"{self.stall_timeout_s} must be >= 0 (0: off)")


@dataclass
class ScoreSection:
    threshold_quantile: float = 0.99
    """Anomaly threshold: this quantile of the validation reconstruction errors."""
    batch_size: int = 4096
    """Rows per scoring batch."""
    concurrency: int = 1
    """Scoring workers at once (tasks or actors; each loads the model once)."""
    cpus_per_actor: float = 1.0
    """CPUs (and torch threads) per scoring worker, task or actor."""
    use_gpu: bool = False
    """Score on GPUs (one per actor)."""
    compute: str = "auto"
    """`tasks`: read, score and write fused into one Ray task per file (CPU); `actors`: an actor pool that
    keeps the model loaded, fed by separate read and write tasks (needed for GPUs); `auto`: actors with
    use_gpu, else tasks."""
    incremental: bool = False
    """Input is partitioned (`<data.input>/<key>=<value>/`): score only partitions this model has not scored."""

    def __post_init__(self) -> None:
        _check(0.0 < self.threshold_quantile < 1.0, "score.threshold_quantile", "must be in (0, 1)")
        _check(self.batch_size >= 1, "score.batch_size", "must be >= 1")
        _check(self.concurrency >= 1, "score.concurrency", "must be >= 1")
        _check(self.cpus_per_actor > 0, "score.cpus_per_actor", "must be > 0")
        _check(self.compute in ("auto", "tasks", "actors"), "score.compute", "must be auto, tasks or actors")
        _check(not (self.use_gpu and self.compute == "tasks"), "score.compute",
               "must be actors (or auto) with score.use_gpu: a GPU model stays loaded in an actor")

    @property
    def uses_actors(self) -> bool:
        return self.compute == "actors" or (self.compute == "auto" and self.use_gpu)


@dataclass
class ArtifactsSection:
    uri: str = "artifacts"
    """Where models and checkpoints go: `<uri>/<run.name>/`."""

    def __post_init__(self) -> None:
        _check(bool(self.uri), "artifacts.uri", "must be set")


@dataclass
class OutputSection:
    uri: str = "output"
    """Where scored Parquet goes: `<uri>/run_date=YYYY-MM-DD/`, each with a `_SUCCESS` file written last."""
    flat_latent: bool = False
    """Also write the latent code as float32 columns `z_0 … z_{k-1}`, for feature stores without array types."""
    feature_errors: bool = False
    """Also write `feature_errors`, list<float32>: each feature's squared error (normalized), in input order."""
    top_k_features: int = 0
    """Also write `top_features`, list<string>: the k features with the largest error per row (0: off)."""

    def __post_init__(self) -> None:
        _check(bool(self.uri), "output.uri", "must be set")
        _check(self.top_k_features >= 0, "output.top_k_features", f"{self.top_k_features} must be >= 0")


@dataclass
class StorageSection:
    endpoint_url: Optional[str] = None
    """S3-compatible endpoint (e.g. http://127.0.0.1:9000); AWS_ENDPOINT_URL works too."""
    region: Optional[str] = None
    """S3 region; defaults to AWS_REGION / AWS_DEFAULT_REGION, then us-east-1."""
    retries: int = 3
    """Attempts for transient storage errors before failing."""
    connect_timeout_s: float = 5.0
    """Seconds to wait for a connection before calling the endpoint unreachable."""
    shared_local_paths: bool = False
    """Local paths (data.input, artifacts.uri, output.uri) are one shared filesystem (NFS, a mounted volume)
    on every node; without it a multi-node cluster refuses them (each node would write to its own disk)."""

    def __post_init__(self) -> None:
        if self.endpoint_url is not None:
            _check(self.endpoint_url.startswith(("http://", "https://")), "storage.endpoint_url",
                   f"{self.endpoint_url!r} must start with http:// or https://")
        _check(self.retries >= 1, "storage.retries", "must be >= 1")
        _check(self.connect_timeout_s > 0, "storage.connect_timeout_s", "must be > 0")


@dataclass
class Config:
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
        if t.algorithm == "recirculation":
            _check(m.kind == "dense", "model.kind",
                   f"{m.kind}: train.algorithm recirculation trains a dense autoencoder with one hidden layer")
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


# ---------------------------------------------------------------------------------------------- loading


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless (int -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        words = [w for a in args if typing.get_origin(a) is Literal for w in typing.get_args(a)]
        if words and len(errors) == 2:  # a number or list, or a word like `auto`: the number's message
            raise ConfigError(f"{errors[0] if typing.get_origin(args[0]) is not Literal else errors[1]} "
                              f"(or {', '.join(map(str, words))})")
        raise ConfigError(f"config {key}: {value!r} is not a valid value ({_type_name(tp)})")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config {key}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config {key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config {key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config {key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config {key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config {key}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise ConfigError(f"config {key}: unsupported type {tp}")  # pragma: no cover - a bug, not user input


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {prefix}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else str(k)
            raise ConfigError(f"config {where}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in raw.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config {dotted}: {p} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`key.sub=value` with the value parsed as YAML (so `[64,32]`, `true`, `1e-3` work)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse {raw!r} as YAML ({e.__class__.__name__})") from None
    return key, value


def config_from_dict(raw: dict[str, Any]) -> Config:
    return _build(Config, raw, "")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load YAML at `path` (or defaults), apply dotted overrides, validate everything."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p}: not found")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"config file {p}{where}: invalid YAML") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping")
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    try:
        return config_from_dict(tree)
    except TypeError as e:  # pragma: no cover - dataclass signature mismatch would be a bug
        raise ConfigError(f"config: {e}") from None
