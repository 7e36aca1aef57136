"""Train an autoencoder on Parquet shards and write the model artifact and `<run>/report.html`.

    python -m jobs.train --config jobs/configs/demo.yaml [--set train.epochs=5 ...] [--overwrite]
    python -m jobs.train --config jobs/configs/demo.yaml --dry-run
"""

from __future__ import annotations

from pipeline.cli import base_parser, config_from_args, run_main
from pipeline.dryrun import dry_run


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--overwrite", action="store_true", help="replace a finished run of the same run.name")
    p.add_argument("--dry-run", action="store_true",
                   help="check config, storage access and input schema, then exit (no Ray, no training)")
    args = p.parse_args(argv)

    def _run() -> None:
        cfg = config_from_args(args)
        if args.dry_run:
            dry_run(cfg)
            return
        from pipeline.jobs import train_job  # torch and Ray: only past the dry run

        train_job(cfg, overwrite=args.overwrite)

    return run_main(_run)


if __name__ == "__main__":
    raise SystemExit(main())
