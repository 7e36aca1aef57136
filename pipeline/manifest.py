"""The model artifact's manifest: where a run's model lives and its JSON description, read without torch (the
dry run, the scheduler and the registry read manifests; only loading the weights needs torch)."""

from __future__ import annotations

from typing import Any

from pipeline.errors import ArtifactError
from pipeline.featurizer import Featurizer
from pipeline.storage import Storage
from pipeline.uri import join_uri

FORMAT = "tabular-autoencoder/v1"
WEIGHTS = "weights.safetensors"
MANIFEST = "manifest.json"


def model_dir(run_uri: str) -> str:
    return join_uri(run_uri, "model")


def featurizer_of(manifest: dict[str, Any]) -> Featurizer:
    """The manifest's typed `features` section (every reader goes through this, not through its keys)."""
    if "features" in manifest:
        return Featurizer.from_dict(manifest["features"])
    names = list(manifest["feature_names"])
    norm = manifest.get("normalization") or {"mean": [0.0] * len(names), "scale": [1.0] * len(names)}
    vector = names[0].rsplit("[", 1)[0] if names and names[0].endswith("]") else None
    return Featurizer.numeric(names, norm["mean"], norm["scale"], vector=vector)


def code_space_of(manifest: dict[str, Any]) -> str:
    """The model version whose coordinates the model's `latent` is in: its own unless it was aligned to a
    previous model's (pipeline/alignment.py); a model saved before alignment existed is its own."""
    return str(manifest.get("code_space") or manifest["model_version"])


def read_manifest(storage: Storage, run_uri: str) -> dict[str, Any]:
    uri = join_uri(model_dir(run_uri), MANIFEST)
    try:
        manifest = storage.read_json(uri)
    except FileNotFoundError:
        raise ArtifactError(f"model {run_uri}: no trained model here ({MANIFEST} not found)") from None
    except ValueError:
        raise ArtifactError(f"model {uri}: manifest is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"model {uri}: not a {FORMAT} manifest")
    return manifest
