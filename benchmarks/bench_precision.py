"""Precision table: the measurement of float32, bf16 and autocast models against the float64 exact twin.

    python benchmarks/bench_precision.py                      # the README table (about 4 minutes on one core)
    python benchmarks/bench_precision.py --models gpt2 --pairs 4

Per model and precision, the hook engine's measurement (``sequence_gram`` for the whole Gram matrix; the
monitor's ``measure(structure="pairs")`` for the per-pair frame) is compared with the exact twin (one backward
per sequence, flattened float64 gradients) run on a float64 copy of the same weights, i.e. with the error of the
measurement itself and of every bf16 operation of the forward and backward passes included:

* ``float32``: float32 weights, no autocast;
* ``bf16 weights``: ``model.to(torch.bfloat16)`` (pure-bf16 training); the reference holds these rounded weights;
* ``float32 + bf16 autocast``: float32 weights measured inside ``torch.autocast(dtype=torch.bfloat16)``, as
  ``Trainer(bf16=True)`` runs the forward (accelerate wraps ``model.forward`` in autocast).

Columns: the Gram entries (max |ΔK| / max |K|), and the same for the exact twin run at that precision (what
the precision costs on its own, without the engine); each pair's gradient cosine (max absolute error); the
per-pair predictions ``pred_dlogp_chosen/rejected`` of ``pair_frame`` (median relative error, both columns);
the share of pairs whose regime is the one the float64 twin gives. The objective is DPO's sigmoid loss (beta 0.1)
with reference log-probs the float64 log-probs shifted by seeded N(0, 1) noise.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from entangle.capture.logprobs import response_lengths, sequence_logps
from entangle.capture.measure import measure, sequence_gram
from entangle.data import encode_pairs, load_pairs
from entangle.metrics import batch_weights, pair_frame

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
MODELS = {"gpt2": "GPT-2 (4 × 128, tied embeddings)", "llama": "Llama (4 × 128, RMSNorm, GQA)",
          "stories260k": "stories260k (real weights, HH-RLHF pairs)"}
PRECISIONS = ("float32", "bf16 weights", "float32 + bf16 autocast")
OBJECTIVE, BETA = "sigmoid", 0.1


def random_pairs(vocab: int, pairs: int, prompt: int, response: int, seed: int) -> dict[str, torch.Tensor]:
    """``pairs`` random pairs sharing a prompt of ``prompt`` tokens, responses of ``response`` ± 25%, right-padded."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * pairs
    lens = [response + int(x) for x in torch.randint(-response // 4, response // 4 + 1, (n,), generator=g)]
    width = prompt + max(lens)
    ids = torch.randint(3, vocab, (n, width), generator=g)
    ids[pairs:, :prompt] = ids[:pairs, :prompt]
    att = torch.zeros(n, width, dtype=torch.long)
    comp = torch.zeros(n, width, dtype=torch.long)
    for i, r in enumerate(lens):
        att[i, :prompt + r] = 1
        comp[i, prompt:prompt + r] = 1
    ids = ids * att
    return {"input_ids": ids, "attention_mask": att, "completion_mask": comp}


def build(name: str, pairs: int, seed: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A float32 model in eval mode and a batch of ``pairs`` pairs (chosen then rejected)."""
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    if name == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=2048, n_positions=128, n_embd=128, n_layer=4, n_head=4,
                                           bos_token_id=1, eos_token_id=2))
        return model.eval(), random_pairs(2048, pairs, 16, 32, seed)
    if name == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=256,
                                             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=128))
        with torch.no_grad():               # random init leaves norm weights at 1: make their gradients generic
            for n, p in model.named_parameters():
                if n.endswith("norm.weight"):
                    p.add_(0.1 * torch.randn_like(p))
        return model.eval(), random_pairs(2048, pairs, 16, 32, seed)
    if name == "stories260k":
        model = AutoModelForCausalLM.from_pretrained(DATA / "stories260k", dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(DATA / "stories260k")
        tok.pad_token = tok.eos_token
        with gzip.open(DATA / "hh-rlhf-harmless-test.jsonl.gz", "rt", encoding="utf-8") as f:
            raw = [json.loads(line) for _, line in zip(range(200), f, strict=False)]
        rows = [r for r in load_pairs(raw, on_mismatch="skip")
                if len(r["prompt"]) + max(len(r["chosen"]), len(r["rejected"])) < 350]
        return model, encode_pairs(tok, rows[:pairs], max_length=256)
    raise ValueError(f"unknown model {name!r}; choose from {list(MODELS)}")


def at_precision(model: torch.nn.Module, precision: str) -> tuple[torch.nn.Module, contextlib.AbstractContextManager,
                                                                    torch.nn.Module]:
    """(the model measured, the context it is measured in, the float64 copy of its weights: the reference)."""
    if precision == "bf16 weights":
        measured = copy.deepcopy(model).to(torch.bfloat16)
        return measured, contextlib.nullcontext(), copy.deepcopy(measured).to(torch.float64)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "float32 + bf16 autocast" \
        else contextlib.nullcontext()
    return model, context, copy.deepcopy(model).to(torch.float64)


def frames(model: torch.nn.Module, batch: dict, ref: torch.Tensor, method: str) -> tuple[torch.Tensor, pd.DataFrame]:
    """(the whole Gram matrix, the per-pair frame as the monitor measures it) of one model."""
    lengths = response_lengths(batch)

    def weights(logps: torch.Tensor) -> torch.Tensor:
        return batch_weights(OBJECTIVE, logps, lengths, ref, beta=BETA)

    gram = sequence_gram(model, batch, method=method)
    view = gram if method == "exact" else measure(model, batch, structure="pairs", weights=weights).plain
    return gram.matrix, pair_frame(view, OBJECTIVE, ref, beta=BETA)


def rel_max(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|."""
    return float((got - want).abs().max() / want.abs().max())


def errors(name: str, precision: str, pairs: int, seed: int) -> dict[str, float]:
    """One row of the table."""
    model, batch = build(name, pairs, seed)
    measured, context, reference = at_precision(model, precision)
    with torch.no_grad():
        logps64 = sequence_logps(reference, batch)
    ref = logps64 + torch.randn(logps64.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    k64, want = frames(reference, batch, ref, "exact")
    with context:
        k, got = frames(measured, batch, ref, "auto")
        k_exact = sequence_gram(measured, batch, method="exact").matrix
    pred = ["pred_dlogp_chosen", "pred_dlogp_rejected"]
    rel_pred = (got[pred].to_numpy() - want[pred].to_numpy()) / np.abs(want[pred].to_numpy())
    return {"model": MODELS[name], "precision": precision, "gram": rel_max(k, k64),
            "gram_exact_twin": rel_max(k_exact, k64),
            "cosine": float(np.abs(got["cosine"] - want["cosine"]).max()),
            "pred": float(np.median(np.abs(rel_pred))),
            "regime": 100.0 * float((got["regime"] == want["regime"]).mean())}


def markdown(rows: list[dict[str, float]]) -> str:
    lines = ["| model | precision | Gram max\\|ΔK\\|/max\\|K\\| | exact twin at this precision | cosine max abs "
             "error | `pred_dlogp_*` median rel. error | same regime |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['precision']} | {r['gram']:.1e} | {r['gram_exact_twin']:.1e} | "
                     f"{r['cosine']:.1e} | {r['pred']:.1e} | {r['regime']:.0f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--pairs", type=int, default=8, help="pairs per batch (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: these small models run fastest on one, ~20x so on a busy machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [errors(m, p, args.pairs, args.seed) for m in args.models for p in args.precisions]
    print(f"{args.pairs} pairs per model, objective {OBJECTIVE} (beta {BETA}); reference: the float64 exact twin "
          "on the same weights")
    print(markdown(rows))


if __name__ == "__main__":
    main()
