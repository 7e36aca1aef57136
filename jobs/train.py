"""Train an autoencoder on Parquet shards and write the model artifact.

    python -m jobs.train --config jobs/configs/demo.yaml [--set train.epochs=5 ...] [--overwrite]
"""

from __future__ import annotations

from pipeline.cli import base_parser, config_from_args, run_main
from pipeline.jobs import train_job


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--overwrite", action="store_true", help="replace a finished run of the same run.name")
    args = p.parse_args(argv)

    def _run() -> None:
        cfg = config_from_args(args)
        train_job(cfg, overwrite=args.overwrite)

    return run_main(_run)


if __name__ == "__main__":
    raise SystemExit(main())
