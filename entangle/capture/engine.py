"""Hook machinery: one forward and one backward pass give the whole per-sequence Gram matrix (THEORY §6).

The backward pass of ``sum_i s_i`` delivers, at every hooked module, the output gradient of each
sequence separately (sequences of a causal LM do not interact). A per-layer rule (see ``rules/``)
turns (inputs, output gradients) into per-example contributions whose inner products are summed
in float64. This module knows nothing about individual layer types.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from .contrib import (
    CHUNK_ELEMS,
    Dense,
    Scaled,
    SharedParameter,
    _gram64,
    dual_gram,
    stats_of_gram,
)
from .exact import exact_gram, per_sequence_grads
from .logprobs import check_batch, model_logits, response_lengths, token_logps
from .params import ParamSpec, select_params, unwrap_model
from .result import GramResult
from .rules import rule_for
from .rules.generic import _tensors, generic

METHODS = ("auto", "exact", "ghost", "materialise")
STRUCTURES = ("full", "pairs")
_ACTIVE: list[GramEngine] = []          # engines whose hooks are installed, innermost last


def current_engine() -> GramEngine | None:
    """The engine whose hooks are installed right now (for forwards that drive parts of the pass themselves)."""
    return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def measurement_mode(model: torch.nn.Module, named_params):
    """Eval mode (no dropout), gradients on the measured parameters only, RNG forked; all restored after."""
    modes = [(m, m.training) for m in model.modules()]
    selected = {id(p) for _, p in named_params}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    devices = sorted({p.device.index for _, p in named_params if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            model.eval()
            for p, _ in flags:  # only the measured parameters carry gradients during the measurement
                p.requires_grad_(id(p) in selected)
            yield
    finally:
        for m, was in modes:
            m.training = was
        for p, was in flags:
            p.requires_grad_(was)


@dataclass
class _Use:
    module: torch.nn.Module
    names: list[str]                 # the module's own measured parameters (local names)
    args: tuple
    kwargs: dict
    grads: list = field(default_factory=list)
    index: dict = field(default_factory=dict)   # local param name -> index of this use among the param's uses


class GramEngine:
    """Installs the hooks for one measurement and accumulates per-parameter Gram blocks."""

    def __init__(self, model: torch.nn.Module, named_params, n: int, mode: str = "auto",
                 preconditioner: Mapping[str, torch.Tensor] | None = None,
                 delta: Mapping[str, torch.Tensor] | None = None, plain: bool = True, pairs: bool = False):
        self.n, self.mode = n, mode
        # pairs: per parameter only the within-pair Gram entries and K c (float64 [3, N], see contrib.pair_stats),
        # with c = self.weights, set between the forward and the backward pass
        self.pairs, self.weights = pairs, None
        self.scale = None if preconditioner is None else {k: v.sqrt() for k, v in preconditioner.items()}
        # Gram blocks per geometry: "plain" <g_i, g_j> and/or "preconditioned" g_i^T P g_j, from the same pass
        kinds = (["plain"] if plain or preconditioner is None else []) + (["preconditioned"] if self.scale else [])
        self.geometries = {k: {"blocks": {}, "shared": {}, "stats": {}} for k in kinds}
        self.delta = delta
        self.dots: dict[str, torch.Tensor] = {}   # param name -> <g_i, delta> [N] (delta mode)
        self.name_of = {id(p): name for name, p in named_params}
        self.param_rows = {name: p.shape[0] if p.dim() else 1 for name, p in named_params}
        self.info: dict[str, str] = {}
        self.uses: dict[str, list] = {}          # param name -> touched rows of each use, in forward order
        self.generic_uses: list[_Use] = []
        self.sources: list[torch.Tensor] = []    # hooked outputs whose inputs carry no gradient
        self.calls: dict[int, int] = {}          # id(param) -> hooked calls of rule-handled modules
        self.generic_params: set[int] = set()    # params with a use through the generic fallback (uncounted)
        self.handles = []
        self.named = list(named_params)
        self.is_paused = False
        self.chunk: tuple[int, int] | None = None      # examples [start, stop) of the current chunk (see examples())
        self.held: dict[str, list] = {}               # param name -> [(start, stop, contribution)] of the chunks
        self.segment_key = None                         # which re-run part of the model is running (None: main)
        self.part_of: dict[str, object] = {}            # param name -> the part its uses were recorded in
        self.owners: list[tuple[torch.nn.Module, list[str]]] = []
        seen = set()
        for module in model.modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            own = [k for k, p in module._parameters.items() if p is not None and id(p) in self.name_of]
            if own:
                self.owners.append((module, own))

    @contextlib.contextmanager
    def paused(self):
        """Module calls inside are not recorded: a forward whose values are reused but never differentiated."""
        was, self.is_paused = self.is_paused, True
        try:
            yield
        finally:
            self.is_paused = was

    @contextlib.contextmanager
    def segment(self, key=None):
        """A part of the model re-run and differentiated on its own inside the main backward (block-wise token
        maps). Its hooked calls and source outputs are counted apart from the main graph's; generic-rule uses
        recorded inside are reduced when it closes, so their inputs are not kept to the end."""
        saved = self.calls, self.sources, self.generic_params, self.generic_uses, self.segment_key
        self.calls, self.sources, self.generic_params, self.generic_uses = {}, [], set(), []
        self.segment_key = object() if key is None else key
        try:
            yield
            with self.paused():                   # the fallback re-runs modules whose hooks are still installed
                self.flush_generic()
        finally:
            self.calls, self.sources, self.generic_params, self.generic_uses, self.segment_key = saved

    @contextlib.contextmanager
    def examples(self, start: int, stop: int):
        """Inside, the model runs on examples ``start..stop-1`` only (a chunk of the batch): their contributions
        are held per parameter until :meth:`reduce_held` forms the [n, n] Gram blocks with the cross-chunk terms.
        Bounds the activations alive at a time by the chunk, at the price of holding one segment's contributions.
        """
        saved = self.n
        self.n, self.chunk = stop - start, (start, stop)
        try:
            yield
        finally:
            self.n, self.chunk = saved, None

    def _hold(self, name: str, contrib, how: str) -> None:
        start, stop = self.chunk
        if self.delta is not None or self.scale is not None or "plain" not in self.geometries or self.pairs:
            raise NotImplementedError("chunked examples give the plain Gram matrix only")
        held = self.held.setdefault(name, [])
        # (a use in another part of the model is refused by the forward hook, see part_of)
        if any(s == start for s, _, _ in held):
            raise NotImplementedError(f"parameter {name!r} is used more than once in one chunk; chunked examples "
                                      "need one use per parameter")
        held.append((start, stop, contrib))
        self.info[name] = f"{how}:{getattr(contrib, 'kind', 'materialised')} (chunked)"

    def reduce_held(self) -> None:
        """Turn the held chunk contributions into Gram blocks [n, n] (within- and cross-chunk terms)."""
        held, self.held = self.held, {}
        blocks = self.geometries["plain"]["blocks"] if "plain" in self.geometries else {}
        for name, parts in held.items():
            g = parts[0][2].gram() if len(parts) == 1 and parts[0][1] - parts[0][0] == self.n else \
                _stacked_gram(parts, self.n)
            blocks[name] = blocks[name] + g if name in blocks else g

    def segment_grad(self, output: torch.Tensor, inputs: list[torch.Tensor], grad: torch.Tensor) -> tuple:
        """Inside :meth:`segment`: pull ``grad`` from ``output`` back to ``inputs`` and to the segment's source
        outputs (firing the rules on the way) and return the gradients of ``inputs``."""
        self.check_all_uses_hooked(output, self.named)
        got = torch.autograd.grad(output, [*inputs, *self.sources], grad, allow_unused=True)
        return got[:len(inputs)]

    # -- hooks -------------------------------------------------------------------------------
    def __enter__(self):
        _ACTIVE.append(self)
        for module, own in self.owners:
            self.handles.append(module.register_forward_pre_hook(self._expand_batch))
            self.handles.append(module.register_forward_hook(self._make_forward_hook(own), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _expand_batch(self, module, args):
        """An input broadcast over the batch (GPT-2 positions [1, T]) would sum its gradient over sequences."""
        if self.is_paused:
            return None
        if args and torch.is_tensor(args[0]) and args[0].dim() > 0 and args[0].shape[0] == 1 and self.n > 1:
            return (args[0].expand(self.n, *args[0].shape[1:]), *args[1:])
        return None

    def _make_forward_hook(self, own: list[str]):
        def hook(module, args, kwargs, output):
            if self.is_paused:
                return
            rule = rule_for(module)
            use_index = {}
            for k in own:
                name = self.name_of[id(module._parameters[k])]
                if self.part_of.setdefault(name, self.segment_key) is not self.segment_key:
                    # its uses would be reduced apart, losing their cross terms
                    raise NotImplementedError(f"parameter {name!r} is used in more than one separately "
                                              "differentiated part of the model")
                touched = torch.unique(args[0]) if rule is not None and isinstance(module, torch.nn.Embedding) else None
                use_index[k] = len(self.uses.setdefault(name, []))
                self.uses[name].append(touched)
            outs = [o for o in _tensors(output) if o.requires_grad]
            for o in outs:
                if o.dim() == 0 or o.shape[0] != self.n:
                    raise RuntimeError(
                        f"{type(module).__name__} (parameters {[self.name_of[id(module._parameters[k])] for k in own]}) "
                        f"returned an output of shape {tuple(o.shape)} whose first dimension is not the batch of "
                        f"{self.n} sequences (the model flattens or broadcasts the batch there), so per-sequence "
                        "gradients cannot be separated at this layer; use method='exact' or leave these parameters "
                        "out (params=...)")
            if not any(torch.is_tensor(a) and a.requires_grad for a in (*args, *kwargs.values())):
                self.sources.extend(outs)
            if rule is None:
                use = _Use(module, own, args, kwargs, grads=[None] * len(outs), index=use_index)
                self.generic_params.update(id(module._parameters[k]) for k in own)
                self.generic_uses.append(use)
                for j, o in enumerate(outs):
                    o.register_hook(self._make_generic_hook(use, j))
                return
            if len(outs) != 1:
                raise RuntimeError(f"{type(module).__name__} returned {len(outs)} differentiable outputs; "
                                   "its rule expects one")
            for k in own:
                self.calls[id(module._parameters[k])] = self.calls.get(id(module._parameters[k]), 0) + 1
            outs[0].register_hook(lambda g: self._apply_rule(rule, module, own, args, g, use_index))
        return hook

    def _make_generic_hook(self, use: _Use, j: int):
        def hook(grad):
            use.grads[j] = grad.detach()
        return hook

    def _dtype(self, module, own):
        return torch.float64 if module._parameters[own[0]].dtype == torch.float64 else torch.float32

    def _apply_rule(self, rule, module, own, args, grad, use_index):
        g = grad.detach().to(self._dtype(module, own))
        if g.dim() == 2:
            g = g.unsqueeze(1)
            args = tuple(a.unsqueeze(1) if torch.is_tensor(a) and a.dim() >= 1 else a for a in args)
        valid = (g != 0).any(-1)
        args = tuple(a.detach() if torch.is_tensor(a) else a for a in args)
        with torch.no_grad():
            contribs = rule(module, args, g, valid, self.mode)
        for k in own:
            if k not in contribs:
                raise RuntimeError(f"rule {rule.__name__} gave no gradient for {type(module).__name__}.{k}")
            with torch.no_grad():
                self._add(self.name_of[id(module._parameters[k])], use_index[k], contribs[k], rule.__name__)

    def _add(self, name: str, use: int, contrib, how: str):
        if self.chunk is not None:
            self._hold(name, contrib, how)
            return
        delta = None if self.delta is None else self.delta[name]
        if not self.geometries:                     # dots only (update_dot)
            self.info[name] = f"{how}:dot"
            dot = contrib.dot(delta)
        elif len(self.uses[name]) == 1 and "plain" in self.geometries:
            # both geometries and the dot from one materialisation of the per-example gradients
            self.info[name] = f"{how}:{getattr(contrib, 'kind', 'materialised')}"
            scale = None if self.scale is None else self.scale[name]
            plain, scaled, dot = dual_gram(contrib, scale, delta, self.weights if self.pairs else None)
            for kind, g in (("plain", plain), ("preconditioned", scaled)):
                if g is not None:
                    blocks = self.geometries[kind]["stats" if self.pairs else "blocks"]
                    blocks[name] = blocks[name] + g if name in blocks else g
        else:
            self.info[name] = f"{how}:{getattr(contrib, 'kind', 'materialised')}"
            if len(self.uses[name]) > 1:
                self.info[name] += f" (shared by {len(self.uses[name])} uses)"
            if self.scale is not None:
                self._accumulate(self.geometries["preconditioned"], name, use, Scaled(contrib, self.scale[name]))
            if "plain" in self.geometries:
                self._accumulate(self.geometries["plain"], name, use, contrib)
            dot = None if delta is None else contrib.dot(delta)
        if dot is not None:                         # a dot product is linear: uses simply add up
            self.dots[name] = self.dots[name] + dot if name in self.dots else dot

    def _accumulate(self, geometry: dict, name: str, use: int, contrib) -> None:
        """Add one use's contribution to the Gram block of ``name`` (tied parameters via SharedParameter)."""
        if len(self.uses[name]) > 1:
            if name not in geometry["shared"]:
                geometry["shared"][name] = SharedParameter(self.uses[name], self.param_rows[name])
            geometry["shared"][name].add(use, contrib)
            return
        g = contrib.gram()
        blocks = geometry["blocks"]
        blocks[name] = blocks[name] + g if name in blocks else g

    def backward(self, total: torch.Tensor, named_params) -> None:
        """Backward pass of ``total`` that reaches every hooked output but computes no parameter gradient.

        Asking autograd for the gradients of the *source* outputs (e.g. the embedding lookups) makes it
        traverse every path from the log-probs down to them, firing the output hooks on the way, while
        skipping the weight-gradient products a training step would compute.
        """
        self.check_all_uses_hooked(total, named_params)
        if self.sources:
            torch.autograd.grad(total, self.sources, allow_unused=True)
        else:
            torch.autograd.grad(total, [p for _, p in named_params], allow_unused=True)

    def check_all_uses_hooked(self, total: torch.Tensor, named_params) -> None:
        """Every autograd use of a rule-handled parameter must be one of the hooked module calls.

        A parameter used outside its module's forward (e.g. ``F.linear(x, self.embed.weight)`` in a
        parent module) would otherwise be silently missing from the Gram matrix.
        """
        if not self.calls:
            return
        edges: dict[int, int] = {}
        seen, stack = set(), [total.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            for nxt, _ in node.next_functions:
                if nxt is not None and hasattr(nxt, "variable"):
                    edges[id(nxt.variable)] = edges.get(id(nxt.variable), 0) + 1
                stack.append(nxt)
        for name, p in named_params:
            if id(p) in self.calls and id(p) not in self.generic_params and edges.get(id(p), 0) != self.calls[id(p)]:
                raise RuntimeError(
                    f"parameter {name!r} is used {edges.get(id(p), 0)} times by autograd but only "
                    f"{self.calls[id(p)]} times through hooked module calls (used outside its module's "
                    "forward?); use method='exact' or register a rule for the module that uses it")

    # -- after the backward pass ----------------------------------------------------------------
    def flush_generic(self) -> None:
        """Reduce the recorded generic-rule uses (their output gradients have all arrived)."""
        uses, self.generic_uses = self.generic_uses, []
        for use in uses:
            grads = [None if g is None else g.to(self._dtype(use.module, use.names)) for g in use.grads]
            contribs = generic(use.module, use.args, use.kwargs, grads, use.names, self.n)
            for k in use.names:
                self._add(self.name_of[id(use.module._parameters[k])], use.index[k], contribs[k], "generic")

    def finish(self, named_params) -> dict[str, dict[str, torch.Tensor]]:
        """Per-geometry Gram blocks [N, N] per parameter (``{}`` for a dots-only pass: no geometry); with
        ``pairs``, per-parameter statistics [3, N] instead (blocks of shared parameters are reduced to them)."""
        self.flush_generic()
        if not self.pairs:
            return {kind: self._blocks(geometry, named_params) for kind, geometry in self.geometries.items()}
        out = {}
        for kind, geometry in self.geometries.items():
            reduced = {name: stats_of_gram(g, self.weights) for name, g in self._blocks(geometry).items()}
            for name, stats in geometry["stats"].items():
                reduced[name] = reduced[name] + stats if name in reduced else stats
            out[kind] = self._complete(reduced, named_params, (3, self.n))
        return out

    def _blocks(self, geometry: dict, named_params=None) -> dict[str, torch.Tensor]:
        """Gram blocks of the parameters reached (of every parameter in ``named_params`` order, when given)."""
        blocks = {**geometry["blocks"], **{name: acc.gram() for name, acc in geometry["shared"].items()}}
        return blocks if named_params is None else self._complete(blocks, named_params, (self.n, self.n))

    def _complete(self, values: dict[str, torch.Tensor], named_params, shape) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in named_params:
            out[name] = values.get(name)
            if out[name] is None:                       # parameter not reached by the log-probs
                out[name] = torch.zeros(*shape, dtype=torch.float64, device=p.device)
                self.info.setdefault(name, "unused (zero gradient)")
        return out


def _stacked_gram(parts: list, n: int) -> torch.Tensor:
    """Gram matrix float64 [n, n] of per-example gradients given as chunk contributions ``(start, stop, c)``
    (examples missing from every chunk have a zero gradient), materialised a block of parameter rows at a time."""
    first = parts[0][2]
    if all(isinstance(c, Dense) for _, _, c in parts) or getattr(first, "n_rows", None) is None:
        whole = [(s, e, c.values if isinstance(c, Dense) else c.rows(None)) for s, e, c in parts]
        flat = torch.zeros(n, whole[0][2][0].numel(), dtype=whole[0][2].dtype, device=whole[0][2].device)
        for s, e, v in whole:
            flat[s:e] = v.reshape(e - s, -1)
        return _gram64(flat)
    probe = first.rows(torch.zeros(1, dtype=torch.long, device=_device(first)))
    width, n_rows = probe[0, 0].numel(), first.n_rows
    out = torch.zeros(n, n, dtype=torch.float64, device=probe.device)
    step = max(1, CHUNK_ELEMS // max(n * width, 1))
    for r in range(0, n_rows, step):
        index = torch.arange(r, min(r + step, n_rows), device=probe.device)
        flat = torch.zeros(n, index.numel() * width, dtype=probe.dtype, device=probe.device)
        for s, e, c in parts:
            flat[s:e] = c.rows(index).reshape(e - s, -1)
        out += _gram64(flat)
    return out


def _device(contrib) -> torch.device:
    return getattr(contrib, "device", None) or torch.device("cpu")


def _check_metric(named, tensors: Mapping[str, torch.Tensor] | None, what: str) -> None:
    if tensors is None:
        return
    for name, p in named:
        if name not in tensors:
            raise ValueError(f"{what} has no entry for parameter {name!r}")
        if tuple(tensors[name].shape) != tuple(p.shape):
            raise ValueError(f"{what}[{name!r}] has shape {tuple(tensors[name].shape)}, parameter has {tuple(p.shape)}")
        if not torch.isfinite(tensors[name]).all():
            raise ValueError(f"{what}[{name!r}] has NaN/inf entries")


def _run(model, batch, params, method, forward, preconditioner=None, delta=None, plain=True, gram=True,
         weights=None):
    """One forward and one backward pass: per-parameter Gram blocks per geometry (``{}`` with ``gram=False``;
    with ``weights``, the ``"pairs"`` statistics [3, N] instead), the log-probs and, with ``delta``, the dots
    ``<g_i, delta>`` [N] (float64, CPU; ``None`` without)."""
    model = unwrap_model(model)
    check_batch(model, batch)
    named = select_params(model, params)
    _check_metric(named, preconditioner, "preconditioner")
    _check_metric(named, delta, "delta")
    n = batch["input_ids"].shape[0]
    with measurement_mode(model, named):
        engine = GramEngine(model, named, n, mode=method, preconditioner=preconditioner, delta=delta, plain=plain,
                            pairs=weights is not None)
        if not gram:
            engine.geometries = {}                      # dots only: no Gram block is accumulated
        with engine:
            logps = token_logps(forward(model, batch), batch).sum(-1)
            if not torch.isfinite(logps).all():
                bad = (~torch.isfinite(logps)).nonzero()[:, 0].tolist()
                raise ValueError(f"non-finite log-probs for sequences {bad} (pairs {[i % (n // 2) for i in bad]})")
            if weights is not None:
                engine.weights = _pair_weights(weights, logps, n)
            engine.backward(logps.sum(), named)
        per_param = engine.finish(named)                # every contribution is in, so every dot is complete
        pred = None
        if delta is not None:
            pred = torch.zeros(n, dtype=torch.float64)
            for name, _ in named:
                if name in engine.dots:
                    pred = pred + engine.dots[name].cpu()
    return engine, named, per_param, logps.detach().to(torch.float64), pred


def _pair_weights(weights, logps: torch.Tensor, n: int) -> torch.Tensor:
    """The vector c [n] (float64, on the log-probs' device) of a ``"pairs"`` measurement, checked."""
    w = weights(logps.detach().to(torch.float64)) if callable(weights) else weights
    w = torch.as_tensor(w).detach().to(device=logps.device, dtype=torch.float64).flatten()
    if w.shape[0] != n:
        raise ValueError(f"weights has {w.shape[0]} entries for {n} sequences")
    bad = (~torch.isfinite(w)).nonzero()[:, 0].tolist()
    if bad:
        raise ValueError(f"non-finite weights for sequences {bad} (pairs {sorted({i % (n // 2) for i in bad})})")
    return w


def sequence_gram(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    params: ParamSpec = None,
    method: str = "auto",
    forward: Callable = model_logits,
    preconditioner: Mapping[str, torch.Tensor] | None = None,
    plain: bool = False,
    delta: Mapping[str, torch.Tensor] | None = None,
    structure: str = "full",
    weights: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> GramResult | tuple[GramResult, torch.Tensor]:
    """Gram matrix of per-sequence gradients of the summed response log-probs (THEORY §1, §4, §6).

    Args:
        model: a causal LM (transformers ``*ForCausalLM``, PEFT model, or DDP-wrapped).
        batch: ``input_ids``, ``attention_mask``, ``completion_mask`` [2B, L] (see ``encode_pairs``).
        params: which parameters (see :func:`select_params`); default all trainable.
        method: ``"auto"`` (one backward, cheaper of ghost/materialised per layer), ``"exact"``
            (one backward per sequence; the slow twin), or force ``"ghost"`` / ``"materialise"``.
        forward: ``forward(model, batch) -> logits`` for models that need a custom call.
        preconditioner: optional diagonal metric ``P`` per parameter name (same shapes); the result is
            then ``g_i^T P g_j`` (Adam's geometry, THEORY §5; see :func:`adam_preconditioner`).
        plain: with a ``preconditioner``, return the plain Gram with the preconditioned one attached as
            ``result.preconditioned``, both from the same forward and backward pass.
        delta: optional parameter update (as in :func:`update_dot`); its first-order prediction
            ``<g_i, delta>`` then comes from the same pass as the Gram matrix, at no extra forward or backward.
        structure: ``"full"`` (the whole matrix), or ``"pairs"``: only each sequence's squared norm, the inner
            product of each pair (rows k and B + k) and ``K @ weights``, with O(N) instead of O(N^2) products
            (what the per-pair frames need; see :class:`GramResult`). Needs ``weights``.
        weights: for ``"pairs"``, the vector c [2B] of ``K @ c``, or a function of the log-probs [2B] (float64)
            computed in the forward pass that returns it (e.g. the batch-mean loss's coefficients / B).

    Returns:
        :class:`GramResult` with ``matrix`` float64 [2B, 2B], ``logps``, ``lengths`` and per-parameter
        blocks (``result.blocks("layer")``); with ``delta``, ``(result, pred)`` where ``pred`` [2B] float64 is
        what :func:`update_dot` returns. The model is left exactly as found.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if structure not in STRUCTURES:
        raise ValueError(f"unknown structure {structure!r}; choose one of {STRUCTURES}")
    if (structure == "pairs") != (weights is not None):
        raise ValueError('structure="pairs" needs weights (the vector c of K @ c, or a function of the log-probs), '
                         'and weights apply to structure="pairs" only (with the full matrix, K @ c is yours to form)')
    if structure == "pairs" and batch["input_ids"].shape[0] % 2:
        raise ValueError(f'structure="pairs" needs 2B sequences (chosen, then rejected); got '
                         f'{batch["input_ids"].shape[0]}')
    if method == "exact" and structure == "pairs":
        full = sequence_gram(model, batch, params, method, forward, preconditioner, plain, delta)
        gram, pred = full if delta is not None else (full, None)
        out = gram.pairs_only(_pair_weights(weights, gram.logps, gram.logps.shape[0]).cpu())
        return out if delta is None else (out, pred)
    if method == "exact":
        model = unwrap_model(model)
        check_batch(model, batch)
        named = select_params(model, params)
        _check_metric(named, preconditioner, "preconditioner")
        with measurement_mode(model, named):
            out = exact_gram(model, batch, named, forward, None if plain else preconditioner)
            if plain and preconditioner is not None:
                out.preconditioned = exact_gram(model, batch, named, forward, preconditioner)
        if delta is None:
            return out
        return out, update_dot(model, batch, delta, params, forward, method="exact")[0]
    engine, named, geometries, logps, pred = _run(model, batch, params, method, forward,
                                                  preconditioner=preconditioner, delta=delta, plain=plain,
                                                  weights=weights if structure == "pairs" else None)

    def result(per_param):
        fields = {"logps": logps, "lengths": response_lengths(batch), "method": method, "info": engine.info}
        if structure == "pairs":
            return GramResult.from_pair_stats(per_param, engine.weights, **fields)
        return GramResult(matrix=torch.stack(list(per_param.values())).sum(0), per_param=per_param, **fields)

    if "plain" not in geometries:
        out = result(geometries["preconditioned"])
    else:
        out = result(geometries["plain"])
        if "preconditioned" in geometries:
            out.preconditioned = result(geometries["preconditioned"])
    return out if delta is None else (out, pred)


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
    if method == "exact":
        model = unwrap_model(model)
        named = select_params(model, params)
        _check_metric(named, delta, "delta")
        with measurement_mode(model, named):
            logps, grads = per_sequence_grads(model, batch, named, forward)
        flat = torch.cat([delta[name].flatten().to(torch.float64) for name, _ in named])
        pred = torch.stack([torch.cat([x.flatten() for x in g]) @ flat for g in grads])
        return pred, logps.to(torch.float64)
    _, _, _, logps, pred = _run(model, batch, params, method, forward, delta=delta, gram=False)
    return pred, logps
