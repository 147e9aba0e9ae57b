"""Two CPU processes (gloo) under torchrun: TRL DPO with DDP, each rank measures its share of the probe, and its own
training micro-batches in-pass (``train_every``).

The test launches this file as a torchrun script; the ``__main__`` part is the training script.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

N_PROBE = 5   # uneven: rank 0 measures pairs 0, 2, 4 and rank 1 pairs 1, 3


def _train(out_dir: str) -> None:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from entangle.builtin import builtin_model, builtin_pairs, builtin_tokenizer
    from entangle.integrations.callback import EntanglementCallback

    tok = builtin_tokenizer()
    model = builtin_model(tok)
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in builtin_pairs(32, seed=1)]
    args = DPOConfig(output_dir=out_dir, max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
                     report_to=[], save_strategy="no", use_cpu=True, bf16=False, logging_steps=1, seed=0,
                     ddp_backend="gloo", disable_tqdm=True)
    cb = EntanglementCallback(builtin_pairs(N_PROBE, seed=2), every=2, strict=True, train_every=1)
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok, callbacks=[cb])
    assert torch.distributed.get_world_size() == 2
    assert type(trainer.accelerator.unwrap_model(trainer.model_wrapped)) is type(model)
    trainer.train()
    assert cb.monitor.pairs == list(range(torch.distributed.get_rank(), N_PROBE, 2))
    if trainer.is_world_process_zero():
        Path(out_dir, "log_history.json").write_text(json.dumps(trainer.state.log_history))


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_two_process_ddp(tmp_path):
    pytest.importorskip("trl")
    from helpers import check_run, run_torchrun

    from entangle.builtin import builtin_model, builtin_pairs, builtin_tokenizer
    from entangle.integrations.monitor import Monitor
    from entangle.runio import read_run

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
           "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", __file__, str(tmp_path / "out")]
    run_torchrun(cmd, tmp_path / "out" / "log_history.json", env)
    history = json.loads((tmp_path / "out" / "log_history.json").read_text())
    run = check_run(tmp_path / "out" / "entangle", N_PROBE, [0, 2], [0], history, "sigmoid")
    assert run["manifest"]["world_size"] == 2
    # per-pair quantities at step 0 equal a single-process measurement of the same initial model
    tok = builtin_tokenizer()
    model = builtin_model(tok)
    single = Monitor(model, tok, builtin_pairs(N_PROBE, seed=2), ref_model=copy.deepcopy(model), out_dir=tmp_path / "one")
    single.measure(0, lr=1e-3)
    ours = run["pairs"][run["pairs"]["step"] == 0].sort_values("pair").reset_index(drop=True)
    theirs = read_run(tmp_path / "one")["pairs"]
    for col in ("logp_chosen", "logp_rejected", "norm2_chosen", "norm2_rejected", "inner", "pred_dlogp_chosen"):
        np.testing.assert_allclose(ours[col], theirs[col], rtol=1e-5, err_msg=col)
    # in-pass: every rank's own micro-batch of each step, gathered on rank 0; at step 0 each row equals the exact twin
    # of the dataset row its index names (the initial model)
    from entangle import encode_pairs, sequence_gram

    tp = run["train_pairs"]
    assert sorted(set(zip(tp["step"], tp["rank"], strict=True))) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert len(tp) == 8 and (tp["index"] >= 0).all() and not tp["excluded"].any()
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in builtin_pairs(32, seed=1)]
    for _, r in tp[tp["step"] == 0].iterrows():
        k = sequence_gram(model, encode_pairs(tok, [rows[int(r["index"])]]), method="exact").matrix
        got = np.array([r.norm2_chosen, r.norm2_rejected, r.inner])
        np.testing.assert_allclose(got, [float(k[0, 0]), float(k[1, 1]), float(k[0, 1])], atol=1e-5 * float(k.max()))


if __name__ == "__main__":
    _train(sys.argv[1])
    # tear the gloo group down before the interpreter exits: otherwise its threads may abort ("terminate called
    # without an active exception") on one rank after a successful run
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
