"""In-pass capture (``EntanglementCallback(train_every=k)``): the training pairs measured inside the trainer's own
forward and backward, against the exact twin (one backward per sequence at the same parameters)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import random_batch, tiny_gpt2, tiny_llama

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from entangle import EntanglementCallback, sequence_gram  # noqa: E402
from entangle.builtin import builtin_model, builtin_pairs, builtin_tokenizer  # noqa: E402
from entangle.capture.inpass import InPassError, PassRecorder  # noqa: E402
from entangle.capture.logprobs import token_logps  # noqa: E402
from entangle.capture.params import select_params  # noqa: E402
from entangle.integrations.training_pass import KEY_CHUNK, column_keys, dataset_keys, pair_keys  # noqa: E402
from entangle.metrics.dataset import dataset_view, most_entangled  # noqa: E402
from entangle.report import make_report  # noqa: E402
from entangle.runio import read_run  # noqa: E402
from entangle.schema import validate  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
COMMON = dict(report_to=[], save_strategy="no", use_cpu=True, bf16=False, logging_steps=1, seed=0,
              learning_rate=1e-3, disable_tqdm=True)


class Snapshots(TrainerCallback):
    """The parameters θ_t at the beginning of every optimizer step (a fresh copy of the model class)."""

    def __init__(self, make):
        self.make, self.at = make, {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        m = self.make()
        m.load_state_dict(model.state_dict())      # not deepcopy: TRL's fused head is bound to the trained model
        self.at[state.global_step] = m.eval()


def _check_rows_against_twin(rows, snapshots, batch_of, tol=1e-5):
    """Every measured row equals the exact twin of its dataset row at its step's parameters (its index is right)."""
    assert len(rows) and not rows["excluded"].any()
    for _, r in rows.iterrows():
        twin = sequence_gram(snapshots.at[int(r["step"])], batch_of(int(r["index"])), method="exact")
        k, scale = twin.matrix, float(twin.matrix.abs().max())
        for got, want in ((r.norm2_chosen, k[0, 0]), (r.norm2_rejected, k[1, 1]), (r.inner, k[0, 1])):
            assert abs(got - float(want)) <= tol * scale, (r["step"], r["index"], got, float(want))
        np.testing.assert_allclose([r.logp_chosen, r.logp_rejected], twin.logps.numpy(), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_dpo_rows_equal_the_exact_twin_on_stories_hh(tmp_path, stories_dir, stories_tokenizer, hh_rows,
                                                     checkpointing):
    """TRL DPO (fused LM head) on stories260k with real HH pairs, gradient accumulation 2, shuffled sampler."""
    from entangle.data import load_pairs

    rows = [r for r in load_pairs(hh_rows[:300]) if len(r["prompt"]) < 150 and len(r["chosen"]) < 120
            and len(r["rejected"]) < 120][:12]
    model = AutoModelForCausalLM.from_pretrained(stories_dir)
    snaps = Snapshots(lambda: AutoModelForCausalLM.from_pretrained(stories_dir))
    args = DPOConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                     gradient_accumulation_steps=2, max_length=128, gradient_checkpointing=checkpointing, **COMMON)
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=stories_tokenizer,
                         callbacks=[snaps, EntanglementCallback(train_every=1, strict=True)])
    trainer.train()
    run = read_run(tmp_path / "out" / "entangle")
    tp = run["train_pairs"]
    validate("train_pairs", tp)
    assert tp.groupby("step")["micro"].nunique().tolist() == [2, 2] and len(tp) == 8
    # the sampler shuffles: the measured rows are not the dataset's first ones in order
    assert tp["index"].tolist() != list(range(8)) and tp.groupby("step")["index"].nunique().tolist() == [4, 4]
    _check_rows_against_twin(tp, snaps, lambda i: trainer.data_collator([trainer.train_dataset[i]]))
    step0 = tp[tp["step"] == 0]           # policy = reference: the sigmoid loss's coefficient is β σ(0)
    np.testing.assert_allclose(step0["a_chosen"], 0.05, rtol=1e-6)
    np.testing.assert_allclose(tp["a_chosen"], -tp["a_rejected"], rtol=1e-6)
    logged = [h for h in trainer.state.log_history if "entangle_train/cosine_q50" in h]
    assert [h["step"] for h in logged] == [0, 1]
    assert [h["entangle_train/cosine_q50"] for h in logged] == run["train_summary"]["cosine_q50"].tolist()


def _row_by_row_keys(data, collate) -> dict:
    """The slow twin of dataset_keys: each row collated alone by the trainer's collator -> its first row."""
    alone: dict = {}
    for i in range(len(data)):
        alone.setdefault(pair_keys(collate([data[i]]))[0], i)
    return alone


def _assert_dataset_keys_equal_row_by_row(trainer):
    """dataset_keys reads TRL's layouts from their token columns: the same keys as collating each row alone."""
    data, collate = trainer.train_dataset, trainer.data_collator
    assert column_keys(data, collate) is not None       # the token columns were read, not every row collated
    assert len(data) > KEY_CHUNK and dataset_keys(trainer) == _row_by_row_keys(data, collate)


@pytest.mark.parametrize("mode", [None, "keep_start", "keep_end"])
def test_dataset_keys_from_token_columns_equal_the_collator_on_hh(stories_tokenizer, hh_rows, mode):
    """TRL DPO's layout with real HH pairs, truncated by the collator (or not): the keys read from the columns equal
    the collator's row by row; a collator that forms other sequences is noticed and every row collated instead."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from entangle.data import load_pairs

    tok = stories_tokenizer
    rows = [{"prompt_ids": tok(r["prompt"])["input_ids"], "chosen_ids": tok(r["chosen"])["input_ids"],
             "rejected_ids": tok(r["rejected"])["input_ids"]} for r in load_pairs(hh_rows[:150])]
    rows.append(dict(rows[3]))                      # a duplicate row: the first one is its index
    data = Dataset.from_list(rows)
    collate = DataCollatorForPreference(pad_token_id=0, **({} if mode is None else
                                                           {"max_length": 96, "truncation_mode": mode}))
    slow = _row_by_row_keys(data, collate)
    assert len(slow) == len(rows) - 1 and slow[pair_keys(collate([rows[3]]))[0]] == 3
    if mode is not None:                            # truncation changes some keys, and only those
        assert sum(len(c) == 96 for c, _ in slow) > 5
    assert column_keys(data, collate) is not None and dataset_keys(_Holder(data, collate)) == slow

    class Shifted(DataCollatorForPreference):   # a collator the columns do not describe: one more token per row
        def torch_call(self, examples):
            return super().torch_call([{**e, "prompt_ids": [1, *e["prompt_ids"]]} for e in examples])

    other = Shifted(pad_token_id=0, max_length=collate.max_length, truncation_mode=collate.truncation_mode)
    assert column_keys(data, other) is None and dataset_keys(_Holder(data, other)) == _row_by_row_keys(data, other)


class _Holder:
    """What dataset_keys reads of a trainer."""

    def __init__(self, data, collate):
        self.train_dataset, self.data_collator = data, collate


def _dpo_builtin(tmp_path, callbacks, **kw):
    tok = builtin_tokenizer()
    model = builtin_model(tok)
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in builtin_pairs(80, seed=1)]
    args = DPOConfig(output_dir=str(tmp_path), **{"max_steps": 3, "per_device_train_batch_size": 2,
                                                  "gradient_accumulation_steps": 2, **COMMON, **kw})
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok, callbacks=callbacks)
    trainer.train()
    return trainer


@pytest.mark.parametrize("checkpointing", [False, True])
def test_in_pass_capture_does_not_change_training(tmp_path, checkpointing):
    """GPT-2 (position ids broadcast over the batch, tied embeddings): weights and losses bit-identical."""
    without = _dpo_builtin(tmp_path / "a", None, gradient_checkpointing=checkpointing)
    cb = EntanglementCallback(train_every=1, strict=True)
    with_cb = _dpo_builtin(tmp_path / "b", [cb], gradient_checkpointing=checkpointing)
    a, b = without.model.state_dict(), with_cb.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in without.state.log_history if "loss" in h] == \
        [h["loss"] for h in with_cb.state.log_history if "loss" in h]
    _assert_dataset_keys_equal_row_by_row(with_cb)
    run = read_run(tmp_path / "b" / "entangle")
    tp = run["train_pairs"]
    assert len(tp) == 3 * 4 and (tp["index"] >= 0).all() and np.isfinite(tp["cosine"]).all()
    # the dataset view and its report: the text of the measured rows comes from the run's pairs_text table
    assert len(run["pairs_text"]) == len(with_cb.train_dataset)
    assert run["pairs_text"].loc[tp["index"], "prompt"].tolist() == with_cb.train_dataset[tp["index"].tolist()]["prompt"]
    html = make_report(tmp_path / "b" / "entangle").read_text()
    assert (tmp_path / "b" / "entangle" / "report" / "dataset_entanglement.png").exists()
    assert with_cb.train_dataset[int(most_entangled(dataset_view(tp), 1)["index"].iloc[0])]["prompt"][:40] in html


def test_cpo_simpo_logits_path_equals_the_exact_twin(tmp_path):
    """CPO/SimPO computes logits (no fused head) and adds an NLL term on the chosen response."""
    cpo = pytest.importorskip("trl.experimental.cpo")
    tok = builtin_tokenizer()
    model = builtin_model(tok)
    snaps = Snapshots(lambda: builtin_model(tok))
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in builtin_pairs(80, seed=2)]
    args = cpo.CPOConfig(output_dir=str(tmp_path / "out"), max_steps=2, loss_type="simpo", cpo_alpha=0.5,
                         max_length=64, per_device_train_batch_size=4, **COMMON)
    trainer = cpo.CPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                             callbacks=[snaps, EntanglementCallback(train_every=1, strict=True)])
    trainer.train()
    tp = read_run(tmp_path / "out" / "entangle")["train_pairs"]

    def batch_of(i):
        b = trainer.data_collator([trainer.train_dataset[i]])
        seqs = [(b[f"{s}_input_ids"][0], b[f"{s}_attention_mask"][0], b[f"{s}_labels"][0] != -100)
                for s in ("chosen", "rejected")]
        width = max(len(x[0]) for x in seqs)

        def pad(t):
            return torch.nn.functional.pad(t.long(), (0, width - len(t)))
        return {"input_ids": torch.stack([pad(x[0]) for x in seqs]),
                "attention_mask": torch.stack([pad(x[1]) for x in seqs]),
                "completion_mask": torch.stack([pad(x[2]) for x in seqs])}

    _check_rows_against_twin(tp, snaps, batch_of)
    assert (tp["a_chosen"] > 0).all() and (tp["a_rejected"] < 0).all()
    _assert_dataset_keys_equal_row_by_row(trainer)


def test_refused_at_train_begin_with_the_reason(tmp_path):
    with pytest.raises(InPassError, match="ld_alpha"):
        _dpo_builtin(tmp_path, [EntanglementCallback(train_every=1)], ld_alpha=0.5)
    with pytest.raises(ValueError, match="nothing to measure"):
        EntanglementCallback()


def _loop(model, batch, weights, recorder):
    """One hand-written training pass: loss = Σ_i w_i s_i (or per-token weights [N, L])."""
    with recorder.recording() as records:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        lp = token_logps(out.logits, batch)
        loss = (lp * weights).sum() if weights.dim() == 2 else (lp.sum(-1) * weights).sum()
        loss.backward()
    return records


def _module_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_engine_hooks_live_while_recording_and_see_only_training_passes():
    """The engines' module hooks are installed once per recording (at its first pass) and removed with it; a forward
    without gradients between two training passes (a reference model's, an evaluation) is not recorded into either."""
    model = tiny_llama(dtype=torch.float32).train()
    batch = random_batch(3, 101, seed=4)
    weights = torch.tensor([0.7, 0.2, -0.2, -0.5, 0.3, 1.1])
    before = _module_hooks(model)
    recorder = PassRecorder(model, select_params(model), strict=True)
    assert _module_hooks(model) == before + 2                       # the recorder's own, on the model
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with recorder.recording() as records:
        for _ in range(2):
            lp = token_logps(model(**inputs).logits, batch)
            (lp.sum(-1) * weights).sum().backward()
            assert _module_hooks(model) == before + 2 + len(recorder.layout[0])   # one hook per measured module
            with torch.no_grad():                                   # not a training pass: nothing recorded
                model(**inputs)
    assert _module_hooks(model) == before + 2
    assert len(records) == 2 and not recorder.errors
    for field in ("norm2", "inner", "coef", "logps"):               # the same pass twice: the same record
        assert torch.equal(getattr(records[0], field), getattr(records[1], field))
    twin = sequence_gram(model.eval(), batch, method="exact").matrix
    want = torch.cat([twin.diagonal(), torch.stack([twin[k, 3 + k] for k in range(3)])])
    got = torch.cat([records[1].norm2, records[1].inner])
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    recorder.close()
    assert _module_hooks(model) == before


def test_gpt2_small_embeddings_materialised_whole_equal_the_twin(monkeypatch):
    """GPT-2 in a hand-written loop: its tied embedding and head (two uses) and its broadcast position embedding (one
    use) are small, so each is materialised whole by the rules' ``dense``; every record entry equals the exact twin,
    and so it does when the embeddings' ``dense`` declines (their contributions instead)."""
    from entangle.capture.rules import embedding

    model = tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).train()      # no dropout: the twin's pass
    batch = random_batch(3, 101, seed=8)
    weights = torch.tensor([0.4, -0.3, 0.9, -0.6, 0.2, -1.1])
    twin = sequence_gram(model.eval(), batch, method="exact").matrix
    model.train()
    want = torch.cat([twin.diagonal(), torch.stack([twin[k, 3 + k] for k in range(3)])])
    for declined in (False, True):
        if declined:
            monkeypatch.setattr(embedding.embedding, "dense", lambda *a: None)
        recorder = PassRecorder(model, select_params(model), strict=True)
        (record,) = _loop(model, batch, weights, recorder)
        recorder.close()
        model.zero_grad()
        assert record.info["transformer.wpe.weight"] == ("embedding:sparse" if declined else "embedding:dense")
        # backward order: the head's use, then the embedding's (whose entry is the one left)
        assert record.info["transformer.wte.weight"] == ("embedding:sparse" if declined else "embedding:dense") + \
            " (shared by 2 uses)"
        got = torch.cat([record.norm2, record.inner])
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), declined


def test_hand_written_loop_vanished_coefficient_and_token_weights():
    """A pair whose coefficient is exactly 0 is excluded (NaN, not divided by zero); the others equal the twin. A loss
    weighting tokens unequally is detected; without strict it is reported and training is untouched."""
    model = tiny_llama(dtype=torch.float32).train()
    batch = random_batch(3, 101, seed=4)
    recorder = PassRecorder(model, select_params(model), strict=True)
    weights = torch.tensor([0.7, 0.0, -0.2, -0.5, 0.3, 1.1])
    (record,) = _loop(model, batch, weights, recorder)
    model.zero_grad()
    twin = sequence_gram(model.eval(), batch, method="exact").matrix
    model.train()
    assert record.excluded.tolist() == [False, True, False, False, False, False]
    assert torch.isnan(record.norm2[[1, 4]]).all() and torch.isnan(record.inner[1])
    for k in (0, 2):
        want = torch.stack([twin[k, k], twin[3 + k, 3 + k], twin[k, 3 + k]])
        got = torch.stack([record.norm2[k], record.norm2[3 + k], record.inner[k]])
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    np.testing.assert_allclose(record.coef, weights, rtol=1e-6)

    token_weights = torch.rand(batch["input_ids"].shape, generator=torch.Generator().manual_seed(0))
    with pytest.raises(InPassError, match="unequally"):
        _loop(model, batch, token_weights, recorder)
    model.zero_grad()
    lenient = PassRecorder(model, select_params(model))
    assert _loop(model, batch, token_weights, lenient) == [] and "unequally" in str(lenient.errors[0])
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    lenient.close()
    recorder.close()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    (token_logps(out.logits, batch) * token_weights).sum().backward()
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
                                       "sppo_hard", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"])
def test_coefficients_recovered_from_the_backward_equal_the_registry(tmp_path, loss_type):
    """At step 0 the policy is its reference: every pair's a_w, a_l read from the trainer's backward equal the
    registry's coefficients of the same loss at those log-probs, for every TRL DPO loss type the registry reproduces
    (length-normalised and asymmetric losses too). A vanished coefficient excludes its pair: SFT's rejected one
    always, APO-down's chosen one at step 0 (β σ'(r_w) - β σ'(βm) = 0 at r_w = m = 0)."""
    from entangle.metrics.objectives import coefficients

    # TRL's sft is the token mean over the micro-batch's chosen responses: the registry's nll_norm="batch", per micro
    hyper = {"sft": {"nll_norm": "batch"}, "exo_pair": {"beta": 0.1, "label_smoothing": 1e-3}}.get(loss_type,
                                                                                                   {"beta": 0.1})
    trainer = _dpo_builtin(tmp_path, [EntanglementCallback(train_every=1, strict=True)], loss_type=loss_type,
                           max_steps=1, **{k: v for k, v in hyper.items() if k == "label_smoothing"})
    tp = read_run(tmp_path / "entangle")["train_pairs"]
    assert len(tp) == 4 and trainer.state.global_step == 1
    vanished = loss_type in ("sft", "apo_down")
    assert tp["excluded"].tolist() == [vanished] * 4 and np.isfinite(tp["cosine"]).all() != vanished
    for _, micro in tp.groupby("micro"):
        def col(c, rows=micro):
            return torch.tensor(rows[c].to_numpy(), dtype=torch.float64)

        a_w, a_l, _ = coefficients(loss_type, col("logp_chosen"), col("logp_rejected"),
                                   ref_chosen_logps=col("logp_chosen"), ref_rejected_logps=col("logp_rejected"),
                                   chosen_lengths=col("len_chosen"), rejected_lengths=col("len_rejected"), **hyper)
        np.testing.assert_allclose(micro["a_chosen"], a_w.numpy(), rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(micro["a_rejected"], a_l.numpy(), rtol=1e-5, atol=1e-9)


def test_train_rows_are_written_every_few_steps_and_at_each_save(tmp_path, monkeypatch):
    """The in-pass rows are held and written one part per TRAIN_WRITE_EVERY measured steps, at each checkpoint save
    and at train end (named by their first step); read back, they are every measured step's rows, in order."""
    from entangle.integrations import callback

    monkeypatch.setattr(callback, "TRAIN_WRITE_EVERY", 2)
    cb = EntanglementCallback(train_every=1, strict=True)
    _dpo_builtin(tmp_path, [cb], max_steps=5, save_strategy="steps", save_steps=3)
    parts = sorted(p.name for p in (tmp_path / "entangle" / "train_pairs").iterdir())
    # steps 0-1 (two held), step 2 (saved after it: global step 3), steps 3-4 (two held)
    assert parts == ["step-00000000.parquet", "step-00000002.parquet", "step-00000003.parquet"]
    run = read_run(tmp_path / "entangle")
    assert run["train_pairs"]["step"].tolist() == [s for s in range(5) for _ in range(4)]
    assert run["train_summary"]["step"].tolist() == list(range(5))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_dpo_lora_rows_equal_the_exact_twin_and_training_is_untouched(tmp_path, checkpointing):
    """TRL DPO with a LoRA ``peft_config`` (no ref_model: the reference pass is the policy with its adapters disabled,
    without gradients, and is not recorded): the adapters' rows equal the exact twin at the step's parameters, the
    base weights are not measured, and training is bit-identical without the callback."""
    peft = pytest.importorskip("peft")
    tok = builtin_tokenizer()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                             lora_dropout=0.0, task_type="CAUSAL_LM")

    def make():
        return peft.get_peft_model(builtin_model(tok), config)

    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in builtin_pairs(40, seed=3)]

    def train(callbacks, out):
        torch.manual_seed(0)
        args = DPOConfig(output_dir=str(out), max_steps=3, per_device_train_batch_size=2,
                         gradient_accumulation_steps=2, gradient_checkpointing=checkpointing, **COMMON)
        trainer = DPOTrainer(model=builtin_model(tok), args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tok, peft_config=config, callbacks=callbacks)
        trainer.train()
        return trainer

    snaps = Snapshots(make)
    trainer = train([snaps, EntanglementCallback(train_every=1, strict=True)], tmp_path / "with")
    assert any(getattr(m, "gradient_checkpointing", False) for m in trainer.model.modules()) == checkpointing
    without = train(None, tmp_path / "without")
    a, b = without.model.state_dict(), trainer.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in without.state.log_history if "loss" in h] == \
        [h["loss"] for h in trainer.state.log_history if "loss" in h]
    run = read_run(tmp_path / "with" / "entangle")
    tp = run["train_pairs"]
    manifest = run["manifest"]
    assert manifest["params"]["tensors"] == sum("lora_" in n for n, _ in trainer.model.named_parameters())
    assert manifest["params"]["tensors"] == 2 * 2 * trainer.model.config.n_layer      # A and B of c_attn and c_fc
    assert manifest["model_class"] == "PeftModelForCausalLM" and manifest["train_pairs"]["every"] == 1
    assert manifest["train_pairs"]["trainer"] == "DPOTrainer" and manifest["train_pairs"]["loss_type"] == ["sigmoid"]
    assert len(tp) == 3 * 4 and tp.groupby("step")["micro"].nunique().tolist() == [2, 2, 2]
    # LoRA B starts at zero: at step 0 only the B matrices have a gradient (the twin agrees), later both
    _check_rows_against_twin(tp, snaps, lambda i: trainer.data_collator([trainer.train_dataset[i]]))


class _SimPOTrainer(Trainer):
    """A hand-written preference trainer on ``transformers.Trainer``: SimPO on the summed response log-probs of a
    preference batch (TRL's collator: the B chosen sequences, then their B rejected ones)."""

    HYPER = {"beta": 2.0, "simpo_gamma": 0.5}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from entangle.metrics.objectives import get_objective

        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        s = token_logps(out.logits, inputs).sum(-1)
        n, b = inputs["completion_mask"][:, 1:].sum(-1), s.shape[0] // 2
        objective = get_objective("simpo")
        loss = objective.fn(s[:b], s[b:], chosen_lengths=n[:b], rejected_lengths=n[b:],
                            **{**objective.defaults, **self.HYPER}).mean()
        return (loss, out) if return_outputs else loss


def test_plain_trainer_with_objective_rows_equal_the_twin_and_coefficients_the_registry(tmp_path):
    """transformers.Trainer with a hand-written SimPO loss, TRL's preference collator, gradient accumulation 2, and
    both measurements: the probe (``objective=`` names the loss) and the training pairs in-pass. The rows equal the
    exact twin; their a_w, a_l equal the registry's SimPO coefficients at the measured log-probs."""
    from transformers import TrainingArguments
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from entangle.metrics.objectives import coefficients

    tok = builtin_tokenizer()
    rows = [{"prompt_ids": tok(r["prompt"])["input_ids"], "chosen_ids": tok(" " + r["chosen"])["input_ids"],
             "rejected_ids": tok(" " + r["rejected"])["input_ids"]} for r in builtin_pairs(40, seed=5)]
    snaps = Snapshots(lambda: builtin_model(tok))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, remove_unused_columns=False, **COMMON)
    collator = DataCollatorForPreference(pad_token_id=tok.pad_token_id)
    probe = builtin_pairs(4, seed=6)
    untokenised = _SimPOTrainer(model=builtin_model(tok), args=args, train_dataset=Dataset.from_list(rows),
                                data_collator=collator)
    with pytest.raises(ValueError, match="processing_class"):
        EntanglementCallback(probe, objective="simpo", strict=True).attach(untokenised).on_train_begin(
            args, untokenised.state, untokenised.control, model=untokenised.model)
    trainer = _SimPOTrainer(model=builtin_model(tok), args=args, train_dataset=Dataset.from_list(rows),
                            data_collator=collator, processing_class=tok, callbacks=[snaps])
    cb = EntanglementCallback(probe, objective="simpo", every=1, train_every=1, strict=True,
                              **_SimPOTrainer.HYPER).attach(trainer)
    trainer.train()
    run = read_run(tmp_path / "out" / "entangle")
    tp = run["train_pairs"]
    assert len(tp) == 2 * 4 and sorted(run["summary"]["step"].unique()) == [0, 1, 2]     # probe: steps 0, 1, end
    assert run["manifest"]["objective"] == "simpo" and run["manifest"]["train_pairs"]["trainer"] == "_SimPOTrainer"
    assert cb.trainer is trainer
    _check_rows_against_twin(tp, snaps, lambda i: trainer.data_collator([trainer.train_dataset[i]]))

    def col(c):
        return torch.tensor(tp[c].to_numpy(), dtype=torch.float64)

    a_w, a_l, _ = coefficients("simpo", col("logp_chosen"), col("logp_rejected"), chosen_lengths=col("len_chosen"),
                               rejected_lengths=col("len_rejected"), **_SimPOTrainer.HYPER)
    np.testing.assert_allclose(tp["a_chosen"], a_w.numpy(), rtol=1e-5)
    np.testing.assert_allclose(tp["a_rejected"], a_l.numpy(), rtol=1e-5)
