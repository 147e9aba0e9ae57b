"""Token-level gradient maps of one pair (THEORY §7) and the forward-only hidden states behind CHES (§8).

``token_map`` returns the inner products ``<grad l_t, grad l_u>`` between the per-token gradients of a pair's
response tokens, where ``l_t = log pi(y_t | x, y_<t)`` is token t's log-prob as ``token_logps`` computes it.
Since ``s(y) = sum_t l_t``, the chosen x rejected block sums to the pair's Gram entry ``<g_w, g_l>``.

Two methods:

* ``"full"``: every parameter, exactly, with the capture engine's per-layer rules (ghost / materialised,
  sparse embeddings, tied-parameter cross terms, generic fallback) and no Python loop over tokens. Token t's
  log-prob depends only on the positions before it, so one *copy* per response token, scored at its own
  predicting position, separates the tokens' gradients (copies of a causal LM do not interact). Two ways:

  - block-wise (the default): the copies of a sequence share its forward pass, so every transformer block
    runs once on the pair's two rows and only its input is kept. The backward pulls the K per-token output
    gradients down one block at a time: each block is re-run on a chunk of copies (``CHUNK_HIDDEN``) and
    differentiated on its own, its layers' per-copy gradients are held until the block's chunks are done and
    then reduced to the K x K Gram blocks (cross-chunk terms included). Memory: the pair's activations, one
    chunk of one block's activations, and one block's per-copy gradient factors, not the whole model's.
  - prefix copies (the fallback for a model whose layout the block-wise pass cannot use, with a warning):
    K left-padded copies through the whole model at once; its memory grows with K times the depth.

  Every block's re-run on the copies is checked against its output on the source rows, so an argument that
  the block-wise pass misreads is caught and the fallback used, never a wrong number.
* ``"head"``: the output layer alone, in closed form and without a backward pass. The gradient of ``l_t``
  w.r.t. the head weight is ``(e_{y_t} - p_t) h_t^T``, so
  ``<grad l_t, grad l_u> = ((e_{y_t} - p_t) . (e_{y_u} - p_u)) (h_t . h_u)``. For tied input/output
  embeddings (GPT-2, tied Llama) this is the head use of the shared matrix only: the input-embedding use
  and its cross terms are left out.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd
import torch

from .engine import current_engine, measurement_mode, sequence_gram
from .logprobs import model_logits, position_ids_from_mask, token_logps
from .params import ParamSpec, select_params, unwrap_model
from .rules.generic import _tensors, map_tensors

METHODS = ("full", "head")
BLOCKS = ("wl", "ww", "ll")


def response_positions(batch: Mapping[str, torch.Tensor], row: int) -> torch.Tensor:
    """Positions [T] (int64, ascending) of the response tokens of sequence ``row``."""
    pos = batch["completion_mask"][row].to(torch.bool).nonzero().flatten()
    if pos.numel() and int(pos[0]) == 0:
        raise ValueError(f"sequence {row}: a response token at position 0 has no context to be predicted from")
    return pos


def _pair_rows(batch: Mapping[str, torch.Tensor], pair: int) -> tuple[int, int]:
    n = batch["input_ids"].shape[0]
    if n % 2:
        raise ValueError(f"the batch has {n} sequences; expected 2B (all chosen, then all rejected)")
    b = n // 2
    if not 0 <= pair < b:
        raise ValueError(f"pair={pair} is out of range for a batch of {b} pairs")
    return pair, b + pair


def prefix_copies(batch: Mapping[str, torch.Tensor], rows: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """One left-padded copy per response token of ``rows``, ending just before that token.

    Returns ``context_ids`` / ``context_mask`` [K, P] (P = the longest prefix) and a two-column batch in the
    layout ``token_logps`` reads: ``input_ids`` [K, 2] with the scored token in column 1 and
    ``completion_mask`` [K, 2] = (0, 1). Padding and prompt tokens of the original rows keep their masks.
    """
    ids, att = batch["input_ids"], batch["attention_mask"]
    spans = [(r, int(p)) for r in rows for p in response_positions(batch, r)]
    width = max(p for _, p in spans)
    k = len(spans)
    ctx = torch.zeros(k, width, dtype=ids.dtype, device=ids.device)
    ctx_mask = torch.zeros(k, width, dtype=att.dtype, device=att.device)
    target = torch.zeros(k, 2, dtype=ids.dtype, device=ids.device)
    for j, (r, p) in enumerate(spans):
        ctx[j, width - p:] = ids[r, :p]
        ctx_mask[j, width - p:] = att[r, :p]
        target[j, 1] = ids[r, p]
    comp = torch.zeros_like(target)
    comp[:, 1] = 1
    return {"input_ids": target, "completion_mask": comp, "attention_mask": torch.ones_like(target),
            "context_ids": ctx, "context_mask": ctx_mask}


def last_position_logits(model: torch.nn.Module, copies: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Logits [K, 2, V] for :func:`prefix_copies`: row 0 holds each copy's last-position logits.

    Only the last position goes through the output layer (``logits_to_keep=1`` where the model accepts it),
    so the head costs K rows, not K x P. Row 1 is a placeholder that ``token_logps`` never reads.
    """
    mask = copies["context_mask"]
    kwargs = {"input_ids": copies["context_ids"], "attention_mask": mask,
              "position_ids": position_ids_from_mask(mask), "use_cache": False}
    try:
        out = model(**kwargs, logits_to_keep=1)
    except TypeError:                                   # a model without logits_to_keep: every position
        out = model(**kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return torch.cat([logits[:, -1:], torch.zeros_like(logits[:, -1:])], 1)


def token_gram(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    pair: int,
    params: ParamSpec = None,
    method: str = "full",
) -> tuple[torch.Tensor, int]:
    """Gram matrix float64 [Tw + Tl, Tw + Tl] of one pair's per-token gradients, chosen tokens first.

    Returns the matrix and Tw, the number of chosen response tokens. ``method`` as in :func:`token_map`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    rows = _pair_rows(batch, pair)
    n_w = int(response_positions(batch, rows[0]).numel())
    if method == "head":
        return head_token_gram(model, batch, rows, params), n_w
    return full_token_gram(model, batch, rows, params), n_w


STRATEGIES = ("auto", "blockwise", "copies")
# Copies re-run through one block at a time: about this many hidden-state elements (chunk x length x width).
CHUNK_HIDDEN = 1 << 19


def full_token_gram(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], rows: tuple[int, ...],
                    params: ParamSpec = None, strategy: str = "auto", chunk: int | None = None) -> torch.Tensor:
    """Exact per-token Gram matrix float64 [K, K] of the response tokens of ``rows`` (all of ``rows[0]`` first).

    ``strategy``: ``"blockwise"`` (one forward of the rows, per-token backward one transformer block at a time,
    each block re-run on ``chunk`` copies at a time (default: about ``CHUNK_HIDDEN`` hidden-state elements) and its
    per-copy gradient factors held until the block is reduced), ``"copies"`` (prefix copies through the whole model at once;
    any causal LM), or ``"auto"``: block-wise where the model's layout allows it, copies otherwise (with a
    warning naming the reason).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    if strategy != "copies":
        try:
            copies = token_copies(batch, rows)
            return sequence_gram(model, copies, params=params, forward=Blockwise(copies, chunk)).matrix
        except (BlockwiseUnsupported, NotImplementedError) as e:
            if strategy == "blockwise":
                raise
            warnings.warn(f"token_map(method='full'): block-wise backward not possible ({e}); using prefix "
                          "copies, whose memory grows with the number of tokens", stacklevel=3)
    copies = prefix_copies(batch, rows)
    return sequence_gram(model, copies, params=params, forward=last_position_logits).matrix


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
        engine, k = current_engine(), self.owner.k
        size = self.owner.chunk_size(grad)
        if size >= k:
            return self._run(engine, None, grad)
        outs = []
        for start in range(0, k, size):
            stop = min(k, start + size)
            with engine.examples(start, stop):
                outs.append(self._run(engine, torch.arange(start, stop, device=grad.device), grad[start:stop]))
        engine.reduce_held()
        return torch.cat(outs)

    def _run(self, engine, index: torch.Tensor | None, grad: torch.Tensor) -> torch.Tensor:
        """Re-run the block on the copies ``index`` (all when None) and pull ``grad`` back through it alone."""
        source = self.source if index is None else self.source[index]
        args, kwargs = (self.args, self.kwargs) if index is None else \
            _rows_of((self.args, self.kwargs), self.owner.k, index)
        hidden = self.reduced_in.index_select(0, source).requires_grad_()
        with torch.enable_grad(), engine.segment(key=self):
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
            (g,) = engine.segment_grad(out, [hidden], grad)
        return g


class Blockwise:
    """``forward(model, copies) -> logits`` for :func:`sequence_gram` over :func:`token_copies`.

    The model runs on the K copies (embeddings, final norm and head see K rows), but every block of the
    stack found by :func:`find_blocks` is evaluated on the source rows only and its output repeated per copy;
    only the block's per-row input is kept. In the backward, each block is re-run on chunks of the K copies
    and differentiated on its own (an engine segment per chunk); the chunks' contributions are reduced to the
    block's Gram blocks (cross-chunk terms included) before the next block down, so one chunk's activations and
    one block's per-copy gradient factors are alive at a time.
    The head sees only the predicting position of each copy.
    """

    def __init__(self, copies: Mapping[str, torch.Tensor], chunk: int | None = None):
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
            engine = current_engine()
            if not hidden.requires_grad:    # nothing measured below this block: the backward must still reach it
                hidden = hidden.detach().requires_grad_()
                engine.sources.append(hidden)
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
        if current_engine() is None:
            raise RuntimeError("Blockwise runs inside a sequence_gram pass")
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


def _head_hidden_and_probs(model: torch.nn.Module, batch: Mapping[str, torch.Tensor],
                           rows: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.nn.Module]:
    """Inputs h [K, d] of the output layer, probabilities p [K, V] and targets y [K] at the response tokens of ``rows``."""
    head = model.get_output_embeddings()
    if head is None or not isinstance(head, torch.nn.Linear):
        raise ValueError(f"{type(model).__name__} has no nn.Linear output layer (get_output_embeddings()); "
                         "method='head' needs one")
    seen: dict[str, torch.Tensor] = {}

    def grab(module, args, output):
        seen["h"], seen["z"] = args[0], output

    sub = {k: batch[k][list(rows)] for k in ("input_ids", "attention_mask")}
    handle = head.register_forward_hook(grab)
    try:
        with torch.no_grad():
            mask = sub["attention_mask"]
            out = model(input_ids=sub["input_ids"], attention_mask=mask, position_ids=position_ids_from_mask(mask),
                        use_cache=False)
    finally:
        handle.remove()
    logits = out.logits if hasattr(out, "logits") else out[0]
    if "z" not in seen or seen["z"].shape != logits.shape or not torch.equal(seen["z"], logits):
        raise ValueError(f"{type(model).__name__} transforms the output layer's result before returning logits "
                         "(scaling or soft-capping); the closed form of method='head' does not apply")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    hs, ps, ys = [], [], []
    for j, r in enumerate(rows):
        pos = response_positions(batch, r)
        hs.append(seen["h"][j, pos - 1].to(dtype))
        ps.append(torch.softmax(logits[j, pos - 1].to(dtype), -1))
        ys.append(batch["input_ids"][r, pos])
    return torch.cat(hs), torch.cat(ps), torch.cat(ys), head


def head_token_gram(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], rows: tuple[int, ...],
                    params: ParamSpec = None) -> torch.Tensor:
    """Closed-form per-token Gram matrix float64 [K, K] over the output-layer weight (no backward pass).

    ``<grad l_t, grad l_u> = (e_{y_t} - p_t) . (e_{y_u} - p_u) * (h_t . h_u)``, with
    ``(e_t - p_t) . (e_u - p_u) = [y_t = y_u] - p_t[y_u] - p_u[y_t] + p_t . p_u``. ``params``, if given, must
    select exactly the output-layer weight.
    """
    model = unwrap_model(model)
    if params is not None:
        named = select_params(model, params)
        head = model.get_output_embeddings()
        if head is None or len(named) != 1 or named[0][1] is not head.weight:
            raise ValueError(f"method='head' measures the output-layer weight only; params={params!r} selects "
                             f"{[n for n, _ in named][:5]}")
    with measurement_mode(model, []):
        h, p, y, _ = _head_hidden_and_probs(model, batch, rows)
    py = p[:, y]                                        # py[t, u] = p_t[y_u]
    err = (y[:, None] == y[None, :]).to(p.dtype) - py - py.T + p @ p.T
    return (err.to(torch.float64) * (h @ h.T).to(torch.float64))


def token_map(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    pair: int = 0,
    params: ParamSpec = None,
    method: str = "full",
    tokenizer: Any = None,
) -> pd.DataFrame:
    """Per-token gradient inner products and cosines of one pair, as a tidy frame (THEORY §7).

    Args:
        model: a causal LM (transformers ``*ForCausalLM``; ``"full"`` needs ``logits_to_keep`` support).
        batch: ``input_ids``, ``attention_mask``, ``completion_mask`` [2B, L] (see ``encode_pairs``).
        pair: which pair (rows ``pair`` and ``B + pair``).
        params: parameter selection for ``"full"`` (see ``select_params``); ``"head"`` always measures the
            output-layer weight alone.
        method: ``"full"`` (exact, every selected parameter) or ``"head"`` (closed form, output layer only; for
            tied embeddings the head use of the shared matrix only).
        tokenizer: decodes the token columns when given; otherwise they hold token ids.

    Returns:
        One row per (block, t, u): ``pair``, ``block`` (``"wl"`` chosen x rejected, ``"ww"`` chosen x chosen,
        ``"ll"`` rejected x rejected), ``t`` / ``u`` (0-based response-token index of the row / column
        sequence: for ``wl`` t is chosen and u rejected), ``token_w`` / ``token_u`` (the row / column tokens),
        ``inner`` = ``<grad l_t, grad l_u>`` (float64) and ``cosine``. The ``wl`` block's ``inner`` sums to
        ``<g_w, g_l>``, the ``ww`` / ``ll`` blocks to ``||g_w||^2`` / ``||g_l||^2`` (for ``"full"``).
    """
    gram, n_w = token_gram(model, batch, pair, params, method)
    rows = _pair_rows(batch, pair)
    ids = [batch["input_ids"][r, response_positions(batch, r)].tolist() for r in rows]
    toks = [[tokenizer.decode([i]) for i in side] for side in ids] if tokenizer is not None else ids
    norm = gram.diagonal().clamp(min=0).sqrt()
    cos = gram / (norm[:, None] * norm[None, :])
    sides = {"w": (slice(0, n_w), toks[0]), "l": (slice(n_w, None), toks[1])}
    frames = []
    for block in BLOCKS:
        (rs, rt), (cs, ct) = sides[block[0]], sides[block[1]]
        inner, c = gram[rs, cs], cos[rs, cs]
        t, u = torch.meshgrid(torch.arange(inner.shape[0]), torch.arange(inner.shape[1]), indexing="ij")
        t, u = t.flatten().numpy(), u.flatten().numpy()
        frames.append(pd.DataFrame({
            "pair": pair, "block": block, "t": t, "u": u,
            "token_w": [rt[i] for i in t], "token_u": [ct[i] for i in u],
            "inner": inner.flatten().cpu().numpy(), "cosine": c.flatten().cpu().numpy(),
        }))
    return pd.concat(frames, ignore_index=True)


def _loop_token_grads(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], pair: int,
                      params: ParamSpec = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The slow twin: one backward per response token with a retained graph, flattened gradients [K, P].

    This is the approach of the paper's public heatmap script; ``token_gram`` must agree with ``G G^T``.
    """
    model = unwrap_model(model)
    named = select_params(model, params)
    rows = _pair_rows(batch, pair)
    sub = {k: batch[k][list(rows)] for k in ("input_ids", "attention_mask", "completion_mask")}
    with measurement_mode(model, named):
        lp = token_logps(model_logits(model, sub), sub)
        targets = [(j, int(p)) for j, r in enumerate(rows) for p in response_positions(batch, r)]
        out = []
        for k, (j, p) in enumerate(targets):
            g = torch.autograd.grad(lp[j, p], [q for _, q in named], retain_graph=k + 1 < len(targets),
                                    allow_unused=True)
            out.append(torch.cat([(torch.zeros_like(q) if x is None else x).flatten().to(dtype)
                                  for x, (_, q) in zip(g, named, strict=True)]))
    return torch.stack(out)


def response_hidden(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states summed and averaged over each sequence's response tokens (forward only, THEORY §8).

    The hidden state for response token k is ``hidden_states[-1]`` at the position that predicts it (k - 1), as
    in CHES (Razin et al.). Returns ``(h_sum, h_mean)``, each float32/float64 [2B, d]; no gradients.
    """
    model = unwrap_model(model)
    mask = batch["attention_mask"]
    with measurement_mode(model, []), torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids_from_mask(mask),
                    use_cache=False, output_hidden_states=True)
    h = out.hidden_states[-1]
    dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    pred = batch["completion_mask"][:, 1:].to(dtype)                # position k - 1 predicts token k
    h_sum = torch.einsum("nl,nld->nd", pred, h[:, :-1].to(dtype))
    n = pred.sum(1, keepdim=True)
    if (n == 0).any():
        raise ValueError(f"sequences {(n[:, 0] == 0).nonzero().flatten().tolist()} have no response tokens")
    return h_sum, h_sum / n
