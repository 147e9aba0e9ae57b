"""The pairwise normalised gradient (THEORY §9): the direction against brute-force per-sequence gradients, each pair's
own first-order change, and PairwiseNormalizedDPOTrainer's first step against a hand-written one."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import random_batch, tiny_gpt2, tiny_llama

from entangle.capture.engine import GramEngine
from entangle.capture.exact import per_sequence_grads
from entangle.capture.logprobs import model_logits
from entangle.capture.measure import update_dot
from entangle.metrics import coefficients
from entangle.mitigate import pairwise_normalized_backward

pytestmark = pytest.mark.usefixtures("one_thread")
B = 3


def _flat_grads(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs [2B] and flattened per-sequence gradients [2B, P] (float64), one backward pass each."""
    logps, grads = per_sequence_grads(model, batch, list(model.named_parameters()))
    return logps.double(), torch.stack([torch.cat([g.flatten() for g in gs]) for gs in grads])


def _brute_direction(model, batch, ref, objective, loss_weights=None, **hyper) -> tuple[torch.Tensor, torch.Tensor]:
    """-sum_i m_i (g_w/|g_w| - g_l/|g_l|) from materialised per-sequence gradients, and the batch-mean loss."""
    logps, flat = _flat_grads(model, batch)
    b = logps.shape[0] // 2
    lengths = batch["completion_mask"].sum(-1).double()
    a_w, a_l, loss = coefficients(objective, logps[:b], logps[b:], ref_chosen_logps=ref[:b], ref_rejected_logps=ref[b:],
                                  chosen_lengths=lengths[:b], rejected_lengths=lengths[b:], loss_weights=loss_weights,
                                  **hyper)
    m = (a_w.abs() + a_l.abs()) / (2 * b)
    unit = flat / flat.norm(dim=1, keepdim=True)
    return -(m[:, None] * (unit[:b] - unit[b:])).sum(0), loss.mean()


def _grad(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()]).double()


@pytest.mark.parametrize("bookkeeping", [True, False])
@pytest.mark.parametrize("make, padding, objective, weights", [
    (tiny_gpt2, "right", "sigmoid", None),
    (tiny_llama, "left", ["sigmoid", "sft"], [1.0, 0.5]),
])
def test_grad_is_the_brute_force_direction(make, padding, objective, weights, bookkeeping, monkeypatch):
    """Both ways of forming the direction: from the norm pass's factors (book-keeping, the default) and by the
    surrogate's backward through the kept graph (the fallback)."""
    used = []
    original = GramEngine.weighted_grads

    def spy(self, coef):
        out = original(self, coef) if bookkeeping else None
        used.append(out is not None)
        return out
    monkeypatch.setattr(GramEngine, "weighted_grads", spy)
    model = make()
    batch = random_batch(B, 101, padding_side=padding, seed=3)
    ref = -20 - 5 * torch.rand(2 * B, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected, expected_loss = _brute_direction(model, batch, ref, objective, weights, beta=0.2)
    loss, frame = pairwise_normalized_backward(model, batch, objective, ref, loss_weights=weights, beta=0.2)
    got = _grad(model)
    assert (got - expected).norm() / expected.norm() < 1e-5
    pairwise_normalized_backward(model, batch, objective, ref, loss_weights=weights, beta=0.2)
    torch.testing.assert_close(_grad(model), 2 * got, rtol=1e-6, atol=0)   # .grad accumulates like loss.backward()
    assert loss == pytest.approx(float(expected_loss), rel=1e-6)
    assert len(frame) == B and (frame["cosine"].abs() < 1).all()
    assert all(p.requires_grad for p in model.parameters()) and not model.training   # left as found
    # without a weighted sum the pass runs again, keeping the graph for the surrogate's backward
    assert used == ([True] * 2 if bookkeeping else [False] * 2)


@pytest.mark.parametrize("objective, hyper", [("sigmoid", {"beta": 0.5}), ("sppo_hard", {"beta": 0.5}),
                                              ("dil_lsif", {})])
def test_each_pair_alone_moves_chosen_up_and_rejected_down(objective, hyper):
    """The first-order change of a pair's own step: m ||g_w|| (1 - cos) >= 0 for chosen, -m ||g_l|| (1 - cos) <= 0."""
    model = tiny_llama(seed=2)
    batch = random_batch(4, 101, seed=5)
    # references far from the policy: sppo_hard's chosen coefficient is then negative for some pairs
    ref = torch.cat([torch.full((4,), -80.0), torch.full((4,), -1.0)]).double()
    named = list(model.named_parameters())
    for i in range(4):
        rows = [i, 4 + i]
        one = {k: v[rows] for k, v in batch.items()}
        model.zero_grad(set_to_none=True)
        _, frame = pairwise_normalized_backward(model, one, objective, ref[rows], **hyper)
        delta = {n: -p.grad for n, p in named}
        pred, _ = update_dot(model, one, delta, method="exact")
        row = frame.iloc[0]
        m = (abs(row["a_chosen"]) + abs(row["a_rejected"])) / 2
        gap = 1 - row["cosine"]
        assert pred[0] > 0 and pred[1] < 0
        torch.testing.assert_close(pred, torch.tensor([m * row["norm2_chosen"] ** 0.5 * gap,
                                                       -m * row["norm2_rejected"] ** 0.5 * gap], dtype=pred.dtype),
                                   rtol=1e-4, atol=0)


def test_a_pair_with_a_zero_gradient_is_named():
    model = tiny_gpt2()
    batch = random_batch(B, 101, seed=4)

    def frozen_rejected_of_pair_1(model, batch):          # the rejected log-prob of pair 1 does not depend on θ
        logits = model_logits(model, batch)
        keep = torch.ones(logits.shape[0], 1, 1, dtype=torch.bool)
        keep[B + 1] = False
        return torch.where(keep, logits, logits.detach())

    with pytest.raises(ValueError, match="pair 1: the rejected response's log-prob has a zero gradient"):
        pairwise_normalized_backward(model, batch, "sigmoid", torch.full((2 * B,), -30.0),
                                     forward=frozen_rejected_of_pair_1)
    assert all(p.grad is None for p in model.parameters())      # nothing accumulated


# -- the trainer -------------------------------------------------------------------------------------------------

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl import DPOConfig  # noqa: E402

from entangle.builtin import builtin_model, builtin_pairs, builtin_tokenizer  # noqa: E402
from entangle.data import encode_pairs  # noqa: E402
from entangle.integrations.callback import EntanglementCallback  # noqa: E402
from entangle.integrations.reference import peft_reference, probe_logps  # noqa: E402
from entangle.mitigate.trainer import PairwiseNormalizedDPOTrainer  # noqa: E402
from entangle.runio import read_run  # noqa: E402

LR = 0.05
SGD = dict(report_to=[], save_strategy="no", use_cpu=True, bf16=False, logging_steps=1, seed=0, disable_tqdm=True,
           optim="sgd", learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
           max_steps=1)


def _rows(n: int = 4) -> list[dict]:
    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in builtin_pairs(n, seed=1)]


def _trainer(tmp_path, model, ref_model=None, **kw) -> PairwiseNormalizedDPOTrainer:
    peft_config = kw.pop("peft_config", None)
    callbacks = kw.pop("callbacks", None)
    args = DPOConfig(output_dir=str(tmp_path / "out"), **{**SGD, **kw})
    return PairwiseNormalizedDPOTrainer(model=model, ref_model=ref_model, args=args, processing_class=builtin_tokenizer(),
                                        train_dataset=Dataset.from_list(_rows()), peft_config=peft_config,
                                        callbacks=callbacks)


def _assert_sgd_step(before, after, params=None) -> None:
    """``after = before - lr * before.grad`` over the (named) trained parameters, 1e-5 relative."""
    pairs = [(p0, p1) for (n, p0), (_, p1) in zip(before.named_parameters(), after.named_parameters(), strict=True)
             if params is None or n in params]
    step = torch.cat([(LR * p0.grad).flatten() for p0, _ in pairs])
    got = torch.cat([(p0.detach() - p1.detach()).flatten() for p0, p1 in pairs])
    assert step.norm() > 0 and (got - step).norm() / step.norm() < 1e-5


@pytest.mark.parametrize("batch_size, accumulation", [(4, 1), (2, 2)])
def test_trainer_step_is_a_step_along_the_direction(tmp_path, batch_size, accumulation):
    """One SGD step over the 4 pairs (one batch, or two accumulated halves) = -lr * the direction of all 4."""
    tok = builtin_tokenizer()
    policy = builtin_model(tok).double()          # float64: the parameters' rounding does not hide the step
    ref = copy.deepcopy(policy)
    with torch.no_grad():                     # a policy away from its reference: pairs with different coefficients
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p, generator=torch.Generator().manual_seed(p.numel())))
    before = copy.deepcopy(policy)
    trainer = _trainer(tmp_path, policy, ref, per_device_train_batch_size=batch_size,
                       gradient_accumulation_steps=accumulation)
    trainer.train()
    batch = encode_pairs(tok, _rows())
    loss, _ = pairwise_normalized_backward(before, batch, "sigmoid", probe_logps(ref, batch), beta=0.1)
    _assert_sgd_step(before, trainer.model)
    logged = next(h for h in trainer.state.log_history if "loss" in h)
    assert logged["loss"] == pytest.approx(loss, rel=1e-5) and -1 < logged["pairwise/cosine"] < 1


def test_trainer_with_lora_and_the_callback(tmp_path):
    """LoRA: the adapters step along the direction of their own gradients, reference = adapters disabled; the
    callback measures the probe at steps 0 and 1 alongside."""
    peft = pytest.importorskip("peft")
    tok = builtin_tokenizer()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                             lora_dropout=0.0, task_type="CAUSAL_LM", init_lora_weights=False)
    callback = EntanglementCallback(_rows(4), every=1, strict=True)
    trainer = _trainer(tmp_path, builtin_model(tok).double(), peft_config=config, per_device_train_batch_size=4,
                       callbacks=[callback])
    model = trainer.model        # a deep copy would call the original's forward (TRL patches it with a closure)
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    before = {n: p.detach().clone() for n, p in lora.items()}
    trainer.train()
    after = {n: p.detach().clone() for n, p in lora.items()}
    with torch.no_grad():                         # back to θ_0 for the hand-written step
        for n, p in lora.items():
            p.copy_(before[n])
    model.zero_grad(set_to_none=True)
    batch = encode_pairs(tok, _rows())
    with peft_reference(model):
        ref = probe_logps(model, batch)
    pairwise_normalized_backward(model, batch, "sigmoid", ref, beta=0.1)
    step = torch.cat([(LR * p.grad).flatten() for p in lora.values()])
    got = torch.cat([(before[n] - after[n]).flatten() for n in lora])
    assert step.norm() > 0 and (got - step).norm() / step.norm() < 1e-5
    run = read_run(tmp_path / "out" / "entangle")
    assert sorted(run["pairs"]["step"].unique()) == [0, 1]


def test_trainer_refuses_a_loss_it_cannot_reproduce_and_a_distributed_run(tmp_path, monkeypatch):
    model = builtin_model(builtin_tokenizer())
    with pytest.raises(ValueError, match="PairwiseNormalizedDPOTrainer cannot train this loss: .*aot"):
        _trainer(tmp_path, model, copy.deepcopy(model), loss_type="aot", per_device_train_batch_size=4)
    import accelerate

    monkeypatch.setattr(accelerate.Accelerator, "num_processes", property(lambda self: 2))
    with pytest.raises(ValueError, match="runs in one process"):
        _trainer(tmp_path, model, copy.deepcopy(model), per_device_train_batch_size=4)


def test_erlhf_reference_conditions_on_the_transformed_prompt():
    """reference_logps with a prompt prefix = the reference's log-probs of the same responses after prefix + prompt."""
    from entangle.integrations.reference import reference_logps

    tok = builtin_tokenizer()
    model, rows = builtin_model(tok), _rows(3)
    plain = probe_logps(model, encode_pairs(tok, rows))
    torch.testing.assert_close(reference_logps(model, tok, rows), plain, rtol=0, atol=0)
    prefixed = [{**r, "prompt": "this is a review of a movie . " + r["prompt"]} for r in rows]
    expected = probe_logps(model, encode_pairs(tok, prefixed))
    got = reference_logps(model, tok, rows, prompt_transform="this is a review of a movie . ")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert (got - plain).abs().min() > 1e-3                              # the prefix changes every reference log-prob
    chat = reference_logps(model, tok, [{**r, "prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows[:1]],
                           prompt_transform=lambda messages: messages[0]["content"])     # a callable transform
    torch.testing.assert_close(chat, reference_logps(model, tok, rows[:1]), rtol=0, atol=0)
