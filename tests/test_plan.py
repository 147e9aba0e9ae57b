"""entangle.plan against what a real measurement and a real DPO step count: FLOPs (FlopCounterMode) and the peak
of live tensor bytes (LiveBytes), on a GPT-2 (tied embeddings) and a Llama from config and on stories260k."""

from __future__ import annotations

import pytest
import torch
from helpers import _one_line_error

from entangle import measure
from entangle.cli import main
from entangle.plan import LiveBytes, dpo_loss, flop_counter, plan

pytestmark = pytest.mark.usefixtures("one_thread")

GPT2 = dict(model_type="gpt2", vocab_size=2048, n_positions=128, n_embd=128, n_layer=2, n_head=4,
            bos_token_id=0, eos_token_id=0)
LLAMA = dict(model_type="llama", vocab_size=2048, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def _batch(pairs: int, prompt: int, response: int, vocab: int) -> dict[str, torch.Tensor]:
    """Random token ids, each pair's two sequences sharing their prompt, no padding."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (2 * pairs, prompt + response), generator=g)
    ids[pairs:, :prompt] = ids[:pairs, :prompt]
    comp = torch.zeros_like(ids)
    comp[:, prompt:] = 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": comp}


def _measured(model, batch, structure: str) -> tuple[float, int]:
    """(FLOPs of measure / FLOPs of a DPO step, peak live bytes of measure) on the real model."""
    weights = torch.ones(batch["input_ids"].shape[0], dtype=torch.float64) if structure == "pairs" else None
    with flop_counter() as f, LiveBytes() as live:
        measure(model, batch, structure=structure, weights=weights)
    measured = f.get_total_flops()
    with flop_counter() as f:
        dpo_loss(model, batch).backward()
    model.zero_grad(set_to_none=True)
    return measured / f.get_total_flops(), live.peak


@pytest.mark.parametrize("name,structure", [("gpt2", "pairs"), ("llama", "full"), ("stories260k", "pairs")])
def test_plan_matches_a_real_measurement(name, structure, stories_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    pairs, prompt, response = 4, 24, 40
    if name == "stories260k":
        config = stories_dir
        model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    else:
        config = GPT2 if name == "gpt2" else LLAMA
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config)).eval()
    frame = plan(config, pairs=pairs, prompt=prompt, response=response, dtype="float32", structure=structure)
    totals = frame.attrs["totals"]
    ratio, peak = _measured(model, _batch(pairs, prompt, response, model.config.vocab_size), structure)
    assert totals["flop_ratio"] == pytest.approx(ratio, rel=0.25), (totals["flop_ratio"], ratio)
    assert totals["measure_extra_bytes"] == pytest.approx(peak, rel=0.25), (totals["measure_extra_bytes"], peak)
    # the table: one row per layer type, the engine's choices, and a total that adds up
    rows = frame.set_index("layer_type")
    assert rows.loc["total", "measure_flops"] == totals["measure_flops"]
    assert rows.drop("total")["measure_flops"].sum() == totals["measure_flops"]
    assert "Embedding" in rows.index and "sparse" in rows.loc["Embedding", "method"]
    assert "materialised" in rows.loc["Conv1D" if name == "gpt2" else "Linear", "method"]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_plan_in_pass_matches_a_real_capture(name):
    """plan(in_pass=True): the products of in-pass capture (each pair's entries alone, the affine layers reduced
    together over the pass's positions) against the FLOPs a real capture adds to a real DPO step."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from entangle.capture.inpass import PassRecorder
    from entangle.capture.params import select_params

    pairs, prompt, response = 4, 24, 40
    config = GPT2 if name == "gpt2" else LLAMA
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config)).train()
    batch = _batch(pairs, prompt, response, model.config.vocab_size)

    def step() -> int:
        with flop_counter() as f:
            dpo_loss(model, batch).backward()
        model.zero_grad(set_to_none=True)
        return f.get_total_flops()

    plain = step()
    recorder = PassRecorder(model, select_params(model), strict=True)
    with recorder.recording() as records:
        recorded = step()
    recorder.close()
    assert len(records) == 1 and torch.isfinite(records[0].inner).all()
    frame = plan(config, pairs=pairs, prompt=prompt, response=response, dtype="float32", in_pass=True)
    totals = frame.attrs["totals"]
    assert totals["measure_flops"] == pytest.approx(recorded - plain, rel=0.15), (totals["measure_flops"],
                                                                                  recorded - plain)
    assert "ghost" in frame.set_index("layer_type").loc["Conv1D" if name == "gpt2" else "Linear", "method"]


def test_plan_shards_state_not_activations():
    one = plan(LLAMA, pairs=4, prompt=8, response=8).attrs["totals"]
    two = plan(LLAMA, pairs=4, prompt=8, response=8, world_size=2, in_pass=True)
    totals = two.attrs["totals"]
    assert totals["adam_bytes"] == one["adam_bytes"] / 2 and totals["fsdp_unsharded_bytes"] > 0
    assert totals["train_sequences_per_gpu"] == one["train_sequences_per_gpu"] / 2
    # in the trainer's pass: no forward or backward of its own, only the per-example products
    assert (two["measure_flops"] == two["product_flops"]).all() and totals["measure_flops"] > 0


def test_plan_cli(tmp_path, capsys):
    import json

    import pandas as pd

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(LLAMA))
    out = tmp_path / "plan.csv"
    assert main(["plan", "--model", str(cfg), "--pairs", "2", "--prompt", "8", "--response", "8",
                 "--world-size", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "x a training step" in text and "memory per GPU" in text and "LlamaRMSNorm" in text
    assert list(pd.read_csv(out)["layer_type"])[-1] == "total"
    _one_line_error(capsys, ["plan", "--model", str(tmp_path / "nothing"), "--pairs", "2", "--prompt", "8",
                             "--response", "8"], match="bundled config")
