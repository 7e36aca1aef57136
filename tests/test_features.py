"""The featurizer and what feeds it (pipeline/roles.py, stats.py, featurizer.py, prepare.py): roles, mergeable
statistics, encoding, manifest, per-column errors, for scalar columns and vector columns alike.

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
from pipeline.errors import InputError
from pipeline.featurizer import MISSING, OTHER, CategoricalColumn, Featurizer, NumericColumn, beyond_float32
from pipeline.inputs import auto_features
from pipeline.prepare import BatchStats, merge_stat_rows
from pipeline.roles import column_roles, vector_roles
from pipeline.rows import SplitFeatures, batch_rows, raw_featurizer, validation_mask
from pipeline.stats import ColumnMoments, LevelCounts, normalization_stats
from pipeline.models import build_model
from pipeline.sample import generate_mixed, mixed_table

import datetime as dt

FEATURES = ["amount", "items", "account_age_days", "risk_score", "latency_ms", "balance", "country", "currency",
            "channel", "merchant", "card_present"]


def mixed(rows: int = 3000, seed: int = 0) -> pa.Table:
    return mixed_table(generate_mixed(rows, seed=seed), 0, rows, dt.datetime(2026, 1, 1))


def data_section(**kw) -> DataSection:
    return DataSection(features=FEATURES, id_columns=["id"], **{"validation_fraction": 0.1, **kw})


def unfitted(table: pa.Table, data: DataSection) -> Featurizer:
    return Featurizer.unfitted(column_roles(table.schema, data.feature_columns, data.categorical_columns, "t"))


def fitted(table: pa.Table, data: DataSection, bounds: list[int]) -> Featurizer:
    """The featurizer the prepare pass fits when the table arrives in blocks cut at `bounds`."""
    fz = unfitted(table, data)
    udf = BatchStats(data, fz)
    rows = [{k: v[0] for k, v in udf(table.slice(a, b - a)).items()} for a, b in zip(bounds[:-1], bounds[1:])]
    stats, *_ = merge_stat_rows(rows[::-1], fz, data.max_categories)  # any order, too
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
    assert auto == (FEATURES, [])


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
    # what the table holds: nulls give indicators, the merchant column keeps its most frequent levels, up to 16
    # (levels tied at the cut share `other`)
    by = {c.name: c for c in whole.columns}
    assert by["account_age_days"].indicator and by["latency_ms"].indicator and not by["amount"].indicator
    train = t.filter(pa.array(~validation_mask(t, data)))
    counts = train.column("merchant").drop_null().value_counts().to_pylist()
    cut = sorted((c["counts"] for c in counts), reverse=True)[16]
    assert set(by["merchant"].levels) == {c["values"] for c in counts if c["counts"] > cut}
    assert set(by["currency"].levels) <= {"USD", "EUR", "GBP", "JPY", "BRL", "INR", "CAD", "AUD", "MXN"}
    assert by["card_present"].levels in (["false", "true"], ["true", "false"])


def test_numeric_columns_without_nulls_are_the_float_matrix_itself():
    x = (np.random.default_rng(1).normal(size=(1000, 5)) * [1, 10, 100, 1e3, 1e-2]).astype(np.float32)
    whole = ColumnMoments.empty(5)
    for a, b in [(0, 300), (300, 301), (301, 1000)]:
        whole = whole.merge(ColumnMoments.of(x[a:b]))
    np.testing.assert_allclose(whole.mean, x.astype(np.float64).mean(0), rtol=1e-9)
    np.testing.assert_allclose(whole.std, x.astype(np.float64).std(0, ddof=1), rtol=1e-6)
    t = pa.table({"id": np.arange(1000), **{f"f{j}": x[:, j] for j in range(5)}})
    data = DataSection(id_columns=["id"], features=[f"f{j}" for j in range(5)], validation_fraction=0.1)
    fz = Featurizer.numeric(data.feature_columns, whole.mean, whole.std)
    assert fz.plain and fz.layout() is None and fz.width == 5
    np.testing.assert_array_equal(batch_rows(t, data, fz).x, x)
    np.testing.assert_array_equal(SplitFeatures(data, 5, "train", fz)(t).column("x").to_pylist(),
                                  SplitFeatures(data, 5, "train")(t).column("x").to_pylist())


def test_a_vector_column_is_numeric_inputs_through_the_same_featurizer():
    x = np.random.default_rng(2).normal(size=(500, 4)).astype(np.float32)
    values = pa.array(x.reshape(-1))
    vec = pa.table({"id": np.arange(500), "v": pa.FixedSizeListArray.from_arrays(values, 4)})
    cols = pa.table({"id": np.arange(500), **{f"v[{j}]": x[:, j] for j in range(4)}})
    fz_vec = Featurizer.unfitted(vector_roles("v", 4), "v")
    fz_cols = Featurizer.unfitted(vector_roles("v", 4))
    vdata = DataSection(id_columns=["id"], features="v", validation_fraction=0.1)
    cdata = DataSection(id_columns=["id"], features=[f"v[{j}]" for j in range(4)], validation_fraction=0.1)
    got = batch_rows(vec, vdata, fz_vec).x
    np.testing.assert_array_equal(got, x)
    assert np.shares_memory(got, values.to_numpy())  # the fast path: the vector's values, reshaped, no copy
    stats = [merge_stat_rows([{k: v[0] for k, v in BatchStats(d, fz)(t).items()}], fz, 64)
             for t, d, fz in [(vec, vdata, fz_vec), (cols, cdata, fz_cols)]]
    assert stats[0][1:] == stats[1][1:]
    np.testing.assert_array_equal(stats[0][0].numeric.mean, stats[1][0].numeric.mean)
    fitted_vec = fz_vec.fit(stats[0][0], *normalization_stats(stats[0][0].numeric), 64, "impute")
    assert fitted_vec.vector == "v" and fitted_vec.plain and fitted_vec.names == fz_cols.names
    # a manifest written before: the vector's elements as numeric columns with `vector` set
    old = {"vector": "v", "columns": [{"role": "numeric", "name": f"v[{j}]", "family": "float", "offset": 0.5,
                                       "scale": 2.0, "indicator": False} for j in range(4)]}
    loaded = Featurizer.from_dict(old)
    assert loaded.to_dict() == old and loaded.vector == "v" and loaded.offset.tolist() == [0.5] * 4
    np.testing.assert_array_equal(batch_rows(vec, vdata, loaded).x, x)


def test_vector_errors_name_the_file_column_count_and_setting():
    v = pa.array([[1.0, float("nan")], [1.0, 2.0], [float("inf"), 0.0]], pa.list_(pa.float32()))
    t = pa.table({"id": [1, 2, 3], "v": v, "path": ["f.parquet"] * 3})
    fz = raw_featurizer(DataSection(id_columns=["id"], features="v"), 2)
    with pytest.raises(InputError, match=r"^file f\.parquet: column 'v' has 2 rows with NaN or infinite values "
                                         r"\(set data.nan_policy=drop to skip them\)$"):
        batch_rows(t, DataSection(id_columns=["id"], features="v"), fz)
    # NaN in a vector is a bad value under every missing policy, not a missing one
    for missing in ("impute", "drop", "error"):
        rows = batch_rows(t, DataSection(id_columns=["id"], features="v", nan_policy="drop", missing=missing), fz)
        assert rows.keep.tolist() == [False, True, False]
        assert rows.reasons == ["NaN or infinite value in v[1]", "NaN or infinite value in v[0]"]
    nulls = pa.table({"id": [1, 2], "v": pa.array([[1.0, None], None], pa.list_(pa.float32()))})
    with pytest.raises(InputError, match="column 'v' has 1 null vectors"):
        batch_rows(nulls, DataSection(id_columns=["id"], features="v", missing="impute"), fz)


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
    with pytest.raises(InputError, match="column 'a' has 1 rows with infinite values"):
        fz.matrix(inf, "impute", "error")  # infinities stay bad input under every missing policy
    _, keep, reasons, _ = fz.matrix(inf, "impute", "drop")
    assert keep.tolist() == [True, False, True, True] and reasons == ["infinite value in a"]
    # finite in the file, but beyond float32 (the model's input): said as such, not as an infinity
    vast = t.set_column(1, "a", pa.array([1.0, 1e300, -1e39, 3.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning from the cast either
        with pytest.raises(InputError, match=r"column 'a' has 2 rows with values beyond float32's range"):
            fz.matrix(vast, "impute", "error")
    assert beyond_float32(pa.chunked_array([[[1e300, 1.0]], [[2.0, -1e39]]])) == 2  # a vector column's too


def test_level_counters_are_bounded_and_keep_the_frequent_levels():
    rng = np.random.default_rng(0)
    ids = [f"user-{i}" for i in rng.permutation(20_000)]  # an id mistaken for a category
    frequent = ["a"] * 3000 + ["b"] * 2000
    t = pa.table({"id": np.arange(25_000), "u": pa.array(ids + frequent)})
    data = DataSection(id_columns=["id"], features=["u"], max_categories=2, validation_fraction=0.1)
    fz = unfitted(t, data)
    udf = BatchStats(data, fz)
    rows = [{k: v[0] for k, v in udf(t.slice(i, 5000)).items()} for i in range(0, 25_000, 5000)]
    assert all(len(json.loads(r["stats"])["levels"][0]["counts"]) <= 1024 for r in rows)  # bounded per block
    stats, *_ = merge_stat_rows(rows, fz, data.max_categories)
    assert stats.levels[0].truncated
    with pytest.warns(UserWarning, match="column 'u': more than 1024 distinct values"):
        out = fz.fit(stats, np.zeros(0), np.ones(0), 2, "impute")
    assert out.columns[0].levels == ["a", "b"]
    merged = LevelCounts({"p": 2, "q": 1}).merge(LevelCounts({"q": 2, "r": 1}), capacity=2)
    assert merged.counts == {"q": 3, "p": 2} and merged.truncated


def test_a_column_null_in_every_training_row_is_named():
    t = pa.table({"id": np.arange(100), "a": np.arange(100.0), "b": pa.nulls(100, pa.float64()),
                  "s": pa.nulls(100, pa.string())})
    data = DataSection(id_columns=["id"], features=["a", "b", "s"], validation_fraction=0.1)
    with pytest.warns(UserWarning) as caught:
        fz = fitted(t, data, [0, 100])
    assert [str(w.message) for w in caught] == [
        f"column {c!r}: null in every training row, so it carries nothing (exclude it with data.exclude_columns)"
        for c in ("b", "s")]
    assert fz.names == ["a", "b", "s"]  # still trained on (a constant input), as before: a warning, not an error


def test_kept_levels_never_depend_on_their_names():
    """A level gets a slot only if seen twice and not tied at the cut: a column of ids keeps none (before, its k
    alphabetically first values kept slots, and their rows topped the anomaly ranking)."""
    ids = LevelCounts({f"u{i}": 1 for i in range(500)})
    assert ids.top(64) == []
    some = LevelCounts({"a": 9, "b": 5, "c": 3, "d": 3, "e": 3, "f": 1})
    assert some.top(64) == ["a", "b", "c", "d", "e"]  # under the cap: every level seen twice, "f" is `other`
    assert some.top(3) == ["a", "b"]  # "c", "d", "e" tie at the cut: none of them
    assert some.top(2) == ["a", "b"] and some.top(1) == ["a"]
    t = pa.table({"id": np.arange(3000), "u": pa.array([f"user-{i}" for i in range(3000)])})
    data = DataSection(id_columns=["id"], features=["u"], validation_fraction=0.1)
    fz = fitted(t, data, [0, 1000, 3000])
    assert fz.columns[0].levels == [] and fz.width == 2  # `other` and `missing`: every row the same


def test_manifest_round_trip_and_type_changes_name_the_column():
    t = mixed(2000)
    fz = fitted(t, data_section(), [0, 700, 2000])
    back = Featurizer.from_dict(json.loads(json.dumps(fz.to_dict())))
    assert back == fz and back.layout() == fz.layout() and back.width == fz.width
    x1 = batch_rows(t, data_section(), fz).x
    np.testing.assert_array_equal(x1, batch_rows(t, data_section(), back).x)
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


def test_categorical_errors_by_width_equal_one_cross_entropy_per_column():
    # columns of one width share one gather and log-softmax (SlotLayout.buckets): adjacent runs of them as a
    # view, interleaved ones through an index matrix. Values and gradients equal one cross-entropy per column.
    cols = [CategoricalColumn("u", "bool", ["True", "False"]), NumericColumn("a", "float", indicator=True),
            CategoricalColumn("v", "bool", ["True", "False"]), CategoricalColumn("w", "bool", ["True", "False"]),
            CategoricalColumn("m", "string", list("abcdefg")), NumericColumn("b", "float"),
            CategoricalColumn("z", "string", ["x", "y"])]
    fz = Featurizer(cols)
    layout = fz.layout()
    widths = {where[2] if isinstance(where[0], int) else len(where[0]): len(c) for where, c in layout.buckets()}
    assert widths == {4: 4, 9: 1}  # u, v, w, z (two levels + other + missing) and m
    model = build_model(fz.width, hidden_dims=[6], latent_dim=2, layout=layout)
    assert sorted(type(span).__name__ for span, _ in model._buckets) == ["str", "tuple"]  # both paths
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(64, fz.width)
    for a, b, _ in layout.groups:
        x[torch.arange(64), a + torch.randint(0, b - a, (64,), generator=g)] = 1.0
    for slot, _ in layout.numeric:
        x[:, slot] = torch.randn(64, generator=g)
    recon = torch.randn(64, fz.width, generator=g, requires_grad=True)
    want = torch.zeros(64, layout.n_columns)
    for slot, col in layout.numeric:
        want[:, col] = want[:, col] + (recon[:, slot] - x[:, slot]) ** 2
    for a, b, col in layout.groups:
        want[:, col] = torch.nn.functional.cross_entropy(recon[:, a:b], x[:, a:b].argmax(dim=1), reduction="none")
    got = model.column_errors(recon, x)
    torch.testing.assert_close(got, want)
    (grad_got,) = torch.autograd.grad(got.sum(), recon)
    (grad_want,) = torch.autograd.grad(want.sum(), recon)
    torch.testing.assert_close(grad_got, grad_want)


def test_split_and_stats_do_not_depend_on_the_fitted_statistics_without_ids():
    t = mixed(2000)
    data = DataSection(features=FEATURES, id_columns=[], validation_fraction=0.1)
    un = unfitted(t, data)
    fz = fitted(t, data, [0, 2000])
    a = validation_mask(t, data, batch_rows(t, data, un).split_key)
    b = validation_mask(t, data, batch_rows(t, data, fz).split_key)
    np.testing.assert_array_equal(a, b)
    assert 0.05 < a.mean() < 0.15
    assert OTHER != MISSING
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SplitFeatures(data, 0, "validation", fz)(t)


def test_kinds_and_rules_without_a_softmax_head_refuse_categoricals_with_one_line():
    from pipeline.config import load_config
    from pipeline.errors import ConfigError
    from pipeline.inputs import InputSpec
    from pipeline.preflight import check_categoricals
    from pipeline.roles import ColumnRole

    spec = InputSpec("in", ["in/a"], ["a", "c"], 10, ["a", "c"],
                     roles=[ColumnRole("a", "numeric", "float"), ColumnRole("c", "categorical", "string")])
    check_categoricals(load_config(None, []), spec)  # dense with backprop takes them
    for overrides, key in [(["train.algorithm=recirculation", "model.hidden_dims=[]"], "train.algorithm"),
                           (["model.kind=variational"], "model.kind")]:
        with pytest.raises(ConfigError, match=rf"^config {key}: .* numeric columns only; \['c'\] are categorical"):
            check_categoricals(load_config(None, overrides), spec)
    numeric = InputSpec("in", ["in/a"], ["a"], 10, ["a"], roles=[ColumnRole("a", "numeric", "float")])
    check_categoricals(load_config(None, ["model.kind=variational"]), numeric)
