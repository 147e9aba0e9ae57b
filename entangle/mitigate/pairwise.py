"""The pairwise normalised gradient (THEORY §9): every pair stepped at the centre of its band.

For a batch-mean loss L over B pairs with per-pair coefficients (a_w, a_l) (THEORY §2), train along the surrogate

    L' = -sum_i m_i ( s_w,i / ||g_w,i|| - s_l,i / ||g_l,i|| ),   m_i = (|a_w,i| + |a_l,i|) / (2B),

with the norms detached, so that ``.grad = -sum_i m_i (g_w,i / ||g_w,i|| - g_l,i / ||g_l,i||)``. A step along it
moves each pair's chosen log-prob by ``m_i ||g_w,i|| (1 - cos_i) >= 0`` and its rejected one by
``-m_i ||g_l,i|| (1 - cos_i) <= 0`` (that pair's own term, to first order): the pitfall cannot occur for it.
m_i is (a_w,i + |a_l,i|) / (2B) for every loss whose chosen coefficient is positive (all margin losses; for DPO
m_i = βσ(-β·margin_i) / B); the absolute value keeps the step on the preference's side for a loss whose chosen
coefficient is negative at that pair (e.g. ``sppo_hard`` past its target).

One forward pass is shared: the engine measures every sequence's exact gradient norm over all trainable parameters
in a backward pass that computes no parameter gradient. Its hooks keep each layer's factors (inputs and output
gradients), from which the direction is formed per parameter once the norms are known (book-keeping: for a linear
layer ``(c * grad_out)^T input``, the weight-gradient product a backward pass computes), so the returned loss is
linear in the parameters: ``loss.backward()`` only adds that direction to ``.grad`` (scaled as the caller scales the
loss, through DDP's hooks), without a second pass through the activations. On a ``fully_shard`` model, or for a
contribution kind the engine cannot sum so (the pass is then run again), the surrogate backpropagates through the
forward's kept graph instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from entangle.capture.logprobs import model_logits, response_lengths, token_logps
from entangle.capture.measure import gram_pass
from entangle.capture.params import ParamSpec
from entangle.metrics.objectives import ObjectiveSpec
from entangle.metrics.pairs import batch_weights, pair_frame


def pairwise_normalized_loss(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    objective: ObjectiveSpec = "sigmoid",
    ref_logps: torch.Tensor | None = None,
    *,
    params: ParamSpec = None,
    loss_weights: Sequence[float] | None = None,
    forward: Callable = model_logits,
    **hyper: Any,
) -> tuple[torch.Tensor, pd.DataFrame]:
    """A scalar whose value is the batch-mean loss L and whose gradient is the pairwise normalised direction.

    Arguments as in :func:`pairwise_normalized_backward`. Returns ``(loss, frame)``: ``loss`` = L + L' - L'
    (detached parts), a 0-dim tensor in the log-probs' dtype on the model's device, to be backpropagated by the
    caller (a trainer scales it for gradient accumulation); ``frame`` is the measurement's :func:`pair_frame`.
    The forward runs in the engine's measurement mode (eval: no dropout, so no gradient checkpointing either).
    """
    n = batch["input_ids"].shape[0]
    if n % 2:
        raise ValueError(f"the batch needs 2B sequences (chosen, then rejected); got {n}")
    out = _normalized_loss(model, batch, objective, ref_logps, params, loss_weights, forward, hyper, bookkeeping=True)
    if out is None:     # a contribution kind without a weighted sum: the pass again, keeping the graph
        out = _normalized_loss(model, batch, objective, ref_logps, params, loss_weights, forward, hyper,
                               bookkeeping=False)
    return out


def _normalized_loss(model, batch, objective, ref_logps, params, loss_weights, forward, hyper: dict, *,
                     bookkeeping: bool) -> tuple[torch.Tensor, pd.DataFrame] | None:
    """:func:`pairwise_normalized_loss` with the direction formed by book-keeping (``None`` when a contribution
    cannot be summed so) or, without it or on a sharded model, by the surrogate's backward through the kept graph."""
    n = batch["input_ids"].shape[0]
    lengths = response_lengths(batch)

    def weights(logps: torch.Tensor) -> torch.Tensor:
        return batch_weights(objective, logps, lengths, ref_logps, loss_weights, **hyper)

    with gram_pass(model, batch, params, pairs=True) as engine:
        bookkeeping = bookkeeping and not engine.sharded
        if bookkeeping:
            engine.keep_contributions()
        with engine:
            logps = token_logps(forward(engine.model, batch), batch).sum(-1)
            engine.set_weights(weights, logps)
            # book-keeping needs no second pass through the graph: it is freed as the norm pass goes
            engine.backward(logps.sum(), retain_graph=not bookkeeping)
        measurement = engine.finish(logps.detach().to(torch.float64), lengths)
    frame = pair_frame(measurement.plain, objective, ref_logps, loss_weights=loss_weights, **hyper)
    B = n // 2
    m = (frame["a_chosen"].abs() + frame["a_rejected"].abs()).to_numpy() / (2 * B)
    norms = np.sqrt(frame[["norm2_chosen", "norm2_rejected"]].to_numpy())
    zero = (m > 0) & (norms == 0).any(axis=1)
    if zero.any():
        i = int(np.flatnonzero(zero)[0])
        side = "chosen" if norms[i, 0] == 0 else "rejected"
        raise ValueError(f"pair {i}: the {side} response's log-prob has a zero gradient over the trained "
                         f"parameters, so it cannot be normalised (pairs with a zero norm: "
                         f"{np.flatnonzero(zero).tolist()})")
    with np.errstate(divide="ignore", invalid="ignore"):   # m = 0 pairs take no part, whatever their norms
        scale = np.where(m[:, None] > 0, m[:, None] / norms, 0.0)
    coef = torch.as_tensor(np.concatenate([scale[:, 0], -scale[:, 1]]), dtype=logps.dtype, device=logps.device)
    value = torch.as_tensor(float(frame["loss"].mean()), dtype=logps.dtype, device=logps.device)
    # book-keeping: the direction -sum_i coef_i g_i formed per parameter from the factors the norm pass saw, so the
    # surrogate is linear in the parameters and its backward never goes through the activations again
    if bookkeeping:
        direction = engine.weighted_grads(-coef.to(torch.float64))
        if direction is None:
            return None
        named = dict(engine.named)
        surrogate = sum((named[name] * g).sum() for name, g in direction.items())
    else:                                       # sharded, or the fallback: the surrogate's backward (kept graph)
        surrogate = -(coef * logps).sum()
    return value + (surrogate - surrogate.detach()), frame


def pairwise_normalized_backward(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    objective: ObjectiveSpec = "sigmoid",
    ref_logps: torch.Tensor | None = None,
    *,
    params: ParamSpec = None,
    loss_weights: Sequence[float] | None = None,
    forward: Callable = model_logits,
    **hyper: Any,
) -> tuple[float, pd.DataFrame]:
    """Fill ``.grad`` with the pairwise normalised direction of ``objective`` on ``batch`` (THEORY §9).

    ``.grad += -sum_i m_i (g_w,i / ||g_w,i|| - g_l,i / ||g_l,i||)`` over the trainable parameters (accumulating
    like ``loss.backward()``), with m_i = (|a_w,i| + |a_l,i|) / (2B) from the objective's coefficients and the
    exact per-sequence gradient norms measured from the same forward pass (module docstring).

    Args:
        model: a causal LM (transformers ``*ForCausalLM``, PEFT model); its trainable parameters are trained.
        batch: ``input_ids``, ``attention_mask``, ``completion_mask`` [2B, L] as ``encode_pairs`` builds them.
        objective: any per-pair objective of the registry (name, callable, list with ``loss_weights``).
        ref_logps: [2B] reference log-probs (chosen, then rejected) for objectives that need them.
        params: the parameters whose gradient norms normalise (``select_params`` spec); default all trainable.
            Parameters left out get no gradient.
        loss_weights: weights of a list of objectives.
        forward: ``forward(model, batch) -> logits`` for models that need a custom call.
        hyper: the objective's hyper-parameters (``beta=0.1``, ...).

    Returns:
        ``(loss, frame)``: the batch-mean loss L of the objective (a float) and the measurement's per-pair frame
        (:func:`entangle.pair_frame`: norms, cosines, coefficients, the plain step's predicted changes).

    Raises:
        ValueError: naming the pair whose chosen or rejected log-prob has a zero gradient (it cannot be normalised);
            a pair whose coefficients are both zero takes no part and is not checked.
    """
    loss, frame = pairwise_normalized_loss(model, batch, objective, ref_logps, params=params,
                                           loss_weights=loss_weights, forward=forward, **hyper)
    loss.backward()
    return float(loss.detach()), frame
