"""What one measurement pass returns: typed containers of tensors, one type per view.

* :class:`GramResult` — the whole Gram matrix ``K_ij`` of one geometry (``"plain"`` ``<g_i, g_j>``, or
  ``"preconditioned"`` ``g_i^T P g_j``), with its per-parameter blocks.
* :class:`PairStats` — what the per-pair tables need and nothing more: each sequence's squared norm, the inner
  product within each pair and the batch view ``K c`` for one coefficient vector ``c`` (``structure="pairs"``).
* :class:`Measurement` — everything one forward and backward pass measured: the log-probs, the plain and the
  preconditioned view (each a ``GramResult`` or a ``PairStats``, or ``None`` when not asked for) and the update
  dots ``<g_i, delta>``.

``GramResult`` and ``PairStats`` both answer the questions of the per-pair frames (:meth:`within_pair`,
:meth:`batch_view`, :meth:`layer_pairs`), so ``entangle.metrics.pair_frame`` takes either.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

_LAYER_RE = re.compile(r"(?:^|\.)(?:h|layers|layer|blocks|block)\.(\d+)(?:\.|$)")
GEOMETRIES = ("plain", "preconditioned")


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


def group_blocks(per_param: dict[str, torch.Tensor], by: str | Callable[[str], str]) -> dict[str, torch.Tensor]:
    """Per-parameter tensors summed per group: ``by`` is ``"module"``, ``"layer"``, ``"param"`` or name -> group."""
    if by == "param":
        return dict(per_param)
    key = {"module": module_of, "layer": layer_of}.get(by, by) if isinstance(by, str) else by
    if isinstance(key, str):
        raise ValueError(f"unknown grouping {by!r}; use 'module', 'layer', 'param' or a callable")
    out: dict[str, torch.Tensor] = {}
    for name, block in per_param.items():
        g = key(name)
        out[g] = out[g] + block if g in out else block.clone()
    return out


@dataclass(kw_only=True)
class _ViewFields:
    """What every view of a pass carries besides its numbers (keyword-only)."""

    per_param: dict[str, torch.Tensor] = field(default_factory=dict)
    method: str = "auto"
    info: dict[str, str] = field(default_factory=dict)
    geometry: str = "plain"

    def __post_init__(self):
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"geometry must be one of {GEOMETRIES}, got {self.geometry!r}")

    def blocks(self, by: str | Callable[[str], str] = "module") -> dict[str, torch.Tensor]:
        """Per-parameter values grouped by ``"module"``, ``"layer"``, ``"param"`` or a callable name -> group;
        the groups sum to the whole (Gram blocks [2B, 2B] of a ``GramResult``, statistics [3, 2B] of a
        ``PairStats``)."""
        return group_blocks(self.per_param, by)


@dataclass
class GramResult(_ViewFields):
    """Per-sequence gradient Gram matrix of a batch of 2B sequences (all chosen, then all rejected).

    Attributes:
        matrix: float64 [2B, 2B], ``K_ij = <g_i, g_j>`` with ``g_i = d s_i / d theta`` over the selected parameters
            (``g_i^T P g_j`` when ``geometry == "preconditioned"``).
        logps: float64 [2B], the summed response log-probabilities ``s_i`` (nats).
        lengths: int64 [2B], the number of response tokens of each sequence.
        per_param: float64 [2B, 2B] block per parameter name; the blocks sum to ``matrix`` (empty from an engine
            that keeps the total alone, ``GramEngine(per_param=False)``).
        method: ``"exact"``, ``"auto"``, ``"ghost"`` or ``"materialise"``.
        info: how each parameter was handled (rule name, ghost/materialised), for inspection.
        geometry: ``"plain"`` or ``"preconditioned"`` (Adam's diagonal metric, THEORY §5).
    """

    matrix: torch.Tensor
    logps: torch.Tensor
    lengths: torch.Tensor

    @property
    def n_pairs(self) -> int:
        return self.matrix.shape[0] // 2

    def within_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm2 [2B], inner [B])``: each sequence's ``||g_i||^2`` and each pair's ``<g_w, g_l>``."""
        return _within(self.matrix)

    def batch_view(self, weights: torch.Tensor) -> torch.Tensor:
        """``K c`` [2B] float64 for coefficients ``c`` [2B]."""
        k = self.matrix.detach().to(torch.float64).cpu()
        return k @ torch.as_tensor(weights).detach().to(torch.float64).cpu()

    def layer_pairs(self, by: str | Callable[[str], str] = "layer") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per group, ``(norm2 [2B], inner [B])`` of its Gram block (see :meth:`within_pair`)."""
        return {name: _within(block) for name, block in self.blocks(by).items()}

    def pairs(self, weights: torch.Tensor) -> PairStats:
        """This result reduced to what ``structure="pairs"`` measures (the slow twin of that path)."""
        w = torch.as_tensor(weights).detach().to(torch.float64)
        stats = {n: stats_of_gram(b.to(torch.float64), w.to(b.device)) for n, b in self.per_param.items()}
        return PairStats.from_stats(stats, w, logps=self.logps, lengths=self.lengths, method=self.method,
                                    info=self.info, geometry=self.geometry)


@dataclass
class PairStats(_ViewFields):
    """The per-pair statistics of a batch of 2B sequences, measured without forming the Gram matrix.

    Attributes:
        stats: float64 [3, 2B] over all selected parameters: row 0 ``||g_i||^2``, row 1 ``<g_i, g_partner(i)>``
            (pair k = sequences k and B + k, so both halves hold the pair's inner product), row 2 ``(K c)_i``.
        weights: the coefficient vector ``c`` [2B] of ``K c``.
        logps, lengths, method, info, geometry: as in :class:`GramResult`.
        per_param: float64 [3, 2B] per parameter name; they sum to ``stats``.
    """

    stats: torch.Tensor
    weights: torch.Tensor
    logps: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def from_stats(cls, per_param: dict[str, torch.Tensor], weights: torch.Tensor, **fields) -> PairStats:
        """From per-parameter statistics [3, 2B] (see ``capture.contrib.pair_stats``)."""
        total = torch.stack(list(per_param.values())).sum(0)
        return cls(stats=total, weights=weights, per_param=per_param, **fields)

    @property
    def n_pairs(self) -> int:
        return self.stats.shape[1] // 2

    @property
    def kc(self) -> torch.Tensor:
        """``K c`` [2B] float64 for this result's ``weights``."""
        return self.stats[2]

    def within_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm2 [2B], inner [B])``, as :meth:`GramResult.within_pair`."""
        return self.stats[0], self.stats[1, :self.n_pairs]

    def batch_view(self, weights: torch.Tensor) -> torch.Tensor:
        """``K c`` [2B] as measured; ``weights`` must be the ``c`` it was measured for (``ValueError`` otherwise)."""
        c = torch.as_tensor(weights).detach().to(torch.float64).cpu()
        measured = self.weights.detach().to(torch.float64).cpu()
        if measured.shape != c.shape or not torch.allclose(measured, c, rtol=1e-9,
                                                           atol=1e-12 * float(c.abs().max().clamp(min=1e-300))):
            raise ValueError("these pair statistics carry K c for other weights than the ones asked for (measure "
                             "with weights=entangle.metrics.batch_weights(...) for the same objective, "
                             "hyper-parameters and reference log-probs)")
        return self.kc.detach().to(torch.float64).cpu()

    def layer_pairs(self, by: str | Callable[[str], str] = "layer") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per group, ``(norm2 [2B], inner [B])``."""
        b = self.n_pairs
        return {name: (st[0], st[1, :b]) for name, st in self.blocks(by).items()}


View = GramResult | PairStats


@dataclass
class Measurement:
    """Everything one forward and backward pass measured (see ``entangle.capture.measure``).

    Attributes:
        logps: float64 [N], the summed response log-probabilities.
        lengths: int64 [N], response tokens per sequence.
        plain: ``<g_i, g_j>`` as a :class:`GramResult` (``structure="full"``) or :class:`PairStats`
            (``structure="pairs"``); ``None`` when not asked for.
        preconditioned: the same in the preconditioner's geometry ``g_i^T P g_j``; ``None`` without one.
        update: float64 [N] ``<g_i, delta>``, the first-order change along ``delta``; ``None`` without one.
        method, info: as in :class:`GramResult`.
    """

    logps: torch.Tensor
    lengths: torch.Tensor
    plain: View | None = None
    preconditioned: View | None = None
    update: torch.Tensor | None = None
    method: str = "auto"
    info: dict[str, str] = field(default_factory=dict)


def stats_of_gram(gram: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The statistics [3, N] of ``PairStats`` read off a whole Gram matrix [N, N] (N = 2B)."""
    b = gram.shape[0] // 2
    k = torch.arange(b, device=gram.device)
    cross = gram[k, b + k]
    return torch.stack([gram.diagonal(), torch.cat([cross, cross]), gram @ weights.to(gram)])


def _within(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = block.shape[0] // 2
    k = torch.arange(b, device=block.device)
    return block.diagonal(), block[k, b + k]
