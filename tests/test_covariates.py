"""Per-pair covariates: exact values on hand-made pairs, CHES against a direct computation, report on HH-RLHF."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from entangle.capture.measure import sequence_gram
from entangle.data import encode_pairs, load_pairs
from entangle.metrics import pair_frame
from entangle.metrics.covariates import covariate_report, edit_distance, pair_covariates, response_hidden


def hand_batch() -> dict[str, torch.Tensor]:
    """Two pairs with prompt [9, 9]; responses given as token ids, right-padded with 0."""
    prompt = [9, 9]
    responses = [[5, 6, 7, 8], [1, 2, 3], [5, 6, 8], [4, 2, 3, 1, 1]]   # chosen 0, chosen 1, rejected 0, rejected 1
    width = 2 + max(map(len, responses))
    ids = torch.zeros(4, width, dtype=torch.long)
    att = torch.zeros_like(ids)
    comp = torch.zeros_like(ids)
    for i, r in enumerate(responses):
        ids[i, : 2 + len(r)] = torch.tensor(prompt + r)
        att[i, : 2 + len(r)] = 1
        comp[i, 2: 2 + len(r)] = 1
    return {"input_ids": ids, "attention_mask": att, "completion_mask": comp}


def test_text_covariates_exact():
    cov = pair_covariates(hand_batch())
    assert cov.pair.tolist() == [0, 1]
    assert cov.shared_prefix_len.tolist() == [2, 0]
    assert cov.edit_distance.tolist() == [1, 3]          # delete 7; substitute 1->4, insert 1, 1
    assert cov.jaccard.tolist() == [3 / 4, 3 / 4]        # {5,6,8} of {5,6,7,8}; {1,2,3} of {1,2,3,4}
    assert cov.len_chosen.tolist() == [4, 3]
    assert cov.len_rejected.tolist() == [3, 5]
    assert edit_distance([], [1, 2]) == 2 and edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert edit_distance([1, 2, 3, 4], [2, 1, 3, 5]) == 3


def test_ches_against_direct_computation(llama_model):
    from helpers import random_batch

    batch = random_batch(3, 101, padding_side="left", seed=2)
    hidden = response_hidden(llama_model, batch)
    cov = pair_covariates(batch, hidden=hidden)
    out = llama_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp(min=0), output_hidden_states=True)
    h = out.hidden_states[-1].detach().double()
    for k in range(3):
        hs = []
        for i in (k, 3 + k):
            pos = batch["completion_mask"][i].bool().nonzero().flatten()
            hs.append(h[i, pos - 1])                      # the position that predicts each response token
        w_sum, l_sum = hs[0].sum(0), hs[1].sum(0)
        w_mean, l_mean = hs[0].mean(0), hs[1].mean(0)
        assert cov.ches[k] == pytest.approx(float(w_sum @ l_sum - w_sum @ w_sum), rel=1e-5)
        assert cov.ches_norm[k] == pytest.approx(float(w_mean @ l_mean - w_mean @ w_mean), rel=1e-5, abs=1e-6)


def test_embed_cosine_uses_the_callable_on_decoded_responses():
    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    seen = []

    def embed(texts):
        seen.extend(texts)
        return torch.tensor([[float(len(t)), 1.0] for t in texts])

    cov = pair_covariates(hand_batch(), embed_fn=embed, tokenizer=Tok())
    assert seen == ["5 6 7 8", "1 2 3", "5 6 8", "4 2 3 1 1"]
    e = torch.tensor([[7.0, 1], [5, 1], [5, 1], [9, 1]], dtype=torch.float64)
    expected = torch.nn.functional.cosine_similarity(e[:2], e[2:], dim=-1).numpy()
    np.testing.assert_allclose(cov.embed_cosine.to_numpy(), expected)
    with pytest.raises(ValueError, match="tokenizer"):
        pair_covariates(hand_batch(), embed_fn=embed)


def test_report_decile_and_ranks_on_a_hand_made_frame():
    frame = pd.DataFrame({
        "pair": range(10), "cosine": np.linspace(0, 0.9, 10),
        "regime": ["ideal"] * 8 + ["both_rise", "both_fall"],
        "jaccard": np.linspace(0, 0.9, 10), "edit_distance": np.arange(10)[::-1],
    })
    rep = covariate_report(frame).set_index("covariate")
    assert rep.loc["jaccard", "spearman_cosine"] == pytest.approx(1.0)
    assert rep.loc["edit_distance", "spearman_cosine"] == pytest.approx(-1.0)
    for c in ("jaccard", "edit_distance"):               # the risky end holds the last pair, a pitfall
        assert rep.loc[c, "n_top"] == 1
        assert rep.loc[c, "pitfall_share_top"] == 1.0
        assert rep.loc[c, "pitfall_share_all"] == pytest.approx(0.2)
        assert rep.loc[c, "lift"] == pytest.approx(5.0)
    with pytest.raises(ValueError, match="regime"):
        covariate_report(frame.drop(columns="regime"))


def test_report_on_real_hh_pairs(hh_rows, stories_model, stories_tokenizer):
    rows = load_pairs(hh_rows[:30])[:24]
    batch = encode_pairs(stories_tokenizer, rows, max_prompt_length=16, max_length=48)
    gram = sequence_gram(stories_model, batch)
    # CPO's margin + NLL pulls the chosen side harder: some pairs leave the ideal regime at initialisation
    pairs = pair_frame(gram, "cpo_sigmoid")
    cov = pair_covariates(batch, hidden=response_hidden(stories_model, batch))
    frame = pairs.merge(cov, on=["pair", "len_chosen", "len_rejected"], validate="one_to_one")
    assert len(frame) == 24
    assert 0 < (frame.regime != "ideal").sum() < 24
    rep = covariate_report(frame)
    assert rep.covariate.tolist() == ["shared_prefix_len", "edit_distance", "jaccard", "len_chosen", "len_rejected",
                                      "ches", "ches_norm"]
    assert rep.n_top.eq(3).all()
    numeric = rep[["spearman_cosine", "spearman_pitfall", "pitfall_share_top", "pitfall_share_all"]]
    assert np.isfinite(numeric.to_numpy()).all()
    assert (numeric.iloc[:, :2].abs() <= 1).all().all()

