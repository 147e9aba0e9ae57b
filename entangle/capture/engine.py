"""Hook machinery: one forward and one backward pass give the per-sequence Gram views (THEORY §6).

The backward pass of ``sum_i s_i`` delivers, at every hooked module, the output gradient of each
sequence separately (sequences of a causal LM do not interact). A per-layer rule (see ``rules/``)
turns (inputs, output gradients) into per-example contributions (``contrib.Contribution``) whose inner
products are summed in float64. This module knows nothing about individual layer types.

:class:`GramEngine` is an explicit object: whoever drives a pass holds it. :func:`gram_pass` sets one up
(model checks, measurement mode, hooks) and :meth:`GramEngine.run` runs the forward and backward pass of a batch
and returns a typed :class:`~entangle.capture.result.Measurement`. A pass that re-runs part of the model and
differentiates it on its own (block-wise token maps) uses the narrow interface of :meth:`GramEngine.paused`,
:meth:`GramEngine.add_source`, :meth:`GramEngine.sub_pass` and :meth:`GramEngine.add_gram`.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from .contrib import (
    Contribution,
    Scaled,
    SharedParameter,
    affine_within_blocks,
    block_grams,
    dense_enough,
    dense_total,
    dual_gram,
    factored_kind,
    pair_products,
    weighted_sum,
)
from .logprobs import response_lengths, token_logps
from .result import GramResult, Measurement, PairStats, stats_of_gram
from .rules import rule_for
from .rules.generic import _tensors, generic
from .sharding import is_sharded, reshard, whole

Sink = Callable[[str, Contribution, str], None]

# Calls of small layers are held back and reduced together while their inputs and output gradients total at most this
# many elements (about 16 MB in float32): one rule call per group of equal shapes instead of one per call.
PENDING_ELEMS = 1 << 22
# positions_with_gradient reads an output gradient of at most this many elements whole (measured on CPU: faster up to
# about 1M elements, slower above)
SMALL_GRADIENT = 1 << 19
# Within pairs, the held calls of affine layers are reduced together in chunks of at most this many position products
# (calls x pairs x contrib.pair_products(T); about 28 bytes each while a chunk is reduced)
AFFINE_ELEMS = 1 << 20
# the key of the one Gram block a GramEngine(per_param=False) keeps: the total over its parameters
TOTAL = ""


class SeparatePartsError(RuntimeError):
    """A parameter is used in more than one separately differentiated part of a pass (see ``sub_pass``)."""


def autocast_off(device: torch.device | None) -> contextlib.AbstractContextManager:
    """Autocast disabled on ``device``'s type while the engine forms and reduces per-example gradients.

    A pass may run inside ``torch.autocast`` (a training loop's mixed precision): the forward then computes what
    training computes, but the backward hooks and the reductions would run in it too, turning the float32 partial
    sums of the Gram products into bfloat16 ones. Every rule casts its inputs to float32 (float64) explicitly.
    """
    if device is None or not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


@contextlib.contextmanager
def measurement_mode(model: torch.nn.Module, named_params):
    """Eval mode (no dropout), gradients on the measured parameters only, RNG forked; all restored after.

    A ``fully_shard`` model is resharded on the way in and out: a forward without a backward leaves the root's
    whole parameters in place, with the ``requires_grad`` of the moment, which the next training step would use."""
    reshard(model)
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
        reshard(model)
        for m, was in modes:
            m.training = was
        for p, was in flags:
            p.requires_grad_(was)


@dataclass
class _Use:
    """A generic-fallback module call, reduced once all its output gradients have arrived."""

    module: torch.nn.Module
    names: list[str]                 # the module's own measured parameters (local names)
    args: tuple | None               # None: a checkpointed call, whose inputs come from the backward's re-run
    kwargs: dict | None
    grads: list = field(default_factory=list)
    index: dict = field(default_factory=dict)   # local param name -> index of this use among the param's uses


@dataclass(frozen=True)
class _Plan:
    """What the hooks need of one module with measured parameters: the same for every pass over one layout (built
    once per module and kept in the layout, so that a training run's hooks do not look it up again per call)."""

    own: tuple[str, ...]             # the module's measured parameters (local names)
    names: tuple[str, ...]           # their parameter names
    rule: Callable | None            # None: the generic fallback
    touched: Callable | None         # the rule's ``touched`` (None: a use may touch every row)
    key: tuple | None                # the static part of the batching key (None: the rule declares no batch_key)
    affine: bool = False             # an affine rule of its weight and bias (within pairs: reduced all together)


@dataclass
class _Part:
    """What is counted per separately differentiated part of a pass: the main graph, or one ``sub_pass``."""

    n: int
    sink: Sink | None = None
    key: object = None
    calls: dict[str, int] = field(default_factory=dict)     # param name -> hooked calls of rule-handled modules
    leaves: dict[int, str] = field(default_factory=dict)    # id of the tensor a hooked call used -> param name
    sources: list[torch.Tensor] = field(default_factory=list)   # hooked outputs whose inputs carry no gradient
    generic_params: set[str] = field(default_factory=set)   # params with a use through the generic fallback
    generic_uses: list[_Use] = field(default_factory=list)


class GramEngine:
    """Installs the hooks for one pass over ``n`` sequences and accumulates the views asked for.

    Args:
        model: the unwrapped model whose modules are hooked.
        named_params: the measured parameters ``[(name, parameter)]``.
        n: sequences in the batch.
        mode: ``"auto"``, ``"ghost"`` or ``"materialise"`` (per-layer choice of the rules).
        plain: accumulate the plain Gram view ``<g_i, g_j>``.
        preconditioner: a diagonal metric ``P`` per parameter name: accumulate ``g_i^T P g_j`` too.
        delta: an update per parameter name: accumulate ``<g_i, delta>``.
        pairs: reduce every Gram view to the pair statistics [3, N] (``PairStats``); the coefficient vector is
            set with :meth:`set_weights` between the forward and the backward pass.
        layout: :func:`engine_layout` of ``model`` and ``named_params``, if the caller has it already.
        within: the batch is B pairs (chosen ``k``, rejected ``B + k``) and only each sequence's squared norm and each
            pair's inner product are asked for (the plain view alone): they are reduced pair by pair (the ghost
            identity over a pair's 2T positions, not the batch's 2BT), and the plain Gram blocks hold NaN between
            different pairs (not measured).
        per_param: keep each parameter's Gram block (``GramResult.per_param``). ``False`` (a ``within`` engine only)
            sums every block into the total as it arrives: the result's ``per_param`` is empty and ``info`` still says
            how each parameter was measured (in-pass capture needs the totals alone).
    """

    def __init__(self, model: torch.nn.Module, named_params, n: int, mode: str = "auto", plain: bool = True,
                 preconditioner: Mapping[str, torch.Tensor] | None = None,
                 delta: Mapping[str, torch.Tensor] | None = None, pairs: bool = False, layout: tuple | None = None,
                 within: bool = False, per_param: bool = True):
        if within and (not plain or preconditioner is not None or delta is not None or pairs or n % 2):
            raise ValueError("within=True measures the plain view of an even batch (B pairs) alone")
        if not per_param and not within:
            raise ValueError("per_param=False needs within=True")
        self.model, self.n, self.mode, self.within, self.per_param = model, n, mode, within, per_param
        self.pairs, self.weights = pairs, None
        self.scale = None if preconditioner is None else {k: v.sqrt() for k, v in preconditioner.items()}
        kinds = (["plain"] if plain else []) + (["preconditioned"] if self.scale is not None else [])
        # per geometry: Gram blocks [N, N] (or pair statistics [3, N]) per parameter, and tied-parameter accumulators
        self.geometries = {k: {"blocks": {}, "shared": {}} for k in kinds}
        self.delta = delta
        self.dots: dict[str, torch.Tensor] = {}   # param name -> <g_i, delta> [N]
        self.named = list(named_params)
        self.pending: dict[tuple, list] = {}       # batch key -> calls of small layers held back (_flush_pending)
        self.affine_pending: dict[tuple, list] = {}   # within pairs: (N, T, device, dtype) -> affine calls held back
        self.pending_elems = 0
        self.info: dict[str, str] = {}
        self.uses: dict[str, list] = {}           # param name -> touched rows of each use (lazily), forward order
        self.part_of: dict[str, object] = {}      # param name -> key of the part its uses were recorded in
        self.part = _Part(n)
        self.is_paused = False
        self.finished = False                       # set by finish(): output gradients arriving later are ignored
        # in-pass capture (capture.inpass): a per-sequence factor applied to every output gradient (the inverse of
        # the loss coefficient the trainer's backward carries), and the modules re-run by gradient checkpointing,
        # whose inputs are taken from the re-run instead of being held from the first forward
        self.row_scale: torch.Tensor | None = None
        self.scales: dict[tuple, tuple] = {}      # row_scale as each (stacked) call shape needs it, see _scaled
        self.checkpointed: set[int] = set()
        self.rerun_inputs: dict[int, list] = {}
        self.checkpointed_calls: set[int] = set()
        self.waiting: dict[int, tuple] = {}       # module id -> a checkpointed call's reduction awaiting its re-run
        self.forward_done = False                 # set after the forward: the hooks then only see the re-runs
        # a pass whose backward the engine does not own: failures in its hooks go to ``on_error`` (then it stops)
        self.on_error: Callable[[BaseException], None] | None = None
        self.failed = False
        self.handles: list[HookSlot] = []        # the hooks of its own pass (__enter__)
        # book-keeping (keep_contributions): every contribution of the pass per parameter, for weighted_grads
        self.kept: dict[str, list] | None = None
        self.layout = layout if layout is not None else engine_layout(model, self.named)
        self.owners, self.name_at, self.plans, (self.sharded, self.param_rows, self.shapes) = self.layout
        # calls of small layers may be held back and reduced together (_batch_key): plain full Gram views only
        self.batchable = not pairs and delta is None and kinds == ["plain"]

    # -- the pass ----------------------------------------------------------------------------------------------
    def run(self, batch: Mapping[str, torch.Tensor], forward: Callable,
            weights: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None) -> Measurement:
        """One forward (``forward(model, batch) -> logits``) and one backward pass of the summed response
        log-probs, hooks installed; returns the views asked for at construction.

        ``weights``: the coefficient vector ``c`` [N] of a ``pairs`` engine, or a function of the log-probs [N]
        (float64) returning it.
        """
        with self:
            # the logits are not kept: only what autograd saves of them lives through the backward
            logps = token_logps(forward(self.model, batch), batch).sum(-1)
            n = self.n
            if not torch.isfinite(logps).all():
                bad = (~torch.isfinite(logps)).nonzero()[:, 0].tolist()
                raise ValueError(f"non-finite log-probs for sequences {bad} (pairs {[i % (n // 2) for i in bad]})")
            if self.pairs:
                self.set_weights(weights, logps)
            self.backward(logps.sum())
        return self.finish(logps.detach().to(torch.float64), response_lengths(batch))

    def keep_contributions(self) -> None:
        """Keep every parameter's contributions (the factors its layer's hooks saw) past :meth:`finish`, so that
        :meth:`weighted_grads` can form a gradient from them without another backward pass. Call before the
        backward; the contributions hold the layers' inputs and output gradients until the engine is dropped."""
        self.kept = {}

    def weighted_grads(self, coef: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """``sum_i coef_i g_i`` per measured parameter (its shape, its dtype), from the kept contributions of the
        pass (:meth:`keep_contributions`): the gradient of ``sum_i coef_i s_i`` that a backward pass would give,
        each use of a parameter added (tied embeddings). Parameters the log-probs never reached are left out (a
        backward pass leaves their ``.grad`` as it is). ``None`` when some contribution cannot be summed so (a
        kind without :func:`~entangle.capture.contrib.weighted_sum`). The kept contributions are released: it can be
        called once per pass."""
        if self.kept is None:
            raise RuntimeError("weighted_grads needs keep_contributions() before the backward pass")
        kept, self.kept = self.kept, None
        out = {}
        with torch.no_grad(), autocast_off(coef.device):
            for name, p in self.named:
                total = None
                for contrib in kept.get(name, ()):
                    g = weighted_sum(contrib, coef)
                    if g is None:
                        return None
                    total = g if total is None else total + g
                if total is not None:
                    out[name] = total.reshape(p.shape).to(p.dtype)
        return out

    def set_weights(self, weights, logps: torch.Tensor) -> None:
        """The vector c [n] of a ``pairs`` engine (float64, on the log-probs' device), checked."""
        self.weights = pair_weights(weights, logps, self.n)

    def __enter__(self):
        slot = HookSlot(self.layout, self.checkpointed)
        slot.engine = self
        self.handles.append(slot)
        return self

    def __exit__(self, *exc):
        for slot in self.handles:
            slot.remove()
        self.handles.clear()

    # -- the narrow interface for passes that re-run parts of the model ----------------------------------------
    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Module calls inside are not recorded: a forward whose values are reused but never differentiated."""
        was, self.is_paused = self.is_paused, True
        try:
            yield
        finally:
            self.is_paused = was

    def add_source(self, tensor: torch.Tensor) -> None:
        """A tensor the backward pass must reach (e.g. a re-run part's input with nothing measured below it)."""
        self.part.sources.append(tensor)

    @contextlib.contextmanager
    def sub_pass(self, n: int, sink: Sink, key: object) -> Iterator[None]:
        """A part of the model re-run on ``n`` examples of its own and differentiated on its own (with
        :meth:`grad`) inside the main backward. Its contributions go to ``sink(name, contribution, how)`` instead of
        the Gram views; its hooked calls and source outputs are counted apart from the main graph's, and its
        generic-fallback uses are reduced when it closes. A parameter whose uses fall in parts of different ``key``
        raises :class:`SeparatePartsError` (their cross terms would be lost)."""
        saved, self.part = self.part, _Part(n, sink, key)
        try:
            yield
            with self.paused():                   # the fallback re-runs modules whose hooks are still installed
                self._flush_generic()
        finally:
            self.part = saved

    def grad(self, output: torch.Tensor, inputs: list[torch.Tensor], grad: torch.Tensor) -> tuple:
        """Inside :meth:`sub_pass`: pull ``grad`` from ``output`` back to ``inputs`` and to the part's source
        outputs (firing the rules on the way); returns the gradients of ``inputs``."""
        self._check_all_uses_hooked(output)
        got = torch.autograd.grad(output, [*inputs, *self.part.sources], grad, allow_unused=True)
        return got[:len(inputs)]

    def add_gram(self, name: str, block: torch.Tensor, how: str) -> None:
        """Add a plain Gram block [n, n] of parameter ``name`` reduced by the caller (from a ``sub_pass`` sink)."""
        if self.scale is not None or self.delta is not None or self.pairs or "plain" not in self.geometries:
            raise ValueError("add_gram adds plain full Gram blocks only")
        self._add_block(name, block)
        self.info[name] = how

    def _add_block(self, name: str, block: torch.Tensor) -> None:
        """Add a plain Gram block to parameter ``name``'s (to the total, without ``per_param``)."""
        key = name if self.per_param else TOTAL
        blocks = self.geometries["plain"]["blocks"]
        blocks[key] = blocks[key] + block if key in blocks else block

    # -- hooks -------------------------------------------------------------------------------------------------
    def _broadcast(self, args: tuple, output):
        """A call on an input broadcast over the batch (GPT-2 positions [1, T]) returns one output for all
        sequences, whose gradient autograd sums over them. Its output is expanded to the batch (a view: the values
        the model computes are unchanged, and so is its backward, which sums the expanded gradient back in the same
        reduction the broadcast would use), so that each sequence's output gradient arrives apart; the rule sees the
        input expanded likewise. Returns ``(args, output, expanded)``."""
        if torch.is_tensor(output) and output.dim() > 0 and output.shape[0] == 1:
            expanded = self._batch_args(args)
            if expanded is not args:
                return expanded, output.expand(self.part.n, *output.shape[1:]), True
        return args, output, False

    def _batch_args(self, args: tuple) -> tuple:
        """``args`` with a first input of batch 1 expanded to the pass's batch (``args`` itself otherwise)."""
        n = self.part.n
        if n > 1 and args and torch.is_tensor(args[0]) and args[0].dim() > 0 and args[0].shape[0] == 1:
            return (args[0].expand(n, *args[0].shape[1:]), *args[1:])
        return args

    def _rerun_inputs(self, module, args, kwargs):
        """Pre-hook of a checkpointed module: during the backward's re-run, keep its inputs for the first call's
        output gradient (before the forward: the re-run may stop inside it once the tensors it needs are saved)."""
        if self.is_paused or not self._in_rerun(module):
            return
        self.rerun_inputs.setdefault(id(module), []).append((self._batch_args(args), kwargs))
        waiting = self.waiting.pop(id(module), None)
        if waiting is not None:                  # the output gradient arrived before the re-run: reduce it now
            self._apply_rule(*waiting)

    def _in_rerun(self, module) -> bool:
        """A call of a checkpointed module while the backward pass recomputes its forward."""
        return id(module) in self.checkpointed and torch._C._current_graph_task_id() != -1

    def _plan(self, module, own) -> _Plan:
        """``module``'s :class:`_Plan` (built at its first call over this layout)."""
        plan = self.plans.get(id(module))
        if plan is None:
            rule = rule_for(module)
            names = tuple(self.name_at[id(module), k] for k in own)
            batch_key = getattr(rule, "batch_key", None)
            key = None if batch_key is None else (rule, type(module), batch_key(module), tuple(own),
                                                  tuple(self.shapes[name] for name in names))
            affine = bool(getattr(rule, "affine", False)) and set(own) <= {"weight", "bias"}
            plan = self.plans[id(module)] = _Plan(tuple(own), names, rule, getattr(rule, "touched", None), key, affine)
        return plan

    def on_forward(self, module, plan: _Plan, args, kwargs, output):
        """The forward hook of a module with measured parameters (installed by :meth:`__enter__`, or by a
        :class:`HookSlot` that passes its calls to the engine of the moment); returns what the hook returns."""
        if self.is_paused:
            return None
        args, output, expanded = self._broadcast(args, output)
        rerun = self._in_rerun(module)
        if rerun or self.forward_done:       # a re-run's inputs were taken by its pre-hook
            return output if expanded and rerun else None
        self._record(module, plan, args, kwargs, output)
        return output if expanded else None

    def external_use(self, module: torch.nn.Module, args: tuple) -> Callable[[torch.Tensor], None]:
        """Record a call of ``module`` on ``args`` that the model made outside the module's forward (a fused kernel
        that uses its weight, such as TRL's fused LM head): returns the function to call with that call's output
        gradient [N, T, d_out] once the backward pass has it. The module must have a rule."""
        own = next((o for m, o in self.owners if m is module), None)
        plan = None if own is None else self._plan(module, own)
        if plan is None or plan.rule is None:
            raise ValueError(f"{type(module).__name__} has no measured parameter or no rule for an external use")
        part, use_index = self.part, self._use_index(module, plan, args, count=True)
        return lambda g: self._apply_rule(part, plan.rule, module, plan.own, (args, {}), g, use_index)

    def _use_index(self, module, plan: _Plan, args, count: bool = False) -> dict:
        """Record a use of each of ``module``'s measured parameters; local name -> index among the param's uses.
        ``count``: also count the call of a rule-handled module and the tensors it uses (for
        :meth:`_check_all_uses_hooked`), in the same loop."""
        part, use_index, key, part_of, all_uses = self.part, {}, self.part.key, self.part_of, self.uses
        calls, leaves, params = part.calls, part.leaves, module._parameters
        touched = plan.touched
        for k, name in zip(plan.own, plan.names, strict=True):
            if part_of.setdefault(name, key) is not key:
                raise SeparatePartsError(f"parameter {name!r} is used in more than one separately "
                                         "differentiated part of the model")
            if part.sink is None:             # uses of the main graph (a sub-pass's go to its sink)
                uses = all_uses.get(name)
                if uses is None:
                    uses = all_uses[name] = []
                use_index[k] = len(uses)
                # the rows it touches are formed only if a SharedParameter asks (several uses, reduced apart)
                uses.append(None if touched is None else functools.partial(touched, module, args))
            if count:
                calls[name] = calls.get(name, 0) + 1
                leaves[id(params[k])] = name
        return use_index

    def _record(self, module, plan: _Plan, args: tuple, kwargs: dict, output) -> None:
        """One hooked call of a module with measured parameters: its uses, and hooks on its outputs.

        A checkpointed module's inputs are not held from here to its output gradient (gradient checkpointing frees
        them): the hook on its output takes them from the backward pass's re-run of the same call."""
        part, rule, own = self.part, plan.rule, plan.own
        use_index = self._use_index(module, plan, args, count=rule is not None)
        if type(output) is torch.Tensor:
            outs = [output] if output.requires_grad else []
        else:
            outs = [o for o in _tensors(output) if o.requires_grad]
        n = part.n
        for o in outs:
            if o.dim() == 0 or o.shape[0] != n:
                raise RuntimeError(
                    f"{type(module).__name__} (parameters {list(plan.names)}) "
                    f"returned an output of shape {tuple(o.shape)} whose first dimension is not the batch of "
                    f"{part.n} sequences (the model flattens or broadcasts the batch there), so per-sequence "
                    "gradients cannot be separated at this layer; use method='exact' or leave these parameters "
                    "out (params=...)")
        if not any(torch.is_tensor(a) and a.requires_grad for a in (*args, *kwargs.values())):
            part.sources.extend(outs)
        if id(module) not in self.checkpointed:
            held = (args, kwargs)
        elif id(module) in self.checkpointed_calls:
            raise RuntimeError(f"{type(module).__name__} is called more than once inside gradient-checkpointed "
                               "blocks of one pass; in-pass capture cannot pair its calls with their re-runs")
        else:
            held = None
            self.checkpointed_calls.add(id(module))
        if rule is None:
            use = _Use(module, own, *(held or (None, None)), grads=[None] * len(outs), index=use_index)
            if self.sharded:
                raise ValueError(f"{type(module).__name__} has no rule, and the generic fallback needs its parameters "
                                 "whole, which torch.distributed.fsdp.fully_shard shards; register a rule for it "
                                 "or leave its parameters out (params=...)")
            part.generic_params.update(plan.names)
            part.generic_uses.append(use)
            for j, o in enumerate(outs):
                o.register_hook(self._make_generic_hook(use, j))
            return
        if len(outs) != 1:
            raise RuntimeError(f"{type(module).__name__} returned {len(outs)} differentiable outputs; "
                               "its rule expects one")
        outs[0].register_hook(lambda g: self._apply_rule(part, rule, module, own, held, g, use_index))

    def _inputs(self, module, held: tuple | None) -> tuple:
        """``(args, kwargs)`` of a call: held from the forward, or taken from the backward's re-run."""
        if held is not None:
            return held
        reruns = self.rerun_inputs.get(id(module))
        if not reruns:
            raise RuntimeError(f"{type(module).__name__} is checkpointed but was not re-run before its output "
                               "gradient arrived (reentrant gradient checkpointing is not supported in-pass)")
        return reruns.pop()

    def _make_generic_hook(self, use: _Use, j: int):
        def hook(grad):
            if self.finished:                       # a later backward of a retained graph is not measured
                return
            use.grads[j] = grad.detach()
        return hook

    def _dtype(self, module, own):
        return torch.float64 if module._parameters[own[0]].dtype == torch.float64 else torch.float32

    def _scaled(self, grad: torch.Tensor, dtype: torch.dtype, calls: int = 1) -> torch.Tensor:
        """An output gradient in ``dtype``, each sequence's multiplied by ``row_scale`` when it is set (``calls``
        calls' gradients stacked along the batch: the scale repeated once per call)."""
        g = grad.detach().to(dtype)
        if self.row_scale is not None:
            key = (g.device, dtype, calls, g.dim())
            of, scale = self.scales.get(key, (None, None))
            if of is not self.row_scale:            # once per pass and shape of call, not per call
                scale = self.row_scale.to(device=g.device, dtype=dtype)
                scale = (scale.repeat(calls) if calls > 1 else scale).view(-1, *[1] * (g.dim() - 1))
                self.scales[key] = (self.row_scale, scale)
            g = g * scale
        return g

    @staticmethod
    def _rule_contribs(rule, module, own, args: tuple, g: torch.Tensor, valid: torch.Tensor, mode: str) -> dict:
        """The rule's contributions for one (possibly stacked) call, one for each measured parameter ``own``."""
        contribs = rule(module, args, g, valid, mode)
        for k in own:
            if k not in contribs:
                raise RuntimeError(f"rule {rule.__name__} gave no gradient for {type(module).__name__}.{k}")
        return contribs

    def _apply_rule(self, part: _Part, rule, module, own, held: tuple | None, grad, use_index):
        """Reduce one call's output gradient by its rule; ``held`` = the call's ``(args, kwargs)``, or None for a
        checkpointed call (taken from the re-run)."""
        if self.failed:
            return
        if self.on_error is None:
            self._reduce(part, rule, module, own, held, grad, use_index)
            return
        try:
            self._reduce(part, rule, module, own, held, grad, use_index)
        except Exception as err:  # noqa: BLE001 - handed to on_error, never raised into a pass the engine does not own
            self.failed = True
            self.on_error(err)

    def _reduce(self, part: _Part, rule, module, own, held, grad, use_index):
        if self.finished:                           # a later backward of a retained graph is not measured
            return
        if held is None and not self.rerun_inputs.get(id(module)):
            # a checkpointed call's output gradient can arrive before the backward pass re-runs its layer (it needs
            # no saved tensor of the layer): reduced when the re-run brings the inputs
            self.waiting[id(module)] = (part, rule, module, own, None, grad, use_index)
            return
        args = self._inputs(module, held)[0]
        key = self._batch_key(part, rule, module, own, args, grad)
        if key is None:
            self._contribute(part, rule, module, own, args, grad, use_index)
            return
        a = args[0]
        call = (part, rule, module, own, a.detach(), grad.detach(), use_index)
        sa = a.shape
        if (self.within and self.kept is None and self.plans[id(module)].affine
                and affine_together(sa[0], sa[1], sa[2], grad.shape[2], self.mode)):
            self.affine_pending.setdefault((sa[0], sa[1], a.device, key[-1]), []).append(call)
        else:
            self.pending.setdefault(key, []).append(call)
        self.pending_elems += a.numel() + grad.numel()
        if self.pending_elems > PENDING_ELEMS:
            self._flush_pending()

    def _contribute(self, part: _Part, rule, module, own, args: tuple, grad, use_index) -> None:
        """Reduce one call: its rule on its inputs and output gradient, each contribution added to the views."""
        g = self._scaled(grad, self._dtype(module, own))
        if getattr(rule, "dense", None) is not None and g.dim() == 3 and self._add_dense(part, rule, module, own,
                                                                                        args, g):
            return
        if g.dim() == 2:
            g = g.unsqueeze(1)
            args = tuple(a.unsqueeze(1) if torch.is_tensor(a) and a.dim() >= 1 else a for a in args)
        valid = _positions(rule, g)
        args = tuple(a.detach() if torch.is_tensor(a) else a for a in args)
        # a backward run inside autocast runs this hook in it too
        with torch.no_grad(), autocast_off(g.device):
            contribs = self._rule_contribs(rule, module, own, args, g, valid, self.mode)
            for k in own:
                self._add(part, self.name_at[id(module), k], use_index.get(k), contribs[k], rule.__name__)

    # -- calls of small layers reduced together ----------------------------------------------------------------
    def _batch_key(self, part: _Part, rule, module, own, args: tuple, grad: torch.Tensor):
        """What calls must share to be reduced as one (``None``: reduce this call now). Only plain full Gram views
        of parameters with one use each, through rules that declare a ``batch_key``, on one input [N, T, d]; calls
        of different lengths T are padded with zeros (positions without a gradient, which add nothing)."""
        plan = self.plans[id(module)]
        if plan.key is None or part.sink is not None or not self.batchable or len(args) != 1:
            return None
        a = args[0]
        if not torch.is_tensor(a) or grad.dim() != 3 or a.dim() != 3:
            return None
        sa, sg = a.shape, grad.shape
        if sa[0] != sg[0] or sa[1] != sg[1]:
            return None
        uses = self.uses
        for name in plan.names:
            if len(uses[name]) != 1:
                return None
        return (plan.key, sa[0], sa[2], a.dtype, sg[2], grad.dtype, grad.device, self._dtype(module, own))

    def _flush_pending(self) -> None:
        """Reduce the calls held back: each group of equal keys as one stacked call, else call by call."""
        pending, self.pending, self.pending_elems = self.pending, {}, 0
        fused, self.affine_pending = self.affine_pending, {}
        if self.failed:
            return
        groups = [*self._contribute_affine(fused), *pending.values()]
        for calls in groups:
            if len(calls) > 1 and self._contribute_batched(calls):
                continue
            for part, rule, module, own, a, grad, use_index in calls:
                self._contribute(part, rule, module, own, (a,), grad, use_index)

    def _contribute_affine(self, fused: dict[tuple, list]) -> list[list]:
        """Within pairs: the held calls of affine layers whose pair-by-pair ghost reduction is the cheaper
        (:func:`affine_together`, sorted out as they arrive), all reduced together
        (:func:`~entangle.capture.contrib.affine_within_blocks`, in chunks of at most ``AFFINE_ELEMS`` position
        products), without their rules. Returns the calls of a chunk whose result is not finite, one group each, to
        reduce otherwise."""
        rest = []
        for (n, t, _, dtype), calls in fused.items():
            step = AFFINE_ELEMS // (n // 2 * pair_products(t))
            for s in range(0, len(calls), step):
                chunk = calls[s:s + step]
                with torch.no_grad(), autocast_off(chunk[0][4].device):
                    # a total of calls that all measure the same parameters needs them in no particular order
                    ordered = self.per_param or len({self.plans[id(c[2])].own for c in chunk}) > 1
                    got = affine_within_blocks([c[4] for c in chunk], [c[5] for c in chunk], dtype, self.row_scale,
                                               ordered=ordered)
                if got is None:                 # each call on its own (they may be of different layers)
                    rest.extend([call] for call in chunk)
                    continue
                if not self.per_param:          # the total alone: one sum over the chunk's calls
                    for k, blocks in zip(("weight", "bias"), got, strict=True):
                        measured = [i for i, call in enumerate(chunk) if k in self.plans[id(call[2])].own]
                        if measured:            # the blocks of the layers with this parameter measured
                            self._add_block(TOTAL, (blocks if len(measured) == len(chunk) else blocks[measured]).sum(0))
                    for _, rule, module, *_ in chunk:
                        for name in self.plans[id(module)].names:
                            self.info[name] = f"{rule.__name__}:ghost"
                    continue
                weight, bias = got[0].unbind(0), got[1].unbind(0)
                for i, (_, rule, module, *_) in enumerate(chunk):
                    plan = self.plans[id(module)]
                    for k, name in zip(plan.own, plan.names, strict=True):
                        self.add_gram(name, weight[i] if k == "weight" else bias[i], f"{rule.__name__}:ghost")
        return rest

    def _contribute_batched(self, calls: list) -> bool:
        """One rule call on the stacked inputs and output gradients of ``calls``; each call's Gram matrix is a diagonal
        block of the stacked contribution's (:func:`~entangle.capture.contrib.block_grams`). False when a contribution
        cannot be reduced that way (the caller then reduces each call on its own)."""
        part, rule, module, own = calls[0][:4]
        dtype = self._dtype(module, own)
        g = self._scaled(_stack([c[5] for c in calls]), dtype, len(calls))
        a = _stack([c[4] for c in calls])
        with torch.no_grad(), autocast_off(g.device):
            contribs = self._rule_contribs(rule, module, own, (a,), g, _positions(rule, g), self.mode)
            # the total alone, of materialised rows: one product for all calls and parameters
            total = None if self.per_param else dense_total([contribs[k] for k in own], len(calls))
            if total is not None:
                kinds = {k: [contribs[k].kind] * len(calls) for k in own}
            else:
                grams = {}
                for k in own:
                    grams[k] = block_grams(contribs[k], len(calls), self.mode, self.within)
                    if grams[k] is None:
                        return False
                kinds = {k: grams[k][1] for k in own}
                if not self.per_param:              # the total alone: one sum over the calls
                    total = sum(blocks.sum(0) for blocks, _ in grams.values())
        if total is not None:
            self._add_block(TOTAL, total)
            for i, call in enumerate(calls):
                for k in own:
                    self.info[self.name_at[id(call[2]), k]] = f"{rule.__name__}:{kinds[k][i]}"
            return True
        grams = {k: (blocks.unbind(0), kinds) for k, (blocks, kinds) in grams.items()}
        for i, call in enumerate(calls):
            for k in own:
                blocks, kinds = grams[k]
                self.add_gram(self.name_at[id(call[2]), k], blocks[i], f"{rule.__name__}:{kinds[i]}")
        return True

    def _add(self, part: _Part, name: str, use: int | None, contrib: Contribution, how: str) -> None:
        if part.sink is not None:
            part.sink(name, contrib, how)
            return
        if self.kept is not None:
            self.kept.setdefault(name, []).append(contrib)
        self.info[name] = f"{how}:{contrib.kind}"
        delta = None if self.delta is None else whole(self.delta[name])     # sharded: gathered, one at a time
        if not self.geometries:                     # the update dots alone: no per-example gradient is formed
            self.info[name] = f"{how}:dot"
            dot = contrib.dot(delta)
        elif len(self.uses[name]) == 1 and self.within:
            got = block_grams(contrib, 1, self.mode, within=True)
            if got is None:                         # the whole Gram (masked to the pairs at the end)
                self.add_gram(name, contrib.gram(), self.info[name])
            else:
                self.add_gram(name, got[0][0], f"{how}:{got[1][0]}")
            dot = None
        elif len(self.uses[name]) == 1:
            # every view from one materialisation of the per-example gradients
            scale = None if self.scale is None else whole(self.scale[name])
            plain, scaled, dot = dual_gram(contrib, scale, delta, self.weights if self.pairs else None)
            for kind, g in (("plain", plain), ("preconditioned", scaled)):
                if kind in self.geometries:
                    blocks = self.geometries[kind]["blocks"]
                    blocks[name] = blocks[name] + g if name in blocks else g
        else:
            self.info[name] += f" (shared by {len(self.uses[name])} uses)"
            if self.scale is not None:
                self._accumulate("preconditioned", name, use, Scaled(contrib, whole(self.scale[name])))
            if "plain" in self.geometries:
                self._accumulate("plain", name, use, contrib)
            dot = None if delta is None else contrib.dot(delta)
        if dot is not None:                         # a dot product is linear: uses simply add up
            self.dots[name] = self.dots[name] + dot if name in self.dots else dot

    def _accumulate(self, kind: str, name: str, use: int, contrib: Contribution) -> None:
        """Add one use of a parameter with several uses (tied embeddings, reused layers) via SharedParameter."""
        self._shared(kind, name).add(use, contrib)

    def _shared(self, kind: str, name: str) -> SharedParameter:
        shared = self.geometries[kind]["shared"]
        if name not in shared:
            shared[name] = SharedParameter(self.uses[name], self.param_rows[name], math.prod(self.shapes[name][1:]))
        return shared[name]

    def _add_dense(self, part: _Part, rule, module, own, args: tuple, g: torch.Tensor) -> bool:
        """A call whose measured parameters are all small enough to be materialised, in a plain Gram view alone, by
        its rule's ``dense`` (whole per-example gradients in a few operations) instead of the rule's contribution:
        a parameter with several uses (a small tied embedding and output layer) adds them to its sum over the uses
        (one product at the end); one used once by a layer that is not affine, in a within-pair engine (GPT-2's
        position embedding), is materialised the same way. False (nothing added) when this call does not qualify or
        its gradients are not finite (a non-finite input at a position without a gradient, which the rule's
        contribution skips)."""
        if part.sink is not None or self.kept is not None or not self.batchable:
            return False
        n, names = g.shape[0], [self.name_at[id(module), k] for k in own]
        counts = [len(self.uses[name]) for name in names]
        # an affine layer used once is reduced within pairs by the cheaper of ghost and materialised already
        once = all(c == 1 for c in counts) and self.within and not rule.affine
        if not (once or all(c > 1 for c in counts)):
            return False
        if not all(dense_enough(n, math.prod(self.shapes[name])) for name in names):
            return False
        # the sum of the other uses so far (a parameter used once gets its accumulator only once it has rows)
        into = {} if once else {k: self._shared("plain", name).summed for k, name in zip(own, names, strict=True)}
        with torch.no_grad(), autocast_off(g.device):
            rows = rule.dense(module, tuple(a.detach() if torch.is_tensor(a) else a for a in args), g, into)
        if rows is None:
            return False
        for k, name, c in zip(own, names, counts, strict=True):
            self._shared("plain", name).add_rows(rows[k])
            self.info[name] = f"{rule.__name__}:dense" + (f" (shared by {c} uses)" if c > 1 else "")
        return True

    def backward(self, total: torch.Tensor, retain_graph: bool = False) -> None:
        """Backward pass of ``total`` that reaches every hooked output but computes no parameter gradient.

        Asking autograd for the gradients of the *source* outputs (e.g. the embedding lookups) makes it
        traverse every path from the log-probs down to them, firing the output hooks on the way, while
        skipping the weight-gradient products a training step would compute. ``retain_graph`` keeps the graph
        for a later backward pass of the same forward (a training step), which the hooks ignore once
        :meth:`finish` has run.
        """
        self._check_all_uses_hooked(total)
        targets = self.part.sources or [p for _, p in self.named]
        torch.autograd.grad(total, targets, allow_unused=True, retain_graph=retain_graph)

    def _check_all_uses_hooked(self, total: torch.Tensor) -> None:
        """Every autograd use of a rule-handled parameter must be one of the hooked module calls.

        A parameter used outside its module's forward (e.g. ``F.linear(x, self.embed.weight)`` in a
        parent module) would otherwise be silently missing from the Gram matrix.
        """
        part = self.part
        if not part.calls:
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
        used: dict[str, int] = {}
        for leaf, name in part.leaves.items():
            used[name] = used.get(name, 0) + edges.get(leaf, 0)
        for name, calls in part.calls.items():
            if name not in part.generic_params and used[name] != calls:
                raise RuntimeError(
                    f"parameter {name!r} is used {used[name]} times by autograd but only "
                    f"{calls} times through hooked module calls (used outside its module's "
                    "forward?); use method='exact' or register a rule for the module that uses it")

    # -- after the backward pass -------------------------------------------------------------------------------
    def _flush_generic(self) -> None:
        """Reduce the recorded generic-rule uses of the current part (their output gradients have all arrived)."""
        part = self.part
        uses, part.generic_uses = part.generic_uses, []
        for use in uses:
            if use.args is None:                    # a checkpointed call: its inputs from the backward's re-run
                use.args, use.kwargs = self._inputs(use.module, None)
            with autocast_off(use.module._parameters[use.names[0]].device):
                grads = [None if g is None else self._scaled(g, self._dtype(use.module, use.names)) for g in use.grads]
                contribs = generic(use.module, use.args, use.kwargs, grads, use.names, part.n)
                for k in use.names:
                    self._add(part, self.name_at[id(use.module), k], use.index.get(k), contribs[k],
                              "generic")

    def finish(self, logps: torch.Tensor, lengths: torch.Tensor) -> Measurement:
        """The typed result of the pass (call once every output gradient has arrived)."""
        with autocast_off(logps.device):
            out = self._finish(logps, lengths)
        self.finished = True
        self._release()
        return out

    def _release(self) -> None:
        """Drop the pass's references to its tensors. The hooks on the pass's outputs hold the engine, and the engine
        held some of those outputs (``sources``): a cycle through autograd's hooks, which Python's collector cannot
        see, so every engine of a training run and the activations its hooks hold would stay alive."""
        self.part.sources.clear()                 # the hooks hold this part object itself, too
        self.part.generic_uses.clear()
        self.part = _Part(self.part.n)
        self.rerun_inputs.clear()
        self.waiting.clear()
        self.scales.clear()
        self.pending, self.affine_pending, self.pending_elems = {}, {}, 0
        self.geometries = {k: {"blocks": {}, "shared": {}} for k in self.geometries}
        self.dots = {}

    def _finish(self, logps: torch.Tensor, lengths: torch.Tensor) -> Measurement:
        self._flush_pending()
        self._flush_generic()
        views = {}
        for kind, geometry in self.geometries.items():
            values = {**geometry["blocks"]}
            for name, acc in geometry["shared"].items():
                g = acc.gram()
                values[name] = stats_of_gram(g, self.weights) if self.pairs else g
            fields = {"logps": logps, "lengths": lengths, "method": self.mode, "info": self.info, "geometry": kind}
            if not self.per_param:                  # the total alone (a within engine)
                for name, _ in self.named:
                    self.info.setdefault(name, "unused (zero gradient)")
                total = (sum(values.values()) if values else
                         torch.zeros(self.n, self.n, dtype=torch.float64, device=self.named[0][1].device))
                views[kind] = GramResult(matrix=_within_only(total), **fields)
                continue
            per_param = self._complete(values, (3, self.n) if self.pairs else (self.n, self.n))
            if self.pairs:
                views[kind] = PairStats.from_stats(per_param, self.weights, **fields)
                continue
            stacked = torch.stack(list(per_param.values()))
            if self.within:                         # only the entries within each pair were measured
                stacked = _within_only(stacked)
                per_param = dict(zip(per_param, stacked.unbind(0), strict=True))
            views[kind] = GramResult(matrix=stacked.sum(0), per_param=per_param, **fields)
        update = None
        if self.delta is not None:
            update = torch.zeros(self.n, dtype=torch.float64)
            for name, _ in self.named:
                if name in self.dots:
                    update = update + self.dots[name].cpu()
        return Measurement(logps=logps, lengths=lengths, plain=views.get("plain"),
                           preconditioned=views.get("preconditioned"), update=update, method=self.mode,
                           info=self.info)

    def _complete(self, values: dict[str, torch.Tensor], shape) -> dict[str, torch.Tensor]:
        """A value for every measured parameter, in ``named_parameters`` order (zeros for one never reached)."""
        out = {}
        for name, p in self.named:
            out[name] = values.get(name)
            if out[name] is None:                       # parameter not reached by the log-probs
                out[name] = torch.zeros(*shape, dtype=torch.float64, device=p.device)
                self.info.setdefault(name, "unused (zero gradient)")
        return out


class HookSlot:
    """The engine's module hooks, each call passed to the engine in :attr:`engine` (``None``: not recorded). An
    engine installs one for its own pass (:meth:`GramEngine.__enter__`); in-pass capture installs one for many passes
    over one layout (every micro-batch of a recorded optimizer step), saving the installing and removing of two
    hooks on each measured module per pass.

    Args:
        layout: :func:`engine_layout` of the engines that will use it.
        checkpointed: ids of the modules re-run by gradient checkpointing (their pre-hooks take the re-run's inputs).
    """

    def __init__(self, layout: tuple, checkpointed: set[int]):
        self.engine: GramEngine | None = None
        self.handles = []
        for module, own in layout[0]:
            if id(module) in checkpointed:
                self.handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
            # first among the module's forward hooks: a module sharded by fully_shard on its own is resharded by
            # FSDP's hook, after which it no longer holds the tensor its call used
            self.handles.append(module.register_forward_hook(self._hook(own), with_kwargs=True, prepend=True))

    def _pre(self, module, args, kwargs):
        engine = self.engine
        if engine is not None:
            engine._rerun_inputs(module, args, kwargs)

    def _hook(self, own: list[str]):
        def hook(module, args, kwargs, output):
            engine = self.engine
            if engine is None:
                return None
            return engine.on_forward(module, engine._plan(module, own), args, kwargs, output)
        return hook

    def remove(self) -> None:
        self.engine = None
        for h in self.handles:
            h.remove()
        self.handles.clear()


def affine_together(n: int, t: int, a: int, b: int, mode: str = "auto") -> bool:
    """Whether a within-pair engine reduces an affine call (``n`` sequences over ``t`` positions, factors of widths
    ``a`` and ``b``) with the pass's other affine layers (:func:`~entangle.capture.contrib.affine_within_blocks`):
    its pair-by-pair ghost reduction (:func:`~entangle.capture.contrib.pair_products`) is the cheaper and fits
    ``AFFINE_ELEMS``. Remembered per shape (a training run asks it for every affine call of every micro-batch)."""
    key = (n, t, a, b, mode, AFFINE_ELEMS, pair_products(t))
    got = _AFFINE_TOGETHER.get(key)
    if got is None:
        got = _AFFINE_TOGETHER[key] = (factored_kind(n * t, n, a, b, mode, [2 * t] * (n // 2), halves=True) == "ghost"
                                       and n // 2 * pair_products(t) <= AFFINE_ELEMS)
    return got


_AFFINE_TOGETHER: dict[tuple, bool] = {}


def _positions(rule, g: torch.Tensor) -> torch.Tensor | None:
    """The ``valid`` a rule is given: :func:`positions_with_gradient`, or None for a rule registered with
    ``positions=False`` (it never reads it)."""
    return positions_with_gradient(g) if getattr(rule, "positions", True) else None


def positions_with_gradient(g: torch.Tensor) -> torch.Tensor:
    """``g.any(-1)`` for output gradients [..., d]: the positions with a non-zero (or NaN) entry, by the cheaper of two
    exact reads (``any`` itself is several times slower on CPU). A small tensor: ``max |g| != 0`` (NaN and inf count).
    A large one: a position whose first entry is non-zero has a gradient, which is most of them; only the rest
    (padding, positions no scored token depends on) are read whole."""
    if g.numel() <= SMALL_GRADIENT:
        return g.abs().amax(-1) != 0
    flat = g.reshape(-1, g.shape[-1])
    out = flat[:, 0] != 0
    rest = (~out).nonzero()[:, 0]
    if rest.numel():
        out.index_put_((rest,), flat.index_select(0, rest).any(-1))
    return out.view(g.shape[:-1])


def _within_only(gram: torch.Tensor) -> torch.Tensor:
    """Gram matrices [..., 2B, 2B] with NaN at the entries between different pairs (pair k: rows k and B + k)."""
    b = gram.shape[-1] // 2
    k = torch.arange(2 * b, device=gram.device) % b
    return gram.where(k[:, None] == k[None, :], float("nan"))


def _stack(xs: list[torch.Tensor]) -> torch.Tensor:
    """Calls' [N, T, d] stacked along the batch, those of fewer positions padded with zeros to the longest."""
    length = max(x.shape[1] for x in xs)
    if all(x.shape[1] == length for x in xs):
        return torch.cat(xs)
    out = xs[0].new_zeros(sum(x.shape[0] for x in xs), length, xs[0].shape[2])
    row = 0
    for x in xs:
        out[row:row + x.shape[0], :x.shape[1]] = x
        row += x.shape[0]
    return out


def engine_layout(model: torch.nn.Module, named_params) -> tuple[list, dict, dict, tuple]:
    """``(owners, name_at, plans, params)`` of a :class:`GramEngine` (its ``layout``, which a caller running many passes
    over the same model and parameters builds once): the modules holding measured parameters with their local names,
    in module order, ``(id(module), local name) -> parameter name``, the hooks' per-module facts (``_Plan``, filled
    by the engines as modules are first called), and the parameters' own: ``(sharded, rows, shapes)``, whether any is
    sharded by fully_shard and, per name, its first dimension and its (whole) shape. A hooked call's parameter is found
    by (module, local name), not by the tensor it holds then: FSDP2 (fully_shard) swaps the registered DTensor for a
    whole plain tensor during the module's forward."""
    named_params = list(named_params)
    name_of = {id(p): name for name, p in named_params}
    owners, name_at, seen = [], {}, set()
    for module in model.modules():
        if id(module) in seen:
            continue
        seen.add(id(module))
        own = [k for k, p in module._parameters.items() if p is not None and id(p) in name_of]
        name_at.update({(id(module), k): name_of[id(module._parameters[k])] for k in own})
        if own:
            owners.append((module, own))
    params = (any(is_sharded(p) for _, p in named_params),
              {name: p.shape[0] if p.dim() else 1 for name, p in named_params},
              {name: tuple(p.shape) for name, p in named_params})
    return owners, name_at, {}, params


def pair_weights(weights, logps: torch.Tensor, n: int) -> torch.Tensor:
    """The vector c [n] of a ``"pairs"`` measurement (float64, on the log-probs' device), checked."""
    if weights is None:
        raise ValueError('structure="pairs" needs weights (the vector c of K @ c, or a function of the log-probs)')
    w = weights(logps.detach().to(torch.float64)) if callable(weights) else weights
    w = torch.as_tensor(w).detach().to(device=logps.device, dtype=torch.float64).flatten()
    if w.shape[0] != n:
        raise ValueError(f"weights has {w.shape[0]} entries for {n} sequences")
    bad = (~torch.isfinite(w)).nonzero()[:, 0].tolist()
    if bad:
        raise ValueError(f"non-finite weights for sequences {bad} (pairs {sorted({i % (n // 2) for i in bad})})")
    return w


def check_metric(named, tensors: Mapping[str, torch.Tensor] | None, what: str) -> None:
    """A per-parameter tensor map (preconditioner, update) has every measured parameter, in its shape, finite."""
    if tensors is None:
        return
    for name, p in named:
        if name not in tensors:
            raise ValueError(f"{what} has no entry for parameter {name!r}")
        if tuple(tensors[name].shape) != tuple(p.shape):
            raise ValueError(f"{what}[{name!r}] has shape {tuple(tensors[name].shape)}, parameter has {tuple(p.shape)}")
        if not torch.isfinite(tensors[name]).all():
            raise ValueError(f"{what}[{name!r}] has NaN/inf entries")
