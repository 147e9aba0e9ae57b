"""Sparse token masking: alignment weights, the masked log-prob's gradients against brute force, the token maps,
and TokenMaskedDPOTrainer's loss against the registry path."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import random_batch

from entangle.capture.logprobs import sequence_logps
from entangle.capture.measure import measure
from entangle.capture.tokens import token_map
from entangle.capture.tokens.positions import response_positions
from entangle.data import encode_pairs
from entangle.metrics import pair_frame
from entangle.mitigate.token_mask import (
    TokenMask,
    TokenMaskedDPOTrainer,
    alignment_weights,
    mask_batch,
    weighted_token_map,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_alignment_weights_on_hand_made_pairs():
    w_c, w_r = alignment_weights([5, 6, 7, 8, 2], [5, 6, 7, 9, 2], shared=0.2)        # last content token differs
    assert w_c.tolist() == pytest.approx([0.2, 0.2, 0.2, 1.0, 0.2])
    assert w_r.tolist() == pytest.approx([0.2, 0.2, 0.2, 1.0, 0.2])
    w_c, w_r = alignment_weights([5, 6, 2], [5, 11, 12, 6, 2], shared=0.0)          # an insertion in rejected
    assert w_c.tolist() == [0.0, 0.0, 0.0]
    assert w_r.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]
    w_c, w_r = alignment_weights([3, 4], [7, 8, 9])                                  # nothing shared
    assert w_c.tolist() == [1.0, 1.0] and w_r.tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="shared must be in"):
        alignment_weights([1], [1], shared=1.5)


def _shared_batch(vocab=101):
    """Random pairs whose rejected response copies the chosen one except for a few tokens."""
    batch = random_batch(3, vocab, resp_len=(5, 9), seed=4)
    b = 3
    for k in range(b):
        pw, pl = response_positions(batch, k), response_positions(batch, b + k)
        n = min(len(pw), len(pl))
        batch["input_ids"][b + k, pl[:n - 2]] = batch["input_ids"][k, pw[:n - 2]]
    return batch


def test_masked_batch_weights_sit_on_response_tokens():
    batch = _shared_batch()
    masked = mask_batch(batch, shared=0.25)
    w = masked["token_weights"]
    assert w.shape == batch["input_ids"].shape
    for row in range(6):
        pos = response_positions(batch, row)
        assert set(w[row, pos].tolist()) <= {0.25, 1.0} and (w[row, pos] == 0.25).sum() >= 3
        outside = torch.ones(w.shape[1], dtype=torch.bool)
        outside[pos] = False
        assert (w[row, outside] == 1).all()


def test_masked_logprob_gradient_matches_brute_force(gpt2_model):
    batch = _shared_batch()
    masked = mask_batch(batch, shared=0.3)
    named = [(n, p) for n, p in gpt2_model.named_parameters()]
    grads = []
    for row in range(6):                    # brute force: Σ_t w_t log softmax(logits_{t-1})[y_t], one backward each
        ids = batch["input_ids"][row:row + 1]
        logits = gpt2_model(input_ids=ids, attention_mask=batch["attention_mask"][row:row + 1]).logits[0]
        pos = response_positions(batch, row)
        lp = torch.log_softmax(logits[pos - 1].double(), -1).gather(1, ids[0, pos, None])[:, 0]
        s = (lp * masked["token_weights"][row, pos].double()).sum()
        g = torch.autograd.grad(s, [p for _, p in named])
        grads.append(torch.cat([x.flatten().double() for x in g]))
    brute = torch.stack(grads) @ torch.stack(grads).T
    fast = measure(gpt2_model, masked).plain
    torch.testing.assert_close(fast.matrix, brute, rtol=1e-5, atol=1e-7)
    plain = measure(gpt2_model, batch).plain.matrix
    # down-weighting the shared tokens shrinks every pair's inner product
    assert (fast.matrix[range(3), range(3, 6)].abs() < plain[range(3), range(3, 6)].abs()).all()


def test_weighted_token_map_shrinks_the_shared_tokens(gpt2_model):
    batch = _shared_batch()
    masked = mask_batch(batch, shared=0.2)
    frame = weighted_token_map(token_map(gpt2_model, batch, pair=1), masked)
    wl = frame[frame.block == "wl"]
    shared_cells = np.isclose(wl.weight_t, 0.2) & np.isclose(wl.weight_u, 0.2)
    assert shared_cells.any()
    assert wl.inner_masked[shared_cells].to_numpy() == pytest.approx(0.04 * wl.inner[shared_cells].to_numpy())
    assert wl.inner_masked[shared_cells].abs().sum() < wl.inner[shared_cells].abs().sum()
    gram = measure(gpt2_model, masked).plain.matrix          # the weighted cells sum to the masked pair's entry
    assert wl.inner_masked.sum() == pytest.approx(float(gram[1, 4]), rel=1e-5)
    with pytest.raises(ValueError, match="token_weights"):
        weighted_token_map(frame, batch)


def test_learned_mask_weights_and_penalty():
    mask = TokenMask(20, init=0.5)
    batch = random_batch(2, 20, seed=1)
    penalty = mask.penalty(batch)
    assert float(penalty.detach()) == pytest.approx(0.5)
    penalty.backward()
    assert mask.logits.grad[batch["input_ids"][batch["completion_mask"].bool()]].abs().min() > 0
    w = mask_batch(batch, shared=1.0, mask=mask)["token_weights"]
    assert not w.requires_grad and torch.allclose(w[batch["completion_mask"].bool()], torch.tensor(0.5))


def test_trainer_loss_is_the_registry_objective_of_masked_logps(tmp_path):
    from datasets import Dataset
    from trl import DPOConfig

    from entangle.builtin import builtin_model, builtin_pairs, builtin_tokenizer

    tok = builtin_tokenizer()
    model = builtin_model(tok, n_layer=1, n_embd=32)
    ref = copy.deepcopy(model)
    with torch.no_grad():                        # a policy that differs from its reference: a non-trivial margin
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rows = builtin_pairs(8, seed=2)
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=1, report_to=[],
                     use_cpu=True, bf16=False, activation_checkpointing=False, beta=0.2)
    trainer = TokenMaskedDPOTrainer(model=model, ref_model=ref, args=args, processing_class=tok,
                                    train_dataset=Dataset.from_list(rows), shared=0.1, objective="dpop",
                                    hyper={"dpop_lambda": 5.0})
    inputs = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(trainer.model, inputs)
    batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    masked = mask_batch(batch, shared=0.1)
    s, s_ref = sequence_logps(model, masked), sequence_logps(ref, masked)
    frame = pair_frame(measure(model, masked).plain, "dpop", s_ref, beta=0.2, dpop_lambda=5.0)
    assert float(loss) == pytest.approx(frame["loss"].mean(), rel=1e-4)
    assert frame["logp_chosen"].to_numpy() == pytest.approx(s[:8].double().detach().numpy(), rel=1e-5)
    with pytest.raises(ValueError, match="precompute_ref_log_probs"):
        TokenMaskedDPOTrainer(model=model, ref_model=ref, processing_class=tok, train_dataset=Dataset.from_list(rows),
                              args=DPOConfig(output_dir=str(tmp_path), precompute_ref_log_probs=True, report_to=[],
                                             use_cpu=True, bf16=False, activation_checkpointing=False))


def test_encode_pairs_batch_masks_like_the_trainer():
    from entangle.builtin import builtin_pairs, builtin_tokenizer

    tok = builtin_tokenizer()
    rows = [r for r in builtin_pairs(8, seed=0) if r["kind"] == "last_token"][:1]
    masked = mask_batch(encode_pairs(tok, rows), shared=0.0)
    for row in (0, 1):          # only the differing last word (not the shared EOS) keeps weight
        pos = response_positions(masked, row)
        assert masked["token_weights"][row, pos].tolist()[-2:] == [1.0, 0.0]
        assert masked["token_weights"][row, pos].sum() == 1.0
