"""Monitor in a hand-written PyTorch loop: run directory, first-order check, and untouched training state."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import check_run

from entangle.builtin import builtin_model, builtin_pairs, builtin_tokenizer
from entangle.capture.logprobs import sequence_logps
from entangle.capture.measure import sequence_gram
from entangle.data import encode_pairs
from entangle.integrations.monitor import Monitor
from entangle.runio import read_run


def _dpo_loss(model, ref, batch, beta=0.1):
    B = batch["input_ids"].shape[0] // 2
    lp = sequence_logps(model, batch)
    with torch.no_grad():
        rl = sequence_logps(ref, batch)
    return -F.logsigmoid(beta * ((lp[:B] - rl[:B]) - (lp[B:] - rl[B:]))).mean()


def _state(model, optimizer):
    """Everything a measurement must leave as it was: parameters, .grad, optimizer state, RNG, modes, flags."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "opt": copy.deepcopy(optimizer.state_dict()),
        "rng": torch.get_rng_state(),
        "modes": [m.training for m in model.modules()],
        "flags": [p.requires_grad for p in model.parameters()],
    }


def _same(a, b) -> bool:
    def eq(x, y):
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(eq(x[k], y[k]) for k in x)
        if isinstance(x, list | tuple):
            return len(x) == len(y) and all(eq(u, v) for u, v in zip(x, y, strict=True))
        if torch.is_tensor(x):
            return torch.is_tensor(y) and torch.equal(x, y)
        return x == y
    return eq(a, b)


def test_hand_written_adamw_loop(tmp_path):
    tok = builtin_tokenizer()
    model, ref = builtin_model(tok), builtin_model(tok)
    model.train()
    model.transformer.h[1].requires_grad_(False)        # a frozen block: its flags must survive too
    probe, train = builtin_pairs(8, seed=2), builtin_pairs(48, seed=1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    monitor = Monitor(model, tok, probe, "sigmoid", out_dir=tmp_path, ref_model=ref, strict=True, beta=0.1)
    history = []
    for step in range(6):
        _dpo_loss(model, ref, encode_pairs(tok, train[8 * step: 8 * step + 8])).backward()
        if step % 2 == 0:
            before = _state(model, opt)
            history.append(monitor.measure(step, optimizer=opt))
            monitor.before_update(step)
            assert _same(before, _state(model, opt))
        opt.step()
        if step % 2 == 0:
            before = _state(model, opt)
            history.append(monitor.after_update(step, optimizer=opt))
            assert _same(before, _state(model, opt))
        opt.zero_grad()
    run = check_run(tmp_path, 8, [0, 2, 4], [0, 2, 4], history, "sigmoid")
    assert run["manifest"]["params"]["tensors"] == sum(p.requires_grad for p in model.parameters())
    assert "layer 1" not in set(run["layers"]["layer"])                 # frozen block not measured
    assert run["summary_adam"]["step"].tolist() == [2, 4]
    # pred_gradient is lr · (K c) of the measurement at the same step
    upd, pairs = run["updates"], run["pairs"]
    at0 = pairs[pairs["step"] == 0].sort_values("pair")
    np.testing.assert_allclose(upd[(upd["step"] == 0) & (upd["side"] == "chosen")]["pred_gradient"],
                               at0["batch_dlogp_chosen"])
    # the measurement equals a fresh one, and pairs agree with a direct Gram computation
    gram = sequence_gram(model, encode_pairs(tok, probe))
    assert np.isfinite(gram.matrix.numpy()).all()


def test_measurement_deferred_to_the_update_pass_equals_separate_passes(tmp_path):
    """before_update(measure=True) + after_update: the measurement of θ_t and the update check from one pass
    give the tables and scalars of measure + before_update + after_update, and leave the training state as found."""
    tok = builtin_tokenizer()
    model = builtin_model(tok).to(torch.float64)
    ref = copy.deepcopy(model)
    probe, train = builtin_pairs(6, seed=2), builtin_pairs(24, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    separate = Monitor(model, tok, probe, "sigmoid", out_dir=tmp_path / "separate", ref_model=ref, strict=True,
                       beta=0.1)
    fused = Monitor(model, tok, probe, "sigmoid", out_dir=tmp_path / "fused", ref_model=ref, strict=True, beta=0.1)
    for step in range(3):
        _dpo_loss(model, ref, encode_pairs(tok, train[8 * step: 8 * step + 8])).backward()
        expected = separate.measure(step, optimizer=opt)
        separate.before_update(step)
        before = _state(model, opt)
        fused.before_update(step, optimizer=opt, measure=True)
        assert _same(before, _state(model, opt))
        opt.step()
        expected |= separate.after_update(step)
        before = _state(model, opt)
        got = fused.after_update(step)
        assert _same(before, _state(model, opt))
        assert got.keys() == expected.keys()
        np.testing.assert_allclose([got[k] for k in got], [expected[k] for k in got], rtol=1e-10, atol=1e-12)
        opt.zero_grad()
    a, b = read_run(tmp_path / "separate"), read_run(tmp_path / "fused")
    for name in ("pairs", "summary", "layers", "summary_adam", "updates"):
        assert list(a[name].columns) == list(b[name].columns) and len(a[name]) == len(b[name]) > 0
        numeric = a[name].select_dtypes("number").columns
        assert (a[name].drop(columns=numeric) == b[name].drop(columns=numeric)).all().all()
        np.testing.assert_allclose(b[name][numeric].to_numpy(float), a[name][numeric].to_numpy(float),
                                   rtol=1e-10, atol=1e-12)
    assert b["summary_adam"]["step"].tolist() == [1, 2]
    assert not b["updates"]["pred_gradient"].isna().any()


def test_update_without_measurement_and_failures(tmp_path, monkeypatch, caplog):
    tok = builtin_tokenizer()
    model = builtin_model(tok)
    opt = torch.optim.SGD(model.parameters(), lr=2e-3)
    monitor = Monitor(model, tok, builtin_pairs(4, seed=3), "sft", out_dir=tmp_path)
    (-sequence_logps(model, encode_pairs(tok, builtin_pairs(8, seed=4))).mean()).backward()
    monitor.before_update(0)
    opt.step()
    out = monitor.after_update(0)
    assert out["entangle/update/sign_agreement"] >= 0.9
    assert read_run(tmp_path)["updates"]["pred_gradient"].isna().all()   # no measurement at that step
    # after_update without before_update: logged, or raised with strict
    assert monitor.after_update(1) == {}
    assert "after_update(1) without before_update(1)" in caplog.text
    from entangle.integrations import monitor as monitor_module

    monkeypatch.setattr(monitor_module, "measure", lambda *a, **k: 1 / 0)
    assert monitor.measure(5) == {}
    monitor.strict = True
    with pytest.raises(ZeroDivisionError):
        monitor.measure(6)


def test_bf16_model_and_explicit_reference(tmp_path):
    tok = builtin_tokenizer()
    model = builtin_model(tok).to(torch.bfloat16)
    probe = builtin_pairs(4, seed=5)
    ref = torch.zeros(8, dtype=torch.float64) - 50.0
    monitor = Monitor(model, tok, probe, "ipo", out_dir=tmp_path, ref_logps=ref, strict=True, beta=0.5)
    scalars = monitor.measure(0)
    assert np.isfinite(scalars["entangle/cosine_mean"])
    pairs = read_run(tmp_path)["pairs"]
    assert (pairs["ref_logp_chosen"] == -50.0).all() and len(pairs) == 4
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_configuration_errors():
    tok = builtin_tokenizer()
    model = builtin_model(tok)
    with pytest.raises(ValueError, match="needs reference log-probs"):
        Monitor(model, tok, builtin_pairs(2), "sigmoid")
    with pytest.raises(ValueError, match="expected 4"):
        Monitor(model, tok, builtin_pairs(2), "sigmoid", ref_logps=[0.0, 0.0])
    with pytest.raises(ValueError, match="empty"):
        Monitor(model, tok, [], "sft")
    # a misspelt hyper-parameter, a selection of no parameter, an unknown structure: at construction, by name
    with pytest.raises(ValueError, match=r"unknown hyper-parameter\(s\) \['bta'\] for objective 'sigmoid'"):
        Monitor(model, tok, builtin_pairs(2), "sigmoid", ref_logps="initial", bta=0.1)
    with pytest.raises(ValueError, match="selects no parameter"):
        Monitor(model, tok, builtin_pairs(2), "sft", params="no_such_layer")
    with pytest.raises(ValueError, match="structure must be"):
        Monitor(model, tok, builtin_pairs(2), "sft", structure="upper")
    with pytest.raises(ValueError, match="ref_logps must be log-probs or 'initial'"):
        Monitor(model, tok, builtin_pairs(2), "sigmoid", ref_logps="first")


def test_reference_policy_is_shared_with_checkpoint_analysis():
    """One decision of where reference log-probs come from, for the Monitor and checkpoint analysis."""
    from entangle.integrations.reference import ReferenceError, reference_source

    tok = builtin_tokenizer()
    model = builtin_model(tok)
    rows = builtin_pairs(2)
    trl_rows = [{**r, "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0} for r in rows]
    assert reference_source(True, ref_logps="initial") == "initial"
    assert reference_source(True, ref_logps=[0.0] * 4) == "given"
    assert reference_source(True, rows=trl_rows) == "given"
    assert reference_source(True, ref_model=model, rows=trl_rows) == "model"
    assert reference_source(True, peft=True, rows=rows) == "peft"
    assert reference_source(False, peft=True, rows=rows) == "none"
    with pytest.raises(ReferenceError, match="needs reference log-probs"):
        reference_source(True, rows=rows)
    monitor = Monitor(model, tok, trl_rows, "sigmoid", beta=0.1)
    assert monitor.reference == "given"
    torch.testing.assert_close(monitor._reference_logps(), torch.tensor([-1.0, -1.0, -2.0, -2.0], dtype=torch.float64))


def test_token_maps_and_preference_column(tmp_path):
    """token_maps writes the tokens table of the most and least entangled pairs, whose chosen × rejected blocks
    sum to the pairs' inner products; a probe preference column gives the idealized ranking accuracy."""
    from entangle.metrics import summarize

    tok = builtin_tokenizer()
    model = builtin_model(tok, n_layer=1, n_embd=32)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    pref = [0.9, 0.55, 0.2, 0.99, 0.7]
    probe = [r | {"pref_prob": p} for r, p in zip(builtin_pairs(5, seed=6), pref, strict=True)]
    monitor = Monitor(model, tok, probe, "sigmoid", out_dir=tmp_path, ref_logps="initial", strict=True, beta=0.1)
    assert monitor.pref_col == "pref_prob"
    (-sequence_logps(model, encode_pairs(tok, builtin_pairs(8, seed=4))).mean()).backward()
    opt.step()
    scalars = monitor.measure(4)
    assert "entangle/idealized_ranking_accuracy" in scalars and "entangle/ranking_accuracy_gap" in scalars
    before = _state(model, opt)
    tokens = monitor.token_maps()
    assert _same(before, _state(model, opt))
    run = read_run(tmp_path)
    pairs, summary = run["pairs"], run["summary"]
    assert pairs["pref_prob"].tolist() == pref
    expected = summarize(pairs, pref_col="pref_prob", beta=0.1)
    assert summary["idealized_ranking_accuracy"].tolist() == expected["idealized_ranking_accuracy"].tolist()
    assert summary["ranking_accuracy_gap"].tolist() == expected["ranking_accuracy_gap"].tolist()
    written = run["tokens"]
    assert written.equals(tokens) and set(written["step"]) == {4} and set(written["method"]) == {"full"}
    assert list(written.columns[:4]) == ["step", "pair", "which", "method"]
    cos = pairs.set_index("pair")["cosine"]
    which = written.drop_duplicates("pair").set_index("which")["pair"]
    assert which.to_dict() == {"most entangled": cos.idxmax(), "least entangled": cos.idxmin()}
    sums = written.groupby(["pair", "block"])["inner"].sum().unstack()
    for pair, row in sums.iterrows():
        at = pairs.set_index("pair").loc[pair]
        np.testing.assert_allclose([row["wl"], row["ww"], row["ll"]],
                                   [at["inner"], at["norm2_chosen"], at["norm2_rejected"]], rtol=1e-4, atol=1e-6)
    # chosen pairs, the head method, and the errors
    head = monitor.token_maps(step=5, pairs=[3], method="head")
    assert set(head["pair"]) == {3} and set(head["which"]) == {"selected"} and set(head["method"]) == {"head"}
    assert set(read_run(tmp_path)["tokens"]["step"]) == {4, 5}
    assert set(monitor.token_maps(which="least")["which"]) == {"least entangled"}
    with pytest.raises(ValueError, match="not probe pair ids"):
        monitor.token_maps(pairs=[9])
    with pytest.raises(ValueError, match="which must be"):
        monitor.token_maps(which="some")
    fresh = Monitor(model, tok, probe, "sigmoid", ref_logps="initial", beta=0.1)
    assert fresh.token_maps().empty                     # not strict: logged, nothing written
    fresh.strict = True
    with pytest.raises(ValueError, match="needs a measurement first"):
        fresh.token_maps()


def test_preference_column_errors():
    tok = builtin_tokenizer()
    model = builtin_model(tok, n_layer=1, n_embd=32)
    rows = builtin_pairs(3, seed=1)
    # no column: nothing, unless asked for by name
    assert Monitor(model, tok, rows, "sigmoid", ref_logps="initial", beta=0.1).pref_col is None
    with pytest.raises(ValueError, match="have no such column"):
        Monitor(model, tok, rows, "sigmoid", ref_logps="initial", beta=0.1, pref_col="share")
    with pytest.raises(ValueError, match=r"probability in \[0, 1\]"):
        Monitor(model, tok, [r | {"share": 1.5} for r in rows], "sigmoid", ref_logps="initial", pref_col="share")
    with pytest.raises(ValueError, match="needs beta"):
        Monitor(model, tok, [r | {"share": 0.5} for r in rows], "sft", pref_col="share")
    # an objective without beta ignores a pref_prob column it was not asked to use
    assert Monitor(model, tok, [r | {"pref_prob": 0.5} for r in rows], "sft").pref_col is None


def test_fixed_reference_is_computed_once_and_a_moving_one_every_time(tmp_path):
    import copy

    from entangle.builtin import builtin_model, builtin_pairs, builtin_tokenizer
    from entangle.integrations.monitor import Monitor

    tok = builtin_tokenizer()
    model = builtin_model(tok)
    ref = copy.deepcopy(model)
    calls = {"n": 0}
    forward = ref.forward

    def counted(*a, **k):
        calls["n"] += 1
        return forward(*a, **k)

    ref.forward = counted
    fixed = Monitor(model, tok, builtin_pairs(4), ref_model=ref, beta=0.1)
    fixed.measure(0)
    fixed.measure(1)
    assert calls["n"] == 1
    moving = Monitor(model, tok, builtin_pairs(4), ref_model=ref, beta=0.1, fixed_reference=False)
    first = moving.measure(0)
    with torch.no_grad():                                   # the reference is synced to a new model
        for p in ref.parameters():
            p.add_(0.05)
    second = moving.measure(1)
    assert calls["n"] == 3
    assert first["entangle/loss_mean"] != second["entangle/loss_mean"]
