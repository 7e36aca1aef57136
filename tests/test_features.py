"""The featurizer (pipeline/features.py): roles, mergeable statistics, encoding, manifest, per-column errors.

Pure functions on in-memory Arrow tables: no Ray, no S3.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.config import DataSection
from pipeline.data import (BatchMoments, Moments, SplitFeatures, auto_features, batch_rows, feature_matrix,
                           merge_table_rows, normalization_stats)
from pipeline.errors import InputError
from pipeline.features import (MISSING, OTHER, CategoricalColumn, ColumnMoments, Featurizer, LevelCounts,
                               NumericColumn, column_roles)
from pipeline.models import build_model
from pipeline.sample import generate_mixed, mixed_table

import datetime as dt

FEATURES = ["amount", "items", "account_age_days", "risk_score", "latency_ms", "balance", "country", "currency",
            "channel", "merchant", "card_present"]


def mixed(rows: int = 3000, seed: int = 0) -> pa.Table:
    return mixed_table(generate_mixed(rows, seed=seed), 0, rows, dt.datetime(2026, 1, 1))


def data_section(**kw) -> DataSection:
    return DataSection(features=FEATURES, id_columns=["id"], **kw)


def unfitted(table: pa.Table, data: DataSection) -> Featurizer:
    return Featurizer.unfitted(column_roles(table.schema, data.feature_columns, data.categorical_columns, "t"))


def fitted(table: pa.Table, data: DataSection, bounds: list[int]) -> Featurizer:
    """The featurizer the prepare pass fits when the table arrives in blocks cut at `bounds`."""
    fz = unfitted(table, data)
    udf = BatchMoments(data, len(fz.columns), featurizer=fz)
    rows = [{k: v[0] for k, v in udf(table.slice(a, b - a)).items()} for a, b in zip(bounds[:-1], bounds[1:])]
    stats, *_ = merge_table_rows(rows[::-1], fz, data.max_categories)  # any order, too
    offset, scale = normalization_stats(stats.numeric)
    return fz.fit(stats, offset, scale, data.max_categories, data.missing)


def test_roles_come_from_arrow_types_and_bad_types_get_one_line():
    t = mixed(50)
    roles = {r.name: r.role for r in column_roles(t.schema, FEATURES, [], "f.parquet")}
    assert [c for c, r in roles.items() if r == "categorical"] == ["country", "currency", "channel", "merchant",
                                                                   "card_present"]
    coded = column_roles(t.schema, FEATURES, ["items"], "f.parquet")
    assert {r.name: r.role for r in coded}["items"] == "categorical"
    for col, word in [("event_time", "timestamp"), ("vec", "nested"), ("blob", "binary")]:
        bad = t.append_column("vec", pa.array([[1.0]] * 50)).append_column("blob", pa.array([b"x"] * 50))
        with pytest.raises(InputError, match=rf"^f\.parquet: feature column '{col}' is .*{word}") as e:
            column_roles(bad.schema, ["amount", col], [], "f.parquet")
        assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="only integer codes, strings and booleans"):
        column_roles(t.schema, ["amount"], ["amount"], "f.parquet")
    auto = auto_features(DataSection(features="auto", timestamp_column="event_time",
                                     exclude_columns=["anomaly_kind", "is_anomaly_truth"]), t.schema, "f")
    assert auto == FEATURES


def test_statistics_merge_to_the_same_featurizer_under_any_block_split():
    t = mixed(3000)
    data = data_section(max_categories=16)
    whole = fitted(t, data, [0, 3000])
    rng = np.random.default_rng(0)
    for _ in range(3):
        cuts = sorted(set(rng.integers(1, 3000, size=int(rng.integers(1, 12))).tolist()))
        other = fitted(t, data, [0, *cuts, 3000])
        a, b = whole.to_dict(), other.to_dict()
        for ca, cb in zip(a["columns"], b["columns"]):
            if ca["role"] == "numeric":
                assert ca["indicator"] == cb["indicator"]
                np.testing.assert_allclose([ca["offset"], ca["scale"]], [cb["offset"], cb["scale"]], rtol=1e-9)
            else:
                assert ca == cb
    # what the table holds: nulls give indicators, the merchant column keeps its 16 most frequent levels
    by = {c.name: c for c in whole.columns}
    assert by["account_age_days"].indicator and by["latency_ms"].indicator and not by["amount"].indicator
    assert len(by["merchant"].levels) == 16 and set(by["currency"].levels) <= {"USD", "EUR", "GBP", "JPY", "BRL",
                                                                              "INR", "CAD", "AUD", "MXN"}
    assert by["card_present"].levels in (["false", "true"], ["true", "false"])


def test_numeric_columns_without_nulls_get_exactly_the_old_statistics():
    x = np.random.default_rng(1).normal(size=(1000, 5)).astype(np.float32) * [1, 10, 100, 1e3, 1e-2]
    parts = [(0, 300), (300, 301), (301, 1000)]
    old = Moments(0, np.zeros(5), np.zeros(5))
    new = ColumnMoments.empty(5)
    for a, b in parts:
        old, new = old.merge(Moments.of(x[a:b])), new.merge(ColumnMoments.of(x[a:b]))
    np.testing.assert_array_equal(old.mean, new.mean)
    np.testing.assert_array_equal(old.std, new.std)
    # and the plain featurizer's matrix is the old feature matrix
    t = pa.table({"id": np.arange(1000), **{f"f{j}": x[:, j] for j in range(5)}})
    data = DataSection(features=[f"f{j}" for j in range(5)])
    fz = Featurizer.numeric(data.feature_columns, new.mean, new.std)
    assert fz.plain and fz.layout() is None and fz.width == 5
    np.testing.assert_array_equal(batch_rows(t, data, 5, fz).x, feature_matrix(t, data, 5))
    np.testing.assert_array_equal(SplitFeatures(data, 5, "train", fz)(t).column("x").to_pylist(),
                                  SplitFeatures(data, 5, "train")(t).column("x").to_pylist())


def test_unseen_levels_and_nulls_never_fail_and_land_in_other_and_missing():
    fz = Featurizer([NumericColumn("a", "float", 10.0, 2.0, indicator=True),
                     CategoricalColumn("c", "string", ["x", "y"])])
    t = pa.table({"c": pa.array(["y", "z", None, "x"]), "a": pa.array([1.0, None, float("nan"), 4.0])})
    x, keep, reasons, _ = fz.matrix(t, "impute", "error")
    assert keep.all() and reasons is None
    # slots: a, a's missing indicator, then c: x, y, other, missing
    np.testing.assert_array_equal(x, [[1, 0, 0, 1, 0, 0], [10, 1, 0, 0, 1, 0], [10, 1, 0, 0, 0, 1], [4, 0, 1, 0, 0, 0]])
    assert fz.offset.tolist() == [10, 0, 0, 0, 0, 0] and fz.scale.tolist() == [2, 1, 1, 1, 1, 1]
    with pytest.raises(InputError, match="column 'c' has 1 null values"):
        fz.matrix(t.select(["c"]).append_column("a", pa.array([1.0, 2, 3, 4])), "error", "error")
    _, keep, reasons, _ = fz.matrix(t, "drop", "error")
    assert keep.tolist() == [True, False, False, True]
    assert reasons == ["missing value in a", "missing value in a"]
    inf = t.set_column(1, "a", pa.array([1.0, float("inf"), 2.0, 3.0]))
    with pytest.raises(InputError, match="column 'a' has 1 rows with NaN or infinite values"):
        fz.matrix(inf, "impute", "error")  # infinities stay bad input under every missing policy
    _, keep, reasons, _ = fz.matrix(inf, "impute", "drop")
    assert keep.tolist() == [True, False, True, True] and reasons == ["NaN or infinite value in a"]


def test_level_counters_are_bounded_and_keep_the_frequent_levels():
    rng = np.random.default_rng(0)
    ids = [f"user-{i}" for i in rng.permutation(20_000)]  # an id mistaken for a category
    frequent = ["a"] * 3000 + ["b"] * 2000
    t = pa.table({"id": np.arange(25_000), "u": pa.array(ids + frequent)})
    data = DataSection(features=["u"], max_categories=2)
    fz = unfitted(t, data)
    udf = BatchMoments(data, 1, featurizer=fz)
    rows = [{k: v[0] for k, v in udf(t.slice(i, 5000)).items()} for i in range(0, 25_000, 5000)]
    assert all(len(json.loads(r["stats"])["levels"][0]["counts"]) <= 1024 for r in rows)  # bounded per block
    stats, *_ = merge_table_rows(rows, fz, data.max_categories)
    assert stats.levels[0].truncated
    with pytest.warns(UserWarning, match="column 'u': more than 1024 distinct values"):
        out = fz.fit(stats, np.zeros(0), np.ones(0), 2, "impute")
    assert out.columns[0].levels == ["a", "b"]
    merged = LevelCounts({"p": 2, "q": 1}).merge(LevelCounts({"q": 2, "r": 1}), capacity=2)
    assert merged.counts == {"q": 3, "p": 2} and merged.truncated


def test_manifest_round_trip_and_type_changes_name_the_column():
    t = mixed(2000)
    fz = fitted(t, data_section(), [0, 700, 2000])
    back = Featurizer.from_dict(json.loads(json.dumps(fz.to_dict())))
    assert back == fz and back.layout() == fz.layout() and back.width == fz.width
    x1 = batch_rows(t, data_section(), 0, fz).x
    np.testing.assert_array_equal(x1, batch_rows(t, data_section(), 0, back).x)
    fz.check_types(t.schema, "in")  # float32 vs float64 and int vs float are all numbers: fine
    changed = t.set_column(t.schema.get_field_index("items"), "items", pa.array([str(i) for i in range(2000)]))
    with pytest.raises(InputError, match=r"^in: column 'items' is string \(string\), but the model was trained "
                                         "on it as integer$"):
        fz.check_types(changed.schema, "in")


def test_per_column_errors_one_per_input_column_in_feature_order():
    # features: c (categorical), a (numeric, with an indicator), b (numeric); slots: a, b, a-missing, c x3+2
    fz = Featurizer([CategoricalColumn("c", "string", ["x", "y", "z"]), NumericColumn("a", "float", indicator=True),
                     NumericColumn("b", "float")])
    layout = fz.layout()
    assert fz.names == ["c", "a", "b"] and fz.width == 8 and layout.n_columns == 3
    model = build_model(fz.width, hidden_dims=[6], latent_dim=2, layout=layout)
    x = torch.tensor([[0.5, -1.0, 0.0, 0, 1, 0, 0, 0], [0.0, 2.0, 1.0, 0, 0, 0, 0, 1]])
    recon = torch.randn(2, 8)
    err = model.column_errors(recon, x)
    assert err.shape == (2, 3)
    want_c = -torch.log_softmax(recon[:, 3:8], dim=1)[[0, 1], [1, 4]]
    torch.testing.assert_close(err[:, 0], want_c)
    torch.testing.assert_close(err[:, 1], (recon[:, 0] - x[:, 0]) ** 2 + (recon[:, 2] - x[:, 2]) ** 2)
    torch.testing.assert_close(err[:, 2], (recon[:, 1] - x[:, 1]) ** 2)
    score, h, per_col = model.score_and_latent(x)
    assert per_col.shape == (2, 3) and score.shape == (2,)
    loss, _ = model.loss(x)
    loss.backward()  # the softmax heads train
    assert model.decoder[-1].weight.grad[3:].abs().sum() > 0
    # a numeric-only input: no layout, per-feature squared error as always
    plain = build_model(4, hidden_dims=[4], latent_dim=2)
    assert plain.layout is None
    xr = torch.randn(3, 4)
    torch.testing.assert_close(plain.column_errors(plain(xr), xr), (plain(xr) - xr) ** 2)


def test_split_and_stats_do_not_depend_on_the_fitted_statistics_without_ids():
    t = mixed(2000)
    data = DataSection(features=FEATURES, id_columns=[])
    un = unfitted(t, data)
    fz = fitted(t, data, [0, 2000])
    from pipeline.data import validation_mask

    a = validation_mask(t, data, batch_rows(t, data, 0, un).split_key)
    b = validation_mask(t, data, batch_rows(t, data, 0, fz).split_key)
    np.testing.assert_array_equal(a, b)
    assert 0.05 < a.mean() < 0.15
    assert OTHER != MISSING
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SplitFeatures(data, 0, "validation", fz)(t)


def test_kinds_and_rules_without_a_softmax_head_refuse_categoricals_with_one_line():
    from pipeline.config import load_config
    from pipeline.data import InputSpec
    from pipeline.errors import ConfigError
    from pipeline.features import ColumnRole
    from pipeline.jobs import check_categoricals

    spec = InputSpec("in", ["in/a"], ["a", "c"], 10, ["a", "c"],
                     roles=[ColumnRole("a", "numeric", "float"), ColumnRole("c", "categorical", "string")])
    check_categoricals(load_config(None, []), spec)  # dense with backprop takes them
    for overrides, key in [(["train.algorithm=recirculation", "model.hidden_dims=[]"], "train.algorithm"),
                           (["model.kind=variational"], "model.kind")]:
        with pytest.raises(ConfigError, match=rf"^config {key}: .* numeric columns only; \['c'\] are categorical"):
            check_categoricals(load_config(None, overrides), spec)
    numeric = InputSpec("in", ["in/a"], ["a"], 10, ["a"], roles=[ColumnRole("a", "numeric", "float")])
    check_categoricals(load_config(None, ["model.kind=variational"]), numeric)
