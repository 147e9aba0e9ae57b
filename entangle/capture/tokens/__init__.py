"""Token-level gradient maps of one pair (THEORY §7).

``token_map`` returns the inner products ``<grad l_t, grad l_u>`` between the per-token gradients of a pair's
response tokens, where ``l_t = log pi(y_t | x, y_<t)`` is token t's log-prob as ``token_logps`` computes it.
Since ``s(y) = sum_t l_t``, the chosen x rejected block sums to the pair's Gram entry ``<g_w, g_l>``.

One module per method:

* ``"full"``: every parameter, exactly, with the capture engine's per-layer rules (ghost / materialised,
  sparse embeddings, tied-parameter cross terms, generic fallback) and no Python loop over tokens. Token t's
  log-prob depends only on the positions before it, so one *copy* per response token, scored at its own
  predicting position, separates the tokens' gradients (copies of a causal LM do not interact). Two ways:
  :mod:`.blockwise` (the default; memory independent of depth) and :mod:`.copies` (prefix copies through the
  whole model: the fallback, with a warning, for a model whose layout the block-wise pass cannot use, signalled
  by :class:`~.blockwise.BlockwiseUnsupported` and nothing else).
* ``"head"`` (:mod:`.head`): the output layer alone, in closed form and without a backward pass.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import pandas as pd
import torch

from ..measure import gram_pass, sequence_gram
from ..params import ParamSpec
from ..sharding import check_same_on_every_rank, model_is_sharded
from .blockwise import CHUNK_HIDDEN, Blockwise, BlockwiseUnsupported, token_copies
from .copies import last_position_logits, prefix_copies
from .head import head_token_gram
from .positions import pair_rows, response_positions

__all__ = ["BLOCKS", "CHUNK_HIDDEN", "METHODS", "STRATEGIES", "BlockwiseUnsupported", "full_token_gram",
           "head_token_gram", "pair_rows", "response_positions", "token_gram", "token_map"]

METHODS = ("full", "head")
BLOCKS = ("wl", "ww", "ll")
STRATEGIES = ("auto", "blockwise", "copies")


def token_gram(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    pair: int,
    params: ParamSpec = None,
    method: str = "full",
) -> tuple[torch.Tensor, int]:
    """Gram matrix float64 [Tw + Tl, Tw + Tl] of one pair's per-token gradients, chosen tokens first.

    Returns the matrix and Tw, the number of chosen response tokens. ``method`` as in :func:`token_map`. On a model
    sharded by ``fully_shard`` it is a collective: every rank calls it with the same pair (checked).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    rows = pair_rows(batch, pair)
    if model_is_sharded(model):
        mask = batch["attention_mask"]
        check_same_on_every_rank((method, [batch["input_ids"][r][mask[r].bool()].tolist() for r in rows],
                                  [response_positions(batch, r).tolist() for r in rows]), "a token map")
    n_w = int(response_positions(batch, rows[0]).numel())
    if method == "head":
        return head_token_gram(model, batch, rows, params), n_w
    return full_token_gram(model, batch, rows, params), n_w


def full_token_gram(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], rows: tuple[int, ...],
                    params: ParamSpec = None, strategy: str = "auto", chunk: int | None = None) -> torch.Tensor:
    """Exact per-token Gram matrix float64 [K, K] of the response tokens of ``rows`` (all of ``rows[0]`` first).

    ``strategy``: ``"blockwise"`` (one forward of the rows, per-token backward one transformer block at a time,
    each block re-run on ``chunk`` copies at a time (default: about ``CHUNK_HIDDEN`` hidden-state elements)),
    ``"copies"`` (prefix copies through the whole model at once; any causal LM), or ``"auto"``: block-wise where
    the model's layout allows it, copies otherwise (with a warning naming the reason).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    if strategy != "copies":
        copies = token_copies(batch, rows)
        try:
            with gram_pass(model, copies, params) as engine:
                return engine.run(copies, Blockwise(copies, engine, chunk)).plain.matrix
        except BlockwiseUnsupported as e:
            if strategy == "blockwise":
                raise
            warnings.warn(f"token_map(method='full'): block-wise backward not possible ({e}); using prefix "
                          "copies, whose memory grows with the number of tokens", stacklevel=3)
    copies = prefix_copies(batch, rows)
    return sequence_gram(model, copies, params=params, forward=last_position_logits).matrix


def token_map(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    pair: int = 0,
    params: ParamSpec = None,
    method: str = "full",
    tokenizer: Any = None,
) -> pd.DataFrame:
    """Per-token gradient inner products and cosines of one pair, as a tidy frame (THEORY §7).

    Args:
        model: a causal LM (transformers ``*ForCausalLM``; ``"full"`` needs ``logits_to_keep`` support).
        batch: ``input_ids``, ``attention_mask``, ``completion_mask`` [2B, L] (see ``encode_pairs``).
        pair: which pair (rows ``pair`` and ``B + pair``).
        params: parameter selection for ``"full"`` (see ``select_params``); ``"head"`` always measures the
            output-layer weight alone.
        method: ``"full"`` (exact, every selected parameter) or ``"head"`` (closed form, output layer only; for
            tied embeddings the head use of the shared matrix only).
        tokenizer: decodes the token columns when given; otherwise they hold token ids.

    On a model sharded by ``torch.distributed.fsdp.fully_shard`` every rank must call it with the same pair (each
    block's re-run all-gathers its parameters); ranks given different pairs raise together, none hangs.

    Returns:
        One row per (block, t, u): ``pair``, ``block`` (``"wl"`` chosen x rejected, ``"ww"`` chosen x chosen,
        ``"ll"`` rejected x rejected), ``t`` / ``u`` (0-based response-token index of the row / column
        sequence: for ``wl`` t is chosen and u rejected), ``token_w`` / ``token_u`` (the row / column tokens),
        ``inner`` = ``<grad l_t, grad l_u>`` (float64) and ``cosine``. The ``wl`` block's ``inner`` sums to
        ``<g_w, g_l>``, the ``ww`` / ``ll`` blocks to ``||g_w||^2`` / ``||g_l||^2`` (for ``"full"``).
    """
    gram, n_w = token_gram(model, batch, pair, params, method)
    rows = pair_rows(batch, pair)
    ids = [batch["input_ids"][r, response_positions(batch, r)].tolist() for r in rows]
    toks = [[tokenizer.decode([i]) for i in side] for side in ids] if tokenizer is not None else ids
    norm = gram.diagonal().clamp(min=0).sqrt()
    cos = gram / (norm[:, None] * norm[None, :])
    sides = {"w": (slice(0, n_w), toks[0]), "l": (slice(n_w, None), toks[1])}
    frames = []
    for block in BLOCKS:
        (rs, rt), (cs, ct) = sides[block[0]], sides[block[1]]
        inner, c = gram[rs, cs], cos[rs, cs]
        t, u = torch.meshgrid(torch.arange(inner.shape[0]), torch.arange(inner.shape[1]), indexing="ij")
        t, u = t.flatten().numpy(), u.flatten().numpy()
        frames.append(pd.DataFrame({
            "pair": pair, "block": block, "t": t, "u": u,
            "token_w": [rt[i] for i in t], "token_u": [ct[i] for i in u],
            "inner": inner.flatten().cpu().numpy(), "cosine": c.flatten().cpu().numpy(),
        }))
    return pd.concat(frames, ignore_index=True)
