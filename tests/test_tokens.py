"""Token gradient maps against the per-token brute force (one backward per token, flattened, float64)."""

from __future__ import annotations

import warnings

import matplotlib
import pytest
import torch
from helpers import random_batch, tiny_gpt2, tiny_llama
from twins import loop_token_grads

from entangle.capture.measure import sequence_gram
from entangle.capture.tokens import BlockwiseUnsupported, full_token_gram, token_gram, token_map
from entangle.capture.tokens.blockwise import find_blocks
from entangle.metrics.covariates import response_hidden

matplotlib.use("Agg")

MODELS = {
    "gpt2": lambda: tiny_gpt2(dtype=torch.float64),                 # Conv1D, tied embeddings, learned positions
    "llama": lambda: tiny_llama(dtype=torch.float64),
    "llama_tied": lambda: tiny_llama(tie=True, dtype=torch.float64),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_full_matches_per_token_brute_force(arch, padding_side):
    model = MODELS[arch]()
    batch = random_batch(3, 101, padding_side=padding_side, seed=1)
    gram, n_w = token_gram(model, batch, pair=1)
    grads = loop_token_grads(model, batch, pair=1)
    assert n_w == int(batch["completion_mask"][1].sum())
    assert gram.shape == (grads.shape[0],) * 2
    assert rel_err(gram, grads @ grads.T) < 1e-10


def test_wl_block_sums_to_the_pair_gram_entry():
    """GPT-2 in float64 is float64 throughout (Llama's RMSNorm rounds through float32, ~1e-7)."""
    model = MODELS["gpt2"]()
    batch = random_batch(3, 101, padding_side="left", seed=4)
    K = sequence_gram(model, batch).matrix
    frame = token_map(model, batch, pair=2)
    sums = frame.groupby("block")["inner"].sum()
    scale = float(K.abs().max())
    assert abs(sums["wl"] - float(K[2, 5])) / scale < 1e-10
    assert abs(sums["ww"] - float(K[2, 2])) / scale < 1e-10
    assert abs(sums["ll"] - float(K[5, 5])) / scale < 1e-10
    # row sums are <grad l_t, g_l>: one token against the whole rejected response
    wl = frame[frame.block == "wl"].pivot(index="t", columns="u", values="inner")
    assert abs(wl.sum(axis=1).sum() - float(K[2, 5])) / scale < 1e-10


def test_params_subset_matches_brute_force():
    model = MODELS["llama_tied"]()
    batch = random_batch(2, 101, seed=2)
    gram, _ = token_gram(model, batch, pair=0, params=r"layers\.1\.|embed")
    grads = loop_token_grads(model, batch, pair=0, params=r"layers\.1\.|embed")
    assert rel_err(gram, grads @ grads.T) < 1e-10


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_head_matches_brute_force_on_the_head_weight(padding_side):
    model = MODELS["llama"]()
    batch = random_batch(3, 101, padding_side=padding_side, seed=2)
    gram, _ = token_gram(model, batch, pair=2, method="head")
    grads = loop_token_grads(model, batch, pair=2, params=["lm_head.weight"])
    assert rel_err(gram, grads @ grads.T) < 1e-10
    # params may name the head weight, nothing else
    torch.testing.assert_close(token_gram(model, batch, 2, params=["lm_head.weight"], method="head")[0], gram)
    with pytest.raises(ValueError, match="output-layer weight only"):
        token_gram(model, batch, 2, params=r"layers", method="head")


def test_head_on_tied_gpt2_is_the_head_use_only():
    """For tied embeddings the closed form is the head use alone: equal to the brute force on an untied copy."""
    model = MODELS["gpt2"]()
    batch = random_batch(2, 101, seed=3)
    head_only, _ = token_gram(model, batch, pair=1, method="head")
    untied = MODELS["gpt2"]()
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    grads = loop_token_grads(untied, batch, pair=1, params=["lm_head.weight"])
    assert rel_err(head_only, grads @ grads.T) < 1e-10


def test_frame_layout_tokens_and_cosines():
    model = MODELS["gpt2"]()
    batch = random_batch(2, 101, seed=5)
    n_w, n_l = (int(batch["completion_mask"][i].sum()) for i in (1, 3))

    class Tok:
        def decode(self, ids):
            return f"<{ids[0]}>"

    frame = token_map(model, batch, pair=1, tokenizer=Tok())
    assert list(frame.columns) == ["pair", "block", "t", "u", "token_w", "token_u", "inner", "cosine"]
    assert frame.groupby("block").size().to_dict() == {"wl": n_w * n_l, "ww": n_w * n_w, "ll": n_l * n_l}
    assert (frame.pair == 1).all()
    ids_w = batch["input_ids"][1][batch["completion_mask"][1].bool()].tolist()
    first = frame[(frame.block == "wl") & (frame.u == 0)].sort_values("t")
    assert first.token_w.tolist() == [f"<{i}>" for i in ids_w]
    diag = frame[(frame.block == "ww") & (frame.t == frame.u)]
    torch.testing.assert_close(torch.tensor(diag.cosine.to_numpy()), torch.ones(n_w, dtype=torch.float64))
    assert frame.cosine.abs().max() <= 1 + 1e-12
    plain = token_map(model, batch, pair=1, method="head")
    assert plain.token_w.map(type).eq(int).all()


def test_model_state_is_restored():
    model = MODELS["llama"]().train()
    model.model.layers[0].mlp.gate_proj.weight.requires_grad_(False)
    batch = random_batch(2, 101, seed=6)
    token_map(model, batch, pair=0)
    token_map(model, batch, pair=0, method="head")
    response_hidden(model, batch)
    assert model.training
    assert not model.model.layers[0].mlp.gate_proj.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_bad_arguments():
    model = MODELS["gpt2"]()
    batch = random_batch(2, 101)
    with pytest.raises(ValueError, match="out of range"):
        token_map(model, batch, pair=2)
    with pytest.raises(ValueError, match="unknown method"):
        token_map(model, batch, method="vmap")


def test_response_hidden_sums_and_means_the_predicting_positions():
    model = MODELS["llama"]()
    batch = random_batch(2, 101, padding_side="left", seed=7)
    h_sum, h_mean = response_hidden(model, batch)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp(min=0), output_hidden_states=True)
    h = out.hidden_states[-1]
    for i in range(4):
        pos = batch["completion_mask"][i].bool().nonzero().flatten()
        torch.testing.assert_close(h_sum[i], h[i, pos - 1].sum(0).detach())
        torch.testing.assert_close(h_mean[i], h[i, pos - 1].mean(0).detach())


def test_heatmap_draws_the_wl_block():
    import pandas as pd

    from entangle.report.tokens import token_heatmap

    frame = pd.DataFrame({
        "pair": 0, "block": "wl", "t": [0, 0, 1, 1], "u": [0, 1, 0, 1],
        "token_w": ["a", "a", " b\n", " b\n"], "token_u": ["c", "d", "c", "d"],
        "inner": [1.0, -2.0, 0.5, 0.0], "cosine": [0.5, -0.9, 0.1, 0.0],
    })
    fig = token_heatmap(frame, pair=0)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "␣b\\n"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["c", "d"]
    im = ax.images[0]
    assert im.norm.vmin == -1 and im.norm.vmax == 1 and im.norm.vcenter == 0
    assert "cosine" in fig.axes[1].get_ylabel()
    inner = token_heatmap(frame, pair=0, value="inner").axes[0].images[0].norm
    assert inner.vmin == -2 and inner.vmax == 2
    with pytest.raises(ValueError, match="no rows"):
        token_heatmap(frame, pair=3)


# -- block-wise backward (the default of method="full") against prefix copies and the brute force ----------------
@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("strategy,chunk", [("blockwise", None), ("blockwise", 3), ("copies", None)])
def test_both_full_strategies_match_brute_force(arch, strategy, chunk):
    """chunk=3: the copies go through each block three at a time and the cross-chunk terms are formed at the end."""
    model = MODELS[arch]()
    batch = random_batch(3, 101, padding_side="left", seed=11)
    gram = full_token_gram(model, batch, (2, 5), strategy=strategy, chunk=chunk)
    grads = loop_token_grads(model, batch, pair=2)
    assert rel_err(gram, grads @ grads.T) < 1e-10
    assert all("forward" not in block.__dict__ for block in find_blocks(model))   # patches removed


@pytest.mark.parametrize("arch", ["gpt2", "llama_tied"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_blockwise_in_low_precision(arch, dtype, tol):
    """float32 / bf16 models: the block-wise map against the per-token loop run on the same model."""
    model = MODELS[arch]().to(dtype)
    batch = random_batch(2, 101, seed=12)
    gram = full_token_gram(model, batch, (1, 3), strategy="blockwise", chunk=4)
    grads = loop_token_grads(model, batch, pair=1)
    assert gram.dtype == torch.float64 and torch.isfinite(gram).all()
    assert rel_err(gram, grads @ grads.T) < tol


class _Out:
    def __init__(self, logits):
        self.logits = logits


class _Gate(torch.nn.Module):
    """A layer type without a rule (the engine's generic fallback handles it)."""

    def __init__(self, d):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(d, dtype=torch.float64))

    def forward(self, h):
        return h * torch.sigmoid(self.weight)


class _Block(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.proj, self.gate = torch.nn.Linear(d, d, bias=False, dtype=torch.float64), _Gate(d)

    def forward(self, h, mix):                      # mix: a causal [L, L] matrix, not per sequence; h = 0 at padding
        return h + self.gate(torch.tanh(mix @ self.proj(h)))


class _ToyLM(torch.nn.Module):
    """A causal LM whose blocks get a [L, L] argument: with L equal to the number of copies, taking it for a
    per-sequence argument is caught and method='full' falls back to prefix copies."""

    def __init__(self, vocab=101, d=8):
        super().__init__()
        torch.manual_seed(3)
        self.embed = torch.nn.Embedding(vocab, d, dtype=torch.float64)
        self.layers = torch.nn.ModuleList([_Block(d) for _ in range(2)])
        self.head = torch.nn.Linear(d, vocab, bias=False, dtype=torch.float64)

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        L = input_ids.shape[1]
        mix = torch.tril(torch.ones(L, L, dtype=torch.float64)) / 4
        h = self.embed(input_ids) * attention_mask[..., None]
        for block in self.layers:
            h = block(h, mix)
        return _Out(self.head(h))


def _toy_batch(n_chosen: int, n_rejected: int, prompt: int = 2) -> dict:
    g = torch.Generator().manual_seed(5)
    L = prompt + max(n_chosen, n_rejected)
    ids = torch.randint(3, 101, (2, L), generator=g)
    att = torch.zeros(2, L, dtype=torch.long)
    comp = torch.zeros(2, L, dtype=torch.long)
    for i, n in enumerate((n_chosen, n_rejected)):
        att[i, :prompt + n] = 1
        comp[i, prompt:prompt + n] = 1
    return {"input_ids": ids, "attention_mask": att, "completion_mask": comp}


@pytest.mark.parametrize("chunk", [None, 2])
def test_blockwise_with_an_unknown_layer_type_inside_blocks(chunk):
    model = _ToyLM()
    batch = _toy_batch(4, 3)                        # K = 7 copies, context width 5
    gram = full_token_gram(model, batch, (0, 1), strategy="blockwise", chunk=chunk)
    grads = loop_token_grads(model, batch, pair=0)
    assert rel_err(gram, grads @ grads.T) < 1e-10


def test_block_reused_twice():
    """The same block object called twice: its parameters are used in two separately differentiated parts, whose
    cross terms the block-wise backward cannot form. It refuses, and 'auto' falls back to prefix copies."""
    model = _ToyLM()
    model.layers[1] = model.layers[0]
    batch = _toy_batch(4, 3)
    grads = loop_token_grads(model, batch, pair=0)
    for chunk in (None, 2):
        with pytest.raises(BlockwiseUnsupported, match="more than one separately differentiated part"):
            full_token_gram(model, batch, (0, 1), strategy="blockwise", chunk=chunk)
        with pytest.warns(UserWarning, match="prefix copies"):
            gram = full_token_gram(model, batch, (0, 1), chunk=chunk)
        assert rel_err(gram, grads @ grads.T) < 1e-10


def test_ambiguous_block_argument_falls_back_to_copies():
    model = _ToyLM()
    batch = _toy_batch(4, 1)                        # K = 5 copies = context width 5: mix [5, 5] looks per-copy
    with pytest.raises(BlockwiseUnsupported):
        full_token_gram(model, batch, (0, 1), strategy="blockwise")
    with pytest.warns(UserWarning, match="prefix copies"):
        gram, _ = token_gram(model, batch, pair=0)
    grads = loop_token_grads(model, batch, pair=0)
    assert rel_err(gram, grads @ grads.T) < 1e-10
    assert all("forward" not in block.__dict__ for block in model.layers)


@pytest.mark.parametrize("chunk", [None, 2])
def test_blockwise_lora_adapters_only(chunk):
    """Only adapter weights inside the blocks measured: nothing below the first block carries a gradient."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(MODELS["llama"](), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"],
                                                                    init_lora_weights=False))
    batch = random_batch(2, 101, seed=3)
    gram = full_token_gram(model, batch, (0, 2), params="lora", strategy="blockwise", chunk=chunk)
    grads = loop_token_grads(model, batch, pair=0, params="lora")
    assert rel_err(gram, grads @ grads.T) < 1e-10


@pytest.mark.slow
def test_blockwise_on_real_stories260k_and_hh_pairs(hh_rows, stories_model, stories_tokenizer):
    """The real pretrained tiny Llama (tied embeddings, GQA) on real HH-RLHF pairs, float64, chunked."""
    from entangle.data import encode_pairs, load_pairs

    model = stories_model.to(torch.float64)
    batch = encode_pairs(stories_tokenizer, load_pairs(hh_rows[:2]), max_prompt_length=16, max_length=40)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)          # no fallback to prefix copies
        gram = full_token_gram(model, batch, (1, 3), strategy="auto", chunk=5)
    grads = loop_token_grads(model, batch, pair=1)
    assert rel_err(gram, grads @ grads.T) < 1e-10


def _arch(name: str):
    import transformers as T

    common = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    cfg, cls, kw, dtype = {
        "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, common, torch.float64),
        "mistral_sliding": (T.MistralConfig, T.MistralForCausalLM, {**common, "sliding_window": 4}, torch.float64),
        # Gemma2 (logit soft-capping, alternating sliding / global attention) gives NaN rows in float64 itself
        "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, {**common, "head_dim": 8, "sliding_window": 4}, torch.float32),
        "gpt_neox": (T.GPTNeoXConfig, T.GPTNeoXForCausalLM, {k: v for k, v in common.items()
                                                             if k != "num_key_value_heads"}, torch.float64),
        "phi3": (T.Phi3Config, T.Phi3ForCausalLM, {**common, "pad_token_id": 0}, torch.float64),
    }[name]
    torch.manual_seed(0)
    return cls(cfg(**kw)).to(dtype).eval()


@pytest.mark.parametrize("name", ["qwen2", "mistral_sliding", "gemma2", "gpt_neox", "phi3"])
def test_blockwise_on_other_architectures(name):
    model = _arch(name)
    batch = random_batch(2, 101, padding_side="left", seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)               # block-wise, no fallback
        gram = full_token_gram(model, batch, (1, 3), chunk=3)
    grads = loop_token_grads(model, batch, pair=1)
    assert rel_err(gram, grads @ grads.T) < (1e-6 if name == "gemma2" else 1e-10)
