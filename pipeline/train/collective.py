"""Reductions, broadcasts and gathers over the training ranks (torch.distributed). Outside a process group
they return their input, so the epoch loop and the tensor input run unchanged in one plain process (the tests)
and under Ray Train.
"""

from __future__ import annotations

from typing import Any

import torch


def _in_group() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """The number of ranks; 1 without a group."""
    import torch.distributed as dist

    return dist.get_world_size() if _in_group() else 1


def all_reduce_tensor(t: torch.Tensor, op: str = "SUM") -> torch.Tensor:
    """A CPU tensor reduced over the ranks (`op`: a torch.distributed.ReduceOp name), as a new CPU tensor; `t`
    itself without a group. Under NCCL, which reduces device tensors only, the reduction runs on the device."""
    import torch.distributed as dist

    if not _in_group():
        return t
    out = t.clone()
    if dist.get_backend() == "nccl":
        out = out.cuda()
    dist.all_reduce(out, op=getattr(dist.ReduceOp, op))
    return out.cpu()


def all_reduce(values: list[float], op: str = "SUM") -> list[float]:
    """`values` reduced over the ranks (`op`: a torch.distributed.ReduceOp name); as they are without one."""
    if not _in_group():
        return values
    return all_reduce_tensor(torch.tensor(values, dtype=torch.float64), op).tolist()


def all_reduce_sum(values: list[float]) -> list[float]:
    return all_reduce(values)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (the others pass anything, e.g. None); `obj` itself without a group."""
    import torch.distributed as dist

    if not _in_group():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank; `[obj]` without a group."""
    import torch.distributed as dist

    if not _in_group():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
