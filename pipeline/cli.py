"""What the job entrypoints share: the argument parser, config loading, and the one-line error contract.

A `PipelineError` anywhere (including inside Ray tasks and train workers) ends the job with one line,
`error: <message>`, on stderr and exit code 2. Anything else is a bug and keeps its traceback (exit 1).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

from pipeline.cluster import set_verbose
from pipeline.config import Config, load_config
from pipeline.errors import find_pipeline_error

EXIT_USER_ERROR = 2


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (see jobs/configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, value parsed as YAML (repeatable): --set train.epochs=5")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="also show Ray's info logs (Ray Data execution plans, Ray Train reports and checkpoint "
                        "paths); without it they go only to Ray's session logs")
    return p


def add_schedule_args(p: argparse.ArgumentParser, model_help: str) -> None:
    """The flags a scheduled run uses: which day it is, which stored model, and a check-only mode."""
    p.add_argument("--run-date", default=None, metavar="YYYY-MM-DD",
                   help="the output partition (output.uri/run_date=YYYY-MM-DD/); default: today in UTC")
    p.add_argument("--model", default=None, metavar="RUN_NAME|latest|models:/NAME@ALIAS", help=model_help)
    p.add_argument("--dry-run", action="store_true",
                   help="check config, storage access, input schema (and the model), then exit; no Ray")


def config_from_args(args: argparse.Namespace) -> Config:
    """The config the flags name; also applies --verbose (every job reads its config first)."""
    set_verbose(getattr(args, "verbose", False))
    return load_config(args.config, args.overrides)


def run_main(fn: Callable[[], Optional[int]]) -> int:
    """Run `fn`, turning user errors into one line and exit code 2."""
    try:
        rc = fn()
        return int(rc or 0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BaseException as e:  # noqa: BLE001 - the one place errors are turned into exit codes
        user = find_pipeline_error(e)
        if user is not None:
            print(f"error: {user}", file=sys.stderr, flush=True)
            return EXIT_USER_ERROR
        raise
