"""The training step and its helpers, without Ray: minibatch descent lowers the loss on real structure."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import torch

from pipeline.rows import to_fixed_size_list
from pipeline.tensors import Normalizer, arrow_to_tensor
from pipeline.models import build_model
from pipeline.sample import generate
from pipeline.sizing import effective_batch_size
from pipeline.train import EarlyStopping, evaluate, make_optimizer, tensor_batches, train_epoch


def batches(x: torch.Tensor, size: int):
    return [x[i:i + size] for i in range(0, len(x), size)]


def test_arrow_to_tensor_is_zero_copy_and_exact():
    x = np.random.default_rng(0).normal(size=(100, 7)).astype(np.float32)
    t = pa.table({"x": to_fixed_size_list(x)})
    out = arrow_to_tensor(t)
    assert out.dtype == torch.float32 and tuple(out.shape) == (100, 7)
    np.testing.assert_array_equal(out.numpy(), x)
    buf = t.column("x").chunk(0).flatten().buffers()[1]
    assert out.data_ptr() == buf.address  # no copy between Arrow and torch


def test_normalizer_and_tensor_batches():
    x = np.array([[1.0, 10.0], [3.0, 30.0]], np.float32)
    norm = Normalizer(np.array([2.0, 20.0]), np.array([1.0, 10.0]))
    out = list(tensor_batches([pa.table({"x": to_fixed_size_list(x)})], norm, torch.device("cpu")))
    np.testing.assert_allclose(out[0].numpy(), [[-1, -1], [1, 1]])


def test_training_lowers_loss_on_manifold_data():
    torch.manual_seed(0)
    x, truth = generate(4000, features=16, latent=2, anomaly_fraction=0.0, seed=1)
    xt = torch.from_numpy((x - x.mean(0)) / x.std(0))
    train, val = xt[:3500], xt[3500:]
    model = build_model(16, kind="dense", hidden_dims=[32], latent_dim=4, activation="gelu")
    opt = make_optimizer(model.parameters(), lr=3e-3, weight_decay=0.0)
    before, n = evaluate(batches(val, 512), model)
    losses = [train_epoch(batches(train, 128), model, opt).loss for _ in range(8)]
    after, n2 = evaluate(batches(val, 512), model)
    assert n == n2 == 500
    assert losses[-1] < losses[0] * 0.5
    assert after / n < before / n * 0.3


def test_the_fused_optimizer_makes_adamws_update():
    """make_optimizer's fused AdamW (the pipeline's) steps the weights as the per-tensor AdamW does."""
    torch.manual_seed(0)
    x = torch.randn(64, 6)
    models = [build_model(6, kind="dense", hidden_dims=[8], latent_dim=2) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fused = make_optimizer(models[0].parameters(), lr=1e-2, weight_decay=0.05)
    plain = torch.optim.AdamW(models[1].parameters(), lr=1e-2, weight_decay=0.05, foreach=False)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    for _ in range(5):
        for model, opt in zip(models, (fused, plain)):
            train_epoch(batches(x, 16), model, opt)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # a checkpoint's optimizer state loads back into the fused optimizer and keeps stepping
    again = make_optimizer(models[0].parameters(), lr=1e-2, weight_decay=0.05)
    again.load_state_dict(plain.state_dict())
    train_epoch(batches(x, 16), models[0], again)


def test_score_and_latent_shapes():
    model = build_model(5, kind="dense", hidden_dims=[8], latent_dim=3)
    s, h, sq = model.score_and_latent(torch.randn(11, 5))
    assert s.shape == (11,) and h.shape == (11, 3) and sq.shape == (11, 5)
    torch.testing.assert_close(s, sq.mean(1))


def test_effective_batch_size():
    assert effective_batch_size(1024, 100_000_000) == 1024
    assert effective_batch_size(1024, 300) == 16        # a few hundred rows still get ~20 steps
    assert effective_batch_size(1024, 10_000) == 500
    assert effective_batch_size(8, 10) == 8


def test_early_stopping():
    es = EarlyStopping(patience=2, min_delta=0.01)
    assert es.update(1.0, 0) and es.update(0.5, 1)
    assert not es.update(0.499, 2)  # less than 1% better: not an improvement
    assert not es.should_stop
    assert not es.update(math.nan, 3)
    assert es.should_stop and es.best_epoch == 1


def test_splits_are_cached_when_they_fit_the_share_of_the_object_store(ray_cluster, capsys):
    import ray

    from pipeline.inputs import InputSpec
    from pipeline.train import cache_splits, split_bytes

    store = ray.cluster_resources()["object_store_memory"]
    spec = InputSpec(uri="s3://b/t", files=["s3://b/t/a.parquet"], feature_names=[f"f{i}" for i in range(16)],
                     num_rows=4_318, columns=[])
    assert split_bytes(spec) == 4_318 * 16 * 4
    assert cache_splits(spec, 0.25)
    assert "[train] each training worker reads its part of the splits once and keeps it in memory (0.3 MB of" in \
        capsys.readouterr().out
    assert not cache_splits(spec, 0.0)  # 0: never
    big = InputSpec(uri=spec.uri, files=spec.files, feature_names=spec.feature_names, columns=[],
                    num_rows=int(store * 0.25 / (16 * 4)) + 1)
    assert not cache_splits(big, 0.25) and cache_splits(big, 0.5)
    assert "[train] streaming the input each epoch" in capsys.readouterr().out


def test_epoch_cache_streams_once_then_shuffles_every_row_in_memory():
    from pipeline.train import EpochCache

    rows = torch.arange(100, dtype=torch.float32).reshape(50, 2)
    reads: list[int] = []

    def stream():  # what Ray Data's iter_batches feeds: blocks in some order, batches of 16
        reads.append(1)
        yield from batches(rows, 16)

    cache = EpochCache(stream, batch_size=8, device=torch.device("cpu"), shuffle=True, seed=0)
    first = list(cache())
    assert [b.shape[0] for b in first] == [16, 16, 16, 2]  # the first pass is the stream itself
    passes = [torch.cat(list(cache())) for _ in range(3)]
    assert len(reads) == 1  # read once
    for p in passes:  # every row once per epoch, in batches of the cache's size, in a new order each time
        assert sorted(p[:, 0].tolist()) == rows[:, 0].tolist()
    assert len({tuple(p[:, 0].tolist()) for p in passes}) == 3
    # rows stay whole (a row's features travel together)
    assert all(torch.equal(p[:, 1], p[:, 0] + 1) for p in passes)
    # validation: no shuffle, the same order every time
    val = EpochCache(stream, batch_size=8, device=torch.device("cpu"), shuffle=False, seed=0)
    list(val())
    assert torch.equal(torch.cat(list(val())), rows)

    # a first pass cut short (a failure mid-epoch) is not kept: the next pass streams again
    partial = EpochCache(stream, batch_size=8, device=torch.device("cpu"), shuffle=True, seed=0)
    next(iter(partial()))
    assert partial.rows is None


def test_direct_splits_give_every_row_to_one_rank_and_equal_steps_to_all(tmp_path):
    """Cached epochs without Ray Data: the ranks' reads partition the rows (row groups round robin, or every
    world-th row when there are fewer row groups than ranks), split train/validation as Ray Data's path does
    (SplitFeatures), and a row limit gives every rank the same number of rows per epoch."""
    import pyarrow.parquet as pq

    from pipeline.config import DataSection, StorageSection
    from pipeline.rows import SplitFeatures
    from pipeline.storage import Storage
    from pipeline.train import DirectSplits, EpochCache

    data = DataSection(input=str(tmp_path), features=["f0", "f1"], id_columns=["id"], validation_fraction=0.1)
    files = []
    for i, (lo, n) in enumerate([(0, 70), (70, 50)]):
        ids = np.arange(lo, lo + n)
        f = tmp_path / f"part-{i}.parquet"
        pq.write_table(pa.table({"id": ids, "f0": ids * 1.0, "f1": ids * 2.0}), f, row_group_size=20)  # 4 + 3
        files.append(str(f))
    direct = DirectSplits(files, ["id", "f0", "f1"], data, 2)
    storage = Storage(StorageSection())
    whole = pa.concat_tables(pq.read_table(f) for f in files)

    def f0(t: pa.Table) -> list[float]:  # the rows' first feature (= their id)
        return t.column("x").combine_chunks().flatten().to_numpy()[0::2].tolist()

    want = {s: sorted(f0(SplitFeatures(data, 2, s)(whole))) for s in ("train", "validation")}
    assert 0 < len(want["validation"]) < len(want["train"])
    for world in (1, 2, 3, 10):  # 10 ranks > 7 row groups: every world-th row
        got = {"train": [], "validation": []}
        counts = []
        for rank in range(world):
            train, val = direct.read(storage, rank, world)
            for s, tables in (("train", train), ("validation", val)):
                got[s] += [v for t in tables for v in f0(t)]
            counts.append(sum(t.num_rows for t in train))
        assert {s: sorted(v) for s, v in got.items()} == want, world  # every row once, in its split
        assert min(counts) > 0, (world, counts)
    # the smallest share bounds every rank's epoch: the same number of steps everywhere, new rows each time
    rows = torch.arange(30, dtype=torch.float32).reshape(30, 1)
    cache = EpochCache(None, batch_size=8, device=torch.device("cpu"), shuffle=True, seed=0, rows=rows, limit=20)
    passes = [torch.cat(list(cache())) for _ in range(3)]
    assert all(p.shape[0] == 20 for p in passes) and len({tuple(p[:, 0].tolist()) for p in passes}) == 3
    assert [b.shape[0] for b in cache()] == [8, 8, 4]


def test_streamed_epochs_read_the_files_in_a_new_order_each_time(ray_cluster, tmp_path):
    """What fit() streams when the splits are not cached: each execution (epoch) reads the files in a new
    order, and every row once."""
    import pyarrow.parquet as pq

    from pipeline.config import StorageSection
    from pipeline.inputs import InputSpec
    from pipeline.read import read_dataset
    from pipeline.storage import Storage

    files = []
    for i in range(8):
        files.append(str(tmp_path / f"part-{i}.parquet"))
        pq.write_table(pa.table({"id": np.arange(i * 10, i * 10 + 10)}), files[-1])
    spec = InputSpec(uri=str(tmp_path), files=files, feature_names=["id"], num_rows=80, columns=["id"])
    storage = Storage(StorageSection())

    def first_ids(ds):
        return tuple(int(b["id"][0]) for b in ds.iter_batches(batch_size=None, batch_format="numpy"))

    ds = read_dataset(spec, storage, with_paths=False, shuffle_files=True)
    orders = {first_ids(ds) for _ in range(4)}
    assert len(orders) > 1 and all(sorted(o) == list(range(0, 80, 10)) for o in orders)


def _planted_outliers(seed: int = 0):
    """Normal rows on a line through 6-D space, plus 15% far-off rows on another line: the anomalies, with
    more variance than the normal rows, so the plain loss's one code unit follows them."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(850, 1, generator=g) * torch.tensor([[1.0, 1, 1, 1, 1, 1]]) + 0.05 * torch.randn(850, 6, generator=g)
    outliers = (4 + torch.rand(150, 1, generator=g)) * torch.sign(torch.randn(150, 1, generator=g)) * torch.tensor([[1.0, -1, 1, -1, 1, -1]])
    x = torch.cat([normal, outliers])
    return x[torch.randperm(len(x), generator=g)], torch.cat([normal, outliers])


def _fit(x: torch.Tensor, trim_fraction: float) -> torch.nn.Module:
    from pipeline.train import LossForward

    torch.manual_seed(0)
    model = build_model(6, kind="dense", hidden_dims=[6], latent_dim=1, activation="linear", score="recon")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        train_epoch(batches(x, 50), LossForward(model, trim_fraction), opt)
    return model


def test_trimmed_loss_ignores_planted_outliers_that_pull_the_plain_loss():
    x, ordered = _planted_outliers()
    plain, trimmed = _fit(x, 0.0), _fit(x, 0.2)
    with torch.no_grad():
        errs = {name: m.score(ordered) for name, m in (("plain", plain), ("trimmed", trimmed))}
    normal_err = {k: float(v[:850].mean()) for k, v in errs.items()}
    # the plain loss spends its one code unit partly on the outliers' direction; the trimmed one learns the
    # normal rows' line, reconstructs them better and the outliers worse
    assert normal_err["trimmed"] < 0.5 * normal_err["plain"]
    auroc = {k: float((v[850:, None] > v[None, :850]).double().mean()) for k, v in errs.items()}
    assert auroc["trimmed"] > 0.99 and auroc["trimmed"] > auroc["plain"] + 0.02


def test_trimmed_rows_keeps_the_best_reconstructed_share():
    from pipeline.train import trimmed_rows

    model = build_model(3, kind="dense", hidden_dims=[3], latent_dim=1, score="recon")
    x = torch.randn(40, 3)
    kept = trimmed_rows(model, x, 0.25)
    with torch.no_grad():
        err = model.score(x)
    assert kept.shape == (30, 3)
    assert float(model.score(kept).max()) <= float(torch.sort(err).values[29]) + 1e-6
    assert trimmed_rows(model, x, 0.0) is x and trimmed_rows(model, x[:1], 0.5).shape == (1, 3)


def test_ensemble_trains_its_members_together_and_averages_their_scores():
    from pipeline.train import LossForward

    torch.manual_seed(0)
    ens = build_model(6, kind="dense", hidden_dims=[6], latent_dim=2, ensemble=3)
    first, second = (m.encoder[0].weight for m in ens.members[:2])
    assert len(ens.members) == 3 and not torch.equal(first, second)  # each from its own random start
    x = torch.randn(512, 2) @ torch.randn(2, 6)
    with torch.no_grad():
        before = [float(m.eval_loss(x)) for m in ens.members]
    opt = torch.optim.AdamW(ens.parameters(), lr=1e-2)
    for _ in range(10):
        train_epoch(batches(x, 64), LossForward(ens), opt)  # one optimizer steps every member
    ens.eval()
    with torch.no_grad():
        after = [float(m.eval_loss(x)) for m in ens.members]
        s, h, sq = ens.score_and_latent(x)
        assert all(a < 0.5 * b for a, b in zip(after, before))
        torch.testing.assert_close(s, torch.stack([m.score(x) for m in ens.members]).mean(dim=0))
        torch.testing.assert_close(h, ens.members[0].latent(x))  # one code: the first member's
        torch.testing.assert_close(sq, torch.stack([m.score_and_latent(x)[2] for m in ens.members]).mean(dim=0))
