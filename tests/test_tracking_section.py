"""The `tracking` config section, the MLflow URIs the jobs read, and the pure parts of tracking and promotion:
no MLflow server, no Ray."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.registry import check_candidate
from pipeline.tracking import flatten, resolved_params
from pipeline.tracking_section import ModelRef, TrackingSection, check_tracking_uri, parse_models_uri, redact_uri


@pytest.mark.parametrize("text, ref", [
    ("models:/fraud-ae/3", ModelRef("fraud-ae", version=3)),
    ("models:/fraud_ae.v2@champion", ModelRef("fraud_ae.v2", alias="champion")),
    ("models:/m@challenger-1", ModelRef("m", alias="challenger-1")),
])
def test_models_uri_parses_versions_and_aliases(text, ref):
    assert parse_models_uri(text) == ref
    assert ref.uri == text


@pytest.mark.parametrize("text", ["models:/", "models:/m", "models:/m/0", "models:/m/-1", "models:/m/x",
                                  "models:/m@", "models:/@champion", "models:/m/1/2", "models:/a/b@c",
                                  "models:m/1", "runs:/abc/model", "demo"])
def test_models_uri_refuses_anything_else_in_one_line(text):
    with pytest.raises(ConfigError, match=r"expected models:/NAME/VERSION or models:/NAME@ALIAS") as e:
        parse_models_uri(text)
    assert "\n" not in str(e.value)


def test_models_uri_latest_is_pointed_at_aliases():
    with pytest.raises(ConfigError, match="use an alias"):
        parse_models_uri("models:/m/latest")


@pytest.mark.parametrize("uri", ["http://127.0.0.1:5000", "https://mlflow.example.com", "sqlite:///mlflow.db",
                                 "postgresql+psycopg2://db/mlflow", "databricks", "file:///tmp/mlruns"])
def test_tracking_uri_accepts_mlflow_stores(uri):
    check_tracking_uri(uri, "tracking.uri")
    assert TrackingSection(uri=uri).resolved_uri() == (uri, True)


@pytest.mark.parametrize("uri", ["https://alice:hunter2-secret@mlflow.example.com",
                                 "postgresql://bob:hunter2-secret@db/mlflow"])
def test_tracking_uri_with_credentials_is_refused_without_echoing_them(uri):
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_USERNAME") as e:
        load_config(None, [f"tracking.uri={uri}"])
    assert "hunter2-secret" not in str(e.value) and str(e.value).startswith("config tracking.uri:")


def test_tracking_uri_with_a_token_in_the_query_is_refused():
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_TOKEN") as e:
        check_tracking_uri("https://mlflow.example.com/?token=hunter2-secret", "tracking.uri")
    assert "hunter2-secret" not in str(e.value)


@pytest.mark.parametrize("uri, key", [("s3://bucket/mlruns", "tracking.uri"), ("http://", "tracking.uri"),
                                      ("ftp://host", "MLFLOW_TRACKING_URI")])
def test_tracking_uri_that_is_no_store_names_its_source(uri, key):
    with pytest.raises(ConfigError, match=r"^(config tracking\.uri|environment MLFLOW_TRACKING_URI):"):
        check_tracking_uri(uri, key)


def test_redact_uri_drops_user_info_and_query():
    assert redact_uri("https://u:p@host:8443/x?token=t") == "https://***@host:8443/x"
    assert redact_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert redact_uri("sqlite:///mlflow.db") == "sqlite:///mlflow.db"


def test_section_defaults_track_nothing(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config("jobs/configs/demo.yaml")
    assert cfg.tracking == TrackingSection()
    assert cfg.tracking.resolved_uri() == (None, False)


def test_section_falls_back_to_the_environment_and_the_config_wins(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert TrackingSection().resolved_uri() == ("http://127.0.0.1:5999", False)
    assert TrackingSection(uri="sqlite:///x.db").resolved_uri() == ("sqlite:///x.db", True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://u:secret-pw@host")
    with pytest.raises(ConfigError, match="^environment MLFLOW_TRACKING_URI:") as e:
        TrackingSection().resolved_uri()
    assert "secret-pw" not in str(e.value)


def test_section_loads_from_yaml_overrides_and_checks_its_keys():
    cfg = load_config(None, ["tracking.uri=http://127.0.0.1:5000", "tracking.experiment=nightly",
                             "tracking.registered_model=fraud-ae"])
    assert (cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.registered_model) == \
        ("http://127.0.0.1:5000", "nightly", "fraud-ae")
    assert cfg.to_dict()["tracking"]["registered_model"] == "fraud-ae"
    with pytest.raises(ConfigError, match=r"config tracking\.server: unknown key"):
        load_config(None, ["tracking.server=x"])
    with pytest.raises(ConfigError, match=r"config tracking\.registered_model: 'a/b'"):
        load_config(None, ["tracking.registered_model=a/b"])
    with pytest.raises(ConfigError, match=r"config tracking\.experiment: must not be empty"):
        load_config(None, ["tracking.experiment= "])


def test_params_are_the_resolved_config_flattened():
    manifest = {
        "config": {"run": {"name": "r"}, "model": {"latent_dim": "auto", "kind": "dense"},
                   "train": {"epochs": "auto", "batch_size": 1024, "lr": 0.003},
                   "data": {"features": "auto", "id_columns": ["id"]},
                   "tracking": {"uri": "http://127.0.0.1:5000"}},
        "model": {"latent_dim": 6, "kind": "dense"},
        "metrics": {"epoch_limit": 40, "batch_size": 128},
        "feature_names": ["a", "b"],
    }
    params = resolved_params(manifest)
    assert params["model.latent_dim"] == "6" and params["train.epochs"] == "40"
    assert params["train.batch_size"] == "128" and params["train.lr"] == "0.003"
    assert params["data.features"] == "['a', 'b']" and params["data.id_columns"] == "['id']"
    assert not any(k.startswith("tracking.") for k in params)
    assert flatten({"a": {"b": None, "c": "x" * 7000}})["a.b"] == "null"
    assert len(flatten({"c": "x" * 7000})["c"]) == 6000


def _version(n: int, layout: str = "L1", loss: float = 1.0) -> SimpleNamespace:
    return SimpleNamespace(version=str(n), tags={"input_layout": layout, "validation_loss": repr(loss)})


def test_promotion_check_wants_the_same_layout_and_no_worse_validation_loss():
    current = _version(1, loss=1.0)
    assert check_candidate(_version(2, loss=0.5), current, 0.05) is None
    assert check_candidate(_version(2, loss=1.04), current, 0.05) is None  # within the tolerance
    assert "worse than version 1's" in check_candidate(_version(2, loss=1.06), current, 0.05)
    assert "different input layout" in check_candidate(_version(2, layout="L2", loss=0.5), current, 0.05)
    assert "no input_layout tag" in check_candidate(SimpleNamespace(version="3", tags={}), current, 0.05)
