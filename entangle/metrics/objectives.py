"""Preference objectives as per-pair losses, and their two gradient coefficients (THEORY.md §2).

Every objective is a plain differentiable function of the summed response log-probs of a batch of B pairs:

    f(chosen_logps, rejected_logps, *, ref_chosen_logps, ref_rejected_logps,
      chosen_lengths, rejected_lengths, **hyper) -> per-pair loss [B]

``chosen_logps``/``rejected_logps`` are s(y) = sum of response-token log-probs (nats, TRL's convention); objectives
that work with averaged log-probs (IPO, SimPO, ORPO, the NLL terms) divide by the lengths themselves, so that the
derivative with respect to the *summed* s carries the 1/|y| factor. A trainer's loss is the batch mean of the
per-pair loss (for TRL's ``loss_type=[...]`` with ``loss_weights``: sum_k w_k mean_B(l_k), which is the batch mean
of the weighted per-pair sum).

``coefficients`` turns any objective into (a_w, a_l) = (-dL/ds_w, -dL/ds_l) per pair by autograd (THEORY.md §2), so
``-grad_theta L_pair = a_w g_w + a_l g_l``. They are per-pair coefficients: NOT divided by B. The coefficient vector
of a batch-mean training step (THEORY.md §4) is ``c = cat(a_w, a_l) / B``.

Register a new objective with ``@register_objective("name", needs_ref=..., defaults={...})``; its hyper-parameters
are the keys of ``defaults`` (a default of ``None`` means the caller must pass it).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
LossFn = Callable[..., Tensor]

_STANDARD_ARGS = (
    "chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "chosen_lengths", "rejected_lengths",
)


@dataclass(frozen=True)
class Objective:
    """A registered per-pair loss: the function plus what it needs.

    Attributes:
        name: registry name (``"sigmoid"``, ``"simpo"``, ...).
        fn: the loss function (signature in the module docstring), returning a per-pair loss [B].
        needs_ref: reference log-probs are required.
        needs_lengths: response lengths are required (averaged log-probs, length terms, NLL).
        defaults: hyper-parameter name -> default value; ``None`` marks a required hyper-parameter.
    """

    name: str
    fn: LossFn
    needs_ref: bool = False
    needs_lengths: bool = False
    defaults: Mapping[str, Any] = field(default_factory=dict)

    @property
    def hyper_names(self) -> frozenset[str]:
        return frozenset(self.defaults)

    def __call__(
        self,
        chosen_logps: Tensor,
        rejected_logps: Tensor,
        *,
        ref_chosen_logps: Tensor | None = None,
        ref_rejected_logps: Tensor | None = None,
        chosen_lengths: Tensor | None = None,
        rejected_lengths: Tensor | None = None,
        **hyper: Any,
    ) -> Tensor:
        """Per-pair loss [B], after checking inputs and filling in default hyper-parameters."""
        check_hyper(self, hyper)
        if self.needs_ref and (ref_chosen_logps is None or ref_rejected_logps is None):
            missing = [n for n, v in (("ref_chosen_logps", ref_chosen_logps),
                                      ("ref_rejected_logps", ref_rejected_logps)) if v is None]
            raise ValueError(f"objective {self.name!r} needs reference log-probs: pass {' and '.join(missing)}")
        if self.needs_lengths and (chosen_lengths is None or rejected_lengths is None):
            raise ValueError(
                f"objective {self.name!r} needs response lengths: pass chosen_lengths and rejected_lengths"
            )
        merged = {**self.defaults, **hyper}
        required = sorted(k for k, v in merged.items() if v is None)
        if required:
            raise ValueError(f"objective {self.name!r} needs hyper-parameter(s) {required}")
        return self.fn(
            chosen_logps, rejected_logps,
            ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
            chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
            **merged,
        )


@dataclass(frozen=True)
class WeightedObjective:
    """A weighted sum of objectives, per pair: l = sum_k w_k l_k (TRL's ``loss_type=[...]`` + ``loss_weights``).

    Each hyper-parameter goes to every part that declares it (so ``beta`` is shared, as in TRL); each part keeps
    its own defaults for the rest.
    """

    parts: tuple[Objective, ...]
    weights: tuple[float, ...]

    @property
    def name(self) -> str:
        return " + ".join(f"{w:g}*{p.name}" for p, w in zip(self.parts, self.weights, strict=True))

    @property
    def needs_ref(self) -> bool:
        return any(p.needs_ref for p in self.parts)

    @property
    def hyper_names(self) -> frozenset[str]:
        return frozenset().union(*(p.hyper_names for p in self.parts))

    @property
    def defaults(self) -> dict[str, Any]:
        """Default hyper-parameters of the parts (for a name several parts declare, the first part's)."""
        return {k: v for p in reversed(self.parts) for k, v in p.defaults.items()}

    def __call__(self, chosen_logps: Tensor, rejected_logps: Tensor, **kwargs: Any) -> Tensor:
        """Per-pair weighted loss [B]; same keyword arguments as ``Objective.__call__``."""
        hyper = {k: v for k, v in kwargs.items() if k not in _STANDARD_ARGS}
        check_hyper(self, hyper)
        standard = {k: v for k, v in kwargs.items() if k in _STANDARD_ARGS}
        total = 0.0
        for part, w in zip(self.parts, self.weights, strict=True):
            mine = {k: v for k, v in hyper.items() if k in part.hyper_names}
            total = total + w * part(chosen_logps, rejected_logps, **standard, **mine)
        return total


AnyObjective = Objective | WeightedObjective
ObjectiveSpec = str | LossFn | AnyObjective | Sequence[str | LossFn | Objective]

_REGISTRY: dict[str, Objective] = {}


class HyperParameterError(TypeError, ValueError):
    """A keyword that is not a hyper-parameter of the objective (a TypeError like any unexpected keyword, and a
    ValueError for callers that validate configuration)."""


def check_hyper(obj: AnyObjective, hyper: Mapping[str, Any]) -> None:
    """Raise :class:`HyperParameterError` naming the keywords of ``hyper`` that ``obj`` does not declare."""
    unknown = sorted(set(hyper) - obj.hyper_names)
    if unknown:
        raise HyperParameterError(
            f"unknown hyper-parameter(s) {unknown} for objective {obj.name!r}; "
            f"it accepts {sorted(obj.hyper_names) or 'none'}"
        )


def register_objective(
    name: str,
    *,
    needs_ref: bool = False,
    needs_lengths: bool = False,
    defaults: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Callable[[LossFn], LossFn]:
    """Decorator: register a per-pair loss function under ``name``; the function is returned unchanged.

    ``defaults`` lists the hyper-parameters (a ``None`` value = required). If omitted, they are read from the
    function's keyword parameters that have defaults. Re-registering a name needs ``overwrite=True``.
    """

    def deco(fn: LossFn) -> LossFn:
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"objective {name!r} is already registered (pass overwrite=True to replace it)")
        hyper = dict(_signature_defaults(fn) if defaults is None else defaults)
        _REGISTRY[name] = Objective(name, fn, needs_ref, needs_lengths, hyper)
        return fn

    return deco


def _signature_defaults(fn: LossFn) -> dict[str, Any]:
    return {
        p.name: p.default
        for p in inspect.signature(fn).parameters.values()
        if p.name not in _STANDARD_ARGS and p.default is not inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def available_objectives() -> list[str]:
    """Names of all registered objectives, sorted."""
    return sorted(_REGISTRY)


def get_objective(name: str) -> Objective:
    """The registered objective called ``name``; unknown names raise listing the known ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown objective {name!r}; known objectives: {', '.join(available_objectives())}")
    return _REGISTRY[name]


def resolve_objective(spec: ObjectiveSpec, loss_weights: Sequence[float] | None = None) -> AnyObjective:
    """Turn a name, a callable, an ``Objective`` or a list of those (+ ``loss_weights``) into an objective.

    A bare callable becomes an unregistered ``Objective`` whose hyper-parameters are its keyword defaults.
    A list gives a ``WeightedObjective`` (weights default to 1 each, as in TRL).
    """
    if isinstance(spec, WeightedObjective):
        if loss_weights is not None:
            raise ValueError("loss_weights only apply to a list of objectives, not to a WeightedObjective")
        return spec
    if isinstance(spec, str) or callable(spec):
        if loss_weights is None:
            return _resolve_one(spec)
        spec = [spec]
    parts = tuple(_resolve_one(s) for s in spec)
    if not parts:
        raise ValueError("empty list of objectives")
    weights = tuple(float(w) for w in (loss_weights if loss_weights is not None else [1.0] * len(parts)))
    if len(weights) != len(parts):
        raise ValueError(f"got {len(weights)} loss_weights for {len(parts)} objectives")
    return WeightedObjective(parts, weights)


def _resolve_one(spec: str | LossFn | Objective) -> Objective:
    if isinstance(spec, Objective):
        return spec
    if isinstance(spec, str):
        return get_objective(spec)
    if callable(spec):
        return Objective(getattr(spec, "__name__", repr(spec)), spec, defaults=_signature_defaults(spec))
    raise TypeError(f"cannot use {spec!r} as an objective: give a name, a callable or a list of those")


def coefficients(
    objective: ObjectiveSpec,
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    *,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    loss_weights: Sequence[float] | None = None,
    **hyper: Any,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair gradient coefficients of any objective, by autograd on the scalars (THEORY.md §2).

    Args:
        objective: name, callable, list of names (+ ``loss_weights``), or an ``Objective``.
        chosen_logps, rejected_logps: [B] summed response log-probs s_w, s_l (nats).
        ref_chosen_logps, ref_rejected_logps: [B] reference log-probs (treated as constants).
        chosen_lengths, rejected_lengths: [B] response token counts (constants).
        hyper: hyper-parameters of the objective (``beta=...``).

    Returns:
        (a_w, a_l, loss), float64 [B] each, detached: a_w = -dl/ds_w, a_l = -dl/ds_l of the per-pair loss l
        (NOT divided by B). Differentiation is of sum_k l_k, which equals the per-pair derivative for per-pair
        objectives (and is the right one for a loss whose normaliser couples pairs, such as ``nll_norm="batch"``).
    """
    obj = resolve_objective(objective, loss_weights)

    def const(x: Tensor | None) -> Tensor | None:
        return None if x is None else torch.as_tensor(x).detach().to(torch.float64)

    s_w = const(chosen_logps).requires_grad_(True)
    s_l = const(rejected_logps).requires_grad_(True)
    with torch.enable_grad():
        loss = obj(
            s_w, s_l,
            ref_chosen_logps=const(ref_chosen_logps), ref_rejected_logps=const(ref_rejected_logps),
            chosen_lengths=const(chosen_lengths), rejected_lengths=const(rejected_lengths),
            **hyper,
        )
        if loss.shape != s_w.shape:
            raise ValueError(f"objective {obj.name!r} returned shape {tuple(loss.shape)}, expected per-pair "
                             f"{tuple(s_w.shape)}")
        d_w, d_l = torch.autograd.grad(loss.sum(), (s_w, s_l), allow_unused=True)
    zero = torch.zeros_like(s_w)
    a_w = zero if d_w is None else -d_w
    a_l = zero if d_l is None else -d_l
    return a_w.detach(), a_l.detach(), loss.detach()


# ---------------------------------------------------------------------------------------------------------------
# Shared pieces. Δ = s - s_ref (log-ratio), m = Δ_w - Δ_l, |y| = response length, s̄ = s / |y|.
# ---------------------------------------------------------------------------------------------------------------


def _avg(logps: Tensor, lengths: Tensor) -> Tensor:
    """Length-averaged log-prob s̄ = s / |y| (lengths clamped at 1, as TRL's IPO does)."""
    return logps / lengths.clamp(min=1)


def _nll(chosen_logps: Tensor, chosen_lengths: Tensor, nll_norm: str) -> Tensor:
    """Per-pair NLL of the chosen response whose batch mean is the trainer's NLL term.

    ``"sequence"``: -s_w / |y_w| (token mean within each pair). ``"batch"``: -s_w * B / sum_k |y_w,k|, whose batch
    mean is exactly TRL's token mean over all chosen tokens of the batch (``sft``, CPO/ORPO NLL). They agree when
    all chosen responses have the same length.
    """
    if nll_norm == "sequence":
        return -_avg(chosen_logps, chosen_lengths)
    if nll_norm == "batch":
        return -chosen_logps * chosen_logps.shape[0] / chosen_lengths.sum().clamp(min=1)
    raise ValueError(f"nll_norm must be 'sequence' or 'batch', got {nll_norm!r}")


def _margin(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor) -> Tensor:
    """m = (s_w - s_w^ref) - (s_l - s_l^ref)."""
    return (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)


def _avg_margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths):
    """m̄ = Δ_w / |y_w| - Δ_l / |y_l| (TRL's IPO and sigmoid_norm)."""
    return _avg(chosen_logps - ref_chosen_logps, chosen_lengths) - _avg(rejected_logps - ref_rejected_logps, rejected_lengths)


def _smoothed_logistic(z: Tensor, label_smoothing: float) -> Tensor:
    """-(1 - ε) log σ(z) - ε log σ(-z) (conservative / label-smoothed logistic loss)."""
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - e^x) for x <= 0, branching at -ln 2 for stability (as TRL's ORPO)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


# ---------------------------------------------------------------------------------------------------------------
# TRL 1.16 DPOTrainer loss types (trl/trainer/dpo_trainer.py:1387-1516); defaults from DPOConfig.
# ---------------------------------------------------------------------------------------------------------------


@register_objective("sigmoid", needs_ref=True, defaults={"beta": 0.1})
def sigmoid(chosen_logps, rejected_logps, *, ref_chosen_logps, ref_rejected_logps, beta, **_):
    """DPO: -log σ(β m)."""
    return -F.logsigmoid(beta * _margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps))


@register_objective("hinge", needs_ref=True, defaults={"beta": 0.1})
def hinge(chosen_logps, rejected_logps, *, ref_chosen_logps, ref_rejected_logps, beta, **_):
    """SLiC-style hinge: relu(1 - β m)."""
    return torch.relu(1 - beta * _margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps))


@register_objective("ipo", needs_ref=True, needs_lengths=True, defaults={"beta": 0.1})
def ipo(chosen_logps, rejected_logps, *, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths, beta,
        **_):
    """IPO, length-normalised as TRL: (m̄ - 1/(2β))²."""
    m_bar = _avg_margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths,
                        rejected_lengths)
    return (m_bar - 1 / (2 * beta)) ** 2


@register_objective("exo_pair", needs_ref=True, defaults={"beta": 0.1, "label_smoothing": 1e-3})
def exo_pair(chosen_logps, rejected_logps, *, ref_chosen_logps, ref_rejected_logps, beta, label_smoothing, **_):
    """EXO: KL(q || p) with q = (σ(βm), σ(-βm)) and p = (1-ε, ε). ε must be > 0.

    TRL's DPOConfig default ``label_smoothing=0.0`` is rejected by its trainer for this loss; 1e-3 is the EXO
    paper's recommendation quoted in TRL's error message.
    """
    if not 0 < label_smoothing < 1:
        raise ValueError(f"exo_pair needs 0 < label_smoothing < 1, got {label_smoothing}")
    z = beta * _margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    eps = torch.as_tensor(label_smoothing, dtype=z.dtype)
    return (torch.sigmoid(z) * (F.logsigmoid(z) - torch.log1p(-eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - torch.log(eps)))


@register_objective("nca_pair", needs_ref=True, defaults={"beta": 0.1})
def nca_pair(chosen_logps, rejected_logps, *, ref_chosen_logps, ref_rejected_logps, beta, **_):
    """NCA: -log σ(r_w) - ½ log σ(-r_w) - ½ log σ(-r_l), r = β Δ."""
    r_w, r_l = beta * (chosen_logps - ref_chosen_logps), beta * (rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)


@register_objective("robust", needs_ref=True, defaults={"beta": 0.1, "label_smoothing": 0.0})
def robust(chosen_logps, rejected_logps, *, ref_chosen_logps, ref_rejected_logps, beta, label_smoothing, **_):
    """Robust DPO: [-(1-ε) log σ(βm) + ε log σ(-βm)] / (1 - 2ε), ε in [0, ½)."""
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"robust needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    z = beta * _margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (-(1 - label_smoothing) * F.logsigmoid(z) + label_smoothing * F.logsigmoid(-z)) / (1 - 2 * label_smoothing)


@register_objective("bco_pair", needs_ref=True, defaults={"beta": 0.1})
def bco_pair(chosen_logps, rejected_logps, *, ref_chosen_logps, ref_rejected_logps, beta, **_):
    """BCO (paired): -log σ(r_w) - log σ(-r_l)."""
    r_w, r_l = beta * (chosen_logps - ref_chosen_logps), beta * (rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(r_w) - F.logsigmoid(-r_l)


@register_objective("sppo_hard", needs_ref=True, defaults={"beta": 0.1})
def sppo_hard(chosen_logps, rejected_logps, *, ref_chosen_logps, ref_rejected_logps, beta, **_):
    """SPPO (hard labels): (Δ_w - 1/(2β))² + (Δ_l + 1/(2β))²."""
    return (chosen_logps - ref_chosen_logps - 0.5 / beta) ** 2 + (rejected_logps - ref_rejected_logps + 0.5 / beta) ** 2


@register_objective("apo_zero", needs_ref=True, defaults={"beta": 0.1})
def apo_zero(chosen_logps, rejected_logps, *, ref_chosen_logps, ref_rejected_logps, beta, **_):
    """APO-zero: 1 - σ(r_w) + σ(r_l)."""
    r_w, r_l = beta * (chosen_logps - ref_chosen_logps), beta * (rejected_logps - ref_rejected_logps)
    return 1 - torch.sigmoid(r_w) + torch.sigmoid(r_l)


@register_objective("apo_down", needs_ref=True, defaults={"beta": 0.1})
def apo_down(chosen_logps, rejected_logps, *, ref_chosen_logps, ref_rejected_logps, beta, **_):
    """APO-down: σ(r_w) + 1 - σ(βm)."""
    r_w = beta * (chosen_logps - ref_chosen_logps)
    z = beta * _margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return torch.sigmoid(r_w) + 1 - torch.sigmoid(z)


@register_objective("discopop", needs_ref=True, defaults={"beta": 0.1, "discopop_tau": 0.05})
def discopop(chosen_logps, rejected_logps, *, ref_chosen_logps, ref_rejected_logps, beta, discopop_tau, **_):
    """DiscoPOP: (1 - σ(z/τ)) (-log σ(z)) + σ(z/τ) e^{-z}, z = βm."""
    z = beta * _margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    mix = torch.sigmoid(z / discopop_tau)
    return (1 - mix) * -F.logsigmoid(z) + mix * torch.exp(-z)


@register_objective("sigmoid_norm", needs_ref=True, needs_lengths=True, defaults={"beta": 0.1})
def sigmoid_norm(chosen_logps, rejected_logps, *, ref_chosen_logps, ref_rejected_logps, chosen_lengths,
                 rejected_lengths, beta, **_):
    """Length-normalised DPO: -log σ(β m̄)."""
    m_bar = _avg_margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths,
                        rejected_lengths)
    return -F.logsigmoid(beta * m_bar)


@register_objective("sft", needs_lengths=True, defaults={"nll_norm": "sequence"})
def sft(chosen_logps, rejected_logps, *, chosen_lengths, nll_norm, **_):
    """NLL of the chosen response: -s_w / |y_w| per pair.

    TRL's ``sft`` is the token mean over ALL chosen tokens of the batch, -sum_k s_w,k / sum_k |y_w,k|; pass
    ``nll_norm="batch"`` for a per-pair loss whose batch mean equals it exactly (see ``_nll``).
    """
    return _nll(chosen_logps, chosen_lengths, nll_norm)


# ---------------------------------------------------------------------------------------------------------------
# Variants with extra terms (not TRL 1.16 loss types).
# ---------------------------------------------------------------------------------------------------------------


@register_objective("rdpo", needs_ref=True, needs_lengths=True, defaults={"beta": 0.1, "rdpo_alpha": None})
def rdpo(chosen_logps, rejected_logps, *, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths,
         beta, rdpo_alpha, **_):
    """R-DPO (length-regularised): -log σ(β m - α (|y_w| - |y_l|)); ``rdpo_alpha`` is required."""
    z = beta * _margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -F.logsigmoid(z - rdpo_alpha * (chosen_lengths - rejected_lengths))


@register_objective("dpop", needs_ref=True, defaults={"beta": 0.1, "dpop_lambda": None})
def dpop(chosen_logps, rejected_logps, *, ref_chosen_logps, ref_rejected_logps, beta, dpop_lambda, **_):
    """DPO-Positive: -log σ(β [m - λ max(0, s_w^ref - s_w)]); ``dpop_lambda`` is required (Smaug used 50)."""
    m = _margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -F.logsigmoid(beta * (m - dpop_lambda * torch.relu(ref_chosen_logps - chosen_logps)))


# ---------------------------------------------------------------------------------------------------------------
# Reference-free: TRL's experimental CPOTrainer (cpo_trainer.py:714-735, loss at 890) and ORPOTrainer (848).
# ℓ = s_w - s_l (summed) for sigmoid/hinge; ℓ̄ = s̄_w - s̄_l (averaged) for ipo/simpo. Total adds cpo_alpha·NLL.
# ---------------------------------------------------------------------------------------------------------------

_CPO = {"beta": 0.1, "label_smoothing": 0.0, "cpo_alpha": 1.0, "nll_norm": "sequence"}


@register_objective("cpo_sigmoid", needs_lengths=True, defaults=_CPO)
def cpo_sigmoid(chosen_logps, rejected_logps, *, chosen_lengths, beta, label_smoothing, cpo_alpha, nll_norm, **_):
    """CPO: -(1-ε) log σ(βℓ) - ε log σ(-βℓ) + cpo_alpha · NLL_w."""
    return (_smoothed_logistic(beta * (chosen_logps - rejected_logps), label_smoothing)
            + cpo_alpha * _nll(chosen_logps, chosen_lengths, nll_norm))


@register_objective("cpo_hinge", needs_lengths=True, defaults=_CPO)
def cpo_hinge(chosen_logps, rejected_logps, *, chosen_lengths, beta, cpo_alpha, nll_norm, **_):
    """CPO hinge: relu(1 - βℓ) + cpo_alpha · NLL_w (``label_smoothing`` is accepted and unused, as in TRL)."""
    return torch.relu(1 - beta * (chosen_logps - rejected_logps)) + cpo_alpha * _nll(chosen_logps, chosen_lengths,
                                                                                      nll_norm)


@register_objective("cpo_ipo", needs_lengths=True, defaults=_CPO)
def cpo_ipo(chosen_logps, rejected_logps, *, chosen_lengths, rejected_lengths, beta, cpo_alpha, nll_norm, **_):
    """CPO ipo (averaged log-probs, no reference): (ℓ̄ - 1/(2β))² + cpo_alpha · NLL_w."""
    l_bar = _avg(chosen_logps, chosen_lengths) - _avg(rejected_logps, rejected_lengths)
    return (l_bar - 1 / (2 * beta)) ** 2 + cpo_alpha * _nll(chosen_logps, chosen_lengths, nll_norm)


@register_objective("simpo", needs_lengths=True, defaults={**_CPO, "simpo_gamma": 0.5, "cpo_alpha": 0.0})
def simpo(chosen_logps, rejected_logps, *, chosen_lengths, rejected_lengths, beta, simpo_gamma, label_smoothing,
          cpo_alpha, nll_norm, **_):
    """SimPO: -(1-ε) log σ(βℓ̄ - γ) - ε log σ(-(βℓ̄ - γ)) + cpo_alpha · NLL_w.

    ``cpo_alpha`` defaults to 0 (SimPO proper, TRL's ``loss_type="alphapo"`` sugar); TRL's
    ``CPOConfig(loss_type="simpo")`` keeps its default ``cpo_alpha=1.0`` ("CPO-SimPO"): pass it to reproduce that.
    """
    l_bar = _avg(chosen_logps, chosen_lengths) - _avg(rejected_logps, rejected_lengths)
    return (_smoothed_logistic(beta * l_bar - simpo_gamma, label_smoothing)
            + cpo_alpha * _nll(chosen_logps, chosen_lengths, nll_norm))


@register_objective("orpo", needs_lengths=True, defaults={"beta": 0.1, "nll_norm": "sequence"})
def orpo(chosen_logps, rejected_logps, *, chosen_lengths, rejected_lengths, beta, nll_norm, **_):
    """ORPO: NLL_w - β log σ(log-odds), log-odds = (s̄_w - s̄_l) - [log(1 - e^{s̄_w}) - log(1 - e^{s̄_l})].

    TRL's ORPOTrainer takes its NLL over prompt AND response tokens; here it is over the response only (the prompt
    part of that gradient is not a combination of g_w and g_l).
    """
    avg_w, avg_l = _avg(chosen_logps, chosen_lengths), _avg(rejected_logps, rejected_lengths)
    log_odds = (avg_w - avg_l) - (_log1mexp(avg_w) - _log1mexp(avg_l))
    return _nll(chosen_logps, chosen_lengths, nll_norm) - beta * F.logsigmoid(log_odds)


# ---------------------------------------------------------------------------------------------------------------
# DIL (Xiao et al., "On a Connection Between Imitation Learning and RLHF", ICLR 2025): density-ratio estimation
# losses on r = s̄ - s̄_ref (length-averaged log-probs, no β), as in the DIL reference implementation.
# ---------------------------------------------------------------------------------------------------------------


def _avg_ratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths):
    """(r_w, r_l) = (s̄_w - s̄_w^ref, s̄_l - s̄_l^ref), policy and reference averaged over the same length."""
    return (_avg(chosen_logps - ref_chosen_logps, chosen_lengths),
            _avg(rejected_logps - ref_rejected_logps, rejected_lengths))


@register_objective("dil_lsif", needs_ref=True, needs_lengths=True, defaults={})
def dil_lsif(chosen_logps, rejected_logps, *, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths,
             **_):
    """DIL, least-squares importance fitting: -e^{r_w} + ½ e^{2 r_l}."""
    r_w, r_l = _avg_ratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths,
                           rejected_lengths)
    return -torch.exp(r_w) + 0.5 * torch.exp(2 * r_l)


@register_objective("dil_ukl", needs_ref=True, needs_lengths=True, defaults={})
def dil_ukl(chosen_logps, rejected_logps, *, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths,
            **_):
    """DIL, unnormalised KL: -s̄_w + e^{r_l} (-log π(y_w) + e^{r_l}, length-averaged)."""
    _, r_l = _avg_ratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths,
                         rejected_lengths)
    return -_avg(chosen_logps, chosen_lengths) + torch.exp(r_l)


@register_objective("dil_bce", needs_ref=True, needs_lengths=True, defaults={})
def dil_bce(chosen_logps, rejected_logps, *, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths,
            **_):
    """DIL, binary cross-entropy: -log σ(r_w) - log σ(-r_l)."""
    r_w, r_l = _avg_ratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths,
                           rejected_lengths)
    return -F.logsigmoid(r_w) - F.logsigmoid(-r_l)
