"""The result of a Gram-matrix measurement: a plain container of tensors."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from entangle.capture.contrib import stats_of_gram

_LAYER_RE = re.compile(r"(?:^|\.)(?:h|layers|layer|blocks|block)\.(\d+)(?:\.|$)")


def layer_of(param_name: str) -> str:
    """Group key for ``by="layer"``: ``"layer 3"`` for transformer block 3, else ``"embed"``/``"head"``/``"other"``."""
    m = _LAYER_RE.search(param_name)
    if m:
        return f"layer {int(m.group(1))}"
    low = param_name.lower()
    if any(k in low for k in ("wte", "wpe", "embed", "tok_embeddings")):
        return "embed"
    if any(k in low for k in ("lm_head", "ln_f", "final_norm", "model.norm", "output")):
        return "head"
    return "other"


def module_of(param_name: str) -> str:
    """Group key for ``by="module"``: the owning module's qualified name (``"transformer.h.0.attn.c_attn"``)."""
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


@dataclass
class GramResult:
    """Per-sequence gradient Gram matrix of a batch of 2B sequences (all chosen, then all rejected).

    Attributes:
        matrix: float64 [2B, 2B], ``K_ij = <g_i, g_j>`` with ``g_i = d s_i / d theta`` over the selected parameters.
        logps: float64 [2B], the summed response log-probabilities ``s_i`` (nats).
        lengths: int64 [2B], the number of response tokens of each sequence.
        per_param: float64 [2B, 2B] block per parameter name; the blocks sum to ``matrix``.
        method: ``"exact"`` or ``"auto"``.
        info: how each module was handled (rule name, ghost/materialised), for inspection.
        preconditioned: the same batch in Adam's geometry, when measured in the same pass
            (``sequence_gram(..., preconditioner=P, plain=True)``).
        structure: ``"full"``, or ``"pairs"`` (``sequence_gram(..., structure="pairs", weights=c)``): only the
            within-pair entries ``K_ii`` and ``K_{k,B+k}`` of ``matrix`` and of every block are measured, the
            others are NaN, and ``kc`` holds ``K @ weights``.
        weights: the vector ``c`` [2B] of a ``"pairs"`` result; kc: float64 [2B], ``K @ c`` (exact, from the same
            pass, though ``K`` itself is not formed).
    """

    matrix: torch.Tensor
    logps: torch.Tensor
    lengths: torch.Tensor
    per_param: dict[str, torch.Tensor] = field(default_factory=dict)
    method: str = "auto"
    info: dict[str, str] = field(default_factory=dict)
    preconditioned: GramResult | None = None
    structure: str = "full"
    weights: torch.Tensor | None = None
    kc: torch.Tensor | None = None

    @property
    def n_pairs(self) -> int:
        return self.matrix.shape[0] // 2

    def blocks(self, by: str | Callable[[str], str] = "module") -> dict[str, torch.Tensor]:
        """Gram blocks grouped by ``"module"``, ``"layer"``, ``"param"`` or a callable name -> group; they sum to ``matrix``."""
        if by == "param":
            return dict(self.per_param)
        key = {"module": module_of, "layer": layer_of}.get(by, by) if isinstance(by, str) else by
        if isinstance(key, str):
            raise ValueError(f"unknown grouping {by!r}; use 'module', 'layer', 'param' or a callable")
        out: dict[str, torch.Tensor] = {}
        for name, block in self.per_param.items():
            g = key(name)
            out[g] = out[g] + block if g in out else block.clone()
        return out

    @classmethod
    def from_pair_stats(cls, stats: dict[str, torch.Tensor], weights: torch.Tensor, **fields) -> GramResult:
        """A ``"pairs"`` result from per-parameter statistics float64 [3, N] (``||g_i||^2``,
        ``<g_i, g_partner(i)>``, ``(K c)_i``; see ``capture.contrib.pair_stats``)."""
        total = torch.stack(list(stats.values())).sum(0)
        return cls(matrix=_pair_block(total), per_param={name: _pair_block(st) for name, st in stats.items()},
                   structure="pairs", weights=weights, kc=total[2], **fields)

    def pairs_only(self, weights: torch.Tensor) -> GramResult:
        """This full result reduced to what ``structure="pairs"`` measures (the slow twin of that path)."""
        if self.structure != "full":
            raise ValueError("pairs_only needs a full Gram result")
        w = torch.as_tensor(weights, dtype=torch.float64)
        out = GramResult.from_pair_stats({n: stats_of_gram(b.to(torch.float64), w.to(b.device))
                                          for n, b in self.per_param.items()}, w, logps=self.logps,
                                         lengths=self.lengths, method=self.method, info=self.info)
        if self.preconditioned is not None:
            out.preconditioned = self.preconditioned.pairs_only(weights)
        return out


def _pair_block(stats: torch.Tensor) -> torch.Tensor:
    """[N, N], NaN except the diagonal and the within-pair entries, from statistics [3, N]."""
    n = stats.shape[1]
    b = n // 2
    block = torch.full((n, n), float("nan"), dtype=torch.float64, device=stats.device)
    idx = torch.arange(n, device=stats.device)
    block[idx, idx] = stats[0]
    block[idx, (idx + b) % n] = stats[1]
    return block
