"""The callback's logged scalars are the measurement of the step they name: one record per measured step, at that
step, equal to the run directory's tables, for TRL DPO/CPO and a plain ``Trainer``, whatever ``logging_steps`` is."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from entangle.builtin import builtin_model, builtin_pairs, builtin_sft_rows, builtin_tokenizer  # noqa: E402
from entangle.integrations.callback import EntanglementCallback  # noqa: E402
from entangle.runio import read_run  # noqa: E402

EVERY, MAX_STEPS = 2, 5          # measured at 0, 2, 4 (each followed by an update) and 5 (the end)
MEASURED, UPDATED = [0, 2, 4, 5], [0, 2, 4]
PREFIX = "entangle/"
ARGS = dict(report_to=[], save_strategy="no", use_cpu=True, bf16=False, seed=0, per_device_train_batch_size=4,
            learning_rate=1e-3, disable_tqdm=True, max_steps=MAX_STEPS)


def _pairs(n: int, seed: int) -> list[dict]:
    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in builtin_pairs(n, seed=seed)]


class Recorder(TrainerCallback):
    """An ``on_log`` receiver like a TensorBoard writer: what it is given, at which ``global_step``."""

    def __init__(self):
        self.seen: list[tuple[int, dict]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append((state.global_step, dict(logs)))


def _train(kind: str, tmp_path, callbacks: list, logging_steps: int) -> Trainer:
    """A TRL ``DPOTrainer`` or ``CPOTrainer`` or a plain ``Trainer`` (SFT loss) on the built-in model, trained."""
    tok = builtin_tokenizer()
    model = builtin_model(tok)
    common = {**ARGS, "output_dir": str(tmp_path / "out"), "logging_steps": logging_steps}
    pairs = Dataset.from_list(_pairs(64, 1))
    if kind == "dpo":
        trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=DPOConfig(**common),
                             train_dataset=pairs, processing_class=tok, callbacks=callbacks)
    elif kind == "cpo":
        cpo = pytest.importorskip("trl.experimental.cpo")
        trainer = cpo.CPOTrainer(model=model, args=cpo.CPOConfig(max_length=64, **common), train_dataset=pairs,
                                 processing_class=tok, callbacks=callbacks)
    else:
        data = Dataset.from_list([tok(r["text"] + " " + tok.eos_token) for r in builtin_sft_rows(64)])
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=data, processing_class=tok,
                          callbacks=callbacks, data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    trainer.train()
    return trainer


def _expected(run: dict) -> dict[int, dict[str, float]]:
    """The scalars each measured step should log, from the run directory's tables."""
    expected: dict[int, dict[str, float]] = {}
    for table, prefix in (("summary", PREFIX), ("summary_adam", PREFIX + "adam/")):
        for row in run[table].to_dict("records"):
            step = int(row.pop("step"))
            expected.setdefault(step, {}).update({prefix + k: v for k, v in row.items()})
    for step, rows in run["updates"].groupby("step"):
        expected[int(step)] |= {PREFIX + "update/observed_mean": rows["observed"].mean(),
                                PREFIX + "update/pred_mean": rows["pred_update"].mean()}
    return expected


@pytest.mark.slow
@pytest.mark.parametrize("logging_steps", [1, EVERY, 3])
@pytest.mark.parametrize("kind", ["dpo", "cpo", "plain"])
def test_each_measurement_is_logged_alone_at_its_step(tmp_path, kind, logging_steps):
    torch.set_num_threads(1)
    recorder = Recorder()
    cb = EntanglementCallback(_pairs(4, 2), objective="sft" if kind == "plain" else None, every=EVERY,
                              strict=True, out_dir=tmp_path / "run")
    trainer = _train(kind, tmp_path, [recorder, cb], logging_steps)
    run = read_run(tmp_path / "run")
    assert run["summary"]["step"].tolist() == MEASURED
    assert run["summary_adam"]["step"].tolist() == [2, 4, 5]    # Adam state from step 1 on, the end too
    expected = _expected(run)

    history = trainer.state.log_history
    logged = [h for h in history if any(k.startswith(PREFIX) for k in h)]
    # one record per measured step, in order, holding only the measurement (nothing of the trainer's own logs)
    assert [h["step"] for h in logged] == MEASURED
    for record in logged:
        step = record["step"]
        scalars = {k: v for k, v in record.items() if k != "step"}
        assert all(k.startswith(PREFIX) for k in scalars), f"step {step}: {sorted(scalars)}"
        assert (PREFIX + "update/sign_agreement" in scalars) == (step in UPDATED), f"step {step}"
        want = expected[step]
        assert want.keys() <= scalars.keys(), f"step {step}: not logged {sorted(want.keys() - scalars.keys())}"
        got = np.array([scalars[k] for k in want], dtype=float)
        np.testing.assert_allclose(got, np.array(list(want.values()), dtype=float), rtol=1e-12, atol=0,
                                   equal_nan=True, err_msg=f"step {step}: {list(want)}")
    # the trainer still logs its loss at its own logging steps, the last one included
    assert [h["step"] for h in history if "loss" in h] == list(range(logging_steps, MAX_STEPS + 1, logging_steps))

    # an on_log receiver (TensorBoard, wandb read state.global_step) gets each measurement once, at its step
    received = [(step, logs) for step, logs in recorder.seen if any(k.startswith(PREFIX) for k in logs)]
    assert [step for step, _ in received] == MEASURED
    assert [logs for _, logs in received] == [{k: v for k, v in h.items() if k != "step"} for h in logged]
