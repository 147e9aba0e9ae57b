"""The built-in tokenizer, model and sentiment preference task: no downloads, deterministic, well-formed pairs."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from entangle.builtin import (
    KINDS,
    SPECIAL_TOKENS,
    VOCABULARY,
    builtin_model,
    builtin_pairs,
    builtin_sft_rows,
    builtin_tokenizer,
)


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer()


@pytest.fixture(scope="module")
def rows():
    return [r for seed in range(5) for r in builtin_pairs(200, seed=seed)]


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def of_kind(rows, kind):
    return [r for r in rows if r["kind"] == kind]


# ---- tokenizer ------------------------------------------------------------------------------------------

def test_tokenizer_specials_and_bos(tok):
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == SPECIAL_TOKENS
    assert tok.pad_token_id == 0
    assert len(tok) == len(VOCABULARY) == len(set(VOCABULARY))
    enc = tok("review : the movie was")["input_ids"]
    assert enc[0] == tok.bos_token_id and len(enc) == 6
    assert tok.convert_ids_to_tokens(tok("great<eos> zzz")["input_ids"]) == ["<bos>", "great", "<eos>", "<unk>"]


def test_every_vocabulary_word_is_one_token(tok):
    pre = tok.backend_tokenizer.pre_tokenizer
    for w in VOCABULARY:
        if w not in SPECIAL_TOKENS:
            assert [p for p, _ in pre.pre_tokenize_str(w)] == [w], w


def test_tokenizer_round_trips_text(tok):
    for text in ["review : the film was based on a book and the plot was great !", "i hated it , 10 / 10 ?"]:
        enc = tok(text)["input_ids"]
        expected = text.replace("/", "<unk>")
        assert tok.decode(enc, skip_special_tokens=False) == "<bos> " + expected
    text = "review : the film was a remake and the pacing was painfully dull"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_tokenizer_is_deterministic_and_saves(tok, tmp_path):
    from transformers import AutoTokenizer

    assert builtin_tokenizer().get_vocab() == tok.get_vocab()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "review : the show was two hours long but terribly boring"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True) == text
    assert loaded.pad_token_id == tok.pad_token_id


# ---- pairs ----------------------------------------------------------------------------------------------

def test_rows_format_and_no_unk(tok, rows):
    for r in rows:
        assert set(r) == {"prompt", "chosen", "rejected", "kind"}
        assert all(isinstance(v, str) for v in r.values())
        assert r["prompt"].startswith("review : ") and r["kind"] in KINDS
        for resp in (r["chosen"], r["rejected"]):
            assert resp.startswith(" ") and not resp.startswith("  ")
            enc = tok(r["prompt"] + resp + tok.eos_token)["input_ids"]
            assert tok.unk_token_id not in enc, r
            # TRL tokenizes prompt and prompt + completion: the prompt must be a prefix of the whole
            prompt_ids = tok(r["prompt"])["input_ids"]
            assert enc[: len(prompt_ids)] == prompt_ids and enc[-1] == tok.eos_token_id
        assert r["chosen"] != r["rejected"]


def test_pairs_are_deterministic_and_seeded():
    assert builtin_pairs(40, seed=3) == builtin_pairs(40, seed=3)
    assert builtin_pairs(40, seed=3) != builtin_pairs(40, seed=4)
    assert builtin_pairs(0) == []
    with pytest.raises(ValueError):
        builtin_pairs(-1)


def test_kinds_present_and_balanced():
    assert Counter(r["kind"] for r in builtin_pairs(64)) == {k: 16 for k in KINDS}
    counts = Counter(r["kind"] for r in builtin_pairs(10))
    assert set(counts) == set(KINDS) and max(counts.values()) - min(counts.values()) <= 1


def test_last_token_pairs_differ_only_in_the_final_token(tok, rows):
    for r in of_kind(rows, "last_token"):
        c, j = ids(tok, r["chosen"]), ids(tok, r["rejected"])
        assert len(c) == len(j) >= 4
        assert c[:-1] == j[:-1] and c[-1] != j[-1], r


def test_short_suffix_pairs_share_the_body_and_differ_in_every_suffix_token(tok, rows):
    ks = Counter()
    for r in of_kind(rows, "short_suffix"):
        c, j = ids(tok, r["chosen"]), ids(tok, r["rejected"])
        assert len(c) == len(j)
        k = next(k for k in (2, 3) if c[:-k] == j[:-k] and all(a != b for a, b in zip(c[-k:], j[-k:], strict=True)))
        assert len(c) - k >= 4, r  # the shared body is not trivial
        ks[k] += 1
    assert set(ks) == {2, 3}


def test_long_suffix_pairs_share_a_short_start_then_diverge(tok, rows):
    for r in of_kind(rows, "long_suffix"):
        c, j = ids(tok, r["chosen"]), ids(tok, r["rejected"])
        start = next(i for i, (a, b) in enumerate(zip(c, j, strict=False)) if a != b)
        assert 2 <= start <= 5, r
        assert min(len(c), len(j)) - start >= 10, r


def jaccard(a: list[int], b: list[int]) -> float:
    return len(set(a) & set(b)) / len(set(a) | set(b))


def test_unrelated_pairs_share_little(tok, rows):
    unrelated = [jaccard(ids(tok, r["chosen"]), ids(tok, r["rejected"])) for r in of_kind(rows, "unrelated")]
    last = [jaccard(ids(tok, r["chosen"]), ids(tok, r["rejected"])) for r in of_kind(rows, "last_token")]
    assert max(unrelated) < 0.25 < 0.7 < min(last)
    for r in of_kind(rows, "unrelated"):
        assert ids(tok, r["chosen"])[0] != ids(tok, r["rejected"])[0]


def test_sentiment_words_sort_into_chosen_and_rejected(rows):
    from entangle.builtin import NEGATIVE, POSITIVE

    pos = {w for ws in POSITIVE.values() for w in ws}
    neg = {w for ws in NEGATIVE.values() for w in ws}
    assert not pos & neg
    for r in rows:
        assert not set(r["chosen"].split()) & neg and set(r["chosen"].split()) & pos, r
        assert not set(r["rejected"].split()) & pos and set(r["rejected"].split()) & neg, r


def test_sft_rows_are_prompt_plus_chosen():
    sft = builtin_sft_rows(8, seed=5)
    assert sft == [{"text": r["prompt"] + r["chosen"]} for r in builtin_pairs(8, seed=5)]


# ---- model ----------------------------------------------------------------------------------------------

def test_model_forward_on_an_encoded_batch(tok, rows):
    model = builtin_model(tok)
    assert model.config.vocab_size == len(tok) and model.config.n_positions >= 128
    assert model.lm_head.weight is model.transformer.wte.weight
    texts = [r["prompt"] + r[side] for r in rows[:8] for side in ("chosen", "rejected")]
    batch = tok(texts, padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[0] == 16 and (batch["input_ids"][:, 0] == tok.bos_token_id).all()
    out = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))
    assert out.logits.shape == (*batch["input_ids"].shape, len(tok))
    assert torch.isfinite(out.logits).all()
    # untrained: cross-entropy near log(vocab)
    assert abs(out.loss.item() - torch.log(torch.tensor(float(len(tok)))).item()) < 1.0
    out.loss.backward()
    assert model.transformer.wte.weight.grad.abs().sum() > 0


def test_model_is_deterministic_and_leaves_global_rng_alone(tok):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = builtin_model(tok), builtin_model(tok), builtin_model(tok, seed=1)
    assert torch.equal(torch.rand(3), expected)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["transformer.h.0.attn.c_attn.weight"], sc["transformer.h.0.attn.c_attn.weight"])
    assert not a.training


def test_model_sizes_and_defaults():
    model = builtin_model(n_layer=1, n_embd=32, n_head=2)
    assert (model.config.n_layer, model.config.n_embd, model.config.n_head) == (1, 32, 2)
    assert model.config.vocab_size == len(VOCABULARY)
    assert model.config.pad_token_id == 0
