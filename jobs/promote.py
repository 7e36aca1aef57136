"""Move a registered model's alias (promotion) after checking the candidate against the alias's current holder.

    python -m jobs.promote NAME VERSION [--alias champion] [--tolerance 0.05] [--force] [--tracking-uri URI]

The candidate needs the holder's input layout (same columns, order and roles) and a validation loss no worse
than the holder's by more than --tolerance (relative). Otherwise it refuses in one line (exit 2) unless
--force. Each move is recorded as tags: `promoted.<alias>` on the version, `alias.<alias>.last_move` on the
model (who, when, previous version). The server comes from --tracking-uri, else MLFLOW_TRACKING_URI.
"""

from __future__ import annotations

import argparse

from pipeline.cli import run_main
from pipeline.registry import DEFAULT_TOLERANCE, client_for, promote
from pipeline.tracking_section import TrackingSection


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="registered model name (tracking.registered_model)")
    p.add_argument("version", type=int, help="the version to promote")
    p.add_argument("--alias", default="champion", help="the alias to move (default: champion)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="how much worse (relative) the validation loss may be than the holder's (default 0.05)")
    p.add_argument("--force", action="store_true", help="promote even if the checks fail (recorded in the tag)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking server (else MLFLOW_TRACKING_URI)")
    args = p.parse_args(argv)

    def _run() -> None:
        uri, _ = TrackingSection(uri=args.tracking_uri).resolved_uri()
        if uri is None:
            p.error("no tracking server: pass --tracking-uri or set MLFLOW_TRACKING_URI")
        move = promote(client_for(uri), args.name, str(args.version), args.alias, args.tolerance, args.force)
        print(f"[promote] {move.line()}", flush=True)

    return run_main(_run)


if __name__ == "__main__":
    raise SystemExit(main())
