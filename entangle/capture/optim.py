"""Reading an optimizer's state as a geometry on parameter space (THEORY §5)."""

from __future__ import annotations

import torch

from .params import ParamSpec, select_params, unwrap_model


def adam_preconditioner(optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                        params: ParamSpec = None) -> dict[str, torch.Tensor]:
    """Adam/AdamW's diagonal metric ``P = 1 / (sqrt(v_hat) + eps)`` per measured parameter name.

    ``v_hat`` is the bias-corrected second moment ``exp_avg_sq / (1 - beta2^step)`` (``max_exp_avg_sq``
    with amsgrad). Pass the result as ``sequence_gram(..., preconditioner=P)`` to get ``g_i^T P g_j``.
    Wrappers with an ``.optimizer`` attribute (accelerate's AcceleratedOptimizer) are unwrapped.
    """
    while hasattr(optimizer, "optimizer"):          # AcceleratedOptimizer subclasses Optimizer and wraps one
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        raise TypeError(f"adam_preconditioner needs torch.optim.Adam/AdamW, got {type(optimizer).__name__}")
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out = {}
    for name, p in select_params(unwrap_model(model), params):
        state = optimizer.state.get(p, {})
        if id(p) not in group_of:
            raise ValueError(f"parameter {name!r} is not managed by the optimizer")
        if "exp_avg_sq" not in state:
            raise ValueError(f"optimizer has no state for {name!r} yet (call it after the first optimizer.step())")
        group = group_of[id(p)]
        v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
        step = float(state["step"])
        v_hat = v.to(torch.float64) / (1 - group["betas"][1] ** step)
        out[name] = 1.0 / (v_hat.sqrt() + group["eps"])
    return out
