"""The result of a Gram-matrix measurement: a plain container of tensors."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

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
    """

    matrix: torch.Tensor
    logps: torch.Tensor
    lengths: torch.Tensor
    per_param: dict[str, torch.Tensor] = field(default_factory=dict)
    method: str = "auto"
    info: dict[str, str] = field(default_factory=dict)
    preconditioned: GramResult | None = None

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
