"""Which shard a batch's rows came from: the path column Ray Data's reader adds, named in per-row errors."""

from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PATH_COLUMN = "path"  # added by read_parquet(include_paths=True): names the shard in error messages
ROW_KEY = "row_hash"  # added by read_parquet(include_row_hash=True): a row's place, the split key without ids


def source_of(table: pa.Table, rows: Optional[np.ndarray] = None) -> str:
    """The shard(s) of a batch, or of the rows selected by the boolean mask `rows` (the offending ones)."""
    if PATH_COLUMN in table.column_names and table.num_rows:
        col = table.column(PATH_COLUMN)
        if rows is not None:
            col = col.filter(pa.array(rows))
        paths = pc.unique(col).to_pylist()
        return ", ".join(str(p) for p in paths[:3]) + (" ..." if len(paths) > 3 else "")
    return "input"
