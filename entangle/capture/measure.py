"""The measurement functions: one setup, then the hook engine or the exact twin (THEORY §1, §4-§6).

* :func:`measure` — every view of one forward and backward pass, asked for explicitly, in one typed
  :class:`~entangle.capture.result.Measurement`;
* :func:`sequence_gram` — the Gram matrix of one geometry (:class:`GramResult`);
* :func:`pair_statistics` — the per-pair statistics alone, products linear in the batch (:class:`PairStats`);
* :func:`update_dot` — the first-order change along an update, without per-example gradients;
* :func:`gram_pass` — the explicit engine of one pass, for code that drives the pass itself (token maps).

``method="exact"`` computes the same views from one backward pass per sequence with flattened float64 gradients:
the slow, obviously-correct twin every fast path is tested against.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch

from .engine import GramEngine, check_metric, measurement_mode, pair_weights
from .exact import exact_measurement
from .logprobs import check_batch, model_logits
from .params import ParamSpec, select_params, unwrap_model
from .result import GramResult, Measurement, PairStats
from .sharding import check_supported, check_whole, reshard

METHODS = ("auto", "exact", "ghost", "materialise")
STRUCTURES = ("full", "pairs")
Weights = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def measured(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], params: ParamSpec = None,
             preconditioner: Mapping[str, torch.Tensor] | None = None,
             delta: Mapping[str, torch.Tensor] | None = None) -> Iterator[tuple[torch.nn.Module, list]]:
    """The setup every measurement shares, the fast path and the exact twin alike: the unwrapped model and its
    measured parameters ``[(name, parameter)]``, after the batch and the per-parameter maps are checked, with
    the model in measurement mode (eval, gradients on the measured parameters only, RNG forked; all restored)."""
    model = unwrap_model(model)
    check_supported(model)
    reshard(model)                   # fully_shard: the parameters the caller's maps are keyed and shaped by
    check_batch(model, batch)
    named = select_params(model, params)
    check_metric(named, preconditioner, "preconditioner")
    check_metric(named, delta, "delta")
    with measurement_mode(model, named):
        yield model, named


@contextlib.contextmanager
def gram_pass(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], params: ParamSpec = None, *,
              method: str = "auto", plain: bool = True, preconditioner: Mapping[str, torch.Tensor] | None = None,
              delta: Mapping[str, torch.Tensor] | None = None, pairs: bool = False) -> Iterator[GramEngine]:
    """The :class:`GramEngine` of one pass over ``batch``, set up by :func:`measured`; run the pass with
    ``engine.run(batch, forward)``."""
    with measured(model, batch, params, preconditioner, delta) as (model, named):
        yield GramEngine(model, named, batch["input_ids"].shape[0], mode=method, plain=plain,
                         preconditioner=preconditioner, delta=delta, pairs=pairs)


def measure(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    params: ParamSpec = None,
    *,
    method: str = "auto",
    forward: Callable = model_logits,
    structure: str = "full",
    weights: Weights | None = None,
    plain: bool = True,
    preconditioner: Mapping[str, torch.Tensor] | None = None,
    delta: Mapping[str, torch.Tensor] | None = None,
) -> Measurement:
    """Every view asked for, from one forward and one backward pass of the summed response log-probs.

    Args:
        model: a causal LM (transformers ``*ForCausalLM``, PEFT model, or DDP-wrapped).
        batch: ``input_ids``, ``attention_mask``, ``completion_mask`` [2B, L] (see ``encode_pairs``).
        params: which parameters (see :func:`select_params`); default all trainable.
        method: ``"auto"`` (one backward, the cheaper of ghost/materialised per layer), ``"exact"`` (one backward
            per sequence; the slow twin), or force ``"ghost"`` / ``"materialise"``.
        forward: ``forward(model, batch) -> logits`` for models that need a custom call.
        structure: ``"full"``: each Gram view is a :class:`GramResult` [2B, 2B]; ``"pairs"``: a
            :class:`PairStats` — each sequence's squared norm, each pair's inner product (rows k and B + k) and
            ``K @ weights``, with O(N) instead of O(N^2) products (what the per-pair frames need).
        weights: for ``"pairs"``, the vector c [2B] of ``K @ c``, or a function of the log-probs [2B] (float64)
            returning it (e.g. ``entangle.metrics.batch_weights``).
        plain: measure the plain view ``<g_i, g_j>`` (``result.plain``).
        preconditioner: a diagonal metric ``P`` per parameter name (same shapes): also measure ``g_i^T P g_j``
            (``result.preconditioned``; Adam's geometry with :func:`adam_preconditioner`, THEORY §5).
        delta: a parameter update per name (e.g. ``theta_after - theta_before``): also measure its first-order
            prediction ``<g_i, delta>`` [2B] (``result.update``; THEORY §5).

    Returns:
        a :class:`Measurement`; the model is left exactly as found.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if structure not in STRUCTURES:
        raise ValueError(f"unknown structure {structure!r}; choose one of {STRUCTURES}")
    pairs = structure == "pairs"
    if pairs != (weights is not None):
        raise ValueError('structure="pairs" needs weights (the vector c of K @ c, or a function of the log-probs), '
                         'and weights apply to structure="pairs" only (with the full matrix, K @ c is yours to form)')
    n = batch["input_ids"].shape[0]
    if pairs and n % 2:
        raise ValueError(f'structure="pairs" needs 2B sequences (chosen, then rejected); got {n}')
    if not plain and preconditioner is None and delta is None:
        raise ValueError("nothing to measure: plain=False without a preconditioner or a delta")
    if method == "exact":
        with measured(model, batch, params, preconditioner, delta) as (model, named):
            check_whole(named, "method='exact'")
            out = exact_measurement(model, batch, named, forward, plain, preconditioner, delta)
        if pairs:
            c = pair_weights(weights, out.logps, n).cpu()
            out.plain = None if out.plain is None else out.plain.pairs(c)
            out.preconditioned = None if out.preconditioned is None else out.preconditioned.pairs(c)
        return out
    with gram_pass(model, batch, params, method=method, plain=plain, preconditioner=preconditioner, delta=delta,
                   pairs=pairs) as engine:
        return engine.run(batch, forward, weights)


def sequence_gram(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    params: ParamSpec = None,
    method: str = "auto",
    forward: Callable = model_logits,
    preconditioner: Mapping[str, torch.Tensor] | None = None,
) -> GramResult:
    """Gram matrix of per-sequence gradients of the summed response log-probs (THEORY §1, §4, §6).

    ``K_ij = <g_i, g_j>``, or with a ``preconditioner`` P the matrix ``g_i^T P g_j`` (the result's ``geometry``
    is then ``"preconditioned"``). Arguments as in :func:`measure`; for several views of one pass use
    :func:`measure`.

    Returns:
        :class:`GramResult` with ``matrix`` float64 [2B, 2B], ``logps``, ``lengths`` and per-parameter blocks
        (``result.blocks("layer")``). The model is left exactly as found.
    """
    out = measure(model, batch, params, method=method, forward=forward, plain=preconditioner is None,
                  preconditioner=preconditioner)
    return out.plain if preconditioner is None else out.preconditioned


def pair_statistics(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    weights: Weights,
    params: ParamSpec = None,
    method: str = "auto",
    forward: Callable = model_logits,
    preconditioner: Mapping[str, torch.Tensor] | None = None,
) -> PairStats:
    """Each sequence's ``||g_i||^2``, each pair's ``<g_w, g_l>`` and ``K c`` without forming ``K`` (products
    linear in the batch size): ``measure(..., structure="pairs", weights=weights)`` of one geometry."""
    out = measure(model, batch, params, method=method, forward=forward, structure="pairs", weights=weights,
                  plain=preconditioner is None, preconditioner=preconditioner)
    return out.plain if preconditioner is None else out.preconditioned


def update_dot(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    delta: Mapping[str, torch.Tensor],
    params: ParamSpec = None,
    forward: Callable = model_logits,
    method: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """First-order change of each sequence's log-prob along a parameter update (THEORY §5).

    ``pred_i = <g_i, delta>`` at the model's current parameters, computed per layer as
    ``sum_t delta_t^T dW a_t`` without per-example gradients. ``delta`` maps parameter names (as in
    ``named_parameters``) to tensors of the parameter's shape, e.g. ``theta_after - theta_before``.
    ``method="exact"`` uses one backward per sequence (the test twin).

    Returns:
        ``(pred [N] float64, logps [N] float64)``.
    """
    out = measure(model, batch, params, method=method, forward=forward, plain=False, delta=delta)
    return out.update, out.logps
