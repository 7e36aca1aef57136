"""The model artifact under `artifacts.uri/<run.name>/model/`: weights plus a manifest that scoring needs.

    model/weights.safetensors   the best epoch's weights (safetensors: loading runs no code)
    model/manifest.json         config, feature names and order, the featurizer (`features`: each column's
                                role, normalization, levels), threshold, metrics, library versions, and
                                the weights' sha256 (checked on load)

The manifest is written last, so a model directory without one is incomplete and is never loaded.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import platform
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pipeline.errors import ArtifactError, StorageError
from pipeline.featurizer import Featurizer
from pipeline.manifest import FORMAT, MANIFEST, WEIGHTS, featurizer_of, model_dir, read_manifest
from pipeline.models import build_model
from pipeline.models import Autoencoder
from pipeline.storage import Storage
from pipeline.uri import join_uri

def library_versions() -> dict[str, str]:
    import pyarrow

    import pipeline

    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "pyarrow": pyarrow.__version__, "pipeline": pipeline.__version__}
    try:
        import ray

        out["ray"] = ray.__version__
    except ImportError:  # scoring without Ray (e.g. the plain-PyTorch predictor on a GPU box)
        pass
    return out


def save_artifact(storage: Storage, run_uri: str, model: Autoencoder, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write weights, then the manifest (with the weights' checksum). Returns the manifest written."""
    blob = st_save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    digest = hashlib.sha256(blob).hexdigest()
    d = model_dir(run_uri)
    storage.write_bytes(join_uri(d, WEIGHTS), blob)
    full = {
        "format": FORMAT,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "weights": {"file": WEIGHTS, "sha256": digest, "bytes": len(blob)},
        "versions": library_versions(),
        **manifest,
    }
    full["model_version"] = f"{manifest['run_name']}@{digest[:12]}"
    full["code_space"] = manifest.get("code_space") or full["model_version"]  # aligned: the previous model's
    storage.write_json(join_uri(d, MANIFEST), full)
    return full


@dataclass
class LoadedModel:
    model: Autoencoder
    manifest: dict[str, Any]

    @property
    def mean(self) -> np.ndarray:
        return np.asarray(self.manifest["normalization"]["mean"], dtype=np.float32)

    @property
    def scale(self) -> np.ndarray:
        return np.asarray(self.manifest["normalization"]["scale"], dtype=np.float32)

    @property
    def featurizer(self) -> Featurizer:
        """The input's featurizer (featurizer_of: a manifest without a `features` section gives its numeric inputs)."""
        return featurizer_of(self.manifest)

    @property
    def threshold(self) -> float:
        return float(self.manifest["threshold"])

    @property
    def feature_names(self) -> list[str]:
        return list(self.manifest["feature_names"])

    @property
    def version(self) -> str:
        return str(self.manifest["model_version"])


def load_artifact(storage: Storage, run_uri: str, device: str | torch.device = "cpu") -> LoadedModel:
    """Read the manifest, verify the weights' checksum, build the model. No code from the artifact runs."""
    manifest = read_manifest(storage, run_uri)
    w_uri = join_uri(model_dir(run_uri), manifest["weights"]["file"])
    try:
        blob = storage.read_bytes(w_uri)
    except FileNotFoundError:
        raise ArtifactError(f"model {w_uri}: weights file missing") from None
    except StorageError:
        raise
    if hashlib.sha256(blob).hexdigest() != manifest["weights"]["sha256"]:
        raise ArtifactError(f"model {w_uri}: checksum does not match the manifest (tampered or foreign weights)")
    try:
        state = st_load(blob)
        model = build_model(manifest["n_features"], layout=featurizer_of(manifest).layout(), **manifest["model"])
        model.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - any failure here means the artifact does not fit its manifest
        raise ArtifactError(f"model {w_uri}: weights do not fit the manifest's model ({e.__class__.__name__})") \
            from None
    model.to(device).eval()
    return LoadedModel(model, manifest)
