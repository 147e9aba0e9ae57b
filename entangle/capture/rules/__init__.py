"""Per-layer rules: how one module type turns (inputs, output gradients) into per-example gradient contributions.

A rule is a function ``rule(module, inputs, grad_out, valid, mode) -> {param_name: contribution}``:

* ``inputs``   the module's positional inputs as seen in the forward pass (a tuple),
* ``grad_out`` gradient of ``sum_i s_i`` w.r.t. the module's output, [N, T, d_out], float32/float64,
* ``valid``    [N, T] bool, positions where ``grad_out`` is non-zero (``None`` for a rule registered with
  ``positions=False``: one that never reads it, such as the norms', spares the engine a read of the gradient),
* ``mode``     ``"auto"``, ``"ghost"`` or ``"materialise"`` for rules that can do both.

Rules are registered per module class with :func:`register_rule`; a new layer type is one new
file and one decorator. Modules without a rule fall back to :mod:`entangle.capture.rules.generic`.

A rule whose per-example gradients are non-zero only on some parameter rows says which with
``register_rule(..., touched=fn)``: ``fn(module, inputs) -> sorted LongTensor`` (an embedding lookup touches the rows
of its token ids), on the call's inputs. The engine uses it for parameters with several uses (tied input/output
embeddings) reduced use by use, whose cross terms then only need those rows; it calls ``fn`` only then (after the
backward pass, the inputs held until the pass ends).

A rule whose result depends on the module only through a few settings (not its parameter values) says which, with
``register_rule(..., batch_key=fn)``: ``fn(module) -> hashable``. The engine may then reduce several calls of such
modules at once, as one call on their inputs and output gradients stacked along the batch (calls of equal shapes and
equal keys), which saves the per-call overhead of small layers; a rule without one is always called per call.

A rule for an affine layer ``y = x W (+ b)`` on its one input (``nn.Linear``, GPT-2's ``Conv1D``) says so with
``register_rule(..., affine=True)``: its ``weight`` gradient per example is the product of the input and the output
gradient over positions, its ``bias`` gradient the output gradient summed over positions. An engine that only needs
each pair's entries (``GramEngine(within=True)``) then reduces all such calls of a pass at once, without calling the
rule (:func:`~entangle.capture.contrib.affine_within_blocks`).

A rule that can also give its per-example gradients whole in a few operations says how, with
``register_rule(..., dense=fn)``: ``fn(module, inputs, grad_out, into) -> {param_name: [N, rows, ...] tensor} | None``,
each added in place to ``into[param_name]`` when that is given (the sum of the other uses so far); ``None``: not for
this call (nothing added). The engine uses it for a small parameter with several uses (a small tied embedding
and output layer), whose per-example gradients it sums over the uses and reduces with one product, instead of forming
the rule's contribution for each use; an engine that only needs each pair's entries does the same for a small
parameter used once by a layer that is not affine (GPT-2's position embedding).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Rule = Callable[..., dict]
RULES: dict[type, Rule] = {}
RULES_BY_NAME: dict[str, Rule] = {}


def register_rule(*classes: type | str, touched: Callable[..., torch.Tensor] | None = None,
                  batch_key: Callable[[torch.nn.Module], object] | None = None, affine: bool = False,
                  positions: bool = True, dense: Callable[..., dict | None] | None = None) -> Callable[[Rule], Rule]:
    """Register ``rule`` for module classes (or class names, for classes we do not want to import); ``touched``,
    ``batch_key``, ``affine``, ``positions`` and ``dense`` as in the module docstring (default: a use may touch every
    row; never batched; not affine; ``valid`` given; no whole per-example gradients)."""

    def deco(rule: Rule) -> Rule:
        rule.touched, rule.batch_key, rule.affine, rule.positions = touched, batch_key, affine, positions
        rule.dense = dense
        for c in classes:
            (RULES_BY_NAME if isinstance(c, str) else RULES)[c if isinstance(c, str) else c] = rule
        return rule

    return deco


def rule_for(module: torch.nn.Module) -> Rule | None:
    """The registered rule for ``module``'s exact class, else for the nearest base class whose ``forward`` it
    inherits unchanged, else None (the generic fallback).

    A subclass that overrides ``forward`` computes something else with the same parameters (e.g. OPT's
    learned positional embedding takes the attention mask and adds an offset): its base's rule would be wrong.
    """
    forward = type(module).forward
    for cls in type(module).__mro__:
        rule = RULES.get(cls) or RULES_BY_NAME.get(cls.__name__)
        if rule is not None:
            return rule if getattr(cls, "forward", None) is forward else None
    return None


from . import embedding, linear, norm  # noqa: E402,F401  (registration side effects)
