"""What one measurement costs next to one training step, from a model's config alone (``entangle plan``).

The model is built from its ``config.json`` on the meta device (no weights, no download) and its forward and
backward passes run on fake tensors (``torch._subclasses.FakeTensorMode``: shapes only, nothing computed), so the
counts are those of the model's real code:

* FLOPs are what ``torch.utils.flop_counter.FlopCounterMode`` counts: matrix products and attention (elementwise
  work and the optimizer update are not counted), attributed to the module that runs them;
* memory is the bytes of live tensor storages (:class:`LiveBytes`), tracked op by op, in the pass's order;
* the engine's per-example products are not run: at each hooked module call the plan takes the engine's own
  decisions (:func:`~entangle.capture.rules.rule_for`, :func:`~entangle.capture.contrib.factored_kind`,
  :func:`~entangle.capture.contrib.embedding_dense`) and counts the products and buffers of that choice.

A training step is one DPO step of TRL's default recipe: a forward of the reference model, a forward and a backward
of the policy, AdamW (weights, gradients and both moments in the weights' dtype, as ``torch.optim.AdamW`` keeps
them). A measurement is one :func:`entangle.measure` pass over the probe (its own forward, a backward to the
activations only, the per-example products); ``in_pass=True`` is the capture inside the trainer's own pass (no
extra forward or backward: the products, and the activations the engine holds longer). Under FSDP on
``world_size`` GPUs, weights, gradients and Adam state are sharded (plus the unsharded root and two layers at a
time); each GPU runs its share of the batch and of the probe, whose activations and products are not sharded.

Token statistics enter only the embedding's Gram (dense rows or key pairs): the plan assumes token ids drawn
uniformly from the vocabulary. Every sequence has ``prompt + response`` tokens (no padding).
"""

from __future__ import annotations

import contextlib
import json
import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .capture.contrib import CHUNK_ELEMS, PARTIAL_SUM, embedding_dense, factored_kind, pair_products
from .capture.engine import affine_together
from .capture.logprobs import model_logits, token_logps
from .capture.rules import rule_for

DTYPES = {"bf16": torch.bfloat16, "float32": torch.float32}
STRUCTURES = ("pairs", "full")
# published config.json values, kept as data (provenance: entangle/configs/README.md)
CONFIGS = Path(__file__).resolve().parent / "configs"
BUNDLED = ("qwen2.5-0.5b", "mistral-7b", "llama-3.1-8b", "llama-3.1-70b")


# ---- the model from its config ---------------------------------------------------------------------------------

def load_config(config_or_dir: str | Path | Mapping[str, Any]):
    """A transformers config from a ``config.json`` path, a model directory, a bundled name (:data:`BUNDLED`) or
    a dict of config values."""
    from transformers import AutoConfig

    if isinstance(config_or_dir, Mapping):
        values = dict(config_or_dir)
    else:
        name = str(config_or_dir)
        path = Path(name).expanduser()
        if name in BUNDLED:
            values = json.loads((CONFIGS / f"{name}.json").read_text())
        elif path.is_dir() and (path / "config.json").is_file():
            values = json.loads((path / "config.json").read_text())
        elif path.is_file():
            values = json.loads(path.read_text())
        else:
            raise ValueError(f"model {name!r} is not a config.json, a model directory with one, or a bundled "
                             f"config ({', '.join(BUNDLED)})")
    if "model_type" not in values:
        raise ValueError(f"model {config_or_dir!r}: the config has no 'model_type' to pick the model class")
    return AutoConfig.for_model(**values)


def meta_model(config, dtype: torch.dtype) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_config(config)`` on the meta device: every shape, no storage."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


# ---- live tensor bytes -------------------------------------------------------------------------------------------

class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of the tensor storages created under this mode that are still alive: ``live`` now, ``peak`` since
    entry. Deterministic (it counts tensors, not the allocator's pages); works on real and fake tensors alike.

    Tensors that existed before (weights, the batch) are not counted: ``peak`` is the memory a pass adds.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key = id(storage)
        if key in self._refs and self._refs[key]() is storage:
            return
        size = storage.nbytes()
        self._refs[key] = weakref.ref(storage, lambda _, key=key, size=size: self._free(key, size))
        self.live += size
        self.peak = max(self.peak, self.live)

    def _free(self, key: int, size: int) -> None:
        self._refs.pop(key, None)
        self.live -= size


# ---- one fake pass -------------------------------------------------------------------------------------------------

@dataclass
class _Call:
    """One hooked module call of a pass, as the engine sees it when the call's output gradient arrives."""

    name: str                       # the module's name in the model
    module: torch.nn.Module
    in_shape: tuple                 # the first input's shape ([N, T] ids, or [N, T, d_in])
    out_width: int                  # the output's last dimension
    started: int                    # ops of the pass before the call (the call is after the forward's last
    token_ids: bool                 # attention: a gradient only where response tokens are predicted); the
                                    # input embedding (token ids; another embedding: positions)
    live: int = 0                   # live bytes of the pass when the output gradient arrives


@dataclass
class _Pass:
    """FLOPs of the forward pass(es) per module name (FlopCounterMode's), of the whole pass, peak live bytes,
    hooked calls in backward order."""

    forward: dict[str, int]
    flops: int
    peak: int
    calls: list[_Call]
    last_attention: int             # ops of the pass before its forward's last attention


def flop_counter():
    """``FlopCounterMode`` that also counts CPU's fused attention kernels (torch registers only the CUDA ones)."""
    from torch.utils import flop_counter as fc

    def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    return fc.FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward})


def owners(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The modules that own parameters (the ones the engine hooks), with their names."""
    return [(name, m) for name, m in model.named_modules() if any(p is not None for p in m._parameters.values())]


class _Engine(torch.utils._python_dispatch.TorchDispatchMode):
    """The engine's footprint on a fake pass: each hooked call's inputs are held until its output gradient arrives
    (the engine's closure holds them), when the live bytes are read; outputs whose inputs carry no gradient are the
    sources the engine's backward asks for. Ops are counted to find the last attention of the forward."""

    def __init__(self, model, tracker: LiveBytes):
        super().__init__()
        self.tracker, self.embeddings = tracker, model.get_input_embeddings()
        self.calls: list[_Call] = []
        self.sources: list[torch.Tensor] = []
        self.ops, self.last_attention, self.started = 0, -1, {}
        self.handles = []
        for name, module in owners(model):
            self.handles.append(module.register_forward_pre_hook(self._pre))
            self.handles.append(module.register_forward_hook(self._hook(name)))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        forward = torch._C._current_graph_task_id() == -1
        name = func.__name__
        if forward and ("attention" in name or ("softmax" in name and "log_softmax" not in name)):
            self.last_attention = self.ops
        return func(*args, **(kwargs or {}))

    def _pre(self, module, args):
        self.started[module] = self.ops

    def _hook(self, name: str):
        def hook(module, args, output):
            outs = [o for o in torch.utils._pytree.tree_leaves(output) if isinstance(o, torch.Tensor) and o.requires_grad]
            if not outs or not args or not isinstance(args[0], torch.Tensor):
                return
            if not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
                self.sources.append(outs[0])
            call = _Call(name, module, tuple(args[0].shape), outs[0].shape[-1],
                         started=self.started[module],
                         token_ids=module is self.embeddings)

            def on_grad(grad, call=call, held=args):
                call.live = self.tracker.live
                self.calls.append(call)
            outs[0].register_hook(on_grad)
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _fake(model: torch.nn.Module):
    """The fake mode of ``model``'s parameters, swapping the meta ones for fake CPU tensors (in place, keeping
    shared parameters shared) the first time."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    first = next(model.parameters())
    if isinstance(first, FakeTensor):
        return first.fake_mode
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    swapped: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for key, t in table.items():
                if t is not None and id(t) not in swapped:
                    fake = mode.from_tensor(torch.empty(t.shape, dtype=t.dtype))
                    swapped[id(t)] = torch.nn.Parameter(fake, t.requires_grad) if isinstance(t, torch.nn.Parameter) \
                        else fake
                if t is not None:
                    table[key] = swapped[id(t)]
    return mode


def fake_batch(n: int, prompt: int, response: int) -> dict[str, torch.Tensor]:
    """``n`` sequences of ``prompt + response`` tokens, the last ``response`` of them scored (token ids all 0)."""
    ids = torch.zeros(n, prompt + response, dtype=torch.long)
    comp = torch.zeros_like(ids)
    comp[:, prompt:] = 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": comp}


def dpo_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], beta: float = 0.1) -> torch.Tensor:
    """The forward passes of one DPO step: the reference's (the same weights, no gradient), the policy's, and the
    sigmoid loss to differentiate."""
    with torch.no_grad():
        ref = token_logps(model_logits(model, batch), batch).sum(-1)
    logps = token_logps(model_logits(model, batch), batch).sum(-1)
    b = logps.shape[0] // 2
    margin = (logps[:b] - ref[:b]) - (logps[b:] - ref[b:])
    return torch.nn.functional.logsigmoid(beta * margin).neg().mean()


def _run(model, n: int, prompt: int, response: int, *, training: bool, hooked: bool) -> _Pass:
    """One fake pass over ``n`` sequences: a DPO step (each weight gradient freed once accumulated, as FSDP's
    reduce-scatter frees it) or the engine's pass (forward, backward to the sources); ``hooked``: with the
    engine's footprint."""
    mode = _fake(model)
    model.eval()                                  # no dropout (TRL's DPOConfig disables it; a measurement too)
    frees = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
             for p in model.parameters()] if training else []
    with mode:
        batch = fake_batch(n, prompt, response)
        tracker, counter = LiveBytes(), flop_counter()
        engine = _Engine(model, tracker) if hooked else None
        try:
            with counter, tracker, engine or contextlib.nullcontext(), torch.enable_grad():
                total = dpo_loss(model, batch) if training else token_logps(model_logits(model, batch), batch).sum()
                forward = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
                if training:
                    total.backward()
                else:
                    torch.autograd.grad(total, engine.sources, allow_unused=True)
                del total
        finally:
            for h in frees:
                h.remove()
            if engine is not None:
                engine.close()
    return _Pass(forward, counter.get_total_flops(), tracker.peak, engine.calls if engine else [], engine.last_attention if engine else -1)


# ---- the engine's per-example products at one call -------------------------------------------------------------

@dataclass
class _Cost:
    """What the engine's per-example products cost at one use of one parameter."""

    method: str                     # ghost / materialised / sparse / dense / generic
    flops: int
    transient: int                  # bytes while the use is reduced
    kept: int = 0                   # bytes kept to the end of the pass (a parameter with several uses)


def _factored(n: int, span: int, a: int, b: int, full: bool, within: int | None = None, union: int | None = None
              ) -> _Cost:
    """``Factored`` (Linear, Conv1D weights): L [m, a], R [m, b] over m = n·span positions (contrib.py).

    ``within``: the positions T of the pass when only each pair's entries are reduced (in-pass capture,
    ``GramEngine(within=True)``): the ghost identity pair by pair, ``contrib.pair_products`` per pair when the layer is
    reduced with the pass's other affine layers (``contrib.affine_within_blocks``), else over 2·``union`` (the
    longest span of the layers of its shape, reduced with it as one stacked call; default ``span``)."""
    m = n * span
    if within is not None:
        b_pairs, t = n // 2, within
        fused = affine_together(n, t, a, b)
        kind = "ghost" if fused else factored_kind(m, n, a, b, pair_m=[2 * span] * b_pairs)
        if kind == "ghost":
            width = 2 * (t if fused else union or span)
            step = b_pairs if fused else max(1, CHUNK_ELEMS // (width * width))
            square = pair_products(t) if fused else width * width
            return _Cost(kind, 2 * b_pairs * square * (a + b),
                         4 * n * width // 2 * (a + b) + 28 * min(step, b_pairs) * square)
    else:
        kind = factored_kind(m, n, a, b)
    if kind == "ghost":
        step = max(1, CHUNK_ELEMS // m)
        flops = 2 * m * m * (a + b) + 2 * n * m * m + 2 * n * n * m * math.ceil(m / step)
        return _Cost(kind, flops, 4 * m * (a + b) + 16 * n * m + 20 * min(step, m) * m)
    rows = min(a, max(1, CHUNK_ELEMS // (n * b)))          # a chunk of per-example rows [n, rows, b]
    flops = 2 * n * span * a * b + (2 * n * n * a * b if full else 4 * n * a * b)
    return _Cost(kind, flops, 4 * n * rows * b + 8 * n * min(PARTIAL_SUM, rows * b))


def _dense(n: int, size: int, full: bool) -> int:
    """FLOPs of the Gram (``full``) or the pair statistics of materialised per-example gradients [n, size]."""
    return 2 * n * n * size if full else 4 * n * size


def _embedding(call: _Call, n: int, span: int) -> tuple[_Cost, int]:
    """``EmbeddingRows`` with token ids drawn uniformly from the vocabulary (positions: the same in every
    sequence); returns the cost and the number of distinct ids (the rows a tied head's cross terms need)."""
    vocab, d = call.module.num_embeddings, call.out_width
    if call.token_ids:
        p = 1 - (1 - 1 / vocab) ** span                  # chance that a sequence holds a given id
        keys, distinct = n * vocab * p, vocab * (1 - (1 - p) ** n)
        sharing = vocab * (n * p * (1 - p) + n * n * p * p)
    else:
        keys, distinct, sharing = n * span, span, n * n * span
    kept = 4 * keys * d + 4 * n * span * d + 32 * n * span
    distinct, sharing = round(distinct), round(sharing)
    if embedding_dense(n, distinct, sharing):             # [n, ids, d] rows, chunked
        rows = min(distinct, max(1, CHUNK_ELEMS // (n * d)))
        return _Cost("sparse", 2 * n * n * distinct * d, kept + 8 * n * rows * d, kept), distinct
    step = min(sharing, max(1, CHUNK_ELEMS // d))         # key pairs sharing an id, chunked
    return _Cost("sparse", 0, kept + 40 * sharing + 8 * step * d, kept), distinct


def _use_cost(call: _Call, n: int, span: int, wide_copy: bool, full: bool, pass_flops: int, within: bool = False,
              union: int | None = None) -> tuple[dict[str, _Cost], int | None]:
    """The cost of each of the call's own parameters at this use, the same way the rule and the engine compute it
    (``full``: the whole Gram, else the pair statistics; a parameter with several uses always forms its Gram), and
    the distinct token ids of an embedding use. ``wide_copy``: the engine casts bf16 activations and gradients to
    float32; ``pass_flops``: the module's own FLOPs in the pass (for the generic fallback); ``within``: in-pass
    capture, each pair's entries alone, ``union`` the longest span of the calls reduced with this one (see
    :func:`_factored`)."""
    module, T, d_out = call.module, call.in_shape[1], call.out_width
    rule = rule_for(module)
    name = getattr(rule, "__name__", None)
    d_in = call.in_shape[-1] if len(call.in_shape) > 2 else 0
    # every rule: the gradient cast to float32 (bf16), the mask of positions with a gradient, the input cast
    hook = (4 * n * T * d_out if wide_copy else 0) + n * T * d_out
    cast_in = 4 * n * T * d_in if wide_copy else 0
    costs, distinct = {}, None
    if name in ("linear", "conv1d"):
        a, b = (d_out, d_in) if name == "linear" else (d_in, d_out)
        costs["weight"] = _factored(n, span, a, b, full, T if within else None, union)
        costs["weight"].transient += hook + cast_in
        if module._parameters.get("bias") is not None:     # within pairs: summed from the weight's output products
            costs["bias"] = _Cost("dense", 0 if within else _dense(n, d_out, full), 4 * n * d_out)
    elif name == "embedding":
        costs["weight"], distinct = _embedding(call, n, span)
        costs["weight"].transient += hook
    elif rule is not None:                       # norms: elementwise per-example gradients of the vector parameters
        for k, p in module._parameters.items():
            if p is not None:
                costs[k] = _Cost("dense", _dense(n, p.numel(), full), hook + cast_in + 12 * n * T * d_out)
    else:                                        # the generic fallback: the module re-run per sequence
        for k, p in module._parameters.items():
            if p is not None:
                costs[k] = _Cost("generic", 3 * pass_flops // 2 + _dense(n, p.numel(), full),
                                 8 * n * p.numel() + 4 * p.numel(), 4 * n * p.numel())
    return costs, distinct


def _shared_costs(uses: list[tuple[_Call, _Cost]], distinct: int | None, n: int, span_of, width: int
                  ) -> tuple[int, int]:
    """Extra FLOPs and kept bytes of a parameter with several uses (``SharedParameter``): each use's Gram is full,
    a use that can touch every row keeps its rows of the ids the other uses touch (a tied head: the batch's
    tokens), and the cross terms multiply those rows."""
    rows = distinct if distinct is not None else uses[0][0].module.weight.shape[0]
    flops = kept = 0
    for call, cost in uses:
        if cost.method in ("ghost", "materialised"):
            m = n * span_of(call)
            kept += 4 * m * rows
            flops += 2 * m * rows * width
    pairs = len(uses) * (len(uses) - 1) // 2
    return flops + pairs * 2 * n * n * rows * width, kept


# ---- the plan ------------------------------------------------------------------------------------------------------

def _layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's block stack: its ModuleList with the most parameters."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def plan(config_or_dir: str | Path | Mapping[str, Any], *, pairs: int, prompt: int, response: int,
         world_size: int = 1, dtype: str = "bf16", structure: str = "pairs", in_pass: bool = False,
         probe: int | None = None) -> pd.DataFrame:
    """FLOPs and memory of one measurement next to one DPO training step, per layer type and in total.

    Args:
        config_or_dir: a ``config.json`` path, a model directory, a bundled name (:data:`BUNDLED`) or config values.
        pairs: preference pairs per optimizer step, over all GPUs (each GPU runs ``ceil(pairs / world_size)``).
        prompt, response: tokens of every prompt and every response.
        world_size: GPUs under FSDP (weights, gradients, Adam state sharded; activations and products not).
        dtype: ``"bf16"`` or ``"float32"`` weights (the engine's products run in float32 either way).
        structure: ``"pairs"`` (the callback's per-pair statistics) or ``"full"`` (the whole Gram matrix).
        in_pass: the capture inside the trainer's pass over its own batch instead of a probe pass.
        probe: probe pairs (default ``pairs``; each GPU measures ``ceil(probe / world_size)``).

    Returns:
        one row per layer type (module class) — ``uses`` (hooked calls), ``method`` (the engine's choice per use),
        ``train_flops``, ``measure_flops`` (the measurement's forward and backward in these modules plus the
        products), ``product_flops``, ``product_bytes`` (the largest buffers of one use) — a row for the work
        outside parameterised modules (attention, loss) and a ``total`` row; per GPU. ``frame.attrs["totals"]``
        holds the totals: FLOPs and their ratio, and the memory per GPU of the training step (weights, reference,
        gradients, Adam, activations, peak) and of the measurement (its peak above the weights and optimizer state,
        and the GPU's peak while it runs).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    if structure not in STRUCTURES:
        raise ValueError(f"structure {structure!r}: choose one of {STRUCTURES}")
    for what, v in (("pairs", pairs), ("prompt", prompt), ("response", response), ("world_size", world_size),
                    ("probe", 1 if probe is None else probe)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{what} must be an integer of at least 1, got {v!r}")
    config = load_config(config_or_dir)
    model = meta_model(config, DTYPES[dtype])
    n_train = 2 * math.ceil(pairs / world_size)
    n = n_train if in_pass else 2 * math.ceil((probe or pairs) / world_size)
    T = prompt + response
    train = _run(model, n_train, prompt, response, training=True, hooked=False)
    meas = _run(model, n, prompt, response, training=in_pass, hooked=True)
    prefix = type(model).__name__ + "."

    # the engine's products at every hooked call, in the order the output gradients arrive
    n_uses: dict[int, int] = {}
    for call in meas.calls:
        for p in call.module._parameters.values():
            if p is not None:
                n_uses[id(p)] = n_uses.get(id(p), 0) + 1
    full, wide_copy = structure == "full", DTYPES[dtype] != torch.float32
    rows: dict[str, dict] = {}
    shared: dict[int, list] = {}
    kept = peak_products = 0
    def span(call: _Call) -> int:                 # positions whose output gradient is not zero
        return response if call.started > meas.last_attention else T - 1

    def group(call: _Call) -> tuple:              # calls the engine stacks into one (equal shapes)
        return type(call.module), call.in_shape[-1], call.out_width

    union: dict[tuple, int] = {}                  # the longest span of each such group: the stacked call's
    for call in meas.calls:
        union[group(call)] = max(union.get(group(call), 0), span(call))
    for call in meas.calls:
        is_shared = any(n_uses[id(p)] > 1 for p in call.module._parameters.values() if p is not None)
        costs, distinct = _use_cost(call, n, span(call), wide_copy, full or is_shared,
                                    meas.forward.get(prefix + call.name, 0) // (2 if in_pass else 1),
                                    within=in_pass and not is_shared, union=union[group(call)])
        row = rows.setdefault(type(call.module).__name__, {"uses": 0, "methods": {}, "product_flops": 0,
                                                           "product_bytes": 0, "modules": set()})
        row["uses"] += 1
        row["modules"].add(call.name)
        for k, cost in costs.items():
            p = call.module._parameters[k]
            row["methods"][cost.method] = row["methods"].get(cost.method, 0) + 1
            row["product_flops"] += cost.flops
            row["product_bytes"] = max(row["product_bytes"], cost.transient)
            peak_products = max(peak_products, call.live + kept + cost.transient)
            kept += cost.kept
            if n_uses[id(p)] > 1:
                shared.setdefault(id(p), [[], None, p])
                shared[id(p)][0].append((call, cost))
                shared[id(p)][1] = shared[id(p)][1] or distinct
    for uses, distinct, p in shared.values():
        flops, more = _shared_costs(uses, distinct, n, span,
                                    p[0].numel() if p.dim() > 1 else 1)
        row = rows[type(uses[0][0].module).__name__]
        row["product_flops"] += flops
        kept += more
        peak_products = max(peak_products, meas.calls[-1].live + kept)

    # per layer type, next to the training step's FLOPs in the same modules
    frame = []
    for label, row in rows.items():
        # a parameterised layer's backward is twice its forward (input and weight gradients; the engine's: the
        # input gradients alone): the training step's reference and policy forwards, backward = 2 x both forwards
        train_f = 2 * sum(train.forward.get(prefix + m, 0) for m in row["modules"])
        pass_f = 0 if in_pass else 2 * sum(meas.forward.get(prefix + m, 0) for m in row["modules"])
        frame.append({"layer_type": label, "uses": row["uses"],
                      "method": ", ".join(f"{k} ×{v}" for k, v in sorted(row["methods"].items())),
                      "train_flops": train_f, "measure_flops": pass_f + row["product_flops"],
                      "product_flops": row["product_flops"], "product_bytes": row["product_bytes"]})
    train_total, pass_total = train.flops, 0 if in_pass else meas.flops
    frame.append({"layer_type": "no parameters (attention, loss)", "uses": 0, "method": "",
                  "train_flops": train_total - sum(r["train_flops"] for r in frame),
                  "measure_flops": pass_total - sum(r["measure_flops"] - r["product_flops"] for r in frame),
                  "product_flops": 0, "product_bytes": 0})
    products = sum(r["product_flops"] for r in frame)
    frame.append({"layer_type": "total", "uses": sum(r["uses"] for r in frame), "method": "",
                  "train_flops": train_total, "measure_flops": pass_total + products, "product_flops": products,
                  "product_bytes": max(r["product_bytes"] for r in frame)})
    out = pd.DataFrame(frame)

    # memory per GPU
    bytes_per = torch.finfo(DTYPES[dtype]).bits // 8
    params = sum(p.numel() for p in model.parameters())
    layers = _layers(model)
    unsharded = (params - _numel(layers) + 3 * max(_numel(b) for b in layers)) * bytes_per if world_size > 1 else 0
    shard = params * bytes_per / world_size
    static = {"weights": shard, "reference": shard, "gradients": shard, "adam": 2 * shard, "fsdp_unsharded": unsharded}
    base = sum(static.values())
    train_peak = base + train.peak
    extra = max(meas.peak, peak_products)
    extra = max(0, extra - train.peak) if in_pass else extra
    measure_peak = (train_peak if in_pass else base) + extra
    out.attrs["totals"] = {
        "model": str(config_or_dir), "parameters": params, "dtype": dtype, "world_size": world_size, "pairs": pairs,
        "probe": n // 2 * world_size if not in_pass else pairs, "prompt": prompt, "response": response,
        "structure": structure, "in_pass": in_pass, "train_sequences_per_gpu": n_train, "measure_sequences_per_gpu": n,
        "train_flops": train_total, "measure_flops": pass_total + products,
        "flop_ratio": (pass_total + products) / train_total,
        **{f"{k}_bytes": v for k, v in static.items()}, "activation_bytes": train.peak,
        "train_peak_bytes": train_peak, "measure_extra_bytes": extra, "measure_peak_bytes": measure_peak,
        "memory_ratio": measure_peak / train_peak,
    }
    return out
