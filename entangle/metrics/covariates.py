"""Cheap per-pair covariates of entanglement, and how well each predicts it (THEORY §7, §8).

Everything here is text-only or forward-only: the question is whether the dangerous pairs can be found in a
dataset before training, without gradients. ``pair_covariates`` makes one row per pair; join it to a
``pair_frame`` on ``pair`` and pass the result to ``covariate_report``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from entangle.capture.engine import measurement_mode
from entangle.capture.logprobs import position_ids_from_mask
from entangle.capture.params import unwrap_model

COVARIATE_COLUMNS = ("shared_prefix_len", "edit_distance", "jaccard", "len_chosen", "len_rejected",
                     "ches", "ches_norm", "embed_cosine")

# Which end of each covariate is expected to hold the entangled pairs (THEORY §7, §8): "high" or "low".
RISKY_END = {"shared_prefix_len": "high", "edit_distance": "low", "jaccard": "high", "len_chosen": "high",
             "len_rejected": "high", "ches": "high", "ches_norm": "high", "embed_cosine": "high"}


def response_tokens(batch: Mapping[str, torch.Tensor]) -> list[list[int]]:
    """The response token ids of each of the 2B sequences, in order."""
    ids, mask = batch["input_ids"], batch["completion_mask"].to(torch.bool)
    return [ids[i][mask[i]].tolist() for i in range(ids.shape[0])]


def response_hidden(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states summed and averaged over each sequence's response tokens (forward only, THEORY §8).

    The hidden state for response token k is ``hidden_states[-1]`` at the position that predicts it (k - 1), as
    in CHES (Razin et al.). Returns ``(h_sum, h_mean)``, each float32/float64 [2B, d]; no gradients.
    """
    model = unwrap_model(model)
    mask = batch["attention_mask"]
    with measurement_mode(model, []), torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids_from_mask(mask),
                    use_cache=False, output_hidden_states=True)
    h = out.hidden_states[-1]
    dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    pred = batch["completion_mask"][:, 1:].to(dtype)                # position k - 1 predicts token k
    h_sum = torch.einsum("nl,nld->nd", pred, h[:, :-1].to(dtype))
    n = pred.sum(1, keepdim=True)
    if (n == 0).any():
        raise ValueError(f"sequences {(n[:, 0] == 0).nonzero().flatten().tolist()} have no response tokens")
    return h_sum, h_sum / n


def shared_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading tokens ``a`` and ``b`` have in common."""
    return next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance between two token sequences (unit-cost insertions, deletions, substitutions)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def jaccard(a: Sequence[int], b: Sequence[int]) -> float:
    """|set(a) & set(b)| / |set(a) | set(b)| (1.0 for two empty sequences)."""
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def ches(h_chosen: torch.Tensor, h_rejected: torch.Tensor) -> torch.Tensor:
    """CHES = <h_w, h_l> - ||h_w||^2 per pair, float64 [B] (Razin et al.; THEORY §8, INTEGRATION §3(a))."""
    hw, hl = h_chosen.to(torch.float64), h_rejected.to(torch.float64)
    return (hw * hl).sum(-1) - (hw * hw).sum(-1)


def pair_covariates(
    batch: Mapping[str, torch.Tensor],
    *,
    hidden: tuple[torch.Tensor, torch.Tensor] | None = None,
    embed_fn: Callable[[list[str]], Any] | None = None,
    tokenizer: Any = None,
) -> pd.DataFrame:
    """One row per pair of text- and forward-only covariates.

    Args:
        batch: ``input_ids`` and ``completion_mask`` [2B, L] (see ``encode_pairs``: chosen rows first).
        hidden: ``(h_sum, h_mean)`` [2B, d] from :func:`response_hidden` (final hidden
            states at the positions predicting the response tokens, summed / averaged); adds ``ches`` and
            ``ches_norm``.
        embed_fn: any sentence-embedding callable ``texts -> [n, d]`` (tensor or array); adds ``embed_cosine``,
            the cosine of the two decoded responses' embeddings. Needs ``tokenizer``. Nothing is downloaded.
        tokenizer: decodes the responses for ``embed_fn``.

    Returns:
        Columns: ``pair``; ``shared_prefix_len`` (leading response tokens in common), ``edit_distance`` (token
        Levenshtein distance), ``jaccard`` (token-set overlap), ``len_chosen``, ``len_rejected`` (response
        tokens); with ``hidden``: ``ches`` = <h_w, h_l> - ||h_w||^2 on sums and ``ches_norm`` on means; with
        ``embed_fn``: ``embed_cosine``.
    """
    toks = response_tokens(batch)
    n = len(toks)
    if n % 2:
        raise ValueError(f"the batch has {n} sequences; expected 2B (all chosen, then all rejected)")
    b = n // 2
    chosen, rejected = toks[:b], toks[b:]
    cols: dict[str, Any] = {
        "pair": np.arange(b),
        "shared_prefix_len": [shared_prefix_length(w, r) for w, r in zip(chosen, rejected, strict=True)],
        "edit_distance": [edit_distance(w, r) for w, r in zip(chosen, rejected, strict=True)],
        "jaccard": [jaccard(w, r) for w, r in zip(chosen, rejected, strict=True)],
        "len_chosen": [len(w) for w in chosen],
        "len_rejected": [len(r) for r in rejected],
    }
    if hidden is not None:
        h_sum, h_mean = hidden
        for name, h in (("h_sum", h_sum), ("h_mean", h_mean)):
            if h.shape[0] != n:
                raise ValueError(f"hidden {name} has {h.shape[0]} rows for a batch of {n} sequences")
        cols["ches"] = ches(h_sum[:b], h_sum[b:]).cpu().numpy()
        cols["ches_norm"] = ches(h_mean[:b], h_mean[b:]).cpu().numpy()
    if embed_fn is not None:
        if tokenizer is None:
            raise ValueError("embed_fn needs a tokenizer to decode the responses into texts")
        texts = [tokenizer.decode(t, skip_special_tokens=True) for t in toks]
        e = _embed(embed_fn, texts)
        cols["embed_cosine"] = torch.nn.functional.cosine_similarity(e[:b], e[b:], dim=-1).numpy()
    return pd.DataFrame(cols)


def _embed(embed_fn: Callable[[list[str]], Any], texts: list[str]) -> torch.Tensor:
    out = embed_fn(texts)
    e = out.detach().cpu() if torch.is_tensor(out) else torch.as_tensor(np.asarray(out))
    if e.ndim != 2 or e.shape[0] != len(texts):
        raise ValueError(f"embed_fn returned shape {tuple(e.shape)} for {len(texts)} texts; expected [n, d]")
    return e.to(torch.float64)


def _spearman(x: pd.Series, y: pd.Series) -> float:
    """Spearman rank correlation over the rows where both are finite (NaN if either is constant)."""
    ok = np.isfinite(x.to_numpy(dtype=float)) & np.isfinite(y.to_numpy(dtype=float))
    if ok.sum() < 2:
        return float("nan")
    rx, ry = x[ok].rank().to_numpy(dtype=float), y[ok].rank().to_numpy(dtype=float)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def covariate_report(frame: pd.DataFrame, top: float = 0.1) -> pd.DataFrame:
    """How well each covariate predicts the gradient cosine and the pitfall regimes, one row per covariate.

    Args:
        frame: per-pair rows holding covariate columns (``pair_covariates``) and the ``cosine`` and ``regime``
            columns of ``pair_frame`` (e.g. ``pair_frame(...).merge(pair_covariates(...), on=["pair", "len_chosen", "len_rejected"])``; both
            frames carry the lengths).
        top: the share of pairs flagged by each covariate (0.1 = the top decile).

    Returns:
        Columns: ``covariate``; ``spearman_cosine`` (rank correlation with ``cosine``); ``spearman_pitfall``
        (rank correlation with the pitfall indicator ``regime != "ideal"``); ``risky_end`` (``"high"`` or
        ``"low"``: the end of the covariate expected to hold entangled pairs, e.g. low edit distance);
        ``n_top`` (ceil(top x pairs)); ``pitfall_share_top`` (share of pitfall pairs among the ``n_top`` pairs at
        the risky end); ``pitfall_share_all`` (overall share); ``lift`` (their ratio). Pairs without a regime
        (non-finite predictions) are left out of the pitfall statistics.
    """
    for col in ("cosine", "regime"):
        if col not in frame:
            raise ValueError(f"covariate_report needs a {col!r} column (join pair_frame on 'pair'); "
                             f"columns: {list(frame.columns)}")
    covs = [c for c in COVARIATE_COLUMNS if c in frame]
    if not covs:
        raise ValueError(f"no covariate columns in the frame; expected some of {COVARIATE_COLUMNS}")
    has_regime = frame["regime"].notna()
    pitfall = (frame["regime"] != "ideal").astype(float).where(has_regime)
    rows = []
    for c in covs:
        x = frame[c].astype(float)
        ok = has_regime & np.isfinite(x)
        n_top = math.ceil(top * int(ok.sum())) if ok.any() else 0
        order = x[ok].sort_values(ascending=RISKY_END[c] == "low", kind="stable")
        flagged = pitfall[order.index[:n_top]]
        share_top = float(flagged.mean()) if n_top else float("nan")
        share_all = float(pitfall[ok].mean()) if ok.any() else float("nan")
        rows.append({
            "covariate": c,
            "spearman_cosine": _spearman(x, frame["cosine"].astype(float)),
            "spearman_pitfall": _spearman(x, pitfall),
            "risky_end": RISKY_END[c], "n_top": n_top,
            "pitfall_share_top": share_top, "pitfall_share_all": share_all,
            "lift": share_top / share_all if share_all > 0 else float("nan"),
        })
    return pd.DataFrame(rows)
