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
    rows = EmbeddingRows(ids, grads, valid)
    torch.testing.assert_close(rows.gram(), flat @ flat.T, rtol=1e-12, atol=1e-12)


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
