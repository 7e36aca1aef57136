"""Which checkpoint a (re)started training worker group resumes from.

Ray Train hands a restarted worker group the newest checkpoint its controller has *registered*. The
controller registers a report only when it polls the workers (every 2 s, `RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`)
and all ranks have reported that round; rank 0 has uploaded the checkpoint to storage before it reports. So
when a node is lost just after an epoch, the newest checkpoint, and on short epochs the one before it too,
can be complete in storage but unknown to the controller: the workers restart from an older checkpoint, or,
when none is registered yet, from scratch (issue 12: a node lost after epoch 2 of 8 restarted at
`epoch 1/8`, and a run on other nodes resumed "after epoch 0").

Here rank 0 also looks in the run's checkpoint directory in storage, takes the newest `state.pt` that loads
(an upload cut off half-way does not), and every rank resumes from the same one.
"""

from __future__ import annotations

import io
from typing import Any, Optional

import torch

from pipeline.errors import StorageError
from pipeline.storage import Storage

CHECKPOINT_FILE = "state.pt"


def newest_stored_state(storage: Storage, checkpoints_uri: str) -> tuple[Optional[str], Optional[dict[str, Any]]]:
    """(URI, loaded state) of the newest complete checkpoint under `checkpoints_uri`, or (None, None).

    Ray Train names checkpoint directories `checkpoint_<UTC timestamp>`, so the names sort by age."""
    files = [f for f in storage.list_files(checkpoints_uri, suffix="/" + CHECKPOINT_FILE)
             if f.rsplit("/", 2)[-2].startswith("checkpoint_")]
    for uri in sorted(files, reverse=True):
        try:
            return uri, load_state(storage.read_bytes(uri))
        except Exception:  # noqa: BLE001 - a partial upload: try the next older one
            continue
    return None, None


def load_state(data: bytes) -> dict[str, Any]:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def resume_state(registered: Optional[dict[str, Any]], storage: Optional[Storage], checkpoints_uri: Optional[str],
                 rank: int) -> tuple[Optional[dict[str, Any]], str]:
    """The state to resume from and where it came from: Ray Train's registered checkpoint (`registered`, or
    None), unless storage holds a newer complete one. All ranks call this; rank 0 chooses for all."""
    import torch.distributed as dist

    choice: list[Any] = [None]
    if rank == 0 and storage is not None and checkpoints_uri:
        try:
            uri, stored = newest_stored_state(storage, checkpoints_uri)
        except StorageError as e:  # the registered checkpoint (or none) still works: say why, go on
            print(f"[train] could not look for newer checkpoints in {checkpoints_uri}: {e}", flush=True)
            uri, stored = None, None
        if stored is not None and (registered is None or int(stored["epoch"]) > int(registered["epoch"])):
            choice[0] = uri
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    if choice[0] is None:
        return registered, "registered"
    return (load_state(storage.read_bytes(choice[0])) if storage is not None else registered), choice[0]
