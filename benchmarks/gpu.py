"""GPU check: the project's plain-PyTorch train step and predictor on a CUDA device vs a plain bf16 loop.

    python -m benchmarks.gpu [--rows 1000000] [--batch-size 4096] [--repeats 3] [--out gpu-results.json]
    make bench-gpu

No Ray (its wheel need not be on the GPU box): the pipeline side is what a Ray worker runs per batch,
`pipeline.train.train_epoch` over `tensor_batches` of Arrow batches (zero-copy tensor, pinned, non-blocking
copy, normalization on the device, bf16 autocast), and `pipeline.scorer.BatchScorer` on Arrow batches (to
Arrow output columns). The baseline is a plain loop on the same device with the data already there: normalize, the
same model and optimizer under bf16 autocast; for scoring, the forward pass and the scores copied back.
Ratios are pipeline rows/s over baseline rows/s, medians of `--repeats` after a warm-up. Takes about a
minute on one H100. Without a CUDA device it prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from typing import Callable

import numpy as np
import pyarrow as pa
import torch

MODELS = {"small": ([64, 32], 8), "large": ([512, 256], 32)}
"""The benchmark's model sizes (benchmarks/bench.py): per-batch overhead dominates / compute dominates."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000, help="rows per pass (64 float features)")
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3, help="timed passes per measure (median taken)")
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = p.parse_args(argv)
    for name in ("rows", "features", "batch_size", "repeats"):
        if getattr(args, name) < 1:
            p.exit(2, f"error: --{name.replace('_', '-')} {getattr(args, name)} must be >= 1\n")
    if args.batch_size > args.rows:
        p.exit(2, f"error: --batch-size {args.batch_size} must be <= --rows {args.rows}\n")
    return args


def _timed_rows_per_s(fn: Callable[[], int], device: torch.device, repeats: int) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm-up: CUDA context, kernels, allocator
    out = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        n = fn()
        sync()
        out.append(n / (time.perf_counter() - t0))
    return float(statistics.median(out))


def measure(args: argparse.Namespace, device: torch.device) -> dict:
    """Per model size, train and score: pipeline and plain rows/s and their ratio (any device; main: CUDA)."""
    from pipeline.manifest import featurizer_of
    from pipeline.config import DataSection
    from pipeline.models import build_model
    from pipeline.predictor import Predictor
    from pipeline.rows import to_fixed_size_list
    from pipeline.scorer import BatchScorer
    from pipeline.tensors import Normalizer, autocast_for
    from pipeline.train import make_optimizer, tensor_batches, train_epoch

    torch.manual_seed(0)
    d, bs = args.features, args.batch_size
    x_cpu = torch.randn(args.rows, d) * 2.0 + 1.0
    mean, scale = x_cpu.mean(0), x_cpu.std(0)
    x_np = x_cpu.numpy()
    tables = [pa.table({"id": pa.array(np.arange(i, min(i + bs, args.rows))),
                        "features": to_fixed_size_list(x_np[i:i + bs])}) for i in range(0, args.rows, bs)]
    train_tables = [t.rename_columns(["id", "x"]) for t in tables]
    x_dev = x_cpu.to(device)
    mean_dev, scale_dev = mean.to(device), scale.to(device)
    normalizer = Normalizer(mean.tolist(), scale.tolist(), device)
    data = DataSection(input="gpu-check", features="features", id_columns=["id"], timestamp_column=None)
    results: dict = {}
    for name, (hidden, latent) in MODELS.items():
        model = build_model(d, hidden_dims=hidden, latent_dim=latent).to(device)
        opt = make_optimizer(model.parameters(), lr=1e-3, weight_decay=0.0)  # the pipeline's: fused AdamW

        def pipeline_train() -> int:
            return train_epoch(tensor_batches(train_tables, normalizer, device), model, opt, device).rows

        def plain_train() -> int:
            model.train()
            for i in range(0, args.rows, bs):
                xb = (x_dev[i:i + bs] - mean_dev) / scale_dev
                with autocast_for(device):  # bf16 on CUDA
                    loss = torch.mean((model(xb) - xb) ** 2)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            return args.rows

        manifest = {"normalization": {"mean": mean.tolist(), "scale": scale.tolist()}, "threshold": 1.0,
                    "feature_names": [f"features[{i}]" for i in range(d)], "model_version": "gpu-check"}
        predictor = BatchScorer(Predictor(model, featurizer_of(manifest), device.type, manifest), data,
                                dt.datetime.now(dt.timezone.utc))

        def pipeline_score() -> int:
            return sum(predictor(t).num_rows for t in tables)

        @torch.inference_mode()
        def plain_score() -> int:
            model.eval()
            for i in range(0, args.rows, bs):
                with autocast_for(device):
                    score, h, _ = model.score_and_latent((x_dev[i:i + bs] - mean_dev) / scale_dev)
                score.float().cpu(), h.float().cpu()
            return args.rows

        r = {}
        for measure_name, pipe_fn, base_fn in (("train", pipeline_train, plain_train),
                                               ("score", pipeline_score, plain_score)):
            p = _timed_rows_per_s(pipe_fn, device, args.repeats)
            b = _timed_rows_per_s(base_fn, device, args.repeats)
            r[measure_name] = {"pipeline_rows_per_s": p, "baseline_rows_per_s": b, "ratio": p / b}
            print(f"[gpu] {measure_name} {name}: pipeline {p:,.0f} rows/s, plain bf16 loop {b:,.0f} rows/s "
                  f"({p / b:.2f})", flush=True)
        results[name] = r
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA device here (torch.cuda.is_available() is False); run this on a GPU machine",
              file=sys.stderr)
        return 2
    device = torch.device("cuda")
    t0 = time.perf_counter()
    results = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "rows": args.rows,
               "batch_size": args.batch_size, "models": measure(args, device)}
    results["seconds"] = time.perf_counter() - t0
    print(f"[gpu] {results['device']}: done in {results['seconds']:.0f}s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
