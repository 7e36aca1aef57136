"""Unit tier: the code alignment (pipeline/alignment.py) and how a model artifact carries it.

The end-to-end case (two trainings on the sample table, the second aligned to the first) is in
tests/test_code_space.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline.alignment import CodeMap, fit_alignment, r2_score
from pipeline.artifacts import load_artifact, save_artifact
from pipeline.config import ModelSection, StorageSection
from pipeline.errors import ConfigError
from pipeline.featurizer import Featurizer
from pipeline.manifest import code_space_of
from pipeline.models import build_model
from pipeline.predictor import Predictor
from pipeline.storage import Storage


def rotation(k: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(k, k)))
    return q * np.sign(np.diag(r))


def test_a_rotated_scaled_shifted_copy_is_recovered_exactly():
    rng = np.random.default_rng(0)
    old = rng.normal(size=(500, 6)) * [3, 2, 1, 1, 0.5, 0.2] + 4.0
    rot = rotation(6, 1)
    new = (old - 1.5) @ rot * 0.3  # the same codes, rotated, scaled and shifted
    m = fit_alignment(new, old, "v1@abc")
    np.testing.assert_allclose(m.apply(new), old, atol=1e-4)
    assert m.r2 > 0.999999 and m.code_space == "v1@abc" and m.rows == 500
    # with too few rows for the general map, the rotation still recovers it
    few = fit_alignment(new[:12], old[:12], "v1@abc")
    assert few.kind == "procrustes"
    np.testing.assert_allclose(few.apply(new[12:]), old[12:], atol=1e-4)


def test_a_sheared_copy_takes_the_general_map_and_noise_lowers_the_fit():
    rng = np.random.default_rng(2)
    old = rng.normal(size=(800, 4))
    shear = np.array([[1.0, 0.8, 0, 0], [0, 1.0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0.5, 0.3]])
    new = old @ shear + 1.0
    m = fit_alignment(new, old, "v1")
    assert m.kind == "linear" and m.r2 > 0.999999
    noisy = fit_alignment(new + rng.normal(scale=1.0, size=new.shape), old, "v1")
    assert noisy.r2 < 0.8
    assert r2_score(noisy.apply(new), old) < 1.0


def test_codes_of_other_widths_or_rows_are_refused():
    with pytest.raises(ValueError, match="width 3 cannot be aligned to codes of width 4"):
        fit_alignment(np.zeros((50, 3)), np.zeros((50, 4)), "v1")
    with pytest.raises(ValueError, match="same rows"):
        fit_alignment(np.zeros((50, 3)), np.zeros((40, 3)), "v1")


def test_the_setting_is_checked_on_load():
    with pytest.raises(ConfigError, match="model.align_min_r2"):
        ModelSection(align_min_r2=1.5)
    with pytest.raises(ConfigError, match="model.align_to"):
        ModelSection(align_to="a/b")


def _save(tmp_path, code: dict | None, name: str = "v2"):
    storage = Storage(StorageSection())
    settings = dataclasses.asdict(ModelSection(hidden_dims=[8], latent_dim=3, ensemble=1, score="recon"))
    torch_model = build_model(6, **settings)
    manifest = {"run_name": name, "n_features": 6, "feature_names": [f"f{i}" for i in range(6)], "latent_dim": 3,
                "model": settings, "normalization": {"mean": [0.0] * 6, "scale": [1.0] * 6}, "threshold": 1.0,
                **(code or {})}
    run_uri = str(tmp_path / name)
    save_artifact(storage, run_uri, torch_model, manifest)
    return load_artifact(storage, run_uri)


def test_the_map_round_trips_through_the_model_artifact_and_touches_only_the_emitted_code(tmp_path):
    rng = np.random.default_rng(3)
    cmap = CodeMap(rotation(3, 4) * 2.0, np.array([1.0, -2.0, 0.5]), "procrustes", 0.97, "v1@0123456789ab", 400)
    loaded = _save(tmp_path, {"code_space": cmap.code_space, "code_alignment": {"map": cmap.to_dict(), "r2": 0.97}})
    assert loaded.manifest["code_space"] == "v1@0123456789ab" != loaded.version
    back = CodeMap.from_manifest(loaded.manifest)
    np.testing.assert_array_equal(back.matrix, cmap.matrix)
    assert (back.kind, back.r2, back.code_space, back.rows) == ("procrustes", 0.97, "v1@0123456789ab", 400)

    x = rng.normal(size=(64, 6)).astype(np.float32)
    aligned = Predictor(loaded.model, loaded.featurizer, manifest=loaded.manifest)
    own = Predictor(loaded.model, loaded.featurizer)  # no manifest: the model's own code
    a, o = aligned(x), own(x)
    np.testing.assert_allclose(a.latent, o.latent @ cmap.matrix + cmap.offset, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(a.score, o.score)  # the anomaly score never sees the map
    np.testing.assert_array_equal(a.errors, o.errors)
    assert aligned.code_space == "v1@0123456789ab"


def test_a_model_saved_before_alignment_loads_unaligned_in_its_own_code_space(tmp_path):
    loaded = _save(tmp_path, None, "old")
    del loaded.manifest["code_space"]  # what a manifest written before code spaces holds
    p = Predictor(loaded.model, loaded.featurizer, manifest=loaded.manifest)
    assert p.alignment is None and p.code_space == code_space_of(loaded.manifest) == loaded.version
    x = np.random.default_rng(5).normal(size=(16, 6)).astype(np.float32)
    np.testing.assert_array_equal(p(x).latent, Predictor(loaded.model, loaded.featurizer)(x).latent)
    assert isinstance(loaded.featurizer, Featurizer)


def test_align_to_picks_the_latest_finished_run_and_a_named_run_must_exist(tmp_path):
    from pipeline.code_space import alignment_target
    from pipeline.config import load_config

    storage = Storage(StorageSection())

    def cfg(*sets: str):
        return load_config(None, [f"artifacts.uri={tmp_path}", "run.name=v3", *sets])

    assert alignment_target(cfg(), storage) is None  # nothing to align to: the model starts the code space
    _save(tmp_path, None, "v1")
    _save(tmp_path, None, "v2")
    assert alignment_target(cfg(), storage).endswith("/v2")
    assert alignment_target(cfg("model.align_to=v1"), storage).endswith("/v1")
    assert alignment_target(cfg("model.align_to=none"), storage) is None
    assert alignment_target(cfg("run.name=v2"), storage) is None  # never the run being trained
    with pytest.raises(ConfigError, match="model.align_to: no finished run 'v0'"):
        alignment_target(cfg("model.align_to=v0"), storage)
