"""Codes comparable across model versions: the map that carries a new model's code into a previous model's
coordinates (numpy only; no torch, no Ray).

    fit_alignment(new, old) -> CodeMap      fitted on the same rows encoded by both models
    CodeMap.apply(h)                         new codes -> the previous model's coordinates
    CodeMap.from_manifest(manifest)          the map a model stores (None: the model starts its own code space)

Two autoencoders trained on the same table (another seed, next month's rows) learn codes that carry the same
information in unrelated coordinates. For an autoencoder's code a fitted linear map is the classical tool:
orthogonal Procrustes with a scale and an offset (Schonemann 1966), which keeps the code's geometry, or a
general affine map (least squares), which also undoes stretching and shearing. Both are fitted; the one whose
held-out R^2 is higher is kept (k-fold: every row predicted by a map fitted without it), then refitted on
every row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

FOLDS = 3  # held-out R^2 by 3-fold cross-fitting: every row scored by a map that did not see it
KINDS = ("procrustes", "linear")


@dataclass(frozen=True)
class CodeMap:
    """h_old ~= h_new @ matrix + offset."""

    matrix: np.ndarray
    """(k, k) float64: rotation times scale (`procrustes`) or a general linear map (`linear`)."""
    offset: np.ndarray
    """(k,) float64."""
    kind: str
    """`procrustes` or `linear`."""
    r2: float
    """Held-out R^2 of mapped new codes against the old ones (pooled over the code's dimensions)."""
    code_space: str
    """The model version whose coordinates the mapped codes are in."""
    rows: int = 0
    """Rows the map was fitted on."""

    def apply(self, h: np.ndarray) -> np.ndarray:
        """(rows, k) new codes -> (rows, k) float32 in the code space's coordinates."""
        return (np.asarray(h, np.float64) @ self.matrix + self.offset).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "matrix": self.matrix.tolist(), "offset": self.offset.tolist(),
                "r2": float(self.r2), "code_space": self.code_space, "rows": int(self.rows)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CodeMap":
        return cls(np.asarray(d["matrix"], np.float64), np.asarray(d["offset"], np.float64), str(d["kind"]),
                   float(d["r2"]), str(d["code_space"]), int(d.get("rows", 0)))

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> Optional["CodeMap"]:
        """The manifest's map; None for a model that starts its own code space (and models saved before
        alignment existed)."""
        d = (manifest.get("code_alignment") or {}).get("map")
        return cls.from_dict(d) if d else None


def r2_score(pred: np.ndarray, target: np.ndarray) -> float:
    """1 - SSE / SST, pooled over every dimension (SST around each dimension's mean)."""
    sst = float(((target - target.mean(axis=0)) ** 2).sum())
    return 1.0 - float(((pred - target) ** 2).sum()) / sst if sst > 0 else 0.0


def fit_procrustes(new: np.ndarray, old: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotation R, scale s, offset b minimising |s new R + b - old|^2 (orthogonal Procrustes): (s R, b)."""
    mu_n, mu_o = new.mean(axis=0), old.mean(axis=0)
    a, b = new - mu_n, old - mu_o
    u, sig, vt = np.linalg.svd(a.T @ b)
    rot = u @ vt
    denom = float((a * a).sum())
    scale = float(sig.sum()) / denom if denom > 0 else 1.0
    m = scale * rot
    return m, mu_o - mu_n @ m


def fit_linear(new: np.ndarray, old: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The affine map of least squares: (A, b) minimising |new A + b - old|^2."""
    design = np.hstack([new, np.ones((len(new), 1))])
    coef, *_ = np.linalg.lstsq(design, old, rcond=None)
    return coef[:-1], coef[-1]


FITS = {"procrustes": fit_procrustes, "linear": fit_linear}


def held_out_r2(new: np.ndarray, old: np.ndarray, kind: str, folds: int = FOLDS) -> float:
    """R^2 of `kind`'s map on rows it was not fitted on (rows dealt to `folds` folds in turn)."""
    pred = np.zeros_like(old)
    fold = np.arange(len(new)) % folds
    for f in range(folds):
        m, b = FITS[kind](new[fold != f], old[fold != f])
        pred[fold == f] = new[fold == f] @ m + b
    return r2_score(pred, old)


def fit_alignment(new: np.ndarray, old: np.ndarray, code_space: str, kinds: tuple[str, ...] = KINDS) -> CodeMap:
    """The map from `new` codes to `old` ones (the same rows, in order), of the kind with the best held-out R^2.
    Refuses codes of different widths or row counts (ValueError)."""
    new, old = np.asarray(new, np.float64), np.asarray(old, np.float64)
    if new.ndim != 2 or old.ndim != 2 or new.shape[1] != old.shape[1]:
        raise ValueError(f"codes of width {new.shape[-1]} cannot be aligned to codes of width {old.shape[-1]}")
    if len(new) != len(old) or len(new) < 2 * FOLDS:
        raise ValueError(f"{len(new)} new and {len(old)} old codes: need the same rows, at least {2 * FOLDS}")
    # the general map needs more rows than it has parameters per output to be judged fairly
    usable = [k for k in kinds if k != "linear" or len(new) >= 4 * (new.shape[1] + 1)] or ["procrustes"]
    scores = {k: held_out_r2(new, old, k) for k in usable}
    kind = max(scores, key=scores.get)
    m, b = FITS[kind](new, old)
    return CodeMap(m, b, kind, scores[kind], code_space, len(new))
