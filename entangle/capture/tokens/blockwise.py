"""Block-wise per-token backward for ``token_map(method="full")`` (THEORY §7).

The copies of a sequence (one per response token, scored at its predicting position) share its forward pass, so
every transformer block runs once on the pair's two rows and only its input is kept. The backward pulls the K
per-token output gradients down one block at a time: each block is re-run on a chunk of copies
(``CHUNK_HIDDEN``) and differentiated on its own (an engine ``sub_pass``); its layers' per-copy gradients are held
here until the block's chunks are done and then reduced to the K x K Gram blocks (cross-chunk terms included).
Memory: the pair's activations, one chunk of one block's activations, and one block's per-copy gradient factors,
not the whole model's. Every block's re-run on the copies is checked against its output on the source rows, so
an argument the block-wise pass misreads is caught (:class:`BlockwiseUnsupported`, the caller falls back to
prefix copies), never a wrong number.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from ..contrib import Contribution, _gram64, _row_chunks, _union
from ..engine import GramEngine, SeparatePartsError
from ..logprobs import position_ids_from_mask
from ..rules.generic import _tensors, map_tensors
from .positions import response_positions

# Copies re-run through one block at a time: about this many hidden-state elements (chunk x length x width).
CHUNK_HIDDEN = 1 << 19


class BlockwiseUnsupported(RuntimeError):
    """The model's layout does not allow the block-wise token backward (the caller falls back to copies)."""


def token_copies(batch: Mapping[str, torch.Tensor], rows: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """One copy per response token of ``rows``, for the block-wise backward.

    Copy k is its source row up to the last position any copy needs (causal: later positions cannot affect
    earlier ones), scored at the position that predicts token k. Returns the two-column scoring batch that
    ``token_logps`` reads (``input_ids`` [K, 2] with the token in column 1, ``completion_mask`` (0, 1)) plus
    ``source`` [K] (index into ``rows``), ``position`` [K] (the predicting position) and the rows' context
    ``context_ids`` / ``context_mask`` [len(rows), W].
    """
    ids, att = batch["input_ids"], batch["attention_mask"]
    source, position = [], []
    for j, r in enumerate(rows):
        pos = response_positions(batch, r)
        source += [j] * len(pos)
        position += (pos - 1).tolist()
    width = max(position) + 1
    dev = ids.device
    source_t = torch.tensor(source, device=dev)
    position_t = torch.tensor(position, device=dev)
    rows_t = torch.tensor(rows, device=dev)
    target = torch.zeros(len(source), 2, dtype=ids.dtype, device=dev)
    target[:, 1] = ids[rows_t[source_t], position_t + 1]
    comp = torch.zeros_like(target)
    comp[:, 1] = 1
    return {"input_ids": target, "completion_mask": comp, "attention_mask": torch.ones_like(target),
            "source": source_t, "position": position_t,
            "context_ids": ids[rows_t, :width], "context_mask": att[rows_t, :width]}


def _first_tensor(out) -> tuple[torch.Tensor, Callable]:
    """The hidden state a block returns and a function rebuilding the block's output around a replacement."""
    if torch.is_tensor(out):
        return out, lambda h: h
    if isinstance(out, tuple) and out and torch.is_tensor(out[0]) and not any(torch.is_tensor(o) for o in out[1:]):
        return out[0], lambda h: (h, *out[1:])
    raise BlockwiseUnsupported(f"a block returned {type(out).__name__} with several tensors")


def _rows_of(x, k: int, index: torch.Tensor):
    """``x`` with every per-copy tensor (at least 2-D, leading dimension ``k``) reduced to the rows ``index``."""
    return map_tensors(x, lambda t: t.index_select(0, index) if t.dim() >= 2 and t.shape[0] == k else t)


def find_blocks(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The model's stack of transformer blocks: its ``nn.ModuleList`` holding the most parameters."""
    best, size = None, 0
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m):
            n = sum(p.numel() for p in m.parameters())
            if n > size:
                best, size = m, n
    return best


class _SharedRows(torch.autograd.Function):
    """A block evaluated once per source row in the forward and once per copy in the backward."""

    @staticmethod
    def forward(ctx, hidden, reduced_out, block_pass):
        ctx.block_pass = block_pass
        return reduced_out.index_select(0, block_pass.source)

    @staticmethod
    def backward(ctx, grad):
        return ctx.block_pass.backward(grad), None, None


class _BlockPass:
    """One call of one block: its per-row input and output, and its per-copy arguments for the backward."""

    def __init__(self, owner: Blockwise, block, name: str, reduced_in, reduced_out, args, kwargs):
        self.owner, self.block, self.name = owner, block, name
        self.source = owner.source
        self.reduced_in, self.reduced_out, self.args, self.kwargs = reduced_in, reduced_out, args, kwargs

    def backward(self, grad: torch.Tensor) -> torch.Tensor:
        """Per-copy input gradients [K, L, d]; the block's layers reduce their per-copy gradients on the way."""
        engine, k = self.owner.engine, self.owner.k
        size = min(k, self.owner.chunk_size(grad))
        held = _HeldChunks(k)
        outs = []
        for start in range(0, k, size):
            stop = min(k, start + size)
            index = None if stop - start == k else torch.arange(start, stop, device=grad.device)
            try:
                with engine.sub_pass(stop - start, held.sink(start, stop), key=self):
                    outs.append(self._run(engine, index, grad[start:stop]))
            except SeparatePartsError as e:
                raise BlockwiseUnsupported(str(e)) from e
        held.reduce(engine)
        return torch.cat(outs)

    def _run(self, engine: GramEngine, index: torch.Tensor | None, grad: torch.Tensor) -> torch.Tensor:
        """Re-run the block on the copies ``index`` (all when None) and pull ``grad`` back through it alone."""
        source = self.source if index is None else self.source[index]
        args, kwargs = (self.args, self.kwargs) if index is None else \
            _rows_of((self.args, self.kwargs), self.owner.k, index)
        hidden = self.reduced_in.index_select(0, source).requires_grad_()
        with torch.enable_grad():
            self.owner.recomputing = True
            try:
                out, _ = _first_tensor(self.block(hidden, *args, **kwargs))
            finally:
                self.owner.recomputing = False
            expected = self.reduced_out.index_select(0, source)
            err = float((out.detach() - expected).abs().max()) if out.shape == expected.shape else float("inf")
            tol = (5e-2 if out.element_size() < 4 else 1e-3) * max(1.0, float(expected.abs().max()))
            if not err <= tol:
                raise BlockwiseUnsupported(
                    f"block {self.name} gives the copies other outputs than their source rows (max difference "
                    f"{err:.3g}); an argument with a leading dimension equal to the number of copies was taken "
                    "for a per-sequence one")
            (g,) = engine.grad(out, [hidden], grad)
        return g


class _HeldChunks:
    """The chunk contributions of one block's re-runs, per parameter, until the block is done: then reduced to Gram
    blocks [K, K] (within- and cross-chunk terms) and handed to the engine."""

    def __init__(self, k: int):
        self.k = k
        self.parts: dict[str, list[tuple[int, int, Contribution]]] = {}
        self.how: dict[str, str] = {}

    def sink(self, start: int, stop: int):
        def add(name: str, contrib: Contribution, how: str) -> None:
            held = self.parts.setdefault(name, [])
            if any(s == start for s, _, _ in held):
                raise BlockwiseUnsupported(f"parameter {name!r} is used more than once in one block")
            held.append((start, stop, contrib))
            self.how[name] = f"{how}:{contrib.kind} (block-wise)"
        return add

    def reduce(self, engine: GramEngine) -> None:
        for name, parts in self.parts.items():
            whole = len(parts) == 1 and parts[0][1] - parts[0][0] == self.k
            engine.add_gram(name, parts[0][2].gram() if whole else stacked_gram(parts, self.k), self.how[name])


def stacked_gram(parts: list[tuple[int, int, Contribution]], n: int) -> torch.Tensor:
    """Gram matrix float64 [n, n] of per-example gradients given as chunk contributions ``(start, stop, c)``
    (examples missing from every chunk have a zero gradient), materialised a block of parameter rows at a time
    (only the rows some chunk can touch)."""
    first = parts[0][2]
    index = _union([c.touched for _, _, c in parts])
    if index is None:
        index = torch.arange(first.n_rows, device=first.device)
    out = torch.zeros(n, n, dtype=torch.float64, device=first.device)
    if not index.numel():
        return out
    width = first.rows(index[:1])[0, 0].numel()
    for chunk in _row_chunks(index, n, width):
        flat = None
        for s, e, c in parts:
            rows = c.rows(chunk).reshape(e - s, -1)
            if flat is None:
                flat = torch.zeros(n, rows.shape[1], dtype=rows.dtype, device=rows.device)
            flat[s:e] = rows
        out += _gram64(flat)
    return out


class Blockwise:
    """``forward(model, copies) -> logits`` for the pass of ``engine`` over :func:`token_copies`.

    The model runs on the K copies (embeddings, final norm and head see K rows), but every block of the
    stack found by :func:`find_blocks` is evaluated on the source rows only and its output repeated per copy;
    only the block's per-row input is kept. In the backward, each block is re-run on chunks of the K copies
    and differentiated on its own (an engine segment per chunk); the chunks' contributions are reduced to the
    block's Gram blocks (cross-chunk terms included) before the next block down, so one chunk's activations and
    one block's per-copy gradient factors are alive at a time. The chunks' state is this module's; the engine
    offers the narrow interface (``paused``, ``add_source``, ``sub_pass``, ``grad``, ``add_gram``).
    The head sees only the predicting position of each copy.
    """

    def __init__(self, copies: Mapping[str, torch.Tensor], engine: GramEngine, chunk: int | None = None):
        self.engine = engine
        self.source, self.position = copies["source"], copies["position"]
        self.k = int(self.source.numel())
        self.rep = torch.tensor([int((self.source == j).nonzero()[0, 0]) for j in range(int(self.source.max()) + 1)],
                                device=self.source.device)
        self.context_ids, self.context_mask = copies["context_ids"], copies["context_mask"]
        self.recomputing = False
        self.calls = 0
        self.chunk = chunk

    def chunk_size(self, hidden: torch.Tensor) -> int:
        """Copies re-run through a block at a time: ``chunk``, else about CHUNK_HIDDEN hidden-state elements."""
        if self.chunk is not None:
            return max(1, int(self.chunk))
        return max(1, CHUNK_HIDDEN // max(1, hidden[0].numel()))

    def _block_forward(self, block, orig, name: str):
        def forward(*args, **kwargs):
            if self.recomputing:
                return orig(*args, **kwargs)
            hidden, args = (args[0], args[1:]) if args else (kwargs.pop("hidden_states", None), ())
            if not (torch.is_tensor(hidden) and hidden.dim() == 3 and hidden.shape[0] == self.k):
                raise BlockwiseUnsupported(f"block {name} got a first argument that is not the hidden states [K, L, d]")
            if any(t.requires_grad for t in _tensors((args, kwargs))):
                raise BlockwiseUnsupported(f"block {name} gets a differentiable argument besides the hidden states")
            engine = self.engine
            if not hidden.requires_grad:    # nothing measured below this block: the backward must still reach it
                hidden = hidden.detach().requires_grad_()
                engine.add_source(hidden)
            reduced_in = hidden.detach().index_select(0, self.rep)
            with torch.no_grad(), engine.paused():
                try:
                    out = orig(reduced_in, *_rows_of(args, self.k, self.rep), **_rows_of(kwargs, self.k, self.rep))
                except RuntimeError as e:      # e.g. an argument taken for a per-copy one had another meaning
                    raise BlockwiseUnsupported(f"block {name} does not run on the source rows alone ({e})") from e
            first, rebuild = _first_tensor(out)
            if first.shape != reduced_in.shape:
                raise BlockwiseUnsupported(f"block {name} changes the shape of the hidden states")
            self.calls += 1
            return rebuild(_SharedRows.apply(hidden, first, _BlockPass(self, block, name, reduced_in, first,
                                                                       args, kwargs)))
        return forward

    def _gather(self, module, args):
        h = args[0]
        if not (torch.is_tensor(h) and h.dim() == 3 and h.shape[0] == self.k and h.shape[1] > int(self.position.max())):
            raise BlockwiseUnsupported("the output layer does not receive the hidden states [K, L, d]")
        return (h[torch.arange(self.k, device=h.device), self.position].unsqueeze(1), *args[1:])

    def __call__(self, model: torch.nn.Module, copies: Mapping[str, torch.Tensor]) -> torch.Tensor:
        blocks = find_blocks(model)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if blocks is None or head is None:
            raise BlockwiseUnsupported(f"{type(model).__name__} has no block list (nn.ModuleList) or no "
                                       "get_output_embeddings()")
        names = {id(m): n for n, m in model.named_modules()}
        patched = []
        handle = head.register_forward_pre_hook(self._gather)
        try:
            for block in {id(b): b for b in blocks}.values():     # a block listed twice is patched once
                had = "forward" in block.__dict__
                orig = block.forward
                block.forward = self._block_forward(block, orig, names.get(id(block), type(block).__name__))
                patched.append((block, had, orig))
            ids = self.context_ids.index_select(0, self.source)
            mask = self.context_mask.index_select(0, self.source)
            out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                        use_cache=False)
        finally:
            handle.remove()
            for block, had, orig in patched:
                if had:
                    block.forward = orig
                else:
                    del block.forward
        if self.calls == 0:
            raise BlockwiseUnsupported(f"{type(model).__name__}'s forward did not call its blocks")
        logits = out.logits if hasattr(out, "logits") else out[0]
        if logits.shape[:2] != (self.k, 1):
            raise BlockwiseUnsupported(f"the model returned logits of shape {tuple(logits.shape)}, expected [K, 1, V]")
        return torch.cat([logits, torch.zeros_like(logits)], 1)
