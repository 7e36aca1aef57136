"""Which checkpoint a restarted worker group resumes from (pipeline/train/state.py), on local storage, no Ray."""

from __future__ import annotations

import io

import torch

from pipeline.config import StorageSection
from pipeline.train.state import newest_stored_state, resume_state
from pipeline.storage import Storage


def state_bytes(epoch: int) -> bytes:
    buf = io.BytesIO()
    torch.save({"epoch": epoch, "model": {"w": torch.full((2,), float(epoch))}}, buf)
    return buf.getvalue()


def test_the_newest_complete_stored_checkpoint_wins_over_an_older_registered_one(tmp_path):
    storage = Storage(StorageSection())
    root = tmp_path / "train" / "run"
    for name, epoch in [("checkpoint_2026-01-01_00-00-01.000000", 0), ("checkpoint_2026-01-01_00-00-02.000000", 1)]:
        (root / name).mkdir(parents=True)
        (root / name / "state.pt").write_bytes(state_bytes(epoch))
    (root / "checkpoint_2026-01-01_00-00-03.000000").mkdir()  # an upload cut off half-way
    (root / "checkpoint_2026-01-01_00-00-03.000000" / "state.pt").write_bytes(state_bytes(2)[:40])
    uri, state = newest_stored_state(storage, str(root))
    assert uri.endswith("00-00-02.000000/state.pt") and state["epoch"] == 1

    registered = {"epoch": 0}
    chosen, source = resume_state(registered, storage, str(root), rank=0)
    assert chosen["epoch"] == 1 and source == uri
    # a registered checkpoint at least as new is used as it is
    chosen, source = resume_state({"epoch": 1}, storage, str(root), rank=0)
    assert chosen == {"epoch": 1} and source == "registered"
    # nothing in storage and nothing registered: a fresh start
    assert resume_state(None, storage, str(tmp_path / "none"), rank=0) == (None, "registered")
