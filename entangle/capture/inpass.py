"""Capture inside a pass the engine does not own: the trainer's own forward and backward (THEORY §2, §6).

In the backward pass of a training loss L over the summed response log-probs s_i of a batch, the output gradient of
every hooked module, for sequence i, is that of s_i times the loss coefficient ``c_i = ∂L/∂s_i``: sequences of a
causal LM do not interact. So the trainer's own backward carries each sequence's log-prob gradient scaled by c_i.
:class:`PassRecorder` hooks the model's top-level forward: while it is armed, each forward with gradients on (a
training micro-batch of 2B sequences, chosen then rejected, as TRL's collators stack them) gets a
:class:`~entangle.capture.engine.GramEngine` for its duration, and the first gradient of its backward pass (that of
the per-token log-probs or of the logits) gives every c_i. The engine then divides each sequence's output gradients by
c_i (``row_scale``) and accumulates, per pair, ``||g_w||²``, ``||g_l||²`` and ``<g_w, g_l>`` of the log-prob
gradients themselves; the record is closed when the backward pass ends. Nothing of the pass is changed: the hooks only
read (a broadcast input's output is replaced by an expanded view of the same values, see ``GramEngine._broadcast``).

Two forms of the output layer:

* **TRL's fused LM head** (``model(..., labels=..., fused_lm_head=True)``, TRL ≥ 1.16's DPOTrainer): the forward
  returns per-token log-probs ℓ_t and never builds the logits. ∂L/∂ℓ_t is the coefficient directly; the head's weight
  is used inside the fused kernel, so its per-sequence gradient ``Σ_t ∂L/∂ℓ_t (e_{y_t} - p_t) h_tᵀ`` is formed from the
  final hidden states (recomputing the softmax) and passed to the engine as an external use of the head module.
* **Logits** (CPO/SimPO, a hand-written loss): the head module is hooked as usual; the coefficient of sequence i
  follows from the logits gradient at the label, ``∂L/∂z_{t,y_t} = c_i (1 - p_{t,y_t})``, with p from the forward.

A loss that is not a function of the summed response log-probs (per-token weights, terms on the logits themselves) is
detected from these gradients and reported; so is a sequence whose coefficient vanished in floating point (a saturated
loss): it is marked ``excluded`` instead of being divided by zero.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .engine import GramEngine, HookSlot, engine_layout
from .sharding import check_supported, is_sharded, whole

# a coefficient at or below this magnitude has (nearly) underflowed: the sequence's gradients cannot be recovered
TINY_COEFFICIENT = 1e-30
# relative spread allowed between the per-token coefficients of one sequence (float32 round-off of the backward)
TOKEN_TOLERANCE = 1e-3
# and the absolute round-off, relative to |c_i|, of a float32 logits gradient c_i (1 - p_y) (computed as c_i - c_i p_y:
# a confident token, 1 - p_y ~ 1e-5 in a pretrained model, keeps only a few correct digits of it)
ROUNDING = 8 * torch.finfo(torch.float32).eps


class InPassError(RuntimeError):
    """The training pass cannot be measured (the message says why)."""


@dataclass
class MicroBatch:
    """What one training micro-batch of 2B sequences gave (float64 on the CPU; NaN where not measured).

    Attributes:
        logps: [2B] summed response log-probs, as the trainer's forward computed them.
        lengths: [2B] response tokens.
        coef: [2B] ``∂L/∂s_i`` as the trainer's backward carried it (its loss, after its own scaling).
        norm2: [2B] ``||g_i||²`` of the log-prob gradients; inner: [B] ``<g_w, g_l>`` per pair.
        excluded: [2B] coefficients too small to divide by (their pair's gradients are NaN).
        keys: per pair, the (chosen, rejected) token ids the model saw (attention mask 1), to find its dataset row.
        info: per parameter, how the engine measured it.
    """

    logps: torch.Tensor
    lengths: torch.Tensor
    coef: torch.Tensor
    norm2: torch.Tensor
    inner: torch.Tensor
    excluded: torch.Tensor
    keys: list[tuple[tuple[int, ...], tuple[int, ...]]]
    info: dict[str, str]


class _Pass:
    """The state of one recorded forward/backward pass."""

    def __init__(self, engine: GramEngine, ids: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor | None):
        self.engine, self.ids, self.labels = engine, ids, labels
        self.keys = token_keys(ids, attention)
        self.hidden: torch.Tensor | None = None          # fused head: the final hidden states
        self.token_logps: torch.Tensor | None = None     # logits path, per position [n, T-1]: ℓ_t,
        self.one_minus: torch.Tensor | None = None       # 1 - p_{y_t} and Σ_{v != y_t} p_v²
        self.sum_sq: torch.Tensor | None = None
        self.fused = False                               # called with TRL's fused_lm_head=True
        self.head_use: Callable | None = None
        self.head_params: tuple | None = None            # the head's (weight, bias) gathered in the forward
        self.head_grad: torch.Tensor | None = None       # fused head: ∂L/∂ℓ_t on the scored positions
        self.coef: torch.Tensor | None = None
        self.excluded: torch.Tensor | None = None        # coefficients too small to divide by
        self.logps: torch.Tensor | None = None
        self.lengths: torch.Tensor | None = None
        self.handles: list = []


class PassRecorder:
    """Records per-pair gradient statistics of the training micro-batches that run while it is armed.

    A model sharded by ``fully_shard`` (FSDP2) is measured on each rank's own micro-batches, whatever the layout of
    its FSDP units; FSDP1 and DeepSpeed ZeRO-3 raise ``ValueError`` (:func:`~entangle.capture.sharding.check_supported`).

    Args:
        model: the (unwrapped) model the trainer calls; a PEFT model is fine.
        named_params: the measured parameters ``[(name, parameter)]``.
        mode: the engine's per-layer choice (``"auto"``, ``"ghost"``, ``"materialise"``).
        checkpointed: modules re-run by gradient checkpointing (non-reentrant), see :func:`checkpointed_modules`.
        strict: raise failures into the trainer's pass instead of keeping them in :attr:`errors`.
    """

    def __init__(self, model: torch.nn.Module, named_params, *, mode: str = "auto",
                 checkpointed: set[int] | None = None, strict: bool = False):
        check_supported(model)                   # FSDP1 and DeepSpeed ZeRO-3 raise ValueError; fully_shard works
        self.model, self.named, self.mode, self.strict = model, list(named_params), mode, strict
        self.checkpointed = checkpointed or set()
        self.backbone, self.head = backbone_and_head(model)
        ids = {id(p) for _, p in self.named}
        self.head_measured = any(id(p) in ids for p in self.head.parameters())
        # each measured parameter's (module, local name): fully_shard swaps what a module holds (its DTensor shard,
        # or the whole tensor from its forward until it reshards), so each pass takes the tensors held then
        where = {id(p): name for name, p in self.named}
        self.slots: dict[str, tuple[torch.nn.Module, str]] = {}
        for module in model.modules():
            for key, p in module._parameters.items():
                if p is not None and id(p) in where:
                    self.slots.setdefault(where[id(p)], (module, key))
        self.layout = None                   # the engines' module layout (engine_layout), built at the first pass
        self.checked = False                 # whether this recording's uses were checked (its first pass)
        self.records: list[MicroBatch] = []
        self.errors: list[BaseException] = []
        self.armed = False
        self.current: _Pass | None = None
        self.open: list[_Pass] = []          # passes whose backward has not ended (their engine may still be the slot's)
        self.slot: HookSlot | None = None    # the engines' module hooks, installed once per recording
        self.handles = [model.register_forward_pre_hook(self._begin, with_kwargs=True),
                        model.register_forward_hook(self._end, with_kwargs=True)]

    def close(self) -> None:
        """Remove the hooks."""
        self._close_open()
        self._remove_slot()
        for h in self.handles:
            h.remove()
        self.handles.clear()

    @contextlib.contextmanager
    def recording(self):
        """Record the training passes inside; yields the list their :class:`MicroBatch` records are appended to."""
        self.records, self.armed, self.checked = [], True, False
        try:
            yield self.records
        finally:
            self.armed = False
            self._close_open()
            self._remove_slot()

    def _remove_slot(self) -> None:
        if self.slot is not None:
            self.slot.remove()
            self.slot = None

    def _close_open(self) -> None:
        """Release the passes whose backward never ended (an evaluation with gradients, an error)."""
        for p in list(self.open):
            self._forget(p)

    # -- failures never reach the trainer unless asked -----------------------------------------------------------
    def _guard(self, fn: Callable, *args):
        try:
            return fn(*args)
        except Exception as err:  # noqa: BLE001 - reported, not raised into the trainer's pass
            if self.current is not None:
                self._drop(self.current)
            if self.strict:
                raise
            self.errors.append(err)
            return None

    def _drop(self, p: _Pass) -> None:
        for h in p.handles:
            h.remove()
        p.engine.failed = True
        self._forget(p)
        if self.current is p:
            self.current = None

    def _failed(self, err: BaseException) -> None:
        """A failure inside the engine's backward hooks (the engine has stopped measuring this pass)."""
        if self.strict:
            raise err
        self.errors.append(err)

    # -- forward -------------------------------------------------------------------------------------------------
    def _begin(self, module, args, kwargs):
        if not self.armed or not torch.is_grad_enabled() or not module.training or self.current is not None:
            return
        self._guard(self._start, args, kwargs)

    def _start(self, args, kwargs) -> None:
        self._close_open()           # a pass whose backward never came (an evaluation with gradients, an error)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not torch.is_tensor(ids) or ids.dim() != 2 or ids.shape[0] % 2:
            raise InPassError("in-pass capture needs the model called on input_ids [2B, T] (B chosen sequences, then "
                              f"their B rejected ones); got {None if ids is None else tuple(ids.shape)}")
        if kwargs.get("inputs_embeds") is not None:
            raise InPassError("a forward on inputs_embeds is not supported in-pass (the token ids are needed)")
        attention = kwargs.get("attention_mask")
        attention = torch.ones_like(ids) if attention is None else attention
        named = [(name, self.slots[name][0]._parameters[self.slots[name][1]]) for name, _ in self.named]
        if self.layout is None:
            self.layout = engine_layout(self.model, named)
        # the rows need each sequence's norm and each pair's inner product only: reduced pair by pair
        engine = GramEngine(self.model, named, ids.shape[0], self.mode, plain=True, layout=self.layout, within=True,
                            per_param=False)
        engine.checkpointed, engine.on_error = self.checkpointed, self._failed
        p = _Pass(engine, ids.detach(), attention.detach(), kwargs.get("labels"))
        p.fused = bool(kwargs.get("fused_lm_head", False))
        if self.slot is None:                # the engines' module hooks, installed at the recording's first pass
            self.slot = HookSlot(self.layout, self.checkpointed)
        self.slot.engine = engine
        # the coefficient hooks go first, before the engine's, so that their tensor hooks fire first in the backward
        p.handles.append(self.head.register_forward_hook(lambda m, a, out: self._guard(self._on_logits, p, a, out),
                                                         prepend=True))
        p.handles.append(self.backbone.register_forward_hook(lambda m, a, out: self._guard(self._on_hidden, p, out),
                                                             prepend=True))
        self.current = p

    def _on_hidden(self, p: _Pass, out) -> None:
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        p.hidden = h
        if not (p.fused and self.head_measured):
            return
        # the fused kernel's use of the head weight, recorded inside the model's forward: there a fully_shard head
        # holds the whole tensor autograd sees (a root that reshards after its forward holds its shard at its end)
        p.head_use = p.engine.external_use(self.head, (h[:, :-1].detach(),))
        if is_sharded(self.head.weight):     # a head sharded on its own, never called: gathered by TRL and by us
            p.head_params = (whole(self.head.weight.detach()), None if self.head.bias is None else
                             whole(self.head.bias.detach()))
        if h.requires_grad:                  # its gradient comes after the kernel's backward, head gathered again
            h.register_hook(lambda g: self._guard(self._head_grad, p))

    def _on_logits(self, p: _Pass, args, logits: torch.Tensor) -> None:
        """Logits path: ℓ_t and Σ_v p_v² per position, and the hook that finds the coefficients."""
        if not torch.is_tensor(logits) or not logits.requires_grad:
            return
        with torch.no_grad():
            z = logits[:, :-1].float()
            label = p.ids[:, 1:, None]
            p.token_logps = (z.gather(-1, label) - torch.logsumexp(z, -1, keepdim=True)).squeeze(-1)
            others = torch.softmax(z, -1).scatter_(-1, label, 0.0)      # p_v for v != y_t
            p.one_minus = others.sum(-1)                                 # 1 - p_y, without cancellation
            p.sum_sq = (others ** 2).sum(-1)
        logits.register_hook(lambda g: self._guard(self._logits_grad, p, g))

    def _end(self, module, args, kwargs, output):
        p = self.current
        if p is None:
            return
        self.current = None
        self._guard(self._close_forward, p, kwargs, output)

    def _close_forward(self, p: _Pass, kwargs, output) -> None:
        # the engine's module hooks stay until the backward pass ends: gradient checkpointing re-runs modules there
        p.engine.forward_done = True
        if not self.checkpointed and self.slot is not None:
            self.slot.engine = None
        self.open.append(p)
        for h in p.handles:
            h.remove()
        p.handles.clear()
        fused = getattr(output, "log_probs", None)
        if fused is not None and getattr(output, "logits", None) is None:
            self._fused_forward(p, fused, output)
            root = fused
        elif p.fused:
            raise InPassError("the model was called with fused_lm_head=True but returned logits")
        else:
            logits = output.logits if hasattr(output, "logits") else output[0]
            if p.token_logps is None:
                raise InPassError("the model's output logits were not produced by its output embedding module "
                                  f"({type(self.head).__name__}); in-pass capture cannot find the loss coefficients")
            root = logits
        if not self.checked:       # the model's code is the same for every micro-batch: checked on the first
            p.engine._check_all_uses_hooked(root)
            self.checked = True

    def _fused_forward(self, p: _Pass, log_probs: torch.Tensor, output) -> None:
        """TRL's fused head: the per-token log-probs carry the coefficients; the head weight is an external use."""
        if p.labels is None:
            raise InPassError("a fused LM head call without labels")
        if log_probs.shape[1] != p.ids.shape[1] - 1:
            raise InPassError("the fused head scored more positions than the input has (prompt-learning PEFT "
                              "prepends virtual tokens): not supported in-pass")
        if not p.fused:
            raise InPassError("the model returned fused-head log-probs without being called with fused_lm_head=True")
        mask = p.labels[:, 1:] != -100
        p.logps = log_probs.detach().double().sum(-1).cpu()
        p.lengths = mask.sum(-1).cpu()
        if self.head_measured and p.head_use is None:
            raise InPassError(f"the backbone ({type(self.backbone).__name__}) output was not seen")
        log_probs.register_hook(lambda g: self._guard(self._fused_grad, p, g, mask))

    # -- backward ------------------------------------------------------------------------------------------------
    def _fused_grad(self, p: _Pass, g: torch.Tensor, mask: torch.Tensor) -> None:
        self._set_coefficients(p, g.detach().double(), None, mask)
        p.head_grad = g.detach().float() * mask
        if p.head_use is not None and not p.hidden.requires_grad:
            self._head_grad(p)
        torch.autograd.Variable._execution_engine.queue_callback(lambda: self._guard(self._finish, p))

    def _head_grad(self, p: _Pass) -> None:
        """The fused head's output gradient ``Σ_t ∂L/∂ℓ_t (e_{y_t} - p_t)``, from the final hidden states and the head
        as it is now (after the kernel's backward: fully_shard has gathered it again), to its external use."""
        if p.head_grad is None:              # the coefficients failed (reported): nothing to scale by
            return
        h = p.hidden[:, :-1].detach()
        weight, bias = p.head_params or (self.head.weight, self.head.bias)
        with torch.no_grad():
            z = h.float() @ weight.float().T
            if bias is not None:
                z += bias.float()
            # ∂L/∂ℓ_t (e_y - p_t): -p_t scaled, then the label's entry added (masked positions: ∂L/∂ℓ_t = 0)
            coef = p.head_grad[..., None]
            out_grad = torch.softmax(z, -1).mul_(-coef)
            out_grad.scatter_add_(-1, p.labels[:, 1:].clamp(min=0)[..., None], coef)
        p.head_use(out_grad)

    def _logits_grad(self, p: _Pass, g: torch.Tensor) -> None:
        g = g.detach()
        if (g[:, -1] != 0).any():
            raise InPassError("the loss has a gradient on the last position's logits, which predict no token of the "
                              "sequence: it is not a function of the response log-probs")
        gl = g[:, :-1].double()
        mask = (gl != 0).any(-1)
        at_label = gl.gather(-1, p.ids[:, 1:, None]).squeeze(-1)      # ∂L/∂z_{t,y_t} = c (1 - p_{y_t})
        one_minus = p.one_minus.double()
        coef = self._set_coefficients(p, at_label, one_minus, mask)
        # all of each position's gradient must be c ∂ℓ_t/∂z_t, whose squared norm is (1 - p_y)² + Σ_{v != y} p_v²
        expected = coef[:, None] ** 2 * (one_minus ** 2 + p.sum_sq.double())
        got = (gl ** 2).sum(-1)
        floor = 1e-6 * expected.amax(-1, keepdim=True)
        off = mask & ((got - expected).abs() > TOKEN_TOLERANCE * expected + floor)
        if off.any():
            seq = int(off.any(-1).nonzero()[0, 0])
            raise InPassError(f"the loss's gradient on the logits of sequence {seq} (pair {seq % (g.shape[0] // 2)}) "
                              "is not that of its response log-prob: the loss uses the logits otherwise (label "
                              "smoothing on tokens, an entropy or KL term?), so it cannot be measured in-pass")
        p.logps = (p.token_logps.double() * mask).sum(-1).cpu()
        p.lengths = mask.sum(-1).cpu()
        torch.autograd.Variable._execution_engine.queue_callback(lambda: self._guard(self._finish, p))

    def _set_coefficients(self, p: _Pass, value: torch.Tensor, basis: torch.Tensor | None, mask: torch.Tensor
                          ) -> torch.Tensor:
        """c_i fitted to ``value_t = c_i basis_t`` over the response tokens (which must agree; ``basis`` None: all 1),
        set as the engine's row scale (1 / c_i; 0 for a vanished c_i); returns c [2B]."""
        b = mask.to(value.dtype) if basis is None else basis * mask
        coef = (value * b).sum(-1) / (b * b).sum(-1).clamp(min=1e-300)
        fitted, tolerance = ((coef[:, None], TOKEN_TOLERANCE) if basis is None else
                             (coef[:, None] * basis, TOKEN_TOLERANCE * basis))
        off = mask & ((value - fitted).abs() > coef.abs()[:, None] * (tolerance + ROUNDING) + 1e-300)
        excluded = coef.abs() <= TINY_COEFFICIENT
        off &= ~excluded[:, None]
        if off.any():
            seq = int(off.any(-1).nonzero()[0, 0])
            raise InPassError(f"the loss weights the response tokens of sequence {seq} (pair {seq % (len(coef) // 2)}) "
                              "unequally: it is not a function of the summed response log-probs (LD-DPO's ld_alpha, "
                              "token weights?), so its per-sequence gradients cannot be recovered")
        p.coef, p.excluded = coef, excluded
        p.engine.row_scale = torch.where(excluded, torch.zeros_like(coef), 1 / coef.where(~excluded, torch.ones_like(coef)))
        return coef

    def _finish(self, p: _Pass) -> None:
        try:
            self._record(p)
        finally:
            self._forget(p)

    def _forget(self, p: _Pass) -> None:
        """Release a pass: its hooks, and every reference to its tensors (the hooks autograd keeps on them hold the
        pass, so a reference back would keep each micro-batch's activations alive)."""
        if self.slot is not None and self.slot.engine is p.engine:
            self.slot.engine = None
        p.engine._release()
        p.hidden = p.head_use = None
        if p in self.open:
            self.open.remove(p)

    def _record(self, p: _Pass) -> None:
        if p.engine.failed or p.coef is None:
            return
        m = p.engine.finish(p.logps.double(), p.lengths)
        norm2, inner = (t.detach().double().cpu() for t in m.plain.within_pair())
        excluded = p.excluded.cpu()
        b = len(excluded) // 2
        pair_out = excluded[:b] | excluded[b:]
        norm2 = norm2.masked_fill(torch.cat([pair_out, pair_out]), float("nan"))
        inner = inner.masked_fill(pair_out, float("nan"))
        keys = [(p.keys[k], p.keys[b + k]) for k in range(b)]
        self.records.append(MicroBatch(p.logps.double(), p.lengths.long(), p.coef.double().cpu(), norm2, inner,
                                       excluded, keys, dict(p.engine.info)))


def token_keys(ids: torch.Tensor, mask: torch.Tensor | None = None) -> list[tuple[int, ...]]:
    """The token ids of each sequence (row of ``ids`` [N, T]) that its attention mask keeps: what identifies a training
    row in-pass (the recorder keys each micro-batch's sequences by it; ``training_pass.dataset_keys`` each dataset
    row)."""
    rows = ids.tolist()
    if mask is None:
        return [tuple(r) for r in rows]
    return [tuple(i for i, m in zip(r, k, strict=True) if m) for r, k in zip(rows, mask.tolist(), strict=True)]


def checkpointed_modules(model: torch.nn.Module) -> set[int]:
    """Ids of the modules inside gradient-checkpointed layers (transformers' ``GradientCheckpointingLayer`` with
    ``gradient_checkpointing`` on, which checkpoints its ``forward``: its submodules are re-run by the backward pass,
    the layer's own hooks are not)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - transformers before 4.52 has no such layer class
        return set()
    out: set[int] = set()
    for block in model.modules():
        if isinstance(block, GradientCheckpointingLayer) and block.gradient_checkpointing:
            out.update(id(m) for m in block.modules() if m is not block)
    return out


def backbone_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer backbone (whose output the LM head reads) and the output embedding module of a causal LM,
    under a PEFT wrapper too."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    backbone = getattr(inner, "base_model", None)
    if head is None or backbone is None or backbone is inner:
        raise InPassError(f"{type(inner).__name__} has no output embedding module or no backbone (base_model): "
                          "in-pass capture needs a transformers causal LM")
    return backbone, head
