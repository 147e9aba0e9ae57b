"""Sharded models: what a measurement needs whole is gathered one parameter at a time, the rest is refused.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) every registered parameter is a ``DTensor`` holding this rank's
shard; during a module's forward (and its backward) the module holds the whole parameter as a plain tensor. The
per-example products need only the activations and output gradients the hooks see, which sharding does not split.
What is sharded — Adam's preconditioner and a parameter update, kept as ``DTensor`` of the parameter's placement —
is gathered by :func:`whole` one parameter at a time where the engine uses it (a collective: every rank gathers
the same parameters in the same order, which one forward and backward pass of the same model on every rank does).

``FullyShardedDataParallel`` (FSDP1: flat parameters under renamed modules) and DeepSpeed ZeRO-3 (parameters
partitioned outside the forward, ``param.ds_id`` set by ``deepspeed.zero.Init``) are refused by
:func:`check_supported` with a message naming what works instead.
"""

from __future__ import annotations

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:                       # a torch built without distributed support
    DTensor = ()


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (an FSDP2 parameter, its Adam state, or a tensor computed from them)."""
    return isinstance(tensor, DTensor)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a ``DTensor`` gathered from every rank (a collective), anything else as it is."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor``: a ``DTensor``'s local shard, anything else as it is."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def model_is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` has FSDP2-sharded parameters (``fully_shard``)."""
    return any(is_sharded(p) for p in model.parameters())


def reshard(model: torch.nn.Module) -> None:
    """Free the whole parameters ``fully_shard`` modules still hold after a forward without a backward (the root
    keeps them by default): ``named_parameters()`` then gives the sharded ``DTensor`` parameters again, the ones the
    optimizer holds, and a value written into them is what the next forward gathers. Not a collective."""
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule

        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


def check_supported(model: torch.nn.Module) -> None:
    """Refuse the sharding schemes a measurement cannot read: FSDP1 and DeepSpeed ZeRO-3.

    Raises ``ValueError`` naming the first module or parameter at fault.
    """
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FullyShardedDataParallel

        fsdp1 = next((name for name, m in model.named_modules() if isinstance(m, FullyShardedDataParallel)), None)
        if fsdp1 is not None:
            raise ValueError(
                f"module {fsdp1 or type(model).__name__!r} is wrapped in FullyShardedDataParallel (FSDP1), whose flat "
                "parameters entangle cannot map to the model's layers; shard it with "
                "torch.distributed.fsdp.fully_shard (FSDP2) instead (accelerate / TRL: fsdp_version: 2 in the FSDP "
                "plugin config, transformers: fsdp_config={'version': 2})")
    zero3 = next((name for name, p in model.named_parameters() if hasattr(p, "ds_id")), None)
    if zero3 is not None:
        raise ValueError(
            f"parameter {zero3!r} is partitioned by DeepSpeed ZeRO-3 (it has a ds_id): outside the forward its "
            "tensor is empty, so the parameter snapshot, the realised update and Adam's state cannot be read one "
            "layer at a time; use ZeRO-1/2 (full parameters on every rank) or torch.distributed.fsdp.fully_shard "
            "(FSDP2)")


def check_same_on_every_rank(key: object, what: str) -> None:
    """Refuse a collective pass that the ranks would run on different inputs: on a ``fully_shard`` model every
    module's forward all-gathers its parameters, so every rank must make the same calls in the same order, or the
    ranks hang or mix their results. ``key`` (any picklable value) stands for the inputs; all ranks raise together.
    A collective itself (``all_gather_object`` of ``key``); nothing happens outside a process group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    if world == 1:
        return
    keys: list[object] = [None] * world
    torch.distributed.all_gather_object(keys, key)
    other = next((r for r, k in enumerate(keys) if k != keys[0]), None)
    if other is not None:
        raise ValueError(f"{what} on a model sharded by torch.distributed.fsdp.fully_shard is a collective: every rank "
                         f"must run it on the same inputs, but rank {other}'s differ from rank 0's")


def check_whole(named: list[tuple[str, torch.Tensor]], what: str) -> None:
    """Refuse a computation that needs every measured parameter whole at once on a ``fully_shard`` model."""
    sharded = next((name for name, p in named if is_sharded(p)), None)
    if sharded is not None:
        raise ValueError(f"{what} needs every parameter whole, but {sharded!r} is sharded by "
                         "torch.distributed.fsdp.fully_shard; use the default method on a sharded model")


def zero_optimizer(optimizer: object) -> str | None:
    """The class name of a DeepSpeed ZeRO optimizer in ``optimizer``'s ``.optimizer`` chain (accelerate's
    wrappers), or ``None``. ZeRO-1/2/3 keep Adam's state as flat fp32 partitions, not per parameter."""
    while optimizer is not None:
        name = next((c.__name__ for c in type(optimizer).__mro__ if c.__name__.startswith("DeepSpeedZeroOptimizer")),
                    None)
        if name is not None:
            return name
        optimizer = getattr(optimizer, "optimizer", None)
    return None
