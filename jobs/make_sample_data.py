"""Write synthetic Parquet shards with planted anomalies.

    python -m jobs.make_sample_data --out data/sample --rows 20000 --shards 4        # the mixed table
    python -m jobs.make_sample_data --out data/vec --layout vector --features 32      # numeric vectors
    python -m jobs.make_sample_data --out s3://bucket/sample --endpoint-url http://127.0.0.1:9000
"""

from __future__ import annotations

import argparse

from pipeline.cli import run_main
from pipeline.config import StorageSection
from pipeline.sample import write_mixed_sample, write_sample
from pipeline.storage import Storage


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/sample", help="local path or URI of the shard directory")
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--features", type=int, default=32)
    p.add_argument("--latent", type=int, default=3, help="dimension of the manifold the rows lie near")
    p.add_argument("--anomaly-fraction", type=float, default=None, help="default 0.02 (mixed), 0.01 (numeric)")
    p.add_argument("--layout", choices=["mixed", "vector", "fixed", "columns"], default="mixed",
                   help="mixed: a transactions-like table (numeric, categorical, boolean columns, nulls); else "
                        "numeric features as list<float>, fixed_size_list<float>, or one column each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (else AWS_ENDPOINT_URL)")
    args = p.parse_args(argv)

    def _run() -> None:
        storage = Storage(StorageSection(endpoint_url=args.endpoint_url))
        if args.layout == "mixed":
            files = write_mixed_sample(args.out, storage, rows=args.rows, shards=args.shards,
                                       anomaly_fraction=args.anomaly_fraction or 0.02, seed=args.seed)
            print(f"wrote {args.rows} rows in {len(files)} shards to {args.out}")
            return
        files = write_sample(args.out, Storage(StorageSection(endpoint_url=args.endpoint_url)), rows=args.rows,
                             shards=args.shards, features=args.features, latent=args.latent,
                             anomaly_fraction=args.anomaly_fraction or 0.01, seed=args.seed, layout=args.layout)
        print(f"wrote {args.rows} rows in {len(files)} shards to {args.out}")

    return run_main(_run)


if __name__ == "__main__":
    raise SystemExit(main())
