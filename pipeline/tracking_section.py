"""The `tracking` config section and the MLflow URIs the jobs read: a tracking store and `models:/` references.

    tracking:
      uri: http://mlflow.internal:5000     # else MLFLOW_TRACKING_URI; neither: nothing is tracked
      experiment: nightly-anomalies        # default: run.name
      registered_model: transactions-ae    # register every finished training run as a new version

A leaf module (no MLflow import): the config loads and checks this section on machines without MLflow.
Credentials never go in a URI here: MLflow reads them from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD
/ MLFLOW_TRACKING_TOKEN, and a URI carrying them would end up in logs and params.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlsplit, urlunsplit

from pipeline.errors import ConfigError
from pipeline.errors import check_config as _check

ENV_URI = "MLFLOW_TRACKING_URI"
MODELS_SCHEME = "models:/"
# MLflow accepts more, but `/` and `@` would make `models:/NAME/VERSION` and `models:/NAME@ALIAS` ambiguous
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks")


@dataclass
class TrackingSection:
    uri: Optional[str] = None
    """MLflow tracking server or store: http(s)://host:port, sqlite:///mlflow.db, postgresql://…, databricks.
    Unset: MLFLOW_TRACKING_URI; neither: the job tracks nothing. Set here, an unreachable server stops the job
    before training (exit 2); from the environment, it is a warning and the job runs untracked."""
    experiment: Optional[str] = None
    """MLflow experiment the runs go to; unset: the run.name."""
    registered_model: Optional[str] = None
    """Register each finished training run as a new version of this model (letters, digits, `-`, `_`, `.`);
    unset: runs are tracked, not registered."""

    def __post_init__(self) -> None:
        if self.uri is not None:
            check_tracking_uri(self.uri, "tracking.uri")
        _check(self.experiment is None or bool(self.experiment.strip()), "tracking.experiment", "must not be empty")
        if self.registered_model is not None:
            _check(bool(_NAME.match(self.registered_model)), "tracking.registered_model",
                   f"{self.registered_model!r} must use only letters, digits, '-', '_', '.'")

    def resolved_uri(self) -> tuple[Optional[str], bool]:
        """(the tracking URI, whether it was set in the config rather than taken from MLFLOW_TRACKING_URI)."""
        if self.uri:
            return self.uri, True
        env = os.environ.get(ENV_URI, "").strip()
        if env:
            check_tracking_uri(env, ENV_URI)
            return env, False
        return None, False


def check_tracking_uri(uri: str, key: str) -> None:
    """A store MLflow can open, with no credentials in it; the ConfigError names `key` and never echoes a secret."""
    parts = urlsplit(uri)
    scheme = "databricks" if uri == "databricks" else parts.scheme.split("+", 1)[0]  # postgresql+psycopg2://
    where = f"environment {key}" if key.startswith("MLFLOW") else f"config {key}"

    def fail(msg: str) -> ConfigError:
        return ConfigError(f"{where}: {msg}")

    if scheme not in _SCHEMES:
        raise fail(f"{redact_uri(uri)!r} is not an MLflow tracking URI ({', '.join(s + '://' for s in _SCHEMES)})")
    if parts.password is not None or (parts.username is not None and scheme in ("http", "https")):
        raise fail(f"{redact_uri(uri)!r} carries credentials; put them in MLFLOW_TRACKING_USERNAME and "
                   "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead")
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise fail(f"{uri!r} has no host")
        if parts.query:
            raise fail(f"{redact_uri(uri)!r}: no query string (tokens go in MLFLOW_TRACKING_TOKEN)")


def redact_uri(uri: str) -> str:
    """`uri` without its user info and query (what a log line may show)."""
    parts = urlsplit(uri)
    if not parts.netloc:
        return uri.split("?", 1)[0]
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    if parts.username is not None or parts.password is not None:
        host = f"***@{host}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


@dataclass(frozen=True)
class ModelRef:
    """A registered model version, by number (`models:/NAME/3`) or by alias (`models:/NAME@champion`)."""

    name: str
    version: Optional[int] = None
    alias: Optional[str] = None

    @property
    def uri(self) -> str:
        return f"{MODELS_SCHEME}{self.name}/{self.version}" if self.version is not None \
            else f"{MODELS_SCHEME}{self.name}@{self.alias}"


def is_models_uri(text: Optional[str]) -> bool:
    return bool(text) and text.startswith(MODELS_SCHEME)


def parse_models_uri(text: str) -> ModelRef:
    """`models:/NAME/VERSION` or `models:/NAME@ALIAS` -> ModelRef; anything else is a one-line error."""
    usage = f"--model {text!r}: expected models:/NAME/VERSION or models:/NAME@ALIAS"
    if not is_models_uri(text):
        raise ConfigError(usage)
    rest = text[len(MODELS_SCHEME):]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        if not _NAME.match(name) or not _NAME.match(alias):
            raise ConfigError(usage)
        return ModelRef(name, alias=alias)
    name, _, version = rest.partition("/")
    if not _NAME.match(name) or not version.isdigit() or int(version) < 1:
        raise ConfigError(usage + (" (VERSION is a number from 1; 'latest' is not: use an alias)"
                                   if version == "latest" else ""))
    return ModelRef(name, version=int(version))
