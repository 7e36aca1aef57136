"""`KindSpec`: what the pipeline knows about one model kind besides its model class, in one object.

A kind is its settings dataclass (flat `model.<setting>` config keys, each with a docstring and a range
check), the scores and learning rules it supports, and the hooks training and the config checks need. All
of it loads without torch, so reading a config does not import it; the kind's model class (an
`Autoencoder` subclass, torch only) lives in `pipeline/models/<kind>.py`, and `pipeline.models.MODELS`
maps the kind's name to it. The config and the trainer read a kind's differences from here; only the model
classes and the recirculation rule (`pipeline/recirculation.py`, which trains the plain dense model) differ
in code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

MLP_SETTINGS = ("hidden_dims", "latent_dim", "activation", "dropout", "code_activation", "score")
"""The settings every kind shares: the model classes' keyword arguments (typed and documented in the config's
model section)."""

CODE_SPACE_SETTINGS = ("align_to", "align_min_r2")
"""Model settings that say which coordinates the emitted code is in (pipeline/alignment.py), not how the
network is built: no model class takes them."""

SCORES = ("calibrated", "recon")
"""The anomaly scores every kind supports (pipeline/calibration.py; mean squared reconstruction error)."""


@dataclass(frozen=True)
class NoSettings:
    """The settings of a kind that has none besides the shared MLP ones."""


def _no_check(model_section: Any) -> None:
    return None


def _no_pretraining(model_section: Any) -> int:
    return 0


@dataclass(frozen=True)
class KindSpec:
    name: str
    """The `model.kind` value."""
    settings: type = NoSettings
    """Frozen dataclass of the kind's own settings; range checks in its `__post_init__` (ConfigError naming
    `model.<field>`). Field names are flat config keys and must not clash with another kind's."""
    undercomplete: bool = False
    """The code must be narrower than the input (checked once the input width is known)."""
    find_unused_parameters: bool = False
    """Some epochs train only part of the model, so DDP must expect parameters without gradients."""
    check: Callable[[Any], None] = _no_check
    """Checks of the kind's settings against the shared ones, given the model section (only for this kind)."""
    categorical: bool = True
    """Takes categorical columns (a softmax head per column); a kind whose likelihood has no such part refuses
    them with one line."""
    pretrain_epochs: Callable[[Any], int] = _no_pretraining
    """Epochs (given the model section) before the whole model trains: they do not count for early stopping
    or the best model, and `train.epochs` must exceed them."""
    scores: tuple[str, ...] = SCORES
    """The `model.score` values the kind's model computes."""
    algorithms: tuple[str, ...] = ("backprop",)
    """The `train.algorithm` values that can train it."""

    @property
    def setting_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.settings))

    def settings_from(self, values: dict[str, Any]) -> Any:
        """The kind's settings dataclass from a flat mapping (extra keys: other kinds' settings, skipped)."""
        return self.settings(**{k: values[k] for k in self.setting_names if k in values})
