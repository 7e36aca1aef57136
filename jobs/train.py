"""Train an autoencoder on Parquet shards and write the model artifact.

    python -m jobs.train --config jobs/configs/demo.yaml [--set train.epochs=5 ...] [--overwrite]
"""

from __future__ import annotations

from pipeline.cli import base_parser, config_from_args, run_main
from pipeline.cluster import connect
from pipeline.jobs import check_train, train_job
from pipeline.storage import Storage


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--overwrite", action="store_true", help="replace a finished run of the same run.name")
    args = p.parse_args(argv)

    def _run() -> None:
        cfg = config_from_args(args)
        storage = Storage(cfg.storage)
        spec = check_train(cfg, storage, args.overwrite)  # storage and input problems fail before Ray starts
        connect(cfg.run.num_cpus)
        train_job(cfg, storage, spec=spec)

    return run_main(_run)


if __name__ == "__main__":
    raise SystemExit(main())
