"""Rule dispatch: a subclass that overrides forward is not handled by its base's rule; layers that flatten the batch
are reported, never measured wrongly."""

from __future__ import annotations

import pytest
import torch
from helpers import random_batch

from entangle.capture.measure import sequence_gram
from entangle.capture.rules import rule_for
from entangle.capture.rules.embedding import embedding as embedding_rule


class _OffsetEmbedding(torch.nn.Embedding):
    """Like OPT's learned positions: takes the attention mask, not ids, and shifts the rows it reads."""

    def forward(self, attention_mask):
        return super().forward((attention_mask.cumsum(1) - 1).clamp(min=0) + 2)


class _Out:
    def __init__(self, logits):
        self.logits = logits


class _LM(torch.nn.Module):
    def __init__(self, flatten: bool = False, vocab: int = 101, d: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.tok = torch.nn.Embedding(vocab, d, dtype=torch.float64)
        self.pos = _OffsetEmbedding(40, d, dtype=torch.float64)
        self.mlp = torch.nn.Linear(d, d, dtype=torch.float64)
        self.head = torch.nn.Linear(d, vocab, bias=False, dtype=torch.float64)
        self.flatten = flatten

    def get_input_embeddings(self):
        return self.tok

    def forward(self, input_ids, attention_mask, position_ids=None, use_cache=False):
        h = self.tok(input_ids) + self.pos(attention_mask)
        h = torch.cumsum(h, 1) / 4                                       # causal mixing
        if self.flatten:                                                 # OPT-style [N * L, d] inside the MLP
            h = h + self.mlp(h.reshape(-1, h.shape[-1])).reshape(h.shape)
        else:
            h = h + self.mlp(h)
        return _Out(self.head(torch.tanh(h)))


def test_subclass_overriding_forward_gets_no_base_rule():
    assert rule_for(torch.nn.Embedding(3, 2)) is embedding_rule
    assert rule_for(_OffsetEmbedding(3, 2)) is None                 # the generic fallback handles it


def test_subclass_overriding_forward_is_measured_exactly():
    model = _LM()
    batch = random_batch(3, 101, padding_side="left", seed=2)
    auto = sequence_gram(model, batch)
    exact = sequence_gram(model, batch, method="exact")
    assert float((auto.matrix - exact.matrix).abs().max() / exact.matrix.abs().max()) < 1e-10
    assert auto.info["pos.weight"].startswith("generic")


def test_layer_that_flattens_the_batch_is_reported():
    model = _LM(flatten=True)
    batch = random_batch(3, 101, seed=2)
    with pytest.raises(RuntimeError, match=r"Linear .*mlp\.weight.*not the batch of 6 sequences"):
        sequence_gram(model, batch)
    sequence_gram(model, batch, params=r"^(tok|pos|head)\.")         # leaving it out works
