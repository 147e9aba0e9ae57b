"""The hook engine (method="auto") against its slow twin (one backward per sequence) on real model classes."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import ScaledLinear, random_batch, tiny_gpt2, tiny_llama

from entangle.capture import contrib
from entangle.capture.engine import GramEngine
from entangle.capture.logprobs import sequence_logps
from entangle.capture.measure import sequence_gram

MODELS = {
    "gpt2": lambda dtype: tiny_gpt2(dtype=dtype),
    "llama": lambda dtype: tiny_llama(dtype=dtype),
    "llama_tied": lambda dtype: tiny_llama(tie=True, dtype=dtype),
}
TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def assert_matches(auto, exact, tol):
    assert auto.matrix.dtype == torch.float64 and auto.matrix.shape == exact.matrix.shape
    assert rel_err(auto.matrix, exact.matrix) <= tol
    assert set(auto.per_param) == set(exact.per_param)
    scale = exact.matrix.abs().max()
    for name, block in exact.per_param.items():
        assert float((auto.per_param[name] - block).abs().max() / scale) <= tol, name
    torch.testing.assert_close(auto.logps, exact.logps, rtol=1e-6, atol=1e-6)
    assert torch.equal(auto.lengths, exact.lengths)


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_auto_matches_exact(arch, dtype, padding_side):
    model = MODELS[arch](dtype)
    batch = random_batch(3, 101, padding_side=padding_side, seed=1)
    exact = sequence_gram(model, batch, method="exact")
    auto = sequence_gram(model, batch, method="auto")
    assert_matches(auto, exact, TOL[dtype])


@pytest.mark.parametrize("method", ["ghost", "materialise"])
@pytest.mark.parametrize("arch", list(MODELS))
def test_both_layer_strategies_match_exact(arch, method):
    model = MODELS[arch](torch.float64)
    batch = random_batch(4, 101, seed=2)
    got = sequence_gram(model, batch, method=method)
    assert_matches(got, sequence_gram(model, batch, method="exact"), 1e-10)
    kinds = {v.split(":")[1] for k, v in got.info.items() if k.endswith("weight") and ("c_" in k or "proj" in k)}
    assert kinds == {"ghost" if method == "ghost" else "materialised"}


def test_left_and_right_padding_give_same_logps_and_gram():
    model = tiny_llama(dtype=torch.float64)
    right = sequence_gram(model, random_batch(3, 101, padding_side="right", seed=3))
    left = sequence_gram(model, random_batch(3, 101, padding_side="left", seed=3))
    torch.testing.assert_close(left.logps, right.logps, rtol=1e-10, atol=1e-10)
    assert rel_err(left.matrix, right.matrix) < 1e-10


def test_tied_embedding_cross_terms_are_required(monkeypatch):
    model = tiny_gpt2(dtype=torch.float64)
    assert model.lm_head.weight is model.transformer.wte.weight
    batch = random_batch(3, 101, seed=4)
    exact = sequence_gram(model, batch, method="exact")
    auto = sequence_gram(model, batch)
    assert "shared by 2 uses" in auto.info["transformer.wte.weight"]
    assert rel_err(auto.per_param["transformer.wte.weight"], exact.per_param["transformer.wte.weight"]) < 1e-10
    assert contrib.SHARED_DENSE >= 6 * 101 * 32          # this small: summed over its uses, one product
    # the cross terms between the uses, computed apart (a parameter too large to materialise): the same values
    monkeypatch.setattr(contrib, "SHARED_DENSE", 0)
    apart = sequence_gram(model, batch)
    assert rel_err(apart.per_param["transformer.wte.weight"], exact.per_param["transformer.wte.weight"]) < 1e-10
    # leaving the cross terms between the two uses out is measurably wrong: the check can fail
    monkeypatch.setattr(contrib.SharedParameter, "gram", lambda self: self.own.clone())
    wrong = sequence_gram(model, batch)
    assert rel_err(wrong.matrix, exact.matrix) > 1e-4


def test_small_tied_weight_summed_whole_over_its_uses(monkeypatch):
    """A small tied embedding and output layer: each use's whole per-example gradients (the rules' ``dense``) summed
    over the uses, one product. The same as the exact twin with the output layer's use through its contribution
    instead (the two mixed), and with a padding row, which PyTorch never updates."""
    from entangle.capture.rules import embedding, linear

    dense = embedding.embedding.dense
    models = {"gpt2": tiny_gpt2(dtype=torch.float64),
              "llama, padding_idx 5": tiny_llama(tie=True, dtype=torch.float64, pad_token_id=5)}
    batch = random_batch(3, 101, seed=6)
    batch["input_ids"][[0, 4], 1] = 5                      # the padding id as a real prompt token
    for what, model in models.items():
        name = next(n for n, p in model.named_parameters() if p is model.get_output_embeddings().weight)
        exact = sequence_gram(model, batch, method="exact")
        got = sequence_gram(model, batch)
        assert got.info[name].endswith(":dense (shared by 2 uses)"), (what, got.info[name])
        assert rel_err(got.per_param[name], exact.per_param[name]) < 1e-10, what
        with monkeypatch.context() as m:                   # the output layer's use by its rule's contribution
            m.setattr(linear.linear, "dense", lambda *a: None)
            mixed = sequence_gram(model, batch)
        assert mixed.info[name].startswith("embedding:dense") and "linear" not in mixed.info[name], what
        assert rel_err(mixed.per_param[name], exact.per_param[name]) < 1e-10, what
        with monkeypatch.context() as m:                   # a dense rule returning new rows instead of adding to into
            m.setattr(embedding.embedding, "dense", lambda mod, inputs, g, into: dense(mod, inputs, g, {}))
            apart = sequence_gram(model, batch)
        assert rel_err(apart.per_param[name], exact.per_param[name]) < 1e-10, what
    assert models["llama, padding_idx 5"].model.embed_tokens.padding_idx == 5
    # a non-finite input at a position without a gradient: no whole rows (the engine then takes the contribution,
    # which skips that position)
    head, act, grad = torch.nn.Linear(4, 3, bias=False), torch.randn(2, 5, 4), torch.randn(2, 5, 3)
    grad[1, 4], act[1, 4, 0] = 0.0, float("nan")
    assert linear.linear.dense(head, (act,), grad, {}) is None
    grad[1, 4] = 1.0
    act[1, 4, 0] = 0.5
    torch.testing.assert_close(linear.linear.dense(head, (act,), grad, {})["weight"],
                               torch.stack([grad[i].T @ act[i] for i in range(2)]))


def _forward_without_position_ids(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_broadcast_position_embedding_is_expanded_per_sequence(monkeypatch):
    """GPT-2 builds position ids of shape [1, T]: their embedding gradient would arrive summed over the batch."""
    model = tiny_gpt2(dtype=torch.float64)
    batch = random_batch(3, 101, seed=5)
    exact = sequence_gram(model, batch, method="exact", forward=_forward_without_position_ids)
    auto = sequence_gram(model, batch, forward=_forward_without_position_ids)
    assert rel_err(auto.matrix, exact.matrix) < 1e-10
    monkeypatch.setattr(GramEngine, "_broadcast", lambda self, args, output: (args, output, False))
    with pytest.raises(RuntimeError, match=r"transformer\.wpe\.weight.*first dimension is not the batch"):
        wrong = sequence_gram(model, batch, forward=_forward_without_position_ids)
        assert rel_err(wrong.matrix, exact.matrix) < 1e-6


def test_name_filter_selects_and_matches():
    model = tiny_gpt2(dtype=torch.float64)
    batch = random_batch(3, 101, seed=6)
    got = sequence_gram(model, batch, params=r"\.h\.1\.")
    assert got.per_param and all(".h.1." in k for k in got.per_param)
    assert rel_err(got.matrix, sequence_gram(model, batch, params=r"\.h\.1\.", method="exact").matrix) < 1e-10
    full = sequence_gram(model, batch)
    assert rel_err(got.matrix, full.blocks("layer")["layer 1"]) < 1e-10


def test_frozen_parameters_can_be_selected_by_name_and_stay_frozen():
    model = tiny_llama(dtype=torch.float64)
    for p in model.parameters():
        p.requires_grad_(False)
    batch = random_batch(2, 101, seed=7)
    got = sequence_gram(model, batch, params=r"mlp")
    assert rel_err(got.matrix, sequence_gram(model, batch, params=r"mlp", method="exact").matrix) < 1e-10
    assert not any(p.requires_grad for p in model.parameters())


def test_lora_only():
    peft = pytest.importorskip("peft")
    base = tiny_llama(dtype=torch.float64)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                      lora_dropout=0.1))
    with torch.no_grad():  # LoRA B starts at zero; make the adapter non-trivial
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    batch = random_batch(3, 101, seed=8)
    got = sequence_gram(model, batch, params="lora")
    assert got.per_param and all("lora_" in k for k in got.per_param)
    assert set(got.per_param) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert rel_err(got.matrix, sequence_gram(model, batch, params="lora", method="exact").matrix) < 1e-10
    # default selection on a PEFT model = trainable = the adapters
    assert rel_err(sequence_gram(model, batch).matrix, got.matrix) < 1e-12


def test_blocks_sum_to_total():
    model = tiny_gpt2()
    got = sequence_gram(model, random_batch(3, 101, seed=9))
    for by in ["module", "layer", "param"]:
        blocks = got.blocks(by)
        assert rel_err(torch.stack(list(blocks.values())).sum(0), got.matrix) < 1e-12
    assert {"layer 0", "layer 1", "embed"} <= set(got.blocks("layer"))


def test_unknown_layer_type_uses_generic_fallback_not_skipped():
    model = tiny_llama(dtype=torch.float64)
    torch.manual_seed(0)
    model.model.layers[0].mlp.down_proj = ScaledLinear(48, 32).to(torch.float64)
    batch = random_batch(3, 101, seed=10)
    got = sequence_gram(model, batch)
    assert got.info["model.layers.0.mlp.down_proj.gain"].startswith("generic")
    assert rel_err(got.matrix, sequence_gram(model, batch, method="exact").matrix) < 1e-10
    assert float(got.per_param["model.layers.0.mlp.down_proj.gain"].abs().max()) > 0


def test_model_state_is_untouched():
    model = tiny_gpt2(resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)
    model.train()
    model.transformer.h[0].eval()                      # a mixed train/eval state must survive too
    model.transformer.wpe.weight.requires_grad_(False)
    batch = random_batch(3, 101, seed=11)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    rng = torch.get_rng_state()
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                for m in model.modules())
    first = sequence_gram(model, batch)
    second = sequence_gram(model, batch, params=r"wpe|\.h\.0\.")
    assert torch.equal(torch.get_rng_state(), rng)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert not model.transformer.wpe.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if "wpe" not in n)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]) and torch.equal(p.grad, grads[n]), n
    assert hooks == sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                        for m in model.modules())
    # dropout was off during the measurement: a repeat gives the identical matrix
    assert torch.equal(first.matrix, sequence_gram(model, batch).matrix)
    assert "transformer.wpe.weight" in second.per_param


def test_logps_match_model_forward():
    model = tiny_llama()
    batch = random_batch(3, 101, seed=12)
    got = sequence_gram(model, batch)
    with torch.no_grad():
        torch.testing.assert_close(got.logps.float(), sequence_logps(model, batch))
    assert torch.equal(got.lengths, batch["completion_mask"].sum(-1))


def test_bad_arguments():
    model = tiny_gpt2()
    batch = random_batch(2, 101)
    with pytest.raises(ValueError, match="unknown method"):
        sequence_gram(model, batch, method="fast")
    with pytest.raises(ValueError, match="selects no parameter"):
        sequence_gram(model, batch, params="no_such_param")
    with pytest.raises(ValueError, match="no LoRA"):
        sequence_gram(model, batch, params="lora")


class FunctionalTiedHead(torch.nn.Module):
    """Uses another module's weight functionally: a use no module hook can see."""

    def __init__(self, embed):
        super().__init__()
        self.embed = [embed]                           # not registered as a submodule

    def forward(self, x):
        return torch.nn.functional.linear(x, self.embed[0].weight)


def test_parameter_used_outside_its_module_is_reported_not_skipped():
    model = tiny_llama()
    model.lm_head = FunctionalTiedHead(model.model.embed_tokens)
    batch = random_batch(2, 101)
    with pytest.raises(RuntimeError, match="model.embed_tokens.weight.*used outside"):
        sequence_gram(model, batch)
    exact = sequence_gram(model, batch, method="exact")   # the slow path handles it
    assert float(exact.per_param["model.embed_tokens.weight"].abs().max()) > 0


@pytest.mark.slow
def test_real_pretrained_llama_on_hh_rlhf_pairs(stories_model, stories_tokenizer, hh_rows):
    """The real tiny Llama (RMSNorm, GQA, tied embeddings) on real human preference pairs, right-padded by encode_pairs."""
    from entangle.data import encode_pairs, load_pairs

    rows = [r for r in load_pairs(hh_rows[:60], on_mismatch="skip") if len(r["prompt"]) + max(len(r["chosen"]), len(r["rejected"])) < 350]
    batch = encode_pairs(stories_tokenizer, rows[:4], max_length=256)
    assert (batch["attention_mask"] == 0).any()                         # padding present
    exact = sequence_gram(stories_model, batch, method="exact")
    auto = sequence_gram(stories_model, batch)
    assert rel_err(auto.matrix, exact.matrix) <= 1e-5
    assert "shared by 2 uses" in auto.info["model.embed_tokens.weight"]
    # the same in float64 is exact to round-off
    model64 = stories_model.to(torch.float64)
    assert rel_err(sequence_gram(model64, batch).matrix, sequence_gram(model64, batch, method="exact").matrix) <= 1e-10


def test_non_finite_padded_activations_do_not_leak_into_the_gram():
    """The batched per-example product also multiplies padding positions; a NaN there must not reach K."""
    from entangle.capture.contrib import Factored

    torch.manual_seed(0)
    n, t, a, b = 3, 6, 4, 5
    grad = torch.randn(n, t, a, dtype=torch.float64)
    act = torch.randn(n, t, b, dtype=torch.float64)
    valid = torch.ones(n, t, dtype=torch.bool)
    valid[0, 4:] = False
    grad[0, 4:] = 0.0
    act[0, 5] = float("nan")                        # garbage in a padded position of sequence 0
    got = Factored.from_padded(grad, act, valid, mode="materialise").gram()
    per = torch.stack([grad[i, valid[i]].T @ act[i, valid[i]] for i in range(n)]).flatten(1)
    torch.testing.assert_close(got, per @ per.T, rtol=1e-12, atol=1e-12)


def test_bad_batches_name_the_sequence_and_pair():
    model = tiny_gpt2()
    batch = random_batch(2, 101)
    wrong_vocab = {**batch, "input_ids": batch["input_ids"].clone()}
    wrong_vocab["input_ids"][3, 1] = 500                   # a token id from a bigger tokenizer
    with pytest.raises(ValueError, match=r"sequence 3 \(pair 1, rejected\).*tokenizer does not match"):
        sequence_gram(model, wrong_vocab)
    empty = {**batch, "completion_mask": batch["completion_mask"].clone()}
    empty["completion_mask"][0] = 0
    with pytest.raises(ValueError, match=r"sequence 0 \(pair 0, chosen\) has no response token"):
        sequence_gram(model, empty, method="exact")
    with pytest.raises(ValueError, match="missing"):
        sequence_gram(model, {"input_ids": batch["input_ids"]})


class TiedHeadWithoutRule(torch.nn.Module):
    """An output head that owns the (tied) embedding weight but has no rule: generic fallback for that use."""

    def __init__(self, embed):
        super().__init__()
        self.weight = embed.weight

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight) * 0.9


def test_tied_weight_shared_by_a_rule_and_a_generic_use():
    model = tiny_llama(tie=True, dtype=torch.float64)
    model.lm_head = TiedHeadWithoutRule(model.model.embed_tokens)
    batch = random_batch(3, 101, seed=13)
    got = sequence_gram(model, batch)
    assert "shared by 2 uses" in got.info["model.embed_tokens.weight"]
    assert rel_err(got.matrix, sequence_gram(model, batch, method="exact").matrix) < 1e-10


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("method,dtype", [("auto", torch.float32), ("auto", torch.bfloat16),
                                          ("ghost", torch.float64), ("materialise", torch.float64)], ids=str)
def test_small_layers_reduced_together_match_per_call(arch, method, dtype, monkeypatch):
    """Calls of small layers are held back and reduced as one stacked call per shape: the same Gram blocks and the
    same per-layer choices as reducing each call on its own, and the exact twin's values."""
    from entangle.capture import engine

    model = MODELS[arch](dtype)
    batch = random_batch(3, 101, seed=4)
    batched, calls = [], GramEngine._contribute_batched

    def spy(self, group):
        done = calls(self, group)
        batched.append((len(group), done))
        return done

    monkeypatch.setattr(GramEngine, "_contribute_batched", spy)
    together = sequence_gram(model, batch, method=method)
    assert batched and all(done for _, done in batched) and max(n for n, _ in batched) >= 2
    monkeypatch.setattr(engine, "PENDING_ELEMS", 0)         # every call reduced as it arrives
    batched.clear()
    alone = sequence_gram(model, batch, method=method)
    assert not batched
    assert together.info == alone.info
    assert_matches(together, alone, {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 1e-6}[dtype])
    assert_matches(together, sequence_gram(model, batch, method="exact"), TOL[dtype])


def test_block_grams_are_the_diagonal_blocks_and_refuse_non_finite_padding():
    """block_grams on G calls stacked along the batch gives each call's own Gram matrix (ghost and materialised),
    and None when a non-finite padded activation would reach the product (the engine then reduces call by call)."""
    from entangle.capture.contrib import Dense, Factored, block_grams

    torch.manual_seed(0)
    g, n, t, a, b = 3, 4, 6, 5, 7
    grad = torch.randn(g * n, t, a, dtype=torch.float64)
    act = torch.randn(g * n, t, b, dtype=torch.float64)
    valid = torch.ones(g * n, t, dtype=torch.bool)
    valid[1, 4:] = valid[6, :2] = False
    grad[~valid] = 0.0
    for mode, kind in (("ghost", "ghost"), ("materialise", "materialised")):
        blocks, kinds = block_grams(Factored.from_padded(grad, act, valid, mode), g, mode)
        assert kinds == [kind] * g and blocks.shape == (g, n, n) and blocks.dtype == torch.float64
        for c in range(g):
            one = Factored.from_padded(grad[c * n:(c + 1) * n], act[c * n:(c + 1) * n], valid[c * n:(c + 1) * n],
                                       mode)
            torch.testing.assert_close(blocks[c], one.gram(), rtol=1e-12, atol=1e-12)
    rows = torch.randn(g * n, 9, dtype=torch.float64)
    blocks, _ = block_grams(Dense(rows), g)
    torch.testing.assert_close(blocks[2], rows[2 * n:] @ rows[2 * n:].T, rtol=1e-12, atol=1e-12)
    # calls whose own choice differs (here: call 1 has no position with a gradient but one) each keep theirs
    sparse = grad.clone()
    sparse[n:2 * n, 1:] = 0.0
    mask = valid.clone()
    mask[n:2 * n, 1:] = False
    wide = torch.randn(g * n, t, 40, dtype=torch.float64)
    kinds_alone = [Factored.from_padded(sparse[c * n:(c + 1) * n], wide[c * n:(c + 1) * n], mask[c * n:(c + 1) * n])
                   for c in range(g)]
    blocks, kinds = block_grams(Factored.from_padded(sparse, wide, mask), g)
    assert kinds == [one.kind for one in kinds_alone] and len(set(kinds)) == 2
    for c in range(g):
        torch.testing.assert_close(blocks[c], kinds_alone[c].gram(), rtol=1e-12, atol=1e-12)
    act[1, 5] = float("nan")                         # garbage at a padded position of call 0's sequence 1
    assert block_grams(Factored.from_padded(grad, act, valid, "materialise"), g, "materialise") is None
    for mode in ("ghost", "materialise"):            # within pairs too: the pair's own entries would be NaN
        assert block_grams(Factored.from_padded(grad, act, valid, mode), g, mode, within=True) is None
    assert torch.isfinite(Factored.from_padded(grad[:n], act[:n], valid[:n], "materialise").gram()).all()


def _within_entries(gram: torch.Tensor) -> torch.Tensor:
    """The [..., 2B, 2B] mask of each sequence's squared norm and each pair's inner products (pair k: k and B + k)."""
    k = torch.arange(gram.shape[-1]) % (gram.shape[-1] // 2)
    return k[:, None] == k[None, :]


def test_within_pair_blocks_are_the_whole_blocks_entries_and_nan_between_pairs():
    """block_grams(within=True): each example's squared norm and each pair's inner product equal the whole Gram's
    (ghost, materialised, calls whose own choice differs), the entries between pairs are NaN; Dense gives the whole
    blocks. factored_kind prices the ghost identity pair by pair."""
    from entangle.capture.contrib import Dense, Factored, block_grams, factored_kind

    torch.manual_seed(1)
    g, n, t, a, b = 3, 6, 7, 5, 9
    grad = torch.randn(g * n, t, a, dtype=torch.float64)
    act = torch.randn(g * n, t, b, dtype=torch.float64)
    valid = torch.rand(g * n, t) > 0.3
    valid[2] = False                                 # a sequence with no position carrying a gradient
    grad[~valid] = 0.0
    mask = _within_entries(torch.zeros(n, n))
    for mode in ("ghost", "materialise", "auto"):
        whole, kinds = block_grams(Factored.from_padded(grad, act, valid, mode), g, mode)
        within, kinds_w = block_grams(Factored.from_padded(grad, act, valid, mode), g, mode, within=True)
        assert within.shape == (g, n, n) and within.dtype == torch.float64
        torch.testing.assert_close(within[:, mask], whole[:, mask], rtol=1e-12, atol=1e-12)
        assert within[:, ~mask].isnan().all() and torch.isfinite(within[:, mask]).all()
        if mode != "auto":
            assert kinds_w == kinds
    # a call with most positions empty is materialised within pairs, the others ghost: each keeps its own choice
    sparse, smask = grad.clone(), valid.clone()
    sparse[n:2 * n, 1:] = 0.0
    smask[n:2 * n, 1:] = False
    wide = torch.randn(g * n, t, 60, dtype=torch.float64)
    whole, _ = block_grams(Factored.from_padded(sparse, wide, smask), g)
    within, kinds = block_grams(Factored.from_padded(sparse, wide, smask), g, within=True)
    assert len(set(kinds)) == 2
    torch.testing.assert_close(within[:, mask], whole[:, mask], rtol=1e-12, atol=1e-12)
    rows = torch.randn(g * n, 4, 3, dtype=torch.float64)
    torch.testing.assert_close(block_grams(Dense(rows), g, within=True)[0], block_grams(Dense(rows), g)[0])
    with pytest.raises(ValueError, match="even number"):
        block_grams(Dense(rows[:5]), 1, within=True)
    # pair by pair the ghost identity costs B (2T)² (a + b): cheaper than materialising where the batch's is not
    assert factored_kind(4 * 100, 4, 512, 512) == "materialised"
    assert factored_kind(4 * 100, 4, 512, 512, pair_m=[200, 200]) == "ghost"


@pytest.mark.parametrize("split", [False, True], ids=["pair", "split"])
def test_affine_within_blocks_are_each_calls_weight_and_bias_blocks(split, monkeypatch):
    """affine_within_blocks: calls of several widths (two share a width, stacked into one product, out of call order),
    rows scaled, positions without a gradient: each call's within-pair entries equal block_grams' of its weight
    (Factored) and of its bias (the summed output gradients, Dense); NaN between pairs; None when a position without
    a gradient holds a non-finite input (the reductions per call skip it). Both forms of the position products: one
    2T x 2T block per pair, and three T x T blocks (from SPLIT_PAIRS positions on); in any order for a sum."""
    from entangle.capture.contrib import Dense, Factored, affine_within_blocks, block_grams

    monkeypatch.setattr(contrib, "SPLIT_PAIRS", 1 if split else 10**9)
    torch.manual_seed(3)
    n, t = 6, 5
    widths = [(4, 7), (9, 4), (4, 3), (9, 7)]          # (input, output) per call
    inputs = [torch.randn(n, t, a, dtype=torch.float64) for a, _ in widths]
    grads = [torch.randn(n, t, d, dtype=torch.float64) for _, d in widths]
    for g in grads:
        g[1, 3:] = 0.0                                  # padding
        g[4, 0] = 0.0
    scale = torch.tensor([2.0, -1.0, 0.5, 0.0, 3.0, 1.5], dtype=torch.float64)
    weight, bias = affine_within_blocks(inputs, grads, torch.float64, scale)
    mask = _within_entries(torch.zeros(n, n))
    assert weight.shape == bias.shape == (len(widths), n, n) and weight.dtype == bias.dtype == torch.float64
    for c, (x, g) in enumerate(zip(inputs, grads, strict=True)):
        gs = g * scale.view(-1, 1, 1)
        want_w = block_grams(Factored.from_padded(x, gs, gs.any(-1), "ghost"), 1, "ghost", within=True)[0][0]
        want_b = block_grams(Dense(gs.sum(1)), 1, within=True)[0][0]
        torch.testing.assert_close(weight[c][mask], want_w[mask], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bias[c][mask], want_b[mask], rtol=1e-12, atol=1e-12)
        assert weight[c][~mask].isnan().all() and bias[c][~mask].isnan().all()
    assert (weight[:, 3, mask[3]] == 0).all() and (bias[:, 3, mask[3]] == 0).all()      # row scale 0
    loose = affine_within_blocks(inputs, grads, torch.float64, scale, ordered=False)
    for got, want in zip(loose, (weight, bias), strict=True):
        torch.testing.assert_close(got[:, mask].sum(0), want[:, mask].sum(0), rtol=1e-12, atol=1e-12)
    inputs[2][1, 4, 0] = float("inf")                   # at a position of sequence 1 without a gradient
    assert affine_within_blocks(inputs, grads, torch.float64, scale) is None


@pytest.mark.parametrize("split", [False, True], ids=["pair", "split"])
@pytest.mark.parametrize("arch", list(MODELS))
def test_within_pair_engine_reduces_the_affine_layers_of_a_pass_together(arch, split, monkeypatch):
    """GramEngine(within=True) reduces its held affine calls (Linear, Conv1D) whose ghost reduction is the cheaper all
    at once: the same entries as with them reduced group by group through their rules (and as the exact twin), in
    one chunk or several; a call priced cheaper materialised keeps its rule. With both forms of the position products
    (one 2T x 2T block per pair, or three T x T blocks)."""
    from entangle.capture import engine
    from entangle.capture.logprobs import model_logits
    from entangle.capture.measure import measured

    monkeypatch.setattr(contrib, "SPLIT_PAIRS", 1 if split else 10**9)

    model = MODELS[arch](torch.float32)
    batch = random_batch(3, 101, seed=6)
    fused, real = [], engine.affine_within_blocks

    def spy(inputs, *args, **kwargs):
        fused.append(len(inputs))
        return real(inputs, *args, **kwargs)

    monkeypatch.setattr(engine, "affine_within_blocks", spy)

    def within(mode):
        with measured(model, batch, None, None, None) as (inner, named):
            engine_ = GramEngine(inner, named, batch["input_ids"].shape[0], mode, within=True)
            return engine_.run(batch, model_logits).plain

    # the affine modules of the two blocks, and an untied Llama's head (a tied head has two uses: reduced apart)
    affine = {"gpt2": 8, "llama": 15, "llama_tied": 14}[arch]
    together = within("ghost")
    assert fused == [affine]
    assert sum(v.endswith(":ghost") and v.split(":")[0] in ("conv1d", "linear") for v in together.info.values()) \
        == affine * (2 if arch == "gpt2" else 1)                     # GPT-2's Conv1D biases too
    fused.clear()
    monkeypatch.setattr(engine, "AFFINE_ELEMS", 3 * 4 * 16 * 16 * 3)   # chunks of a few calls
    chunked = within("ghost")
    assert len(fused) > 1 and sum(fused) == affine
    fused.clear()
    auto = within("auto")                             # the narrow layers of this tiny model are materialised
    assert sum(fused) < affine
    assert any(v.endswith(":materialised") for v in auto.info.values())
    fused.clear()
    monkeypatch.setattr(engine, "AFFINE_ELEMS", 0)                     # every group through its rule
    apart = within("ghost")
    assert not fused
    exact = sequence_gram(model, batch, method="exact").matrix
    mask, scale = _within_entries(exact), float(exact.abs().max())
    for got in (together, chunked, auto):
        assert float((got.matrix[mask] - apart.matrix[mask]).abs().max()) <= 1e-6 * scale
        assert float((got.matrix[mask] - exact[mask]).abs().max()) <= TOL[torch.float32] * scale
        for name, block in apart.per_param.items():
            assert float((got.per_param[name][mask] - block[mask]).abs().max()) <= 1e-6 * scale, name
        assert got.matrix[~mask].isnan().all()


@pytest.mark.parametrize("arch", list(MODELS))
def test_within_pair_engine_total_alone_equals_the_sum_of_its_blocks(arch):
    """GramEngine(within=True, per_param=False) (what in-pass capture runs) adds every block into one total as it
    arrives: its matrix equals the per-parameter engine's, with every parameter measured and with a selection where
    some affine layers have only their weight or only their bias measured, in ghost and auto mode; info still names
    every parameter, per_param is empty, and per_param=False without within is refused."""
    from entangle.capture.logprobs import model_logits
    from entangle.capture.measure import measured

    model = MODELS[arch](torch.float32)
    batch = random_batch(3, 101, seed=8)
    n = batch["input_ids"].shape[0]
    odd = re.compile(r"\.(\d+)\.")

    def partial(name, _):                   # layer 0: weights only; layer 1: biases and norms only
        layer = odd.search(name)
        return layer is None or (layer.group(1) == "0") == name.endswith("weight") or "norm" in name or "ln_" in name

    for params in (None, partial):
        for mode in ("ghost", "auto"):
            got = {}
            for per_param in (True, False):
                with measured(model, batch, params, None, None) as (inner, named):
                    engine = GramEngine(inner, named, n, mode, within=True, per_param=per_param)
                    got[per_param] = engine.run(batch, model_logits).plain
            mask = _within_entries(got[True].matrix)
            scale = float(got[True].matrix[mask].abs().max())
            assert float((got[False].matrix[mask] - got[True].matrix[mask]).abs().max()) <= 1e-9 * scale, (params, mode)
            assert got[False].matrix[~mask].isnan().all()
            assert got[False].per_param == {} and got[False].info.keys() == got[True].info.keys()
            assert got[False].info == got[True].info
    if arch == "gpt2":
        assert len([nm for nm, _ in named if nm.endswith("bias") and odd.search(nm)]) > 0
    with pytest.raises(ValueError, match="within"):
        GramEngine(model, list(model.named_parameters()), n, per_param=False)


@pytest.mark.parametrize("whole", [True, False], ids=["small", "large"])
def test_positions_with_gradient_is_any(whole, monkeypatch):
    """The engine's mask of positions with a gradient (a small tensor read whole by max |g|, a large one by a column
    and the rows it leaves open) equals g.any(-1) with zero rows, rows zero in the first entry only, NaN and inf."""
    from entangle.capture import engine
    from entangle.capture.engine import positions_with_gradient

    monkeypatch.setattr(engine, "SMALL_GRADIENT", 1 << 19 if whole else 0)

    g = torch.randn(3, 5, 4)
    g[0, 1] = 0.0
    g[1, 2, 0] = 0.0                                   # first entry zero, others not
    g[2, 3] = 0.0
    g[2, 3, 2] = float("nan")
    g[2, 4, :] = 0.0
    g[2, 4, 3] = float("-inf")
    g[1, 0, 0] = float("nan")
    got = positions_with_gradient(g)
    assert torch.equal(got, g.any(-1)) and got.shape == (3, 5)
    assert not got[0, 1] and got[1, 2] and got[2, 3] and got[2, 4]
    assert torch.equal(positions_with_gradient(torch.zeros(2, 3, 4)), torch.zeros(2, 3, dtype=torch.bool))


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_within_pair_engine_matches_the_exact_twin(arch, dtype):
    """GramEngine(within=True), as in-pass capture runs it: each sequence's norm and each pair's inner product equal
    the exact twin's (GPT-2 with Conv1D, tied embeddings and broadcast positions; Llama; padding), both with the
    small layers reduced together and call by call; the entries between pairs are NaN, per parameter too."""
    from entangle.capture.logprobs import model_logits
    from entangle.capture.measure import measured

    model = MODELS[arch](dtype)
    batch = random_batch(3, 101, seed=5)
    exact = sequence_gram(model, batch, method="exact")
    with measured(model, batch, None, None, None) as (inner, named):
        engine = GramEngine(inner, named, batch["input_ids"].shape[0], within=True)
        got = engine.run(batch, model_logits).plain
    mask = _within_entries(exact.matrix)
    assert got.matrix[~mask].isnan().all() and all(b[~mask].isnan().all() for b in got.per_param.values())
    scale = exact.matrix.abs().max()
    assert float((got.matrix[mask] - exact.matrix[mask]).abs().max() / scale) <= TOL[dtype]
    for name, block in exact.per_param.items():
        assert float((got.per_param[name][mask] - block[mask]).abs().max() / scale) <= TOL[dtype], name
    norm2, inner_ = got.within_pair()
    torch.testing.assert_close(norm2, exact.matrix.diagonal(), rtol=TOL[dtype], atol=TOL[dtype] * float(scale))
    assert inner_.shape == (3,) and torch.isfinite(inner_).all()
    with pytest.raises(ValueError, match="within=True"):
        GramEngine(model, named, 5, within=True)
    with pytest.raises(ValueError, match="within=True"):
        GramEngine(model, named, 6, within=True, pairs=True)
