"""The config sections of the data, scoring and storage: `run`, `data`, `score`, `artifacts`, `output`,
`storage`. Each is a dataclass with a docstring per field, range-checked in `__post_init__`; a problem is a
`ConfigError` naming the dotted key. The model and train sections have their own modules beside this one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from pipeline.errors import check_config as _check
from pipeline.sizing import AUTO


@dataclass
class RunSection:
    name: str = "demo"
    """Run id; artifacts go under `artifacts.uri/<run.name>/`. Letters, digits, `-`, `_`, `.` only."""
    seed: int = 0
    """Seed for weight init and data corruption; the split does not depend on it (it hashes the ids)."""
    num_cpus: Optional[int] = None
    """CPUs for a local Ray started by the job (ignored when connecting to a cluster via RAY_ADDRESS)."""
    stall_timeout_s: float = 1800.0
    """End the job (exit 2) after this long without progress in any Ray phase: prepare, training, validation,
    scoring (0: never). A job without progress says what it waits for every minute before that."""

    def __post_init__(self) -> None:
        ok = bool(self.name) and all(c.isalnum() or c in "-_." for c in self.name) and self.name[0] != "."
        _check(ok, "run.name", f"{self.name!r} must be non-empty and use only letters, digits, '-', '_', '.'")
        _check(self.num_cpus is None or self.num_cpus >= 1, "run.num_cpus", "must be >= 1")
        _check(self.stall_timeout_s >= 0, "run.stall_timeout_s", f"{self.stall_timeout_s} must be >= 0 (0: off)")


@dataclass
class DataSection:
    input: str = "data/sample"
    """URI prefix or local path of the Parquet shards (s3://bucket/prefix, other fsspec URIs, or a path)."""
    features: Union[str, list[str]] = AUTO
    """`auto` (the default): every column but the id, timestamp and excluded ones; one column of float vectors
    (list<float> or fixed_size_list<float>) by name; or a list of columns of any supported type (numeric,
    string, dictionary, boolean). A column's role comes from its Arrow type (README, Column roles)."""
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
    """Levels one-hot encoded per categorical column at most: the most frequent in training (each seen twice or
    more, none tied at the cut: stats.LevelCounts.top); rarer and unseen levels share an `other` level."""
    id_columns: Union[list[str], Literal["auto"]] = AUTO
    """Columns copied unchanged to the output; also hashed for the train/validation split; never features.
    `auto` (the default): the columns whose names mark them as keys (`id`, `user_id`, `customerId`, ...:
    pipeline.inputs.auto_ids) with integer, string or float values, else none (the split then hashes each row's
    place, its file and position: rows.row_keys; the output rows carry no key)."""
    timestamp_column: Optional[str] = AUTO
    """Event-time column copied to the output's `event_timestamp`; unset (null) means the run's as-of time.
    `auto` (the default): the input's one timestamp or date column outside the ids, the exclusions and a
    listed `features`, where it has exactly one; else unset."""
    validation_fraction: Union[float, Literal["auto"]] = AUTO
    """Share of rows held out for validation (chosen by hashing the id columns, stable across reruns). `auto`:
    10%, raised on an input under 2,560 rows to hold out about 256, up to 30% (sizing.auto_validation_fraction),
    resolved from the input's row count when the input is inspected."""
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
        _check(self.validation_fraction == AUTO or 0.0 < self.validation_fraction < 1.0, "data.validation_fraction",
               f"{self.validation_fraction} must be in (0, 1) or auto")

    @property
    def feature_columns(self) -> list[str]:
        """The feature columns; with `auto`, only known once the input's schema is read (InputSpec.data)."""
        if self.features == AUTO:
            raise ValueError("data.features: auto is resolved from the input's schema (pipeline.inputs.inspect_input)")
        return [self.features] if isinstance(self.features, str) else list(self.features)

    @property
    def ids(self) -> list[str]:
        """The id columns; with `auto`, only known once the input's schema is read (InputSpec.data)."""
        if self.id_columns == AUTO:
            raise ValueError("data.id_columns: auto is resolved from the input's schema "
                             "(pipeline.inputs.inspect_input)")
        return list(self.id_columns)

    @property
    def event_time(self) -> Optional[str]:
        """The event-time column or None; with `auto`, only known once the input's schema is read."""
        if self.timestamp_column == AUTO:
            raise ValueError("data.timestamp_column: auto is resolved from the input's schema "
                             "(pipeline.inputs.inspect_input)")
        return self.timestamp_column

    @property
    def drops_rows(self) -> bool:
        """Bad rows are skipped into a rejects table (data.nan_policy or data.missing is `drop`)."""
        return self.nan_policy == "drop" or self.missing == "drop"

    @property
    def vector_column(self) -> bool:
        """True when the features are one list-typed column rather than several scalar columns."""
        return isinstance(self.features, str) and self.features != AUTO


@dataclass
class ScoreSection:
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
    file_mb: float = 64.0
    """Smallest size of an output Parquet file (MB; the last file of a run may be smaller): fewer, larger
    files for readers. Each write task holds about this much scored data in memory."""

    def __post_init__(self) -> None:
        _check(bool(self.uri), "output.uri", "must be set")
        _check(self.top_k_features >= 0, "output.top_k_features", f"{self.top_k_features} must be >= 0")
        _check(self.file_mb > 0, "output.file_mb", f"{self.file_mb} must be > 0")


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
