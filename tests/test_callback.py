"""End-to-end: EntanglementCallback on real trainers (transformers Trainer, TRL DPO/CPO, LoRA), small models."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from helpers import check_run  # noqa: E402
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from entangle.builtin import builtin_model, builtin_pairs, builtin_sft_rows, builtin_tokenizer  # noqa: E402
from entangle.integrations import monitor as monitor_module  # noqa: E402
from entangle.integrations.callback import EntanglementCallback  # noqa: E402
from entangle.runio import read_run  # noqa: E402

COMMON = dict(report_to=[], save_strategy="no", use_cpu=True, bf16=False, logging_steps=1, seed=0,
              per_device_train_batch_size=4, learning_rate=1e-3, disable_tqdm=True)


def _rows(n: int, seed: int) -> list[dict]:
    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in builtin_pairs(n, seed=seed)]


def _dpo(tmp_path, cb=None, loss_type="sigmoid", max_steps=4, model=None, tok=None, train=None, **kw):
    kw = {**COMMON, **kw}
    tok = tok or builtin_tokenizer()
    model = model if model is not None else builtin_model(tok)
    peft = kw.pop("peft_config", None)
    ref = None if peft is not None else copy.deepcopy(model)
    args = DPOConfig(output_dir=str(tmp_path / "out"), max_steps=max_steps, loss_type=loss_type, **kw)
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(train or _rows(64, 1)),
                         processing_class=tok, callbacks=[cb] if cb is not None else None, peft_config=peft)
    trainer.train()
    return trainer


@pytest.mark.parametrize("loss_type, weights, objective", [
    ("ipo", None, "ipo"),
    (["sigmoid", "sft"], [1.0, 0.5], "1*sigmoid + 0.5*sft"),
])
def test_dpo_loss_types(tmp_path, loss_type, weights, objective):
    cb = EntanglementCallback(_rows(8, 2), every=2, strict=True)
    trainer = _dpo(tmp_path, cb, loss_type=loss_type, loss_weights=weights, max_steps=4)
    run = check_run(tmp_path / "out" / "entangle", 8, [0, 2, 4], [0, 2], trainer.state.log_history, objective)
    assert run["manifest"]["hyper"]["beta"] == 0.1
    assert "summary_adam" in run and run["summary_adam"]["step"].tolist() == [2, 4]  # Adam state from step 1 on


def test_dpo_sigmoid_stories_hh(tmp_path, stories_model, stories_tokenizer, hh_rows):
    """TRL DPO (sigmoid, gradient checkpointing on, TRL's default) on stories260k with real HH-RLHF pairs."""
    from entangle.data import load_pairs

    rows = [r for r in load_pairs(hh_rows[:400]) if len(r["prompt"]) < 200 and len(r["chosen"]) < 200
            and len(r["rejected"]) < 200]
    probe, train = rows[:8], rows[8:40]
    cb = EntanglementCallback(probe, every=2, strict=True)
    trainer = _dpo(tmp_path, cb, "sigmoid", max_steps=2, model=stories_model, tok=stories_tokenizer, train=train,
                   max_length=128, gradient_checkpointing=True, learning_rate=1e-4)
    assert trainer.args.gradient_checkpointing
    check_run(tmp_path / "out" / "entangle", 8, [0, 2], [0], trainer.state.log_history, "sigmoid")


def test_dpo_lora_reference_is_base_model(tmp_path):
    peft = pytest.importorskip("peft")
    tok = builtin_tokenizer()
    base = builtin_model(tok)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                             lora_dropout=0.0, task_type="CAUSAL_LM")
    cb = EntanglementCallback(_rows(8, 2), every=2, strict=True)
    trainer = _dpo(tmp_path, cb, model=base, peft_config=config, max_steps=4, learning_rate=1e-2)
    run = check_run(tmp_path / "out" / "entangle", 8, [0, 2, 4], [0, 2], trainer.state.log_history, "sigmoid")
    assert run["manifest"]["params"]["tensors"] == sum("lora_" in n for n, _ in trainer.model.named_parameters())
    # LoRA B starts at zero: at step 0 the policy is the base model, the reference
    step0 = run["pairs"][run["pairs"]["step"] == 0]
    np.testing.assert_allclose(step0["logp_chosen"], step0["ref_logp_chosen"], atol=1e-4)


def test_cpo_simpo(tmp_path):
    cpo = pytest.importorskip("trl.experimental.cpo")
    tok = builtin_tokenizer()
    model = builtin_model(tok)
    args = cpo.CPOConfig(output_dir=str(tmp_path / "out"), max_steps=4, loss_type="simpo", cpo_alpha=0.5,
                         max_length=64, **COMMON)
    cb = EntanglementCallback(_rows(8, 2), every=2, strict=True)
    trainer = cpo.CPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(_rows(64, 1)),
                             processing_class=tok, callbacks=[cb])
    trainer.train()
    run = check_run(tmp_path / "out" / "entangle", 8, [0, 2, 4], [0, 2], trainer.state.log_history, "simpo")
    assert run["manifest"]["hyper"]["cpo_alpha"] == 0.5 and run["manifest"]["hyper"]["nll_norm"] == "batch"


def test_plain_trainer_sft(tmp_path):
    """transformers.Trainer on a causal-LM (SFT) loss; the objective is given explicitly; cb.attach(trainer)."""
    tok = builtin_tokenizer()
    model = builtin_model(tok)
    data = Dataset.from_list([tok(r["text"] + " " + tok.eos_token) for r in builtin_sft_rows(64)])
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, **COMMON)
    trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tok,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    cb = EntanglementCallback(_rows(8, 2), objective="sft", every=2, strict=True,
                              out_dir=tmp_path / "run").attach(trainer)
    trainer.train()
    check_run(tmp_path / "run", 8, [0, 2, 4], [0, 2], trainer.state.log_history, "sft")
    assert cb.trainer is trainer


def test_callback_does_not_change_training(tmp_path):
    """Two identical runs, with and without the callback (measuring every step), end bit-identical."""
    without = _dpo(tmp_path / "a", max_steps=3)
    with_cb = _dpo(tmp_path / "b", EntanglementCallback(_rows(4, 2), every=1, strict=True), max_steps=3)
    a, b = without.model.state_dict(), with_cb.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in without.state.log_history if "loss" in h] == \
        [h["loss"] for h in with_cb.state.log_history if "loss" in h]


def test_measurement_and_update_check_share_one_pass(tmp_path):
    """With check_updates the measurement of a step comes from the pass that predicts its update: both tables hold
    the same log-probs at θ_step; with the Adam view from the optimizer state before the step."""
    cb = EntanglementCallback(_rows(4, 2), every=2, strict=True)
    _dpo(tmp_path, cb, max_steps=4)
    run = read_run(tmp_path / "out" / "entangle")
    pairs, updates = run["pairs"], run["updates"]
    assert sorted(updates["step"].unique()) == [0, 2] and sorted(pairs["step"].unique()) == [0, 2, 4]
    assert run["summary_adam"]["step"].tolist() == [2, 4]       # no Adam state before the first update
    for step in (0, 2):
        at = pairs[pairs["step"] == step].set_index("pair")
        upd = updates[updates["step"] == step]
        for side in ("chosen", "rejected"):
            rows = upd[upd["side"] == side].set_index("pair")
            assert rows["logp_before"].equals(at.loc[rows.index, f"logp_{side}"].rename("logp_before"))


def test_failures_are_logged_or_raised(tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(monitor_module, "measure", broken)
    with caplog.at_level(logging.ERROR, logger="entangle.integrations.monitor"):
        trainer = _dpo(tmp_path / "lenient", EntanglementCallback(_rows(4, 2), every=2), max_steps=2)
    assert trainer.state.global_step == 2
    assert "measurement at step 0 failed" in caplog.text and "injected failure" in caplog.text
    with pytest.raises(RuntimeError, match="injected failure"):
        _dpo(tmp_path / "strict", EntanglementCallback(_rows(4, 2), every=2, strict=True), max_steps=2)


def test_probe_by_index_and_trainer_found_automatically(tmp_path):
    """Probe = indices into the (TRL-tokenised) train dataset; the callback finds its trainer by itself."""
    cb = EntanglementCallback([0, 1, 2, 3], every=2, strict=True)
    trainer = _dpo(tmp_path, cb, max_steps=2)
    assert cb.trainer is trainer
    run = read_run(tmp_path / "out" / "entangle")
    assert run["pairs"]["step"].tolist() == [0] * 4 + [2] * 4


def test_light_measurements_without_update_check_or_adam_view(tmp_path):
    from entangle.runio import read_run

    cb = EntanglementCallback(_rows(8, 2), every=2, strict=True, check_updates=False, adam=False)
    trainer = _dpo(tmp_path, cb, "sigmoid", max_steps=4)
    run = read_run(tmp_path / "out" / "entangle")
    assert sorted(run["pairs"]["step"].unique()) == [0, 2, 4] and len(run["pairs"]) == 3 * 8
    assert "updates" not in run and "summary_adam" not in run
    logged = [h for h in trainer.state.log_history if "entangle/share_ideal" in h]
    assert [h["step"] for h in logged] == [0, 2, 4]       # measured before the update: logged at its own step
    assert not any("entangle/update/sign_agreement" in h for h in trainer.state.log_history)
