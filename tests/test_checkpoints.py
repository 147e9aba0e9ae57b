"""Checkpoint analysis on a real checkpoint series: TRL DPO with ``save_steps=1``, PEFT adapters, one model dir."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from helpers import _one_line_error, run_torchrun  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

import entangle  # noqa: E402
from entangle.builtin import builtin_model, builtin_pairs, builtin_tokenizer  # noqa: E402
from entangle.cli import main  # noqa: E402
from entangle.integrations import checkpoints  # noqa: E402
from entangle.schema import LAYERS  # noqa: E402

LAYER_COLUMNS = LAYERS.columns
from entangle.report import make_report  # noqa: E402
from entangle.runio import read_run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on one thread

N_PAIRS = 4
STEPS = [1, 2, 3]
NUMERIC = ["logp_chosen", "logp_rejected", "norm2_chosen", "norm2_rejected", "inner", "cosine", "loss"]


def _rows(n: int, seed: int) -> list[dict]:
    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in builtin_pairs(n, seed=seed)]


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> dict:
    """A real TRL DPO run of 3 steps saving every step (model + tokenizer), and a probe file of 4 pairs."""
    root = tmp_path_factory.mktemp("series")
    torch.set_num_threads(1)
    tok = builtin_tokenizer()
    model = builtin_model(tok)
    args = DPOConfig(output_dir=str(root / "run"), max_steps=len(STEPS), save_steps=1, save_only_model=True,
                     report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=4, learning_rate=1e-3,
                     logging_steps=1, disable_tqdm=True, seed=0)
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                         train_dataset=Dataset.from_list(_rows(16, 1)), processing_class=tok)
    trainer.train()
    probe = root / "probe.jsonl"
    probe.write_text("\n".join(json.dumps(r) for r in _rows(N_PAIRS, 2)))
    return {"run": root / "run", "probe": probe, "log": trainer.state.log_history}


@pytest.fixture(scope="module")
def analysed(series, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("analysed") / "out"
    assert entangle.analyze(series["run"], series["probe"], out=out, objective="sigmoid", beta=0.1,
                            progress=False) == out
    return {**series, "out": out}


def check_tables(out, steps: list[int], n_pairs: int = N_PAIRS) -> dict:
    """One row per probe pair per checkpoint, steps increasing, finite values."""
    run = read_run(out)
    pairs, layers, summary = run["pairs"], run["layers"], run["summary"]
    assert pairs["step"].tolist() == sorted(pairs["step"]) and sorted(pairs["step"].unique()) == steps
    assert (pairs.groupby("step")["pair"].apply(sorted).map(list) == [list(range(n_pairs))] * len(steps)).all()
    assert summary["step"].tolist() == steps and (summary["n_pairs"] == n_pairs).all()
    assert list(layers.columns) == list(LAYER_COLUMNS) and (layers.groupby(["step", "layer"]).size() == n_pairs).all()
    assert np.isfinite(pairs[NUMERIC].to_numpy(float)).all()
    assert np.isfinite(layers[["inner", "norm2_chosen", "norm2_rejected"]].to_numpy(float)).all()
    return run


def _parts(out) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.glob("*/step-*")}


# ---- full checkpoints ---------------------------------------------------------------------------------------

def test_series_is_measured_in_step_order(analysed):
    run = check_tables(analysed["out"], STEPS)
    manifest = run["manifest"]
    assert manifest["objective"] == "sigmoid" and manifest["hyper"]["beta"] == 0.1
    assert manifest["measured_steps"] == STEPS and manifest["skipped"] == []
    assert [c["checkpoint"] for c in manifest["checkpoints"]] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert manifest["reference"].startswith("checkpoint-1 (step 1): the first checkpoint")
    assert len(manifest["probe"]["sha256"]) == 64 and manifest["versions"]["transformers"]
    # the first checkpoint is the reference: zero margin, DPO loss log 2; later steps moved away from it
    pairs = run["pairs"]
    np.testing.assert_allclose(pairs.loc[pairs["step"] == 1, "loss"], math.log(2), rtol=1e-6)
    assert not np.allclose(pairs.loc[pairs["step"] == 3, "loss"], math.log(2), rtol=1e-6)
    # predictions are scaled by the learning rate the trainer logged at each step
    logged = {h["step"]: h["learning_rate"] for h in analysed["log"] if "learning_rate" in h}
    assert {c["step"]: c["learning_rate"] for c in manifest["checkpoints"]} == {s: logged[s] for s in STEPS}


def test_log_probs_equal_the_checkpoint_models(analysed):
    from entangle.capture.logprobs import sequence_logps
    from entangle.data import encode_pairs, load_pairs

    pairs = read_run(analysed["out"])["pairs"]
    batch = encode_pairs(builtin_tokenizer(), load_pairs(analysed["probe"]))
    for step in STEPS:
        model = AutoModelForCausalLM.from_pretrained(analysed["run"] / f"checkpoint-{step}").eval()
        with torch.no_grad():
            lp = sequence_logps(model, batch).double().numpy()
        at = pairs[pairs["step"] == step]
        np.testing.assert_allclose(at["logp_chosen"], lp[:N_PAIRS], rtol=1e-5)
        np.testing.assert_allclose(at["logp_rejected"], lp[N_PAIRS:], rtol=1e-5)


def test_report_works_on_the_analysis(analysed, tmp_path):
    html = make_report(analysed["out"], tmp_path / "report")
    assert html.exists() and (tmp_path / "report" / "regime_plane.png").exists()


def test_rerun_measures_nothing_again_and_resumes_a_missing_step(analysed, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(analysed["out"], out)
    loaded = []
    real_load = checkpoints.load_checkpoint
    monkeypatch.setattr(checkpoints, "load_checkpoint", lambda c, d="cpu": loaded.append(c.name) or real_load(c, d))
    before = _parts(out)
    entangle.analyze(analysed["run"], analysed["probe"], out=out, beta=0.1, progress=False)
    assert loaded == [] and _parts(out) == before
    # a step whose layers part is missing (interrupted) is measured again; the others are left alone
    (out / "layers" / "step-00000002.parquet").unlink()
    entangle.analyze(analysed["run"], analysed["probe"], out=out, beta=0.1, progress=False)
    assert loaded == ["checkpoint-2", "checkpoint-1"]     # checkpoint-1 only as the reference
    after = _parts(out)
    assert {k: v for k, v in after.items() if "00000002" not in k} == \
        {k: v for k, v in before.items() if "00000002" not in k}
    assert after["pairs/step-00000002.parquet"] > before["pairs/step-00000002.parquet"]
    check_tables(out, STEPS)
    # another analysis (other objective) into the same directory is refused
    with pytest.raises(ValueError, match="other settings"):
        entangle.analyze(analysed["run"], analysed["probe"], out=out, objective="ipo", progress=False)


def test_corrupt_and_half_written_checkpoints_are_skipped_by_name(series, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(series["run"], run)
    weights = run / "checkpoint-1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])          # truncated weights
    (run / "checkpoint-3" / "config.json").unlink()                                  # missing config
    (run / "checkpoint-4").mkdir()                                                   # a save that never finished
    (run / "checkpoint-4" / "trainer_state.json").write_text('{"global_st')
    with caplog.at_level("WARNING", logger="entangle"):
        out = entangle.analyze(run, series["probe"], beta=0.1, progress=False)
    assert out == run / "entangle-analysis"
    manifest = check_tables(out, [2])["manifest"]
    skipped = {s["checkpoint"]: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == {"checkpoint-1", "checkpoint-3", "checkpoint-4"}
    assert "SafetensorError" in skipped["checkpoint-1"] and "config.json" in skipped["checkpoint-3"]
    for name in skipped:
        assert any(name in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    # the corrupt first checkpoint cannot be the reference: the next loadable one is
    assert manifest["reference"].startswith("checkpoint-2 (step 2)")
    assert manifest["measured_steps"] == [2]


@pytest.mark.slow
def test_cli_reports_a_skipped_checkpoint_once(series, tmp_path):
    """The CLI prints each skipped checkpoint once (its note), not also the library's logged warning."""
    run = tmp_path / "run"
    shutil.copytree(series["run"], run)
    (run / "checkpoint-3" / "config.json").unlink()
    proc = subprocess.run([sys.executable, "-m", "entangle.cli", "analyze", str(run), "--data", str(series["probe"]),
                           "--beta", "0.1", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mentions = [line for line in proc.stderr.splitlines() if "checkpoint-3" in line]
    assert len(mentions) == 1 and mentions[0].startswith("note: skipped checkpoint-3: "), proc.stderr[-3000:]


# ---- PEFT adapters, one model directory, process split ------------------------------------------------------

def test_peft_adapter_series(tmp_path):
    from peft import LoraConfig, get_peft_model

    tok = builtin_tokenizer()
    builtin_model(tok).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")          # the only tokenizer: found through the adapters' base model
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0))
    for step in (5, 10):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.add_(0.05 * torch.randn_like(p))
        model.save_pretrained(tmp_path / "run" / f"checkpoint-{step}")
    config = json.loads((tmp_path / "run" / "checkpoint-5" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")

    out = entangle.analyze(tmp_path / "run", _rows(3, 0), beta=0.1, progress=False)
    run = check_tables(out, [5, 10], n_pairs=3)
    manifest = run["manifest"]
    assert manifest["reference"] == "the base model with the adapters disabled"
    assert [c["kind"] for c in manifest["checkpoints"]] == ["peft", "peft"]
    assert manifest["params"]["tensors"] == 4          # lora_A and lora_B of c_attn in 2 layers: the trainable ones
    assert (run["pairs"]["loss"] != math.log(2)).all()


def test_a_single_model_directory(tmp_path):
    tok = builtin_tokenizer()
    builtin_model(tok).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    out = entangle.analyze(tmp_path / "model", _rows(3, 0), out=tmp_path / "a", beta=0.1, progress=False)
    run = check_tables(out, [0], n_pairs=3)
    np.testing.assert_allclose(run["pairs"]["loss"], math.log(2), rtol=1e-6)   # its own reference
    (tmp_path / "model" / "trainer_state.json").write_text(json.dumps({"global_step": 7}))
    out = entangle.analyze(tmp_path / "model", _rows(3, 0), out=tmp_path / "b", objective="simpo", progress=False)
    run = check_tables(out, [7], n_pairs=3)
    assert run["manifest"]["reference"] is None                 # simpo needs no reference model


def test_a_sharded_state_dict_checkpoint_is_read_whole(tmp_path):
    """accelerate's FSDP plugin with SHARDED_STATE_DICT saves ``pytorch_model_fsdp_0/`` (torch.distributed.checkpoint,
    ``{"model": state_dict}``) beside config.json, no weights file: read whole in one process, the same weights and
    the same analysis as the save_pretrained twin; a folder missing a parameter is skipped naming it. (Two ranks'
    shards of a fully_shard model: tests/test_fsdp.py.)"""
    import torch.distributed.checkpoint as dcp

    tok = builtin_tokenizer()
    model = builtin_model(tok, seed=3)
    model.save_pretrained(tmp_path / "full" / "checkpoint-2")
    tok.save_pretrained(tmp_path / "full" / "checkpoint-2")
    for run, drop in (("sharded", None), ("partial", "transformer.ln_f.weight")):
        ckpt = tmp_path / run / "checkpoint-2"
        state = {k: v for k, v in model.state_dict().items() if k != drop}
        dcp.save({"model": state}, storage_writer=dcp.FileSystemWriter(str(ckpt / checkpoints.FSDP_SHARDED)),
                 no_dist=True)
        model.config.save_pretrained(ckpt)
        tok.save_pretrained(ckpt)
    loaded = checkpoints.load_checkpoint(checkpoints.find_checkpoints(tmp_path / "sharded")[0])
    want = dict(model.named_parameters())
    assert all(torch.equal(p, want[n]) for n, p in loaded.named_parameters()) and len(want) > 0
    rows = _rows(3, 0)
    runs = {run: read_run(entangle.analyze(tmp_path / run, rows, out=tmp_path / f"a-{run}", beta=0.1,
                                           ref_model=tmp_path / "full" / "checkpoint-2", progress=False))
            for run in ("full", "sharded")}
    for col in NUMERIC:
        np.testing.assert_array_equal(runs["sharded"]["pairs"][col], runs["full"]["pairs"][col], err_msg=col)
    with pytest.raises(ValueError, match=r"checkpoint-2.*pytorch_model_fsdp_0 holds no tensor for "
                                         r"\[.transformer.ln_f.weight.\]"):
        entangle.analyze(tmp_path / "partial", rows, out=tmp_path / "a-partial", progress=False,
                         ref_model=tmp_path / "full" / "checkpoint-2")


def test_explicit_reference_and_tokenizer_without_pad(tmp_path, caplog):
    tok = builtin_tokenizer()
    for seed in (0, 1):
        builtin_model(tok, seed=seed).save_pretrained(tmp_path / f"model{seed}")
    nopad = builtin_tokenizer()
    nopad.pad_token = None
    with caplog.at_level("WARNING", logger="entangle"):
        out = entangle.analyze(tmp_path / "model0", _rows(3, 0), ref_model=tmp_path / "model1", tokenizer=nopad,
                               beta=0.1, progress=False)
    assert nopad.pad_token == nopad.eos_token and "no pad token" in caplog.text
    run = check_tables(out, [0], n_pairs=3)
    assert run["manifest"]["reference"] == str(tmp_path / "model1")
    assert (np.abs(run["pairs"]["loss"] - math.log(2)) > 1e-3).all()     # another model as reference


def test_checkpoints_are_split_across_processes(analysed, tmp_path, monkeypatch):
    series = checkpoints.find_checkpoints(analysed["run"])
    assert [c.step for c in series] == STEPS
    five = [checkpoints.Checkpoint(s, tmp_path / f"checkpoint-{s}") for s in range(5)]
    assert [c.step for c in checkpoints.checkpoints_for_rank(five, 0, 2)] == [0, 2, 4]
    assert [c.step for c in checkpoints.checkpoints_for_rank(five, 1, 2)] == [1, 3]
    assert [c.step for c in checkpoints.checkpoints_for_rank(five, 2, 3)] == [2]

    # two ranks of a 2-process launch, one after the other: each writes the parts of its own checkpoints with
    # every probe pair (the monitor is a group of one); only rank 0 writes the manifest
    out = tmp_path / "out"
    monkeypatch.setattr(checkpoints, "broadcast_from_main", lambda obj: obj)
    for rank in (0, 1):
        monkeypatch.setattr(checkpoints, "rank_and_world", lambda r=rank: (r, 2))
        monkeypatch.setattr(checkpoints, "gather_to_main", lambda obj, r=rank: [obj, []] if r == 0 else None)
        manifest = (out / "manifest.json").read_text() if rank == 1 else None
        entangle.analyze(analysed["run"], analysed["probe"], out=out, beta=0.1, progress=False)
        if rank == 0:
            assert read_run(out)["summary"]["step"].tolist() == [1, 3]
        else:
            assert (out / "manifest.json").read_text() == manifest
    check_tables(out, STEPS)
    pairs = read_run(out)["pairs"]
    np.testing.assert_allclose(pairs["cosine"], read_run(analysed["out"])["pairs"]["cosine"], rtol=1e-6)


TORCHRUN_SCRIPT = """
import sys, torch, torch.distributed as dist
torch.set_num_threads(1)
dist.init_process_group("gloo")
import entangle
entangle.analyze(sys.argv[1], sys.argv[2], out=sys.argv[3], beta=0.1, progress=False)
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_two_processes_under_torchrun(analysed, tmp_path):
    """Rank 0 measures checkpoints 1 and 3, rank 1 checkpoint 2 (corrupt here): no hang, one manifest."""
    run = tmp_path / "run"
    shutil.copytree(analysed["run"], run)
    (run / "checkpoint-2" / "model.safetensors").write_bytes(b"\0" * 100)
    script = tmp_path / "script.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
           "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", str(script), str(run), str(analysed["probe"]),
           str(tmp_path / "out")]
    run_torchrun(cmd, tmp_path / "out" / "manifest.json", env)   # rank 0 writes it after gathering every rank
    run_ = check_tables(tmp_path / "out", [1, 3])
    assert run_["manifest"]["world_size"] == 2 and run_["manifest"]["measured_steps"] == [1, 3]
    assert [s["checkpoint"] for s in run_["manifest"]["skipped"]] == ["checkpoint-2"]
    expected = read_run(analysed["out"])["pairs"]
    np.testing.assert_allclose(run_["pairs"]["cosine"], expected[expected["step"] != 2]["cosine"], rtol=1e-6)


# ---- command line -------------------------------------------------------------------------------------------

def test_cli_analyze_then_report(analysed, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["analyze", str(analysed["run"]), "--data", str(analysed["probe"]), "--objective", "sigmoid",
                 "--beta", "0.1", "--out", str(out), "--max-pairs", "2", "--params", r"^transformer\.h\."]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out) and "Traceback" not in captured.err
    run = check_tables(out, STEPS, n_pairs=2)
    assert run["manifest"]["params"]["spec"] == repr(r"^transformer\.h\.")
    assert main(["report", str(out)]) == 0
    assert (out / "report" / "report.html").exists()


@pytest.mark.parametrize("argv, match", [
    (["analyze", "{tmp}/missing", "--data", "{probe}"], "does not exist"),
    (["analyze", "{tmp}/empty", "--data", "{probe}"], "no checkpoints in"),
    (["analyze", "{run}", "--data", "{probe}", "--objective", "nope"], "unknown objective 'nope'"),
    (["analyze", "{run}", "--data", "{tmp}/bad.jsonl"], "missing field(s) ['rejected']"),
    (["analyze", "{run}", "--data", "{tmp}/absent.jsonl"], "does not exist"),
    (["analyze", "{run}", "--data", "{probe}", "--objective", "sft", "--beta", "0.1"], "unknown hyper-parameter"),
    (["analyze", "{run}", "--data", "{probe}", "--ref-model", "{tmp}/no-ref"], "no-ref': no such directory"),
    (["analyze", "{tmp}/broken", "--data", "{probe}", "--out", "{tmp}/o"], "checkpoint-1: SafetensorError"),
])
def test_cli_errors_are_one_line(analysed, tmp_path, capsys, argv, match):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "a", "chosen": " b"}) + "\n")
    (tmp_path / "broken" / "checkpoint-1").mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(analysed["run"] / "checkpoint-1" / name, tmp_path / "broken" / "checkpoint-1" / name)
    (tmp_path / "broken" / "checkpoint-1" / "model.safetensors").write_bytes(b"\0" * 10)
    fill = {"{tmp}": str(tmp_path), "{run}": str(analysed["run"]), "{probe}": str(analysed["probe"])}
    for key, value in fill.items():
        argv = [a.replace(key, value) for a in argv]
    line = _one_line_error(capsys, argv, match=match)
    assert line.startswith("entangle analyze: error: ")


@pytest.mark.slow
def test_cli_error_in_a_real_process(tmp_path):
    """No traceback and exit code 1 from the installed entry point too."""
    proc = subprocess.run([sys.executable, "-m", "entangle.cli", "analyze", str(tmp_path / "missing"),
                           "--data", "builtin"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"entangle analyze: error: run directory {str(tmp_path / 'missing')!r} does not exist"]
