"""Contributions (capture/contrib.py): each fast path against per-example gradients formed in full."""

from __future__ import annotations

import pytest
import torch

from entangle.capture import contrib
from entangle.capture.contrib import EmbeddingRows, Factored


@pytest.mark.parametrize("dense", [False, True])
def test_embedding_gram_by_key_pairs_and_by_rows(monkeypatch, dense):
    """Both ways of the embedding Gram (pairs of keys sharing an id / one product of the rows) are exact."""
    monkeypatch.setattr(contrib, "DENSE_SHARING", 10**9 if dense else 0)
    g = torch.Generator().manual_seed(0)
    n, length, vocab, width = 5, 7, 11, 3
    ids = torch.randint(0, vocab, (n, length), generator=g)
    grads = torch.randn(n, length, width, generator=g, dtype=torch.float64)
    valid = torch.rand(n, length, generator=g) > 0.2
    full = torch.zeros(n, vocab, width, dtype=torch.float64)
    for i in range(n):
        for t in range(length):
            if valid[i, t]:
                full[i, ids[i, t]] += grads[i, t]
    flat = full.flatten(1)
    rows = EmbeddingRows(ids, grads, valid, vocab)
    torch.testing.assert_close(rows.gram(), flat @ flat.T, rtol=1e-12, atol=1e-12)
    # every row at once, straight from the positions (keys never formed) and through the keys: the same values
    fresh = EmbeddingRows(ids, grads, valid, vocab)
    straight = fresh.rows(None)
    assert fresh._lookup is not None and torch.equal(fresh.touched, torch.unique(ids))
    torch.testing.assert_close(straight, full, rtol=1e-12, atol=1e-12)
    assert torch.equal(straight, rows.rows(None)) and rows._lookup is None


def test_factored_dot_batched_and_span_by_span():
    """<g_i, D> from one batched product over the union span equals the per-sequence sums, also when a padded
    activation outside a sequence's span is not finite (the span-by-span fallback)."""
    g = torch.Generator().manual_seed(1)
    n, length, a, b = 3, 6, 3, 5
    valid = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    grad_out = torch.randn(n, length, a, generator=g, dtype=torch.float64) * valid[..., None]
    inputs = torch.randn(n, length, b, generator=g, dtype=torch.float64)
    delta = torch.randn(a, b, generator=g, dtype=torch.float64)
    expected = torch.stack([(grad_out[i].T @ inputs[i] * delta).sum() for i in range(n)])
    torch.testing.assert_close(Factored.from_padded(grad_out, inputs, valid).dot(delta), expected,
                               rtol=1e-12, atol=1e-12)
    inputs[0, 5] = float("nan")                      # outside sequence 0's span, inside the union span
    torch.testing.assert_close(Factored.from_padded(grad_out, inputs, valid).dot(delta), expected,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [None, 8])
@pytest.mark.parametrize("restrict", [False, True])
@pytest.mark.parametrize("nan_outside", [False, True])
def test_dual_gram_plain_scaled_and_dots_from_one_materialisation(monkeypatch, chunk, restrict, nan_outside):
    """dual_gram's (plain Gram, preconditioned Gram, dots with an update) equal products of the full per-example
    gradients: padded spans, row chunks (the update rides along as an extra row of each chunk), a restricted
    contribution (a tied head's shared rows), and a non-finite padded activation outside every span."""
    if chunk is not None:
        monkeypatch.setattr(contrib, "CHUNK_ELEMS", chunk)
    g = torch.Generator().manual_seed(2)
    n, length, a, b = 4, 6, 5, 3
    valid = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 0], [0, 1, 0, 1, 0, 0]],
                         dtype=torch.bool)
    left = torch.randn(n, length, a, generator=g, dtype=torch.float64) * valid[..., None]    # output gradients
    right = torch.randn(n, length, b, generator=g, dtype=torch.float64)
    if nan_outside:
        right[0, 4] = float("nan")                   # outside sequence 0's span, inside the union span
    scale = torch.rand(a, b, generator=g, dtype=torch.float64) + 0.5
    delta = torch.randn(a, b, generator=g, dtype=torch.float64)
    full = torch.stack([(left[i] * valid[i, :, None]).T @ torch.nan_to_num(right[i]) for i in range(n)])
    c = Factored.from_padded(left, right, valid, mode="materialise")
    keep = torch.tensor([0, 2, 3]) if restrict else torch.arange(a)      # the parameter rows kept
    if restrict:
        c = c.restricted(keep)
    flat = full[:, keep].flatten(1)
    plain, scaled, dots = contrib.dual_gram(c, scale, delta)            # scale and delta: the whole parameter's
    torch.testing.assert_close(plain, flat @ flat.T, rtol=1e-12, atol=1e-12)
    weighted = (full * scale)[:, keep].flatten(1)
    torch.testing.assert_close(scaled, weighted @ weighted.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dots, flat @ delta[keep].flatten(), rtol=1e-12, atol=1e-12)
    only_plain, none_scaled, none_dots = contrib.dual_gram(c, None, None)
    torch.testing.assert_close(only_plain, flat @ flat.T, rtol=1e-12, atol=1e-12)
    assert none_scaled is None and none_dots is None


def _contributions(n: int = 4, length: int = 6, rows: int = 9, cols: int = 5):
    """One contribution of each kind with its per-example gradients [n, rows, cols] built by hand (float64)."""
    g = torch.Generator().manual_seed(3)
    left = torch.randn(n, length, rows, generator=g, dtype=torch.float64)
    right = torch.randn(n, length, cols, generator=g, dtype=torch.float64)
    valid = torch.rand(n, length, generator=g) > 0.3
    left = left * valid[..., None]
    full = torch.einsum("ntr,ntc->nrc", left, right)
    ids = torch.randint(0, rows, (n, length), generator=g)
    emb = torch.zeros(n, rows, cols, dtype=torch.float64)
    for i in range(n):
        for t in range(length):
            if valid[i, t]:
                emb[i, ids[i, t]] += right[i, t]
    dense = torch.randn(n, rows, cols, generator=g, dtype=torch.float64)
    scale = torch.rand(rows, cols, generator=g, dtype=torch.float64) + 0.5
    positions = torch.randperm(rows, generator=g)[:length]      # one row of distinct ids shared by every sequence
    aligned = torch.zeros(n, rows, cols, dtype=torch.float64)
    aligned[:, positions] = right
    return [
        ("aligned", contrib.AlignedRows(positions, right, rows), aligned),
        ("dense", contrib.Dense(dense), dense),
        ("ghost", Factored.from_padded(left, right, valid, mode="ghost"), full),
        ("materialised", Factored.from_padded(left, right, valid, mode="materialise"), full),
        ("sparse", EmbeddingRows(ids, right, valid, rows), emb),
        ("scaled", contrib.Scaled(contrib.Dense(dense), scale), dense * scale),
    ]


@pytest.mark.parametrize("kind", ["dense", "ghost", "materialised", "sparse", "scaled", "aligned"])
def test_every_contribution_follows_the_protocol(kind):
    """Each contribution's gram / rows / dot / row_blocks / restricted / touched agree with its per-example
    gradients formed by hand: the one protocol the engine relies on (no type is special-cased)."""
    name, c, full = next(x for x in _contributions() if x[0] == kind)
    n, rows = full.shape[0], full.shape[1]
    flat = full.flatten(1)
    assert (c.n, c.n_rows) == (n, rows) and c.kind in ("ghost", "materialised", "sparse")
    torch.testing.assert_close(c.gram(), flat @ flat.T, rtol=1e-12, atol=1e-12)
    index = torch.tensor([1, 4, 7])
    torch.testing.assert_close(c.rows(index).to(torch.float64), full[:, index], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c.rows(None).to(torch.float64), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c.restricted(index).rows(index).to(torch.float64), full[:, index], rtol=1e-12,
                               atol=1e-12)
    delta = torch.randn(full.shape[1:], dtype=torch.float64)
    torch.testing.assert_close(c.dot(delta), flat @ delta.flatten(), rtol=1e-12, atol=1e-12)
    if c.touched is not None:                     # rows outside `touched` are zero
        outside = torch.ones(rows, dtype=torch.bool)
        outside[c.touched] = False
        assert not full[:, outside].any()
    coef = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    summed = contrib.weighted_sum(c, coef)          # book-keeping: sum_i coef_i g_i without the per-example rows
    if kind == "scaled":
        assert summed is None                       # a metric's view of the gradients, not a gradient
    else:
        torch.testing.assert_close(summed.reshape(full.shape[1:]).to(torch.float64),
                                   torch.einsum("n,n...->...", coef, full), rtol=1e-12, atol=1e-12)
    blocks = c.row_blocks()
    if c.kind == "materialised" and kind != "scaled":
        got = torch.zeros_like(full)
        for idx, block in blocks:
            got[:, idx] = block.to(torch.float64)
        torch.testing.assert_close(got, full, rtol=1e-12, atol=1e-12)
    else:
        assert blocks is None


def test_weighted_sum_span_by_span_when_padding_is_not_finite_and_refused_when_restricted():
    """A non-finite activation in another sequence's padding (times a zero gradient) would poison the batched product:
    the sum is then formed span by span; a contribution restricted to some rows is not summed (the caller falls back
    to a backward pass)."""
    g = torch.Generator().manual_seed(4)
    left = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    right = torch.randn(3, 5, 2, generator=g, dtype=torch.float64)
    valid = torch.ones(3, 5, dtype=torch.bool)
    valid[0, 3:] = False
    right = right * valid[..., None]                   # sequence 0 has no gradient at its last two positions
    left[0, 4] = float("nan")                          # ... and a NaN activation there
    coef = torch.tensor([0.5, -2.0, 1.5], dtype=torch.float64)
    c = Factored.from_padded(left, right, valid)
    want = sum(coef[i] * left[i, valid[i]].T @ right[i, valid[i]] for i in range(3))
    torch.testing.assert_close(contrib.weighted_sum(c, coef), want, rtol=1e-12, atol=1e-12)
    assert contrib.weighted_sum(c.restricted(torch.tensor([0, 2])), coef) is None


def test_broadcast_position_ids_take_the_aligned_rows_and_equal_the_key_sums():
    """The embedding rule measures ids broadcast over the batch (an expanded [1, T] row of distinct positions) as
    AlignedRows, whose views equal EmbeddingRows' on the same lookup; repeated ids keep EmbeddingRows."""
    from entangle.capture.rules.embedding import embedding

    g = torch.Generator().manual_seed(4)
    n, length, rows, cols = 4, 6, 10, 3
    module = torch.nn.Embedding(rows, cols)
    grads = torch.randn(n, length, cols, generator=g, dtype=torch.float64)
    grads[1, 4:] = 0.0                                          # a shorter sequence
    valid = (grads != 0).any(-1)
    ids = torch.tensor([[3, 0, 7, 1, 9, 2]]).expand(n, length)
    got = embedding(module, (ids,), grads, valid, "auto")["weight"]
    keyed = EmbeddingRows(ids.contiguous(), grads, valid, rows)
    assert isinstance(got, contrib.AlignedRows)
    torch.testing.assert_close(got.gram(), keyed.gram(), rtol=1e-12, atol=1e-12)
    assert "_sorted" not in vars(got)                           # the Gram reads the positions in any order
    torch.testing.assert_close(got.rows(None), keyed.rows(None), rtol=1e-12, atol=1e-12)
    delta = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    torch.testing.assert_close(got.dot(delta), keyed.dot(delta), rtol=1e-12, atol=1e-12)
    repeated = torch.tensor([[3, 0, 3, 1, 9, 2]]).expand(n, length)
    assert isinstance(embedding(module, (repeated,), grads, valid, "auto")["weight"], EmbeddingRows)
    assert isinstance(embedding(module, (ids.contiguous(),), grads, valid, "auto")["weight"], EmbeddingRows)
