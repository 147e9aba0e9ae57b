"""Per-example gradient contributions of one parameter use, and their inner products.

A *contribution* stands for the per-example gradients ``g_i`` (i = 0..N-1) that one use of one parameter
produces, without necessarily materialising them. Every rule returns contributions, and every contribution
follows one protocol (:class:`Contribution`); the engine and the reductions below rely on nothing else.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Protocol

import torch

from .result import stats_of_gram

# Work on chunks of at most this many float elements when materialising (bounds peak memory).
CHUNK_ELEMS = 1 << 21
# affine_within_blocks forms each pair's position products as three T x T blocks (chosen, rejected, between them) from
# this many positions per sequence on, and as one 2T x 2T block below it (fewer operations; benchmarks/bench_affine.py
# on CPU: the three blocks are 3-10% slower at T = 16-24, 22-53% faster at T = 32-256)
SPLIT_PAIRS = 32
# A parameter with several uses whose per-example gradients total at most this many elements is summed over its uses
# and materialised (SharedParameter), instead of reducing each use and the cross terms between uses apart.
SHARED_DENSE = 1 << 21
# Inner products are summed in float32 over at most this many coordinates, then in float64 (THEORY §6).
PARTIAL_SUM = 1 << 15
# An embedding's Gram goes through its [N, ids, d] rows (one matrix product) rather than key pairs when
# N^2 · distinct ids <= this · key pairs sharing an id (measured break-even on CPU: about 35).
DENSE_SHARING = 16


def _gram64(flat: torch.Tensor) -> torch.Tensor:
    """``flat @ flat.T`` for [N, P]: float32 partial sums over column blocks, accumulated in float64."""
    return _cross64(flat, flat)


def _cross64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` for [N, P] and [M, P] with float32 partial sums accumulated in float64."""
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    for s in range(0, a.shape[1], PARTIAL_SUM):
        out += (a[:, s:s + PARTIAL_SUM] @ b[:, s:s + PARTIAL_SUM].T).to(torch.float64)
    return out


def _row_chunks(index: torch.Tensor, n: int, width: int):
    """Split row ids so that an [n, chunk, width] buffer stays under CHUNK_ELEMS."""
    step = max(1, CHUNK_ELEMS // max(n * width, 1))
    return [index[s:s + step] for s in range(0, index.numel(), step)]


def factored_kind(m: int, n: int, a: int, b: int, mode: str = "auto", pair_m: list[int] | None = None,
                  halves: bool = False) -> str:
    """How a :class:`Factored` contribution computes its Gram: ``"ghost"`` or ``"materialised"``.

    ``m`` positions with a gradient over ``n`` examples, factors of widths ``a`` (L) and ``b`` (R); ``"auto"``
    picks the fewer multiply-adds: ghost ``m^2 (a + b)`` against materialised ``m a b + n^2 a b`` (THEORY §6).
    With ``pair_m`` (the positions of each pair, when only the within-pair entries are asked for), ghost
    ``sum_k m_k^2 (a + b)`` against materialised ``m a b + 2 n a b``; ``halves``: each pair's positions are two equal
    sequences whose three products (each with itself, and with the other) are formed apart from ``SPLIT_PAIRS``
    positions on, ``3/4 sum_k m_k^2 (a + b)`` (:func:`affine_within_blocks`).
    """
    if pair_m is None:
        ghost_cost, mat_cost = m * m * (a + b), m * a * b + n * n * a * b
    else:
        ghost_cost, mat_cost = sum(k * k for k in pair_m) * (a + b), m * a * b + 2 * n * a * b
        if halves and pair_m and pair_m[0] >= 2 * SPLIT_PAIRS:
            ghost_cost = ghost_cost * 3 // 4
    return {"auto": "ghost" if ghost_cost < mat_cost else "materialised",
            "ghost": "ghost", "materialise": "materialised"}[mode]


def embedding_dense(n: int, distinct: int, sharing: int) -> bool:
    """Whether an :class:`EmbeddingRows` Gram goes through its dense [N, ids, d] rows (one matrix product) rather
    than key pairs: ``n`` examples, ``distinct`` token ids, ``sharing`` = key pairs with the same id (sum of the
    squared counts of (example, id) keys per id)."""
    return n * n * distinct <= DENSE_SHARING * sharing


class Contribution(Protocol):
    """The per-example gradients of one use of one parameter, N examples, parameter of ``n_rows`` rows.

    * ``n``, ``n_rows``: examples and parameter rows (the first dimension of the parameter; 1 for a scalar);
    * ``device``: where its tensors live;
    * ``kind``: ``"ghost"``, ``"materialised"`` or ``"sparse"``: how :meth:`gram` computes, for inspection;
    * ``touched``: the parameter rows that can be non-zero (sorted LongTensor), ``None`` for all of them;
    * ``gram()`` -> float64 [N, N], ``<g_i, g_j>`` over this parameter (THEORY §6);
    * ``rows(index)`` -> [N, R, ...], ``g_i`` restricted to the rows ``index`` (sorted LongTensor; ``None``:
      all rows); used for cross terms between uses and for chunked reductions;
    * ``restricted(index)`` -> a contribution that keeps only what ``rows`` needs for those rows;
    * ``dot(delta)`` -> float64 [N], ``<g_i, delta>`` for ``delta`` of the parameter's shape (THEORY §5);
    * ``row_blocks()`` -> the materialised per-example gradients as ``(index, rows [N, r, ...])`` chunks of at
      most about ``CHUNK_ELEMS`` elements, fresh buffers the caller may overwrite, when materialising is how this
      contribution computes anyway; ``None`` otherwise (ghost, sparse). Several views (both geometries, the
      update dots, pair statistics) are then reduced from one materialisation.
    """

    n: int
    n_rows: int
    device: torch.device
    kind: str
    touched: torch.Tensor | None

    def gram(self) -> torch.Tensor: ...

    def rows(self, index: torch.Tensor | None) -> torch.Tensor: ...

    def restricted(self, index: torch.Tensor | None) -> Contribution: ...

    def dot(self, delta: torch.Tensor) -> torch.Tensor: ...

    def row_blocks(self) -> Iterator[tuple[slice | torch.Tensor, torch.Tensor]] | None: ...


class Dense:
    """Materialised per-example gradients ``values`` [N, *param.shape] (vectors, biases, fallbacks)."""

    kind = "materialised"
    touched = None

    def __init__(self, values: torch.Tensor):
        self.values = values
        self.n, self.device = values.shape[0], values.device
        self.n_rows = values.shape[1] if values.dim() > 1 else 1

    def gram(self) -> torch.Tensor:
        return _gram64(self.values.reshape(self.n, -1))

    def rows(self, index: torch.Tensor | None) -> torch.Tensor:
        values = self.values if self.values.dim() > 1 else self.values.unsqueeze(1)     # a scalar: one row
        return values if index is None else values[:, index]

    def restricted(self, index: torch.Tensor | None) -> Dense:
        return self

    def dot(self, delta: torch.Tensor) -> torch.Tensor:
        return self.values.flatten(1).to(torch.float64) @ delta.flatten().to(torch.float64)

    def row_blocks(self) -> Iterator[tuple[slice, torch.Tensor]] | None:
        if self.values.dim() < 2:                 # a scalar parameter: nothing to chunk
            return None
        step = max(1, CHUNK_ELEMS // max(self.values[:, :1].numel(), 1))
        return ((slice(s, s + step), self.values[:, s:s + step].clone()) for s in range(0, self.n_rows, step))


class Factored:
    """Per-example gradients ``g_i = L_i^T R_i`` from per-example factors ``L_i`` [T_i, rows], ``R_i`` [T_i, cols].

    nn.Linear weight [out, in]: L = output gradients, R = inputs. Conv1D weight [in, out]: the reverse.
    Only each sequence's span of positions with a non-zero output gradient is kept (padding and, at the
    head, prompt tokens drop out); the spans are views of the padded tensors, never copies.
    ``mode`` is ``"auto"`` (cheaper of ghost and materialised), ``"ghost"`` or ``"materialise"``.
    """

    touched = None

    def __init__(self, parts: list[tuple[torch.Tensor, torch.Tensor]] | None, n_rows: int, mode: str = "auto",
                 row_ids: torch.Tensor | None = None, padded: tuple | None = None,
                 spans: tuple[torch.Tensor, torch.Tensor, list[int], list[int]] | None = None):
        # per-sequence (L_i, R_i) views: given, or cut from ``spans`` = (left, right, lo, hi) when first needed
        self._parts, self._spans = parts, spans
        self.n_rows = n_rows
        self.row_ids = row_ids                         # param rows of L's columns when restricted
        # (left, right) padded [N, T', ·] over the union of the spans: one batched matmul instead of N small ones
        self.padded = padded
        if parts is not None:
            first_left, first_right = parts[0]
            self.n, m = len(parts), sum(lp.shape[0] for lp, _ in parts)
        else:
            first_left, first_right, lo, hi = spans
            self.n, m = first_left.shape[0], sum(max(0, b - a) for a, b in zip(lo, hi, strict=True))
        a, b = first_left.shape[-1], first_right.shape[-1]
        self.width, self.device, self.dtype = b, first_left.device, first_left.dtype    # width: R's columns
        self.kind = factored_kind(m, self.n, a, b, mode)

    @property
    def parts(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._parts is None:
            left, right, lo, hi = self._spans
            self._parts = [(left[i, a:max(a, b)], right[i, a:max(a, b)])
                           for i, (a, b) in enumerate(zip(lo, hi, strict=True))]
        return self._parts

    @classmethod
    def from_padded(cls, left: torch.Tensor, right: torch.Tensor, valid: torch.Tensor, mode: str = "auto"):
        """Build from padded [N, T, ·] factors and the [N, T] mask of positions with a gradient."""
        pos = torch.arange(valid.shape[1], device=valid.device)
        lo = torch.where(valid, pos, valid.shape[1]).amin(1).tolist()
        hi = torch.where(valid, pos + 1, 0).amax(1).tolist()
        start, stop = min(lo), max(hi)
        # outside its own span a sequence's output gradient (one of the two factors) is exactly zero, so the
        # union span adds only zero terms
        padded = (left[:, start:stop], right[:, start:stop]) if stop > start else None
        return cls(None, left.shape[-1], mode, padded=padded, spans=(left, right, lo, hi))

    def gram(self) -> torch.Tensor:
        if self.kind == "ghost":
            return self._ghost()
        out = torch.zeros(self.n, self.n, dtype=torch.float64, device=self.device)
        step = max(1, CHUNK_ELEMS // max(self.n * self.width, 1))
        for s in range(0, self.n_rows, step):
            out += _gram64(self._per_example(slice(s, s + step), check=False).flatten(1))
        if self.padded is not None and not torch.isfinite(out).all():
            self.padded = None          # a non-finite padded activation times a zero gradient: redo span by span
            return self.gram()
        return out

    def _ghost(self) -> torch.Tensor:
        """K_ij = sum over positions t of i, s of j of (L L^T)_ts (R R^T)_ts (THEORY §6)."""
        left = torch.cat([lp for lp, _ in self.parts])
        right = torch.cat([rp for _, rp in self.parts])
        m = left.shape[0]
        seg = torch.repeat_interleave(torch.arange(self.n, device=left.device),
                                      torch.tensor([lp.shape[0] for lp, _ in self.parts], device=left.device))
        onehot = torch.zeros(self.n, m, dtype=torch.float64, device=left.device)
        onehot[seg, torch.arange(m, device=left.device)] = 1.0
        out = torch.zeros(self.n, self.n, dtype=torch.float64, device=left.device)
        step = max(1, CHUNK_ELEMS // max(m, 1))
        for s in range(0, m, step):
            prod = (left[s:s + step] @ left.T) * (right[s:s + step] @ right.T)
            out += onehot[:, s:s + step] @ prod.to(torch.float64) @ onehot.T
        return out

    def _per_example(self, cols, check: bool = True) -> torch.Tensor:
        """Materialised rows [N, r, cols] of the per-example gradients; ``cols`` indexes L's columns.

        The batched path multiplies padded positions too; a non-finite activation there times a zero gradient
        would be NaN, so the result is checked (``check=False``: the caller checks the reduced result instead).
        """
        if self.padded is not None:
            left, right = self.padded
            out = torch.bmm(left[..., cols].transpose(1, 2), right)
            if not check or torch.isfinite(out.sum()):
                return out
        first = self.parts[0][0][:, cols]
        out = torch.zeros(self.n, first.shape[-1], self.width, dtype=first.dtype, device=first.device)
        for i, (lp, rp) in enumerate(self.parts):
            if lp.shape[0]:
                torch.matmul(lp[:, cols].T, rp, out=out[i])
        return out

    def _local(self, index):
        if self.row_ids is None or isinstance(index, slice):
            return slice(None) if index is None else index
        return slice(None) if index is None else torch.searchsorted(self.row_ids, index)

    def rows(self, index: torch.Tensor | None) -> torch.Tensor:
        return self._per_example(self._local(index))

    def restricted(self, index: torch.Tensor | None) -> Factored:
        """Keep only L's columns ``index`` (one flat copy), e.g. the head's vocabulary rows of the batch's tokens."""
        if index is None:
            return self
        flat = torch.cat([lp[:, index] for lp, _ in self.parts])
        parts, s = [], 0
        for lp, rp in self.parts:
            parts.append((flat[s:s + lp.shape[0]], rp))
            s += lp.shape[0]
        return Factored(parts, index.numel(), "materialise", row_ids=index)

    def dot(self, delta: torch.Tensor) -> torch.Tensor:
        """<g_i, D> = sum_t L_t^T D R_t per example (THEORY §5): no per-example gradient is formed."""
        d = delta.to(self.dtype)
        if self.padded is not None:                # one batched product over the union span
            left, right = self.padded
            out = ((left @ d) * right).sum((1, 2))
            if torch.isfinite(out).all():          # else a non-finite padded activation: span by span
                return out.to(torch.float64)
        return torch.stack([((lp @ d) * rp).sum().to(torch.float64) for lp, rp in self.parts])

    def row_blocks(self) -> Iterator[tuple[slice | torch.Tensor, torch.Tensor]] | None:
        if self.kind != "materialised":
            return None
        step = max(1, CHUNK_ELEMS // max(self.n * self.width, 1))
        # each block is a fresh buffer (a batched product), which the caller may scale in place
        return ((index, self.rows(index)) for index in
                (slice(s, s + step) if self.row_ids is None else self.row_ids[s:s + step]
                 for s in range(0, self.n_rows, step)))


def _field_of(cached: str, i: int) -> property:
    """A read-only attribute that is item ``i`` of the tuple a ``cached_property`` named ``cached`` forms when first
    read (several fields formed together, lazily)."""
    return property(lambda self: getattr(self, cached)[i])


class EmbeddingRows:
    """Per-example gradients of an embedding lookup, sparse by token id: ``g_i[v] = sum_{t: id_t = v} delta_t``.

    Stored as one summed vector per distinct (sequence, token id) key, so memory and work scale with the
    tokens of the batch, never with the vocabulary.
    """

    kind = "sparse"

    def __init__(self, ids: torch.Tensor, grads: torch.Tensor, valid: torch.Tensor, n_rows: int):
        self.n, self.n_rows, self.device, self.ids = ids.shape[0], n_rows, grads.device, ids
        # the keys are formed when first needed: a use materialised whole (a small tied embedding, SharedParameter)
        # never needs them
        self._lookup: tuple | None = (ids, grads, valid)

    @functools.cached_property
    def _keys(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, grads, valid = self._lookup
        seg = valid.nonzero()[:, 0]
        ids_v, grads_v = ids[valid], grads[valid]
        width = int(ids.max()) + 1 if ids.numel() else 1
        keys, inverse = torch.unique(seg * width + ids_v, return_inverse=True)
        sums = torch.zeros(keys.numel(), grads.shape[-1], dtype=grads.dtype, device=grads.device)
        sums.index_add_(0, inverse, grads_v)
        self._lookup = None
        return keys // width, keys % width, sums

    key_ex, key_id, sums = (_field_of("_keys", i) for i in range(3))

    @functools.cached_property
    def touched(self) -> torch.Tensor:
        return torch.unique(self.ids)

    def rows(self, index: torch.Tensor | None) -> torch.Tensor:
        if index is None and self._lookup is not None:     # every row: added straight from the positions
            ids, grads, valid = self._lookup
            out = torch.zeros(self.n, self.n_rows, grads.shape[-1], dtype=grads.dtype, device=grads.device)
            flat = valid.nonzero()[:, 0] * self.n_rows + ids[valid]
            return out.view(-1, grads.shape[-1]).index_add_(0, flat, grads[valid]).view_as(out)
        if index is None:
            index = torch.arange(self.n_rows, device=self.sums.device)
        pos = torch.searchsorted(index, self.key_id).clamp(max=max(index.numel() - 1, 0))
        keep = index[pos] == self.key_id if index.numel() else torch.zeros_like(pos, dtype=torch.bool)
        out = torch.zeros(self.n, index.numel(), self.sums.shape[-1], dtype=self.sums.dtype, device=self.sums.device)
        out[self.key_ex[keep], pos[keep]] = self.sums[keep]
        return out

    def restricted(self, index: torch.Tensor | None) -> EmbeddingRows:
        return self

    def gram(self) -> torch.Tensor:
        """Sum of <sums_k, sums_k'> over key pairs with the same token id (work ~ pairs sharing an id); when many
        sequences share the ids (positions, common tokens), one product of the rows of the ids in the batch."""
        order = torch.argsort(self.key_id, stable=True)
        ids, ex, sums = self.key_id[order], self.key_ex[order], self.sums[order]
        unique, counts = torch.unique_consecutive(ids, return_counts=True)
        if embedding_dense(self.n, unique.numel(), int((counts * counts).sum())):
            out = torch.zeros(self.n, self.n, dtype=torch.float64, device=sums.device)
            for chunk in _row_chunks(unique, self.n, sums.shape[-1]):
                out += _gram64(self.rows(chunk).flatten(1))
            return out
        starts = torch.cumsum(counts, 0) - counts
        group = torch.repeat_interleave(torch.arange(counts.numel(), device=ids.device), counts)
        c_key, start_key = counts[group], starts[group]
        p = torch.repeat_interleave(torch.arange(ids.numel(), device=ids.device), c_key)
        q = start_key[p] + torch.arange(p.numel(), device=ids.device) - torch.repeat_interleave(
            torch.cumsum(c_key, 0) - c_key, c_key)
        out = torch.zeros(self.n * self.n, dtype=torch.float64, device=sums.device)
        step = max(1, CHUNK_ELEMS // max(sums.shape[-1], 1))
        for s in range(0, p.numel(), step):
            pp, qq = p[s:s + step], q[s:s + step]
            out.index_add_(0, ex[pp] * self.n + ex[qq], (sums[pp] * sums[qq]).sum(-1).to(torch.float64))
        return out.view(self.n, self.n)

    def dot(self, delta: torch.Tensor) -> torch.Tensor:
        per_key = (self.sums * delta.to(self.sums.dtype)[self.key_id]).sum(-1).to(torch.float64)
        return torch.zeros(self.n, dtype=torch.float64, device=per_key.device).index_add_(0, self.key_ex, per_key)

    def row_blocks(self) -> None:
        return None


class AlignedRows:
    """Per-example gradients of an embedding lookup whose ids are one row shared by every sequence, without repeats
    (position ids broadcast over the batch): ``g_i[ids_t] = delta_it``, so the per-example gradient over the touched
    rows is the output gradient itself and its Gram one matrix product (no keys to sort and sum, as
    :class:`EmbeddingRows` needs for token ids)."""

    kind = "sparse"

    def __init__(self, ids: torch.Tensor, grads: torch.Tensor, n_rows: int):
        self.ids, self.grads = ids, grads
        self.n, self.n_rows, self.device = grads.shape[0], n_rows, grads.device

    @functools.cached_property
    def _sorted(self) -> tuple[torch.Tensor, torch.Tensor]:
        order = torch.argsort(self.ids)
        return self.ids[order], self.grads[:, order]                      # sorted ids, [N, T, d]

    touched, values = (_field_of("_sorted", i) for i in range(2))

    def gram(self) -> torch.Tensor:                     # over every position, in any order: no sort needed
        return _gram64(self.grads.reshape(self.n, -1))

    def rows(self, index: torch.Tensor | None) -> torch.Tensor:
        if index is None:
            index = torch.arange(self.n_rows, device=self.device)
        pos = torch.searchsorted(index, self.touched).clamp(max=max(index.numel() - 1, 0))
        keep = index[pos] == self.touched if index.numel() else torch.zeros_like(pos, dtype=torch.bool)
        out = torch.zeros(self.n, index.numel(), self.values.shape[-1], dtype=self.values.dtype, device=self.device)
        out[:, pos[keep]] = self.values[:, keep]
        return out

    def restricted(self, index: torch.Tensor | None) -> AlignedRows:
        return self

    def dot(self, delta: torch.Tensor) -> torch.Tensor:
        return (self.values * delta[self.touched].to(self.values.dtype)).sum((1, 2)).to(torch.float64)

    def row_blocks(self) -> None:
        return None


class Scaled:
    """A contribution seen through a diagonal metric: ``g_i -> scale * g_i`` (e.g. sqrt of Adam's P, THEORY §5).

    ``<scale g_i, scale g_j> = g_i^T P g_j`` with ``P = scale^2``; always materialised, chunked over rows.
    """

    kind = "materialised"

    def __init__(self, contrib, scale: torch.Tensor):
        self.contrib, self.scale = contrib, scale
        self.touched = contrib.touched
        self.n, self.n_rows, self.device = contrib.n, contrib.n_rows, contrib.device

    def rows(self, index: torch.Tensor | None) -> torch.Tensor:
        rows = self.contrib.rows(index)
        scale = self.scale if index is None else self.scale[index]
        return rows * scale.to(rows.dtype)

    def restricted(self, index: torch.Tensor | None) -> Scaled:
        return Scaled(self.contrib.restricted(index), self.scale)

    def gram(self) -> torch.Tensor:
        index = self.touched if self.touched is not None else torch.arange(self.scale.shape[0],
                                                                            device=self.scale.device)
        out = torch.zeros(self.n, self.n, dtype=torch.float64, device=self.scale.device)
        for chunk in _row_chunks(index, self.n, max(1, self.scale[0].numel())):
            out += _gram64(self.rows(chunk).flatten(1))
        return out

    def dot(self, delta: torch.Tensor) -> torch.Tensor:
        return self.contrib.dot(self.scale.to(delta.dtype) * delta)

    def row_blocks(self) -> None:
        return None


def dual_gram(contrib: Contribution, scale: torch.Tensor | None, delta: torch.Tensor | None = None,
              weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(<g_i, g_j>, g_i^T P g_j, <g_i, delta>)`` of one use with ``P = scale^2``, materialising each per-example
    row chunk only once. The preconditioned Gram is ``None`` without ``scale``, the dots (float64 [N]) ``None``
    without ``delta``. With ``weights``, each Gram matrix is reduced to :func:`pair_stats` (float64 [3, N]).

    A contribution that does not materialise anyway (ghost, sparse embeddings: ``row_blocks()`` is ``None``) gives
    each view apart.
    """
    n = contrib.n
    if weights is None:
        reduce, shape = _gram64, (n, n)
    else:
        def reduce(flat):
            return pair_stats(flat, weights)
        shape = (3, n)
    blocks = None if scale is None and delta is None and weights is None else contrib.row_blocks()
    if blocks is None:
        grams = [contrib.gram(), None if scale is None else Scaled(contrib, scale).gram()]
        if weights is not None:
            grams = [None if g is None else stats_of_gram(g, weights) for g in grams]
        return grams[0], grams[1], None if delta is None else contrib.dot(delta)
    plain = scaled = dot = None
    for index, rows in blocks:                        # rows: a fresh buffer, scaled in place below
        flat = rows.flatten(1)
        if plain is None:
            plain = torch.zeros(*shape, dtype=torch.float64, device=rows.device)
            scaled = None if scale is None else torch.zeros_like(plain)
            dot = None if delta is None else torch.zeros(n, dtype=torch.float64, device=rows.device)
        plain += reduce(flat)
        # (the update as an extra row of the same Gram product would be slower: 33 rows cost 1.6x 32 on CPU)
        if delta is not None:
            dot += _cross64(flat, delta[index].reshape(1, -1).to(rows.dtype))[:, 0]
        if scale is not None:
            scaled += reduce(rows.mul_(scale[index].to(rows.dtype)).flatten(1))
    return plain, scaled, dot


def weighted_sum(contrib: Contribution, coef: torch.Tensor) -> torch.Tensor | None:
    """``sum_i coef_i g_i`` of a contribution's per-example gradients [N, ...]: the gradient of ``sum_i coef_i s_i``
    with respect to the parameter (its shape up to a reshape), formed from the factors without materialising the
    per-example gradients (for a linear layer ``(coef * L)^T R``, the weight gradient autograd would compute).
    ``None`` for a contribution kind this cannot sum (the caller then backpropagates instead)."""
    if isinstance(contrib, Dense):
        return torch.tensordot(coef.to(contrib.values.dtype), contrib.values, dims=1)
    if isinstance(contrib, Factored) and contrib.row_ids is None:
        if contrib.padded is not None:
            left, right = contrib.padded
            c = coef.to(left.dtype).view(-1, 1, 1)
            out = (left * c).flatten(0, 1).T @ right.flatten(0, 1)
            if torch.isfinite(out).all():           # else a non-finite padded activation times a zero gradient
                return out
        first = contrib.parts[0][0]
        out = torch.zeros(first.shape[-1], contrib.width, dtype=first.dtype, device=first.device)
        for ci, (lp, rp) in zip(coef.to(first.dtype), contrib.parts, strict=True):
            if lp.shape[0]:
                out += ci * (lp.T @ rp)
        return out
    if isinstance(contrib, EmbeddingRows):
        out = torch.zeros(contrib.n_rows, contrib.sums.shape[-1], dtype=contrib.sums.dtype, device=contrib.device)
        return out.index_add_(0, contrib.key_id, contrib.sums * coef.to(contrib.sums.dtype)[contrib.key_ex, None])
    if isinstance(contrib, AlignedRows):
        out = torch.zeros(contrib.n_rows, contrib.values.shape[-1], dtype=contrib.values.dtype, device=contrib.device)
        summed = (contrib.values * coef.to(contrib.values.dtype).view(-1, 1, 1)).sum(0)
        return out.index_add_(0, contrib.touched, summed)
    return None


def block_grams(contrib: Contribution, groups: int, mode: str = "auto", within: bool = False
                ) -> tuple[torch.Tensor, list[str]] | None:
    """The Gram matrices of ``groups`` calls batched into one contribution of ``groups * N`` examples (call ``c``'s
    examples are ``c*N .. c*N+N-1``): float64 [groups, N, N], the diagonal blocks only, and how each call's block
    was computed. The ghost/materialised choice is made per call, as :func:`factored_kind` makes it for one call.

    ``within``: each call's N = 2B examples are B pairs (chosen ``k``, rejected ``B + k``) and only each example's
    squared norm and each pair's inner product are asked for: factors are reduced pair by pair (the ghost identity
    over a pair's 2T positions instead of the call's 2BT) and the entries between pairs are NaN (not measured);
    materialised rows (``Dense``) still give the whole blocks, which cost no more.

    ``None`` for a contribution this cannot batch (sparse rows, factors without a padded form) or whose batched
    product is not finite (a non-finite padded activation times a zero gradient): the caller then reduces each
    call on its own."""
    n = contrib.n // groups
    if within and n % 2:
        raise ValueError(f"within-pair blocks need an even number of examples per call, got {n}")
    if isinstance(contrib, Dense) and contrib.values.dim() > 1:
        return _block_gram64(contrib.values.reshape(groups, n, -1)), [contrib.kind] * groups
    if not isinstance(contrib, Factored) or contrib.padded is None or contrib.row_ids is not None:
        return None
    left, right = contrib.padded
    _, _, lo, hi = contrib._spans
    widths = [max(0, y - x) for x, y in zip(lo, hi, strict=True)]
    b = n // 2

    def kind(c: int) -> str:
        w = widths[c * n:(c + 1) * n]
        return factored_kind(sum(w), n, left.shape[-1], right.shape[-1], mode,
                             [w[k] + w[b + k] for k in range(b)] if within else None)

    kinds = [kind(c) for c in range(groups)]
    reduce = {"materialised": _materialised_blocks, "ghost": _ghost_blocks}
    if len(set(kinds)) == 1:                        # the common case: every call reduced the same way
        out = reduce[kinds[0]](left, right, groups, within)
    else:
        out = torch.zeros(groups, n, n, dtype=torch.float64, device=left.device)
        for k in set(kinds):
            calls = torch.tensor([c for c in range(groups) if kinds[c] == k], device=left.device)
            rows = (calls[:, None] * n + torch.arange(n, device=left.device)).flatten()
            out[calls] = reduce[k](left[rows], right[rows], calls.numel(), within)
    finite = torch.isfinite(out.diagonal(0, 1, 2)).all() if within else torch.isfinite(out).all()
    return (out, kinds) if finite else None


def _materialised_blocks(left: torch.Tensor, right: torch.Tensor, groups: int, within: bool = False) -> torch.Tensor:
    """Per-call Gram [groups, N, N] of padded factors [groups * N, T, a], [groups * N, T, b]: per-example gradients
    [groups * N, a, b] formed in chunks of L's columns (``within``: their products within pairs only, NaN between
    pairs, see :func:`_from_pairs`)."""
    n = left.shape[0] // groups
    out = torch.zeros(*((groups * n // 2, 2, 2) if within else (groups, n, n)), dtype=torch.float64,
                      device=left.device)
    step = max(1, CHUNK_ELEMS // max(left.shape[0] * right.shape[-1], 1))
    for s in range(0, left.shape[-1], step):
        rows = torch.bmm(left[..., s:s + step].transpose(1, 2), right)
        out += _block_gram64(_pairwise(rows, groups).flatten(2) if within else rows.reshape(groups, n, -1))
    return _from_pairs(out, groups) if within else out


def _ghost_blocks(left: torch.Tensor, right: torch.Tensor, groups: int, within: bool = False) -> torch.Tensor:
    """Per-call Gram [groups, N, N] without per-example gradients: K_ij = sum over positions t of i, s of j of
    (L L^T)_ts (R R^T)_ts (THEORY §6), the position products formed for a few sequences i at a time
    (``within``: :func:`_ghost_pair_blocks`)."""
    if within:
        return _ghost_pair_blocks(left, right, groups)
    n, span = left.shape[0] // groups, left.shape[1]
    lf, rf = left.reshape(groups, n * span, -1), right.reshape(groups, n * span, -1)
    out = torch.empty(groups, n, n, dtype=torch.float64, device=left.device)
    step = max(1, CHUNK_ELEMS // max(groups * n * span * span, 1))          # sequences i per chunk
    for s in range(0, n, step):
        k = min(step, n - s)
        rows = slice(s * span, (s + k) * span)
        prod = torch.bmm(lf[:, rows], lf.transpose(1, 2)) * torch.bmm(rf[:, rows], rf.transpose(1, 2))
        out[:, s:s + k] = prod.to(torch.float64).view(groups, k, span, n, span).sum((2, 4))
    return out


def _pairwise(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``groups`` calls' examples [groups * 2B, ...] (each call's B chosen, then its B rejected) as pairs
    [groups * B, 2, ...]: pair ``k`` of call ``c`` is examples ``c*2B + k`` and ``c*2B + B + k``."""
    b = x.shape[0] // groups // 2
    return x.reshape(groups, 2, b, *x.shape[1:]).transpose(1, 2).reshape(groups * b, 2, *x.shape[1:])


def _from_pairs(blocks: torch.Tensor, groups: int) -> torch.Tensor:
    """Per-pair Gram blocks [groups * B, 2, 2] as ``groups`` Gram matrices [2B, 2B] (float64) holding them, NaN at
    the entries between different pairs (not measured)."""
    b = blocks.shape[0] // groups
    out = torch.full((groups, 2 * b, 2 * b), float("nan"), dtype=torch.float64, device=blocks.device)
    # entry (s*B + k, s'*B + k) of call c = side s and s' of pair k: the diagonal over (k, k') of [c, s, k, s', k']
    out.view(groups, 2, b, 2, b).diagonal(0, 2, 4).copy_(blocks.view(groups, b, 2, 2).permute(0, 2, 3, 1))
    return out


def _ghost_pair_blocks(left: torch.Tensor, right: torch.Tensor, groups: int) -> torch.Tensor:
    """:func:`_ghost_blocks` within pairs only: per pair, the position products over its 2T positions (NaN between
    pairs, see :func:`_from_pairs`)."""
    span = left.shape[1]
    lp = _pairwise(left, groups).reshape(-1, 2 * span, left.shape[-1])       # [groups * B, 2T, a]
    rp = _pairwise(right, groups).reshape(-1, 2 * span, right.shape[-1])
    out = torch.empty(lp.shape[0], 2, 2, dtype=torch.float64, device=left.device)
    step = max(1, CHUNK_ELEMS // max(4 * span * span, 1))                     # pairs per chunk
    for s in range(0, lp.shape[0], step):
        ls, rs = lp[s:s + step], rp[s:s + step]
        prod = torch.bmm(ls, ls.transpose(1, 2)) * torch.bmm(rs, rs.transpose(1, 2))
        out[s:s + step] = _pair_sums64(prod, span)
    return _from_pairs(out, groups)


def _pair_sums64(prod: torch.Tensor, span: int) -> torch.Tensor:
    """Position products [P, 2T, 2T] of pairs (chosen positions, then rejected) summed into their [P, 2, 2] blocks, in
    float64."""
    return prod.to(torch.float64).view(-1, 2, span, 2, span).sum((2, 4))


def pair_products(t: int) -> int:
    """Position products per pair that :func:`affine_within_blocks` forms for sequences of ``t`` positions."""
    return 3 * t * t if t >= SPLIT_PAIRS else 4 * t * t


def affine_within_blocks(inputs: list[torch.Tensor], grads: list[torch.Tensor], dtype: torch.dtype,
                         row_scale: torch.Tensor | None = None, ordered: bool = True
                         ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Within-pair Gram blocks of ``C`` calls of affine layers (y = x W + b) on one pass of 2B sequences, B pairs
    (chosen ``k``, rejected ``B + k``), all at once: a few stacked products for the whole pass instead of one
    reduction per call.

    ``inputs[c]`` [2B, T, a_c] and ``grads[c]`` [2B, T, d_c] (every call over the same T positions), in ``dtype``
    once stacked; each sequence's output gradients multiplied by ``row_scale[i]`` (if given) before any product.
    Returns float64 ``(weight, bias)`` [C, 2B, 2B], each call's Gram matrix of the per-example gradients of its
    weight (the ghost identity, THEORY §6: ``<g_i, g_j> = sum_ts (X_i X_j^T)_ts (G_i G_j^T)_ts``) and of its bias (the
    output gradients summed over positions: ``sum_ts (G_i G_j^T)_ts``), with NaN between different pairs (not
    measured), as :func:`block_grams` gives them within pairs. From ``SPLIT_PAIRS`` positions on, per pair three
    T x T position products: the chosen sequence's with itself, the rejected one's with itself and the chosen one's
    with the rejected one's (3 T^2 instead of the (2T)^2 of the pair's positions together, which is fewer operations
    at small T). ``None`` when a squared norm is not finite (a non-finite input at a position without a gradient,
    which the per-call reductions skip): the caller reduces the calls otherwise. Factors of equal width are stacked
    into one product per kind of block; memory grows as ``C B (2T)^2``, which the caller bounds. ``ordered=False``:
    the calls in some order of the function's choosing (for a caller that sums them)."""
    c, n, t = len(inputs), inputs[0].shape[0], inputs[0].shape[1]
    b = n // 2
    split = t >= SPLIT_PAIRS
    products = _split_products if split else _pair_products
    x, order = products(inputs, None, b, dtype)
    g, g_order = products(grads, row_scale, b, dtype)
    if g_order != order:                        # the output gradients' products in the inputs' order of calls
        at = {call: j for j, call in enumerate(g_order)}
        index = torch.tensor([at[call] for call in order], device=g[0].device)
        g = [p.index_select(p.dim() - 4, index) for p in g]        # the calls' dimension of each kind
    if split:
        def blocks(own: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
            """[C * B, 2, 2] per call and pair from its products summed over positions (float64 sums)."""
            own, cross = own.to(torch.float64).sum((-2, -1)), cross.to(torch.float64).sum((-2, -1))
            return torch.stack([own[0], cross, cross, own[1]], -1).view(c * b, 2, 2)

        weight, bias = blocks(x[0] * g[0], x[1] * g[1]), blocks(*g)
    else:
        weight = _pair_sums64((x[0] * g[0]).view(c * b, 2 * t, 2 * t), t)
        bias = _pair_sums64(g[0].view(c * b, 2 * t, 2 * t), t)
    both = _from_pairs(torch.cat([weight, bias]), 2 * c)
    if not torch.isfinite(both.diagonal(0, 1, 2)).all():
        return None
    if ordered and order != list(range(c)):     # back to the calls' order (the small results only)
        back = torch.tensor(order, device=both.device).argsort()
        return both[:c].index_select(0, back), both[c:].index_select(0, back)
    return both[:c], both[c:]


def _width_classes(xs: list[torch.Tensor]) -> list[list[int]]:
    """The calls grouped by the width of their factor (stacked into one product each)."""
    classes: dict[int, list[int]] = {}
    for i, x in enumerate(xs):
        classes.setdefault(x.shape[-1], []).append(i)
    return list(classes.values())


def _pair_products(xs: list[torch.Tensor], scale: torch.Tensor | None, b: int, dtype: torch.dtype
                   ) -> tuple[list[torch.Tensor], list[int]]:
    """``[K]``, K [C, B, 2T, 2T]: per call and pair, the products of the pair's 2T position rows (chosen, then
    rejected); the calls grouped by width, their order returned with them."""
    parts, order, t = [], [], xs[0].shape[1]
    for idx in _width_classes(xs):
        # pair-major: pair k of a call is its rows k and B + k, side by side [B, 2, T, d]
        s = torch.cat([xs[i].unflatten(0, (2, b)).transpose(0, 1) for i in idx]).to(dtype)
        if scale is not None:
            s.view(len(idx), b, 2, t, -1).mul_(scale.to(dtype).view(2, b).T.reshape(1, b, 2, 1, 1))
        s = s.view(len(idx) * b, 2 * t, -1)
        parts.append(torch.bmm(s, s.transpose(1, 2)))
        order.extend(idx)
    return [(torch.cat(parts) if len(parts) > 1 else parts[0]).view(len(xs), b, 2 * t, 2 * t)], order


def _split_products(xs: list[torch.Tensor], scale: torch.Tensor | None, b: int, dtype: torch.dtype
                    ) -> tuple[list[torch.Tensor], list[int]]:
    """``[own, cross]``: per call and pair, the position products within its chosen and within its rejected sequence
    (own [2, C, B, T, T]) and between the two (cross [C, B, T, T]); the calls grouped by width, their order returned
    with them."""
    own, cross, order, t = [], [], [], xs[0].shape[1]
    for idx in _width_classes(xs):
        # side-major: the chosen halves of the width's calls, then their rejected halves [2, L, B, T, d]
        s = torch.cat([xs[i][:b] for i in idx] + [xs[i][b:] for i in idx]).to(dtype)
        if scale is not None:
            s.view(2, len(idx), b, -1).mul_(scale.to(dtype).view(2, 1, b, 1))
        own.append(torch.bmm(s, s.transpose(1, 2)).view(2, len(idx), b, t, t))
        sides = s.view(2, len(idx) * b, t, -1)
        cross.append(torch.bmm(sides[0], sides[1].transpose(1, 2)).view(len(idx), b, t, t))
        order.extend(idx)
    if len(own) == 1:
        return [own[0], cross[0]], order
    return [torch.cat(own, 1), torch.cat(cross)], order


def dense_total(contribs: list, groups: int) -> torch.Tensor | None:
    """The sum over ``groups`` batched calls (as in :func:`block_grams`) and over ``contribs`` of their Gram blocks,
    float64 [N, N], when every contribution is materialised (``Dense`` rows): one product of each example's rows of
    all calls and parameters side by side. ``None`` otherwise."""
    if not all(isinstance(c, Dense) and c.values.dim() > 1 for c in contribs):
        return None
    n = contribs[0].n // groups
    rows = torch.cat([c.values.reshape(groups, n, -1) for c in contribs], -1) if len(contribs) > 1 else \
        contribs[0].values.reshape(groups, n, -1)
    return _gram64(rows.transpose(0, 1).reshape(n, -1))


def _block_gram64(x: torch.Tensor) -> torch.Tensor:
    """``x @ x.T`` per block for [G, N, P]: float32 partial sums over column blocks, accumulated in float64."""
    out = torch.zeros(x.shape[0], x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[2], PARTIAL_SUM):
        part = x[..., s:s + PARTIAL_SUM]
        out += torch.bmm(part, part.transpose(1, 2)).to(torch.float64)
    return out


def pair_stats(flat: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """float64 [3, N] from per-example rows ``flat`` [N, P] of N = 2B sequences (pair k = rows k and B + k):
    ``||g_i||^2``, ``<g_i, g_partner(i)>`` and ``(K c)_i = <g_i, sum_j c_j g_j>`` with ``c = weights`` [N].

    O(N P) work instead of the O(N^2 P) of the whole Gram matrix; float32 partial sums over column blocks,
    accumulated in float64, as in the Gram products.
    """
    n, b = flat.shape[0], flat.shape[0] // 2
    out = torch.zeros(3, n, dtype=torch.float64, device=flat.device)
    c = weights.to(device=flat.device, dtype=flat.dtype)
    for s in range(0, flat.shape[1], PARTIAL_SUM):
        x = flat[:, s:s + PARTIAL_SUM]
        out[0] += torch.linalg.vector_norm(x, dim=1).to(torch.float64).square()    # one read (vecdot(x, x): two)
        cross = torch.linalg.vecdot(x[:b], x[b:]).to(torch.float64)
        out[1, :b] += cross
        out[1, b:] += cross
        out[2] += (x @ (c @ x)).to(torch.float64)
    return out


def _intersect(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    both = torch.cat([a, b]).unique(return_counts=True)
    return both[0][both[1] > 1]


def _union(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    if not parts or any(p is None for p in parts):
        return None
    return torch.unique(torch.cat(parts))


def dense_enough(n: int, numel: int) -> bool:
    """Whether the per-example gradients of ``n`` examples of a parameter of ``numel`` elements are small enough to be
    materialised whole (``SHARED_DENSE``)."""
    return n * numel <= SHARED_DENSE


class SharedParameter:
    """Accumulates a parameter used more than once in the forward pass (tied embeddings, reused layers).

    Its per-example gradient is the sum over uses, so ``K = sum_u K_u + sum_{u != v} <c_u, c_v>``.
    Each use's own Gram is computed when it arrives; for the cross terms each use keeps only the rows
    that another use can touch (for a tied head: the vocabulary rows of the batch's tokens). A parameter whose
    per-example gradients total at most ``SHARED_DENSE`` elements (``row_numel``: elements per parameter row) is
    instead summed over its uses, materialised, and its Gram is one product (fewer, larger operations).
    """

    def __init__(self, touched_per_use: list, n_rows: int, row_numel: int | None = None):
        # per use: its touched rows (None: all), or a function of nothing returning them (formed when first needed)
        self.touched, self.n_rows, self.row_numel = touched_per_use, n_rows, row_numel
        self.kept: list[tuple[torch.Tensor | None, object]] = []
        self.own = None
        self.dense: bool | None = None              # decided by the number of examples, at the first use
        self.summed: torch.Tensor | None = None     # dense: the whole per-example gradients added so far

    def is_dense(self, n: int) -> bool:
        """Whether the per-example gradients of ``n`` examples are small enough to be summed over the uses whole."""
        if self.dense is None:
            self.dense = self.row_numel is not None and dense_enough(n, self.n_rows * self.row_numel)
        return self.dense

    def add_rows(self, rows: torch.Tensor) -> None:
        """Add one use's whole per-example gradients [N, n_rows, ...] (a dense parameter only); ``rows`` may be
        :attr:`summed` itself, already added to in place."""
        if not self.is_dense(rows.shape[0]):
            raise ValueError("add_rows needs a parameter small enough to be materialised (is_dense)")
        if self.summed is None:
            self.summed = rows
        elif rows is not self.summed:
            self.summed = self.summed + rows

    def add(self, use: int, contrib) -> None:
        if self.is_dense(contrib.n):                # summed and reduced at gram()
            self.kept.append((None, contrib))
            return
        others = _union([self._touched(k) for k in range(len(self.touched)) if k != use])
        index = _intersect(contrib.touched, others)
        self.kept.append((index, contrib.restricted(index)))
        g = contrib.gram()
        self.own = g if self.own is None else self.own + g

    def _touched(self, use: int) -> torch.Tensor | None:
        t = self.touched[use]
        if callable(t):
            t = self.touched[use] = t()
        return t

    def gram(self) -> torch.Tensor:
        if self.dense:
            total = self.summed
            for _, c in self.kept:
                total = c.rows(None) if total is None else total + c.rows(None)
            return _gram64(total.flatten(1))
        out = self.own.clone()
        for u in range(len(self.kept)):
            for v in range(u + 1, len(self.kept)):
                (iu, cu), (iv, cv) = self.kept[u], self.kept[v]
                common = _intersect(iu, iv)
                if common is None:
                    common = torch.arange(self.n_rows, device=out.device)
                width = max(1, cu.rows(common[:1]).shape[-1]) if common.numel() else 1
                for chunk in _row_chunks(common, cu.n, width):
                    cross = _cross64(cu.rows(chunk).flatten(1), cv.rows(chunk).flatten(1))
                    out += cross + cross.T
        return out
