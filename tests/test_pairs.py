"""pair_frame / summarize against brute force: one autograd.grad per sequence, float64 inner products."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import random_batch, tiny_gpt2, tiny_llama

from entangle.capture.logprobs import response_lengths, sequence_logps
from entangle.capture.result import GramResult
from entangle.metrics import PAIR_COLUMNS, REGIMES, coefficients, pair_frame, summarize


def per_sequence_grads(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Slow twin: the [2B, P] float64 matrix of flattened per-sequence gradients, and the log-probs [2B]."""
    params = [p for p in model.parameters() if p.requires_grad]
    s = sequence_logps(model, batch)
    rows = []
    for i in range(len(s)):
        grads = torch.autograd.grad(s[i], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params,
                                                                                                     strict=True)]))
    return torch.stack(rows).double(), s.detach().double()


def gram_from_grads(G: torch.Tensor, logps: torch.Tensor, lengths: torch.Tensor) -> GramResult:
    return GramResult(matrix=G @ G.T, logps=logps, lengths=lengths, method="exact")


def random_gram(B: int, dim: int = 12, seed: int = 0, entangle: float = 0.9) -> tuple[GramResult, torch.Tensor]:
    """Synthetic gradients with g_l = entangle * g_w + noise, of varied scales, so every regime occurs."""
    g = torch.Generator().manual_seed(seed)
    gw = torch.randn(B, dim, generator=g, dtype=torch.float64) * torch.rand(B, 1, generator=g, dtype=torch.float64) * 3
    gl = entangle * gw * torch.rand(B, 1, generator=g, dtype=torch.float64) * 2 + 0.3 * torch.randn(
        B, dim, generator=g, dtype=torch.float64)
    G = torch.cat([gw, gl])
    logps = -torch.rand(2 * B, generator=g, dtype=torch.float64) * 40
    lengths = torch.randint(1, 30, (2 * B,), generator=g)
    ref = logps + torch.randn(2 * B, generator=g, dtype=torch.float64) * 2
    return gram_from_grads(G, logps, lengths), ref


@pytest.mark.parametrize("make_model", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_frame_matches_brute_force(make_model):
    B, beta, lr = 4, 0.5, 1e-3
    model = make_model()
    batch = random_batch(B, model.config.vocab_size, seed=1)
    G, s = per_sequence_grads(model, batch)
    lengths = response_lengths(batch)
    with torch.no_grad():
        ref = sequence_logps(make_model(seed=5), batch).double()
    frame = pair_frame(gram_from_grads(G, s, lengths), "sigmoid", ref, step=3, lr=lr, beta=beta)

    assert list(frame.columns) == ["step", *PAIR_COLUMNS[:-1], "ref_logp_chosen", "ref_logp_rejected", "loss"]
    gw, gl = G[:B], G[B:]
    np.testing.assert_allclose(frame["norm2_chosen"], (gw * gw).sum(1), rtol=1e-12)
    np.testing.assert_allclose(frame["inner"], (gw * gl).sum(1), rtol=1e-12)
    np.testing.assert_allclose(frame["cosine"], torch.cosine_similarity(gw, gl), rtol=1e-10)
    np.testing.assert_allclose(frame["ratio"], (gw * gl).sum(1) / torch.minimum((gw * gw).sum(1), (gl * gl).sum(1)))
    np.testing.assert_allclose(frame["len_chosen"], lengths[:B])

    a_w, a_l, _ = coefficients("sigmoid", s[:B], s[B:], ref_chosen_logps=ref[:B], ref_rejected_logps=ref[B:],
                               beta=beta)
    # per pair: the step direction of this pair alone is a_w g_w + a_l g_l
    step = a_w[:, None] * gw + a_l[:, None] * gl
    np.testing.assert_allclose(frame["pred_dlogp_chosen"], lr * (gw * step).sum(1), rtol=1e-10)
    np.testing.assert_allclose(frame["pred_dlogp_rejected"], lr * (gl * step).sum(1), rtol=1e-10)
    # batch: the mean-loss step direction is sum_i c_i g_i with c = a / B
    direction = (torch.cat([a_w, a_l]) / B) @ G
    np.testing.assert_allclose(frame["batch_dlogp_chosen"], lr * gw @ direction, rtol=1e-10)
    np.testing.assert_allclose(frame["batch_dlogp_rejected"], lr * gl @ direction, rtol=1e-10)


def test_first_order_prediction_matches_a_real_step():
    """Move the parameters along the batch direction and compare the log-prob change with batch_dlogp_*."""
    B, lr = 3, 1e-4
    model = tiny_gpt2()
    batch = random_batch(B, model.config.vocab_size, seed=2)
    G, s = per_sequence_grads(model, batch)
    ref = s + 1.0
    frame = pair_frame(gram_from_grads(G, s, response_lengths(batch)), "sigmoid", ref, lr=lr, beta=1.0)
    a_w, a_l = torch.tensor(frame["a_chosen"].to_numpy()), torch.tensor(frame["a_rejected"].to_numpy())
    direction = (torch.cat([a_w, a_l]) / B) @ G
    params = list(model.parameters())
    with torch.no_grad():
        offset = 0
        for p in params:
            p.add_(lr * direction[offset:offset + p.numel()].view_as(p).to(p.dtype))
            offset += p.numel()
        s_after = sequence_logps(model.double(), batch)
    predicted = np.concatenate([frame["batch_dlogp_chosen"], frame["batch_dlogp_rejected"]])
    np.testing.assert_allclose((s_after - s).numpy(), predicted, rtol=0.05, atol=1e-6)


def test_dpo_margin_never_shrinks_and_no_pitfall_per_pair():
    B, beta = 2000, 0.1
    gram, ref = random_gram(B, seed=3)
    frame = pair_frame(gram, "sigmoid", ref, beta=beta)
    K = gram.matrix
    idx = torch.arange(B)
    diff2 = K[idx, idx] - 2 * K[idx, B + idx] + K[B + idx, B + idx]  # ||g_w - g_l||²
    m = (frame["logp_chosen"] - frame["ref_logp_chosen"]) - (frame["logp_rejected"] - frame["ref_logp_rejected"])
    expected = beta / (1 + np.exp(beta * m.to_numpy())) * diff2.numpy()  # β σ(-βm) ||g_w - g_l||²
    d_margin = (frame["pred_dlogp_chosen"] - frame["pred_dlogp_rejected"]).to_numpy()
    np.testing.assert_allclose(d_margin, expected, rtol=1e-9, atol=1e-12)
    assert (d_margin >= 0).all()
    counts = frame["regime"].value_counts()
    assert "chosen_falls_rejected_rises" not in counts
    assert {"ideal", "both_rise", "both_fall"} <= set(counts.index)


def test_batch_view_can_show_the_pitfall():
    """Pair 0 alone is ideal; pair 1's step pushes pair 0's chosen down and its rejected up (THEORY §3, §4)."""
    e1, e2 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    G = torch.stack([e1, -3 * e1, 0.1 * e2, -3 * e2])  # chosen 0, chosen 1, rejected 0, rejected 1
    logps = torch.full((4,), -5.0, dtype=torch.float64)
    frame = pair_frame(gram_from_grads(G, logps, torch.full((4,), 3)), "sigmoid", logps, beta=1.0)
    row = frame.iloc[0]
    assert row["regime"] == "ideal"
    assert not row["batch_chosen_rises"] and not row["batch_rejected_falls"]
    summary = summarize(frame)
    assert summary.loc[0, "batch_share_chosen_falls_rejected_rises"] == 0.5


def test_regime_boundaries_follow_theory_conditions():
    gram, ref = random_gram(1500, seed=4)
    dpo = pair_frame(gram, "sigmoid", ref)
    ratio_of_norms = np.sqrt(dpo["norm2_chosen"] / dpo["norm2_rejected"])  # ||g_w|| / ||g_l||
    # DPO: w falls iff cos > ||g_w||/||g_l||; l rises iff cos > ||g_l||/||g_w||; ideal iff ratio < 1
    np.testing.assert_array_equal(~dpo["chosen_rises"], dpo["cosine"] > ratio_of_norms)
    np.testing.assert_array_equal(~dpo["rejected_falls"], dpo["cosine"] > 1 / ratio_of_norms)
    np.testing.assert_array_equal(dpo["regime"] == "ideal", dpo["ratio"] < 1)
    # general margin loss, r = a_w / |a_l| != 1 (SimPO with different lengths)
    simpo = pair_frame(gram, "simpo", beta=2.0)
    r = simpo["a_chosen"] / -simpo["a_rejected"]
    assert not np.allclose(r, 1)
    np.testing.assert_array_equal(simpo["chosen_rises"], simpo["inner"] < r * simpo["norm2_chosen"])
    np.testing.assert_array_equal(simpo["rejected_falls"], simpo["inner"] < simpo["norm2_rejected"] / r)


def test_summary_shares_quantiles_and_ranking():
    B, beta = 300, 0.2
    gram, ref = random_gram(B, seed=5)
    p = np.random.default_rng(0).uniform(0.05, 0.95, B)
    frames = [pair_frame(gram, "sigmoid", ref, step=k, beta=beta, pref_prob=p) for k in (0, 10)]
    frame = pd.concat(frames, ignore_index=True)
    assert np.array_equal(frame["pref_prob"].to_numpy()[:B], p)
    out = summarize(frame, pref_col="pref_prob", beta=beta)
    assert list(out["step"]) == [0, 10] and list(out["n_pairs"]) == [B, B]
    for prefix in ("share_", "batch_share_"):
        np.testing.assert_allclose(out[[prefix + r for r in REGIMES]].sum(axis=1), 1.0)
    f = frames[0]
    row = out.iloc[0]
    assert row["cosine_q50"] == pytest.approx(np.median(f["cosine"]))
    assert row["ratio_q90"] == pytest.approx(np.quantile(f["ratio"], 0.9))
    assert row["norm2_chosen_mean"] == pytest.approx(f["norm2_chosen"].mean())
    assert row["ranking_accuracy"] == pytest.approx((f["logp_chosen"] > f["logp_rejected"]).mean())
    ref_gap = f["ref_logp_chosen"] - f["ref_logp_rejected"]
    assert row["ref_ranking_accuracy"] == pytest.approx((ref_gap > 0).mean())
    assert row["ranking_accuracy_ref_adjusted"] == pytest.approx((f["margin"] > ref_gap).mean())
    ideal = (ref_gap + np.log(p / (1 - p)) / beta > 0).mean()
    assert row["idealized_ranking_accuracy"] == pytest.approx(ideal)
    assert row["ranking_accuracy_gap"] == pytest.approx(ideal - row["ranking_accuracy"])
    # beta defaults to the one the frame was built with
    assert summarize(frames[0], pref_col="pref_prob").loc[0, "idealized_ranking_accuracy"] == pytest.approx(ideal)


def test_ranking_ties_count_one_half():
    """At the first DPO step the policy is its reference: every implicit reward margin is exactly 0, a tie, which
    ranks like a coin flip (one half), not as a wrong ranking; a tie of the log-probs themselves counts the same."""
    gram, _ = random_gram(40, seed=9)
    logps = gram.logps.clone()
    logps[3] = logps[40 + 3]                     # pair 3: chosen and rejected log-probs tie
    gram = GramResult(matrix=gram.matrix, logps=logps, lengths=gram.lengths)
    out = summarize(pair_frame(gram, "sigmoid", logps))   # the reference is the policy itself
    assert out.loc[0, "ranking_accuracy_ref_adjusted"] == 0.5
    margin = (logps[:40] - logps[40:]).numpy()
    expected = ((margin > 0).sum() + 0.5 * (margin == 0).sum()) / 40
    assert (margin == 0).sum() == 1 and out.loc[0, "ranking_accuracy"] == pytest.approx(expected)
    assert out.loc[0, "ref_ranking_accuracy"] == pytest.approx(expected)


def test_non_finite_pairs_are_excluded_and_counted():
    gram, ref = random_gram(50, seed=6)
    G = torch.linalg.cholesky(gram.matrix + 1e-9 * torch.eye(100))  # any factor G with G Gᵀ = K
    G[7] = 0.0  # pair 7's chosen gradient vanishes: cosine and ratio are NaN
    frame = pair_frame(gram_from_grads(G, gram.logps, gram.lengths), "sigmoid", ref)
    assert not np.isfinite(frame.loc[7, "cosine"])
    out = summarize(frame)
    assert out.loc[0, "n_pairs"] == 50 and out.loc[0, "n_excluded"] == 1
    kept = frame.drop(index=7)
    assert out.loc[0, "cosine_mean"] == pytest.approx(kept["cosine"].mean())
    assert out.loc[0, "ranking_accuracy"] == pytest.approx((kept["margin"] > 0).mean())
    np.testing.assert_allclose(out[[f"share_{r}" for r in REGIMES]].sum(axis=1), 1.0)


def test_bad_input_names_the_pair():
    gram, ref = random_gram(5, seed=7)
    logps = gram.logps.clone()
    logps[5 + 2] = float("nan")  # rejected of pair 2
    with pytest.raises(ValueError, match=r"non-finite log-probs for pair\(s\) \[2\]"):
        pair_frame(GramResult(gram.matrix, logps, gram.lengths), "sigmoid", ref)
    K = gram.matrix.clone()
    K[1, 5 + 3] = K[5 + 3, 1] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite Gram entries involving pair\(s\) \[1, 3\]"):
        pair_frame(GramResult(K, gram.logps, gram.lengths), "sigmoid", ref)
    bad_ref = ref.clone()
    bad_ref[4] = float("-inf")
    with pytest.raises(ValueError, match=r"non-finite reference log-probs for pair\(s\) \[4\]"):
        pair_frame(gram, "sigmoid", bad_ref)
    with pytest.raises(ValueError, match="ref_logps has 8 entries but the Gram matrix has 10 sequences"):
        pair_frame(gram, "sigmoid", ref[:8])
    with pytest.raises(ValueError, match="'sigmoid' needs reference log-probs"):
        pair_frame(gram, "sigmoid")
    with pytest.raises(ValueError, match="'pref_prob' has 3 values for 5 pairs"):
        pair_frame(gram, "sigmoid", ref, pref_prob=[0.5, 0.5, 0.5])
    with pytest.raises(TypeError, match="'bta' is neither a hyper-parameter of objective 'sigmoid'"):
        pair_frame(gram, "sigmoid", ref, bta=0.1)
    frame = pair_frame(gram, "sigmoid", ref, pref_prob=[0.5, 1.2, 0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match=r"'pref_prob' must be a probability in \[0, 1\]; pair\(s\) \[1\]"):
        summarize(frame, pref_col="pref_prob")


def test_combination_and_lr_scaling():
    gram, ref = random_gram(20, seed=8)
    one = pair_frame(gram, ["sigmoid", "sft"], ref, loss_weights=[1.0, 0.5], beta=0.3)
    two = pair_frame(gram, ["sigmoid", "sft"], ref, loss_weights=[1.0, 0.5], beta=0.3, lr=2.0)
    np.testing.assert_allclose(two["pred_dlogp_chosen"], 2 * one["pred_dlogp_chosen"])
    np.testing.assert_allclose(two["batch_dlogp_rejected"], 2 * one["batch_dlogp_rejected"])
    n = gram.lengths[:20].double().numpy()
    sig = pair_frame(gram, "sigmoid", ref, beta=0.3)
    np.testing.assert_allclose(one["a_chosen"], sig["a_chosen"] + 0.5 / n)
    # lr = 0 (the end of a linear schedule): no predicted change, the directions of a step unchanged
    zero = pair_frame(gram, ["sigmoid", "sft"], ref, loss_weights=[1.0, 0.5], beta=0.3, lr=0.0)
    assert (zero[["pred_dlogp_chosen", "pred_dlogp_rejected", "batch_dlogp_chosen"]] == 0).all().all()
    for col in ("chosen_rises", "rejected_falls", "batch_chosen_rises", "batch_rejected_falls", "regime"):
        assert (zero[col] == one[col]).all(), col
    assert (one["regime"] != "chosen_falls_rejected_rises").any()     # what zero predictions used to read as
    for bad in (-1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lr must be a finite learning rate >= 0"):
            pair_frame(gram, "sigmoid", ref, beta=0.3, lr=bad)


def _hh_batch(rows, tokenizer, n_pairs: int, max_prompt: int = 24, max_resp: int = 16) -> dict:
    """Hand-built right-padded batch: split each dialogue at its last Assistant turn, keep short windows."""
    seqs = []
    for side in ("chosen", "rejected"):
        for row in rows[:n_pairs]:
            cut = row[side].rindex("\n\nAssistant:") + len("\n\nAssistant:")
            prompt = tokenizer(row[side][:cut], add_special_tokens=False)["input_ids"][-max_prompt:]
            resp = tokenizer(row[side][cut:], add_special_tokens=False)["input_ids"][:max_resp]
            seqs.append((prompt, resp + [tokenizer.eos_token_id]))
    L = max(len(p) + len(r) for p, r in seqs)
    batch = {k: torch.zeros(len(seqs), L, dtype=torch.long) for k in ("input_ids", "attention_mask", "completion_mask")}
    for i, (p, r) in enumerate(seqs):
        batch["input_ids"][i, :len(p) + len(r)] = torch.tensor(p + r)
        batch["attention_mask"][i, :len(p) + len(r)] = 1
        batch["completion_mask"][i, len(p):len(p) + len(r)] = 1
    return batch


@pytest.mark.slow
def test_real_pairs_on_stories_model(hh_rows, stories_model, stories_tokenizer):
    B = 4
    batch = _hh_batch(hh_rows, stories_tokenizer, B)
    G, s = per_sequence_grads(stories_model, batch)
    frame = pair_frame(gram_from_grads(G, s, response_lengths(batch)), "sigmoid", s - 0.5, beta=0.1)
    assert len(frame) == B and np.isfinite(frame.select_dtypes("number")).all().all()
    assert "chosen_falls_rejected_rises" not in set(frame["regime"])
    assert (frame["pred_dlogp_chosen"] - frame["pred_dlogp_rejected"] >= 0).all()
    assert summarize(frame).loc[0, "n_excluded"] == 0


def test_summary_of_one_step_equals_the_grouped_summary_with_excluded_pairs():
    """summarize reads a one-step frame (a callback's) without grouping: the same row as that step's part of a
    grouped multi-step summary, with NaN pairs excluded and counted, and each statistic its brute-force value."""
    frames = []
    for step in range(3):
        gram, ref = random_gram(40, seed=10 + step)
        frame = pair_frame(gram, "sigmoid", ref, beta=0.5).assign(step=step)
        frame.loc[[3, 7], "inner"] = np.nan
        frames.append(frame)
    whole = summarize(pd.concat(frames, ignore_index=True))
    for step, frame in enumerate(frames):
        one = summarize(frame)
        assert len(one) == 1 and one.loc[0, "step"] == step
        pd.testing.assert_frame_equal(one, whole[whole["step"] == step].reset_index(drop=True))
        kept = frame.drop(index=[3, 7])
        assert one.loc[0, "n_pairs"] == 40 and one.loc[0, "n_excluded"] == 2
        assert one.loc[0, "cosine_q50"] == pytest.approx(np.quantile(kept["cosine"], 0.5))
        assert one.loc[0, "share_ideal"] == pytest.approx((kept["regime"] == "ideal").mean())
        assert one.loc[0, "ranking_accuracy"] == pytest.approx(
            ((kept["logp_chosen"] > kept["logp_rejected"]) + 0.5 * (kept["logp_chosen"] == kept["logp_rejected"])).mean())
    assert summarize(frames[0].iloc[:0]).empty


def test_summary_of_train_columns_equals_the_summary_of_their_frame():
    """summary_row (a callback's step, before its frame exists) gives summarize's row of the same pairs as a frame:
    excluded pairs (a vanished coefficient, NaN and no regime) and a non-finite cosine left out and counted."""
    from entangle.metrics.summary import summary_row
    from entangle.metrics.train import train_pair_columns

    rng = np.random.default_rng(4)
    p = 12
    excluded = np.zeros(p, bool)
    excluded[[2, 9]] = True
    norm2 = (rng.random(p) + 0.1, rng.random(p) + 0.1)
    inner = rng.normal(size=p) * 0.2
    for x in (*norm2, inner):
        x[excluded] = np.nan
    norm2[0][5] = 0.0                                   # a zero gradient: cosine NaN
    columns = train_pair_columns(step=7, rank=0, micro=np.repeat(np.arange(6), 2), pair=np.tile([0, 1], 6),
                                 index=np.arange(p), logps=(rng.normal(size=p), rng.normal(size=p)),
                                 lengths=(np.full(p, 9), np.full(p, 11)), coef=(rng.normal(size=p), rng.normal(size=p)),
                                 norm2=norm2, inner=inner, excluded=excluded, lr=1e-3, pairs_in_step=p)
    one = pd.DataFrame([summary_row(7, columns)])
    pd.testing.assert_frame_equal(one, summarize(pd.DataFrame(columns)))
    assert one.loc[0, "n_pairs"] == p and one.loc[0, "n_excluded"] == 3
