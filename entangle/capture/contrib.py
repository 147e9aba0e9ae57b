"""Per-example gradient contributions of one parameter use, and their inner products.

A *contribution* stands for the per-example gradients ``g_i`` (i = 0..N-1) that one use of one
parameter produces, without necessarily materialising them. It offers two operations:

* ``gram()``        -> float64 [N, N], ``<g_i, g_j>`` over this parameter (THEORY §6);
* ``rows(index)``   -> float [N, R, ...], ``g_i`` restricted to the parameter's rows ``index``
                       (``None`` = all rows), used for cross terms of tied parameters.

``touched`` lists the parameter rows that can be non-zero (``None`` = all); for an embedding
lookup it is the set of token ids, which keeps tied input/output embeddings cheap.
"""

from __future__ import annotations

import torch

# Work on chunks of at most this many float elements when materialising (bounds peak memory).
CHUNK_ELEMS = 1 << 21
# Inner products are summed in float32 over at most this many coordinates, then in float64 (THEORY §6).
PARTIAL_SUM = 1 << 15


def _gram64(flat: torch.Tensor) -> torch.Tensor:
    """``flat @ flat.T`` for [N, P]: float32 partial sums over column blocks, accumulated in float64."""
    n, p = flat.shape
    out = torch.zeros(n, n, dtype=torch.float64, device=flat.device)
    for s in range(0, p, PARTIAL_SUM):
        c = flat[:, s:s + PARTIAL_SUM]
        out += (c @ c.T).to(torch.float64)
    return out


class Dense:
    """Materialised per-example gradients ``values`` [N, *param.shape] (vectors, biases, fallbacks)."""

    kind = "materialised"
    touched = None

    def __init__(self, values: torch.Tensor):
        self.values = values
        self.n = values.shape[0]

    def gram(self) -> torch.Tensor:
        return _gram64(self.values.reshape(self.values.shape[0], -1))

    def rows(self, index: torch.Tensor | None) -> torch.Tensor:
        return self.values if index is None else self.values[:, index]

    def dot(self, delta: torch.Tensor) -> torch.Tensor:
        return self.values.flatten(1).to(torch.float64) @ delta.flatten().to(torch.float64)


class Factored:
    """Per-example gradients ``g_i = L_i^T R_i`` with ``L`` [N, T, rows] and ``R`` [N, T, cols].

    nn.Linear weight [out, in]: L = output gradients, R = inputs. Conv1D weight [in, out]: the reverse.
    Only each sequence's span of positions with a non-zero output gradient is used (padding and,
    at the head, prompt tokens drop out); the padded tensors are viewed, never copied.
    ``mode`` is ``"auto"`` (cheaper of ghost and materialised), ``"ghost"`` or ``"materialise"``.
    """

    touched = None

    def __init__(self, left: torch.Tensor, right: torch.Tensor, valid: torch.Tensor, mode: str = "auto"):
        self.n = left.shape[0]
        self.left, self.right = left, right
        pos = torch.arange(valid.shape[1], device=valid.device)
        any_valid = valid.any(1)
        lo = torch.where(valid, pos, valid.shape[1]).amin(1)
        hi = torch.where(valid, pos + 1, 0).amax(1)
        self.spans = [(int(a), int(b)) if ok else (0, 0) for a, b, ok in zip(lo, hi, any_valid, strict=True)]
        m = sum(b - a for a, b in self.spans)
        a, b = left.shape[-1], right.shape[-1]
        ghost_cost = m * m * (a + b)
        mat_cost = m * a * b + self.n * self.n * a * b
        self.kind = {"auto": "ghost" if ghost_cost < mat_cost else "materialised",
                     "ghost": "ghost", "materialise": "materialised"}[mode]

    def gram(self) -> torch.Tensor:
        if self.kind == "ghost":
            return self._ghost()
        out = torch.zeros(self.n, self.n, dtype=torch.float64, device=self.left.device)
        rows = self.left.shape[-1]
        step = max(1, CHUNK_ELEMS // max(self.n * self.right.shape[-1], 1))
        for s in range(0, rows, step):
            out += _gram64(self._per_example(slice(s, s + step)).flatten(1))
        return out

    def _ghost(self) -> torch.Tensor:
        """K_ij = sum over positions t of i, s of j of (L L^T)_ts (R R^T)_ts (THEORY §6)."""
        left = torch.cat([self.left[i, a:b] for i, (a, b) in enumerate(self.spans)])
        right = torch.cat([self.right[i, a:b] for i, (a, b) in enumerate(self.spans)])
        seg = torch.cat([torch.full((b - a,), i, device=left.device) for i, (a, b) in enumerate(self.spans)])
        m = left.shape[0]
        onehot = torch.zeros(self.n, m, dtype=torch.float64, device=left.device)
        onehot[seg, torch.arange(m, device=left.device)] = 1.0
        out = torch.zeros(self.n, self.n, dtype=torch.float64, device=left.device)
        step = max(1, CHUNK_ELEMS // max(m, 1))
        for s in range(0, m, step):
            prod = (left[s:s + step] @ left.T) * (right[s:s + step] @ right.T)
            out += onehot[:, s:s + step] @ prod.to(torch.float64) @ onehot.T
        return out

    def _per_example(self, index) -> torch.Tensor:
        """Materialised ``g_i[index]`` [N, len(index), cols] (index: a slice or a row-index tensor)."""
        left = self.left[..., index]
        out = torch.zeros(self.n, left.shape[-1], self.right.shape[-1], dtype=left.dtype, device=left.device)
        for i, (a, b) in enumerate(self.spans):
            if b > a:
                torch.matmul(left[i, a:b].T, self.right[i, a:b], out=out[i])
        return out

    def rows(self, index: torch.Tensor | None) -> torch.Tensor:
        return self._per_example(slice(None) if index is None else index)

    def dot(self, delta: torch.Tensor) -> torch.Tensor:
        """<g_i, D> = sum_t L_t^T D R_t per example (THEORY §5): no per-example gradient is formed."""
        per_position = ((self.left @ delta.to(self.left.dtype)) * self.right).sum(-1)
        return per_position.to(torch.float64).sum(1)


class EmbeddingRows:
    """Per-example gradients of an embedding lookup: ``g_i[v] = sum_{t: id_t = v} delta_t`` (sparse by id)."""

    kind = "materialised"

    def __init__(self, ids: torch.Tensor, grads: torch.Tensor, valid: torch.Tensor):
        self.n = ids.shape[0]
        self.seg = valid.nonzero()[:, 0]
        self.ids = ids[valid]                                   # [M]
        self.grads = grads[valid]                               # [M, d]
        self.touched = torch.unique(ids)

    def rows(self, index: torch.Tensor | None) -> torch.Tensor:
        if index is None:
            raise ValueError("embedding rows must be requested by token id")
        pos = torch.searchsorted(index, self.ids)
        keep = (pos < index.numel()) & (index[pos.clamp(max=index.numel() - 1)] == self.ids)
        out = torch.zeros(self.n * index.numel(), self.grads.shape[1], dtype=self.grads.dtype,
                          device=self.grads.device)
        out.index_add_(0, (self.seg * index.numel() + pos)[keep], self.grads[keep])
        return out.view(self.n, index.numel(), -1)

    def dot(self, delta: torch.Tensor) -> torch.Tensor:
        per_position = (self.grads * delta.to(self.grads.dtype)[self.ids]).sum(-1).to(torch.float64)
        return torch.zeros(self.n, dtype=torch.float64, device=per_position.device).index_add_(0, self.seg, per_position)

    def gram(self) -> torch.Tensor:
        rows = torch.unique(self.ids)
        out = torch.zeros(self.n, self.n, dtype=torch.float64, device=self.grads.device)
        step = max(1, CHUNK_ELEMS // max(self.n * self.grads.shape[1], 1))
        for s in range(0, rows.numel(), step):
            out += _gram64(self.rows(rows[s:s + step]).flatten(1))
        return out


class Scaled:
    """A contribution seen through a diagonal metric: ``g_i -> scale * g_i`` (e.g. sqrt of Adam's P, THEORY §5).

    ``<scale g_i, scale g_j> = g_i^T P g_j`` with ``P = scale^2``; always materialised, chunked over rows.
    """

    kind = "materialised"

    def __init__(self, contrib, scale: torch.Tensor):
        self.contrib, self.scale = contrib, scale
        self.touched = contrib.touched

    def rows(self, index: torch.Tensor | None) -> torch.Tensor:
        rows = self.contrib.rows(index)
        scale = self.scale if index is None else self.scale[index]
        return rows * scale.to(rows.dtype)

    def gram(self) -> torch.Tensor:
        index = self.touched if self.touched is not None else torch.arange(self.scale.shape[0],
                                                                            device=self.scale.device)
        width = max(1, self.scale[0].numel())
        step = max(1, CHUNK_ELEMS // max(width * 64, 1))
        out = torch.zeros(self.contrib.n, self.contrib.n, dtype=torch.float64, device=self.scale.device)
        for s in range(0, index.numel(), step):
            out += _gram64(self.rows(index[s:s + step]).flatten(1))
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


class SharedParameter:
    """Accumulates a parameter used more than once in the forward pass (tied embeddings).

    Its per-example gradient is the sum over uses, so ``K = sum_u K_u + sum_{u != v} <c_u, c_v>``.
    Each use's own Gram is computed when it arrives; for the cross terms each use keeps only its
    rows that another use can touch (for GPT-2's tied head: the token ids of the input).
    """

    def __init__(self, touched_per_use: list[torch.Tensor | None]):
        self.touched = touched_per_use
        self.kept: list[tuple[torch.Tensor | None, torch.Tensor]] = []
        self.own = None

    def add(self, use: int, contrib) -> None:
        others = _union([t for k, t in enumerate(self.touched) if k != use])
        index = _intersect(contrib.touched, others)
        self.kept.append((index, contrib.rows(index)))
        g = contrib.gram()
        self.own = g if self.own is None else self.own + g

    def gram(self) -> torch.Tensor:
        out = self.own.clone()
        for u in range(len(self.kept)):
            for v in range(u + 1, len(self.kept)):
                common = _intersect(self.kept[u][0], self.kept[v][0])
                cu, cv = _select(*self.kept[u], common), _select(*self.kept[v], common)
                cross = cu.flatten(1).to(torch.float64) @ cv.flatten(1).to(torch.float64).T
                out += cross + cross.T
        return out


def _select(index: torch.Tensor | None, rows: torch.Tensor, wanted: torch.Tensor | None) -> torch.Tensor:
    """Rows ``wanted`` of per-example ``rows`` that were kept for parameter rows ``index`` (``None`` = all)."""
    if wanted is None:
        return rows
    return rows[:, wanted if index is None else torch.searchsorted(index, wanted)]
