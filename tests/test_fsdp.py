"""Sharded training: FSDP2 (``fully_shard``) measured in two CPU processes against the whole model (``measure``, the
Monitor, token maps, in-pass capture; TRL's DPOTrainer under accelerate's FSDP2 plugin with the callback); FSDP1, DeepSpeed ZeRO-3 refused (also in-pass), ZeRO-1/2 measured without the Adam view
(fakes of the attributes DeepSpeed and accelerate set)."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import random_batch, run_torchrun, tiny_gpt2

from entangle.capture.inpass import InPassError, PassRecorder
from entangle.capture.measure import measure
from entangle.capture.params import select_params
from entangle.integrations.callback import _refuse_sharded
from entangle.integrations.distributed import check_every_rank_measures
from entangle.integrations.training_pass import refuse_in_pass
from entangle.runio import read_run

WORKER = Path(__file__).resolve().parent / "fsdp_worker.py"
TRAINER_WORKER = Path(__file__).resolve().parent / "fsdp_trainer_worker.py"
MODELS = ("gpt2", "llama", "stories260k")
# in-pass cases of the worker (model/fully_shard layout/loss path), see IN_PASS in fsdp_worker.py
IN_PASS = ("gpt2/blocks/logits", "stories260k/blocks/fused", "stories260k/accelerate/logits", "llama/alone/fused")


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_fully_shard_two_processes(tmp_path):
    """GPT-2 (tied), Llama and stories260k sharded over 2 ranks: Gram / pair statistics in both geometries and the
    update dots equal the whole model's (float32, <= 1e-5 relative); so do the Monitor's tables. In-pass capture of a
    hand-written DPO step on each rank's own pairs (logits or TRL's fused head; several fully_shard layouts) equals
    the whole model's in-pass record and its exact twin, and leaves the step's gradients and weights unchanged."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
           "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", str(WORKER), str(tmp_path)]
    run_torchrun(cmd, tmp_path / "result.json", env)
    ranks = json.loads((tmp_path / "result.json").read_text())
    assert len(ranks) == 2
    for r, rank in enumerate(ranks):
        assert sorted(rank["in_pass"]) == sorted(IN_PASS)
        for case, got in rank["in_pass"].items():
            assert got["records"] == [1, 1] and got["pairs"] == 2 - r and got["excluded"] == 0, (r, case, got)
            assert got["grads_identical"] and got["weights_identical"], (r, case)
            assert len(got["errors"]) == 6, (r, case, got["errors"])
            for key, err in got["errors"].items():
                assert got["sizes"][key] > 0 and err <= 1e-5, (r, case, key, err)
        for name in MODELS:
            got = rank[name]
            assert got["sharded"] == "DTensor"
            assert got["drift"] <= 1e-6, name        # training under the Monitor is unchanged
            assert {"tokens/full", "tokens/head", "full/plain", "pairs/update"} <= set(got["errors"]), name
            assert got["token_fallbacks"] == [], name   # the block-wise token pass ran on the sharded blocks
            for key, err in got["errors"].items():
                assert got["sizes"][key] > 0 and err <= 1e-5, (name, key, err)
            assert "fully_shard" in got["refused"]["exact"]
            assert "a token map on a model sharded by torch.distributed.fsdp.fully_shard is a collective: every " \
                   "rank must run it on the same inputs, but rank 1's differ" in got["refused"]["token_map"]
    # the sharded checkpoint (both ranks' shards) read whole in this process: the whole twin's weights, and analysed
    from transformers import AutoModelForCausalLM

    from entangle.integrations.checkpoints import analyze, find_checkpoints, load_checkpoint

    series = find_checkpoints(tmp_path / "fsdp_checkpoints")
    assert [c.step for c in series] == [3]
    loaded, want = load_checkpoint(series[0]), AutoModelForCausalLM.from_pretrained(tmp_path / "whole_checkpoint")
    assert not (tmp_path / "fsdp_checkpoints" / "checkpoint-3" / "model.safetensors").exists()
    theirs = dict(want.named_parameters())
    assert len(theirs) > 0 and all(torch.equal(p, theirs[n]) for n, p in loaded.named_parameters())
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight      # still tied
    probe = json.loads((tmp_path / "probe.json").read_text())[:2]
    analyze(tmp_path / "fsdp_checkpoints", probe, objective="sigmoid", ref_model=tmp_path / "whole_checkpoint",
            out=tmp_path / "analysis", progress=False, max_length=64)
    analysed = read_run(tmp_path / "analysis")
    assert analysed["pairs"]["step"].tolist() == [3, 3] and not analysed["manifest"].get("skipped")
    for name in MODELS:
        sharded, whole = read_run(tmp_path / name / "sharded"), read_run(tmp_path / name / "whole")
        assert sharded["manifest"]["world_size"] == 2
        for table, key, columns in (
            ("pairs", ["pair"], ["logp_chosen", "logp_rejected", "norm2_chosen", "norm2_rejected", "inner",
                                 "pred_dlogp_chosen", "pred_dlogp_rejected"]),
            ("layers", ["pair", "layer"], ["inner", "norm2_chosen", "norm2_rejected"]),
            ("summary_adam", ["step"], ["inner_mean", "norm2_chosen_mean", "norm2_rejected_mean", "cosine_mean"]),
            ("updates", ["seq"], ["logp_before", "logp_after", "pred_update"]),
            ("tokens", ["pair", "block", "t", "u"], ["inner", "cosine"]),
        ):
            ours, theirs = (t[table].sort_values(key).reset_index(drop=True) for t in (sharded, whole))
            assert len(ours) == len(theirs) > 0, (name, table)
            for col in columns:
                scale = np.abs(theirs[col]).max()
                np.testing.assert_allclose(ours[col], theirs[col], rtol=0, atol=1e-5 * scale,
                                           err_msg=f"{name}: {table}.{col}")


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_trl_trainer_under_accelerate_fsdp2(tmp_path):
    """TRL's DPOTrainer with transformers' ``fsdp_config={"version": 2}`` (accelerate's FSDP plugin shards
    stories260k with fully_shard) in two CPU processes, EntanglementCallback measuring the probe every step and the
    training pairs in-pass: training is bit-identical to the run without it; every probe row and every train_pairs
    row equals the exact twin of a whole model at the gathered parameters of its step (<= 1e-5 relative); every
    dataset row is measured once; token maps called on every rank equal the whole model's."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
           "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", str(TRAINER_WORKER), str(tmp_path)]
    run_torchrun(cmd, tmp_path / "trainer_result.json", env)
    got = json.loads((tmp_path / "trainer_result.json").read_text())
    assert got["parameters"] == "DTensor" and got["model"].startswith("FSDP") and got["world_size"] == 2
    assert got["same_training"] and got["snapshots"] == [0, 1, 2]
    assert got["probe_steps"] == [0, 1, 2] and got["probe_pairs"] == 4 and got["logged"] == [0, 1, 2]
    assert got["train_steps"] == [0, 1] and got["logged_train"] == [0, 1] and got["excluded"] == 0
    assert sorted(got["train_index"]) == list(range(8)) and got["train_index"] != list(range(8))
    assert got["tokens_rows"] > 0
    assert set(got["errors"]) == {f"{w}/{k}" for w in ("probe", "train") for k in ("norm2", "inner", "logps")} \
        | {"tokens"}
    for key, err in got["errors"].items():
        assert got["sizes"][key] > 0 and err <= 1e-5, (key, err)


class FullyShardedDataParallel(torch.distributed.fsdp.FullyShardedDataParallel if torch.distributed.is_available()
                               else torch.nn.Module):
    """FSDP1 as the refusal sees it (an instance in the module tree), without a process group."""

    def __init__(self):
        torch.nn.Module.__init__(self)


def test_fsdp1_and_zero3_refused():
    model, batch = tiny_gpt2(), random_batch(2, 101)
    model.transformer.h[0].add_module("wrapped", FullyShardedDataParallel())
    with pytest.raises(ValueError, match=r"'transformer.h.0.wrapped' is wrapped in FullyShardedDataParallel.*"
                                         r"fully_shard.*fsdp_version: 2"):
        measure(model, batch)
    model = tiny_gpt2()
    model.transformer.h[1].mlp.c_fc.weight.ds_id = 7       # what deepspeed.zero.Init sets on partitioned params
    with pytest.raises(ValueError, match=r"'transformer.h.1.mlp.c_fc.weight' is partitioned by DeepSpeed ZeRO-3"):
        measure(model, batch)


def test_in_pass_refuses_fsdp1_and_zero3():
    """The callback's in-pass check at train begin and a hand-written loop's PassRecorder refuse them as the
    Monitor does, naming the module or parameter."""
    trainer = SimpleNamespace(args=SimpleNamespace())
    model = tiny_gpt2()
    refuse_in_pass(trainer, model)
    model.transformer.h[0].add_module("wrapped", FullyShardedDataParallel())
    with pytest.raises(InPassError, match=r"cannot measure this training pass: module 'transformer.h.0.wrapped' is "
                                          r"wrapped in FullyShardedDataParallel.*fully_shard"):
        refuse_in_pass(trainer, model)
    with pytest.raises(ValueError, match=r"'transformer.h.0.wrapped' is wrapped in FullyShardedDataParallel"):
        PassRecorder(model, select_params(model))
    model = tiny_gpt2()
    model.transformer.h[1].mlp.c_fc.weight.ds_id = 7
    with pytest.raises(InPassError, match=r"'transformer.h.1.mlp.c_fc.weight' is partitioned by DeepSpeed ZeRO-3"):
        refuse_in_pass(trainer, model)


def _trainer(fsdp_version=None, zero_stage=None):
    """A trainer as ``_refuse_sharded`` reads it: accelerate's FSDP / DeepSpeed plugin on ``accelerator.state``."""
    state = SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=fsdp_version),
                            deepspeed_plugin=SimpleNamespace(zero_stage=zero_stage))
    return SimpleNamespace(is_fsdp_enabled=fsdp_version is not None, is_deepspeed_enabled=zero_stage is not None,
                           accelerator=SimpleNamespace(state=state))


def test_callback_sharding_schemes():
    for ok in (_trainer(), _trainer(fsdp_version=2), _trainer(zero_stage=1), _trainer(zero_stage=2)):
        _refuse_sharded(ok)
    with pytest.raises(RuntimeError, match=r"FullyShardedDataParallel \(FSDP1.*fully_shard \(accelerate: fsdp_version: 2"):
        _refuse_sharded(_trainer(fsdp_version=1))
    with pytest.raises(RuntimeError, match="DeepSpeed ZeRO-3.*use ZeRO-1/2, FSDP2"):
        _refuse_sharded(_trainer(zero_stage=3))


def test_every_rank_needs_a_pair_under_fully_shard():
    check_every_rank_measures(False, 1, 2)          # DDP: a rank without pairs just waits
    check_every_rank_measures(True, 2, 2)
    with pytest.raises(ValueError, match="the probe has 1 pairs for 2 ranks.*fully_shard.*at least 2 pairs"):
        check_every_rank_measures(True, 1, 2)


class DeepSpeedZeroOptimizer:
    """DeepSpeed's ZeRO-1/2 optimizer as seen through accelerate's wrapper: its ``.optimizer`` is a torch Adam over
    flat fp32 partitions, not over the model's parameters."""

    def __init__(self, numel: int):
        self.flat = torch.nn.Parameter(torch.zeros(numel))
        self.optimizer = torch.optim.AdamW([self.flat])
        self.flat.grad = torch.ones(numel)
        self.optimizer.step()


def test_zero_optimizer_gives_no_adam_view(tmp_path, caplog):
    from entangle.builtin import builtin_model, builtin_pairs, builtin_tokenizer
    from entangle.integrations.monitor import Monitor

    tok = builtin_tokenizer()
    model = builtin_model(tok)
    monitor = Monitor(model, tok, builtin_pairs(2, seed=1), objective="sigmoid", ref_logps="initial",
                      out_dir=tmp_path, strict=True)
    wrapped = SimpleNamespace(optimizer=DeepSpeedZeroOptimizer(sum(p.numel() for p in model.parameters())))
    with caplog.at_level(logging.WARNING, logger="entangle.integrations.monitor"):
        scalars = monitor.measure(0, optimizer=wrapped)
        monitor.measure(1, optimizer=wrapped)
    assert "entangle/cosine_mean" in scalars and not any(k.startswith("entangle/adam/") for k in scalars)
    warnings = [r.getMessage() for r in caplog.records if "DeepSpeedZeroOptimizer" in r.getMessage()]
    assert len(warnings) == 1 and "no Adam geometry" in warnings[0]
    assert "summary_adam" not in read_run(tmp_path)
