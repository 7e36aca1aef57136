"""The scoring output's commit protocol: stage, verify, publish atomically.

Ray writes to `<output>/_staging/<attempt>/`; only when the staged scored rows plus the staged rejected
rows equal the input's rows does `publish` swap the files into `<output>/` and write `_SUCCESS` (with the
counts) last. Readers take a directory only once `_SUCCESS` is there; `_`-prefixed paths are hidden from
them. A crash before `publish` leaves the published location as it was.

Rejects (data.nan_policy=drop, data.missing=drop): rows with infinite (or missing) features are not scored;
they are written, with the id columns, raw features, `source_file` and `reason`, to `<output>/_rejects/`
(published with the output, hidden from readers of it by the `_` prefix), and counted in `_SUCCESS` as
`rejected_rows`.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, Optional

import pyarrow.compute as pc

from pipeline.storage import Storage, map_io
from pipeline.uri import join_uri

SUCCESS = "_SUCCESS"
STAGING = "_staging"
REJECTS = "_rejects"


def new_staging(out: str) -> str:
    """A fresh staging location for one attempt at `out`, named by its start time."""
    return join_uri(out, STAGING, f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}")


def remove_abandoned_staging(storage: Storage, out: str) -> None:
    """Staging attempts left by crashed runs are hidden from readers; a new run of the partition clears them."""
    staging_root = join_uri(out, STAGING)
    if storage.exists(staging_root):
        print(f"[score] removing staging left by an earlier, unfinished run: {staging_root}", flush=True)
        storage.delete_dir(staging_root)


def count_rows(storage: Storage, files: list[str], true_column: Optional[str] = None) -> tuple[int, int]:
    """Rows of Parquet `files` (from the footers) and, with `true_column`, that bool column's true values."""
    def one(f: str) -> tuple[int, int]:
        with storage.open_parquet(f) as pf:
            if true_column is None:
                return pf.metadata.num_rows, 0
            col = pf.read(columns=[true_column]).column(true_column)
            return pf.metadata.num_rows, int(pc.sum(col).as_py() or 0)

    counts = map_io(one, files)
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


def publish(storage: Storage, staging: str, out: str, success: dict[str, Any]) -> list[str]:
    """Replace `out`'s data files with the staged ones and write `_SUCCESS` last. Returns the new files.

    `_SUCCESS` goes first, so during the swap readers see an incomplete partition (and skip it), never a
    mix of old and new rows presented as complete. Deletes and moves overlap (`map_io`).
    """
    storage.delete_file(join_uri(out, SUCCESS))
    map_io(storage.delete_file, storage.list_files(out))
    storage.delete_dir(join_uri(out, REJECTS))
    # list_files hides `_` names: the staged data files, then the staged rejects
    moves = [(f, join_uri(out, f[len(staging):].lstrip("/"))) for f in storage.list_files(staging)]
    published = [dst for _, dst in moves]
    staged_rejects = join_uri(staging, REJECTS)
    moves += [(f, join_uri(out, REJECTS, f[len(staged_rejects):].lstrip("/")))
              for f in storage.list_files(staged_rejects)]
    map_io(lambda m: storage.move(*m), moves)
    storage.write_json(join_uri(out, SUCCESS), {**success, "files": [p.rsplit("/", 1)[-1] for p in published]})
    storage.delete_dir(staging)
    return published


def discard_staging(storage: Storage, staging: str) -> None:
    """Best effort, on the way out of a failed run: the original error matters more."""
    try:
        storage.delete_dir(staging)
    except Exception:  # noqa: BLE001
        pass
