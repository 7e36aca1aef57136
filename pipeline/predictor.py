"""The model at inference: built and loaded once per worker process, then batch after batch of input slots.

    Predictor.from_artifact(storage, model_uri)    a stored model (checksum-verified): scoring
    Predictor.from_state(settings, state, fz)      the best epoch's weights before an artifact exists: the
                                                   validation pass that sets the threshold
    cached_predictor(key, build)                   the one model a worker process keeps, for the run `key`
    predictor(x) -> Prediction                     per-row score, code and per-column error

Plain PyTorch (no Ray): usable on a GPU box on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from pipeline.alignment import CodeMap
from pipeline.artifacts import load_artifact
from pipeline.featurizer import Featurizer
from pipeline.manifest import code_space_of
from pipeline.models import build_model
from pipeline.storage import Storage
from pipeline.tensors import Normalizer, autocast_for


@dataclass
class Prediction:
    score: np.ndarray
    """(rows,) float32: the anomaly score."""
    latent: np.ndarray
    """(rows, latent_dim) float32: the code, in the model's code space (aligned when the model stores a map)."""
    errors: np.ndarray
    """(rows, columns) float32: each input column's error."""


class Predictor:
    """A model ready to score raw input slots: normalized with the featurizer's statistics, run under
    `torch.inference_mode()`, with bf16 autocast on a GPU."""

    def __init__(self, model: torch.nn.Module, featurizer: Featurizer, device: Union[str, torch.device] = "cpu",
                 manifest: Optional[dict[str, Any]] = None):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.featurizer = featurizer
        self.normalizer = Normalizer(featurizer.offset, featurizer.scale, self.device)
        self.manifest = manifest or {}
        """The stored model's manifest (threshold, version); empty before there is an artifact."""
        self.alignment = CodeMap.from_manifest(self.manifest)
        """The map of the emitted code into a previous version's coordinates (None: the model's own code)."""

    @classmethod
    def from_artifact(cls, storage: Storage, model_uri: str, device: str = "cpu") -> "Predictor":
        loaded = load_artifact(storage, model_uri, device)
        return cls(loaded.model, loaded.featurizer, device, loaded.manifest)

    @classmethod
    def from_state(cls, model_settings: dict[str, Any], state: dict[str, torch.Tensor],
                   featurizer: Featurizer) -> "Predictor":
        model = build_model(featurizer.width, layout=featurizer.layout(), **model_settings)
        model.load_state_dict(state)
        return cls(model, featurizer)

    @property
    def threshold(self) -> np.float32:
        return np.float32(self.manifest["threshold"])

    @property
    def version(self) -> str:
        return str(self.manifest["model_version"])

    @property
    def code_space(self) -> str:
        """The model version whose coordinates `latent` is in."""
        return code_space_of(self.manifest)

    @torch.inference_mode()
    def __call__(self, x: Union[np.ndarray, torch.Tensor]) -> Prediction:
        xt = torch.as_tensor(x)
        if self.device.type == "cuda":
            xt = xt.pin_memory().to(self.device, non_blocking=True)
        with autocast_for(self.device):
            score, h, sq = self.model.score_and_latent(self.normalizer(xt))
        latent = h.float().cpu().numpy()
        if self.alignment is not None:  # the emitted code only: the score above used the model's own
            latent = self.alignment.apply(latent)
        return Prediction(score.float().cpu().numpy().astype(np.float32, copy=False), latent,
                          sq.float().cpu().numpy())


_CACHED: dict[Any, Predictor] = {}
"""The model a worker process keeps: the one its current run loaded (scoring or the validation pass)."""


def cached_predictor(key: Any, build: Callable[[], Predictor]) -> Predictor:
    """The worker process's predictor for `key` (a run's id), built on first use. A new key replaces it: a
    worker never reuses a model loaded for an earlier run (the artifact may have changed)."""
    if key not in _CACHED:
        _CACHED.clear()
        _CACHED[key] = build()
    return _CACHED[key]
