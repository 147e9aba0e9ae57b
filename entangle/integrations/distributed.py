"""The few ``torch.distributed`` collectives the monitor needs: shard the probe, gather to rank 0, broadcast back,
and :func:`collective`, which runs one measurement on every rank without letting a failure hang the others.

Every function works unchanged in a single process (no process group, or a group of one).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
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


def check_every_rank_measures(sharded: bool, n_pairs: int, world: int) -> None:
    """On a model sharded by ``fully_shard`` every rank must run each measurement's passes (a sharded module's
    forward all-gathers its parameters, a collective): refuse a probe that leaves a rank without a pair."""
    if sharded and n_pairs < world:
        raise ValueError(f"the probe has {n_pairs} pairs for {world} ranks: on a model sharded by "
                         "torch.distributed.fsdp.fully_shard every rank takes part in every measurement's forward "
                         f"and backward, so each needs a pair of its own; give the probe at least {world} pairs")


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


def collective(what: str, step: int, local: Callable[[], Any], combine: Callable[[list[Any]], dict[str, float]],
               *, rank: int, world: int, strict: bool, logger: logging.Logger) -> dict[str, float]:
    """Run ``local`` on every rank, ``combine`` the gathered results on rank 0 and share its scalars.

    ``rank``/``world``: this process's place in the group measuring together (``world == 1``: alone, no
    collective, even inside a process group). A failure is logged with the step and gives ``{}`` (every rank still
    joins the collectives, so none hangs), or is raised on every rank with ``strict`` (alone: the original
    exception).
    """
    error = None
    try:
        payload = local()
    except Exception as e:
        if strict and world == 1:
            raise
        logger.exception("entangle: %s at step %d failed on rank %d", what, step, rank)
        payload, error = None, f"rank {rank}: {type(e).__name__}: {e}"
    parts = gather_to_main((payload, error)) if world > 1 else [(payload, error)]
    result = None
    if parts is not None:
        errors = [e for _, e in parts if e is not None]
        if not errors:
            try:
                result = combine([p for p, _ in parts])
            except Exception as e:
                if strict and world == 1:
                    raise
                logger.exception("entangle: writing the %s of step %d failed", what, step)
                errors = [f"rank 0: {type(e).__name__}: {e}"]
        result = (result, "; ".join(errors) or None)
    scalars, error = broadcast_from_main(result) if world > 1 else result
    if error is not None and strict:
        raise RuntimeError(f"entangle: {what} at step {step} failed: {error}")
    return scalars or {}
