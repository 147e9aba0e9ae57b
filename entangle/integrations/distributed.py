"""The few ``torch.distributed`` collectives the monitor needs: shard the probe, gather to rank 0, broadcast back.

Every function works unchanged in a single process (no process group, or a group of one).
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(n: int, rank: int, world: int) -> list[int]:
    """The indices of ``range(n)`` this rank handles: every ``world``-th, starting at ``rank``."""
    return list(range(rank, n, world))


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (a list in rank order), ``None`` on the other ranks."""
    rank, world = rank_and_world()
    if world == 1:
        return [obj]
    out = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    _, world = rank_and_world()
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
