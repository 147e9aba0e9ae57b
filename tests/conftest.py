"""Shared fixtures: small models built from config (no downloads) and the real data in ../shared when present."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
HH_PATH = SHARED / "data" / "hh-rlhf-harmless-test.jsonl.gz"
STORIES_DIR = SHARED / "models" / "stories260k"


def tiny_gpt2(seed: int = 0, vocab: int = 101, dtype=torch.float32, **kw):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                     bos_token_id=1, eos_token_id=2, **kw)
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def tiny_llama(seed: int = 0, vocab: int = 101, tie: bool = False, dtype=torch.float32, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tie, **kw,
    )
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    # random init leaves norm weights at 1: perturb them so their gradients are generic
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def random_batch(n_pairs: int, vocab: int, prompt_len=(3, 7), resp_len=(2, 9), padding_side="right", seed=0):
    """A hand-made batch of 2B sequences (chosen then rejected) with shared prompts and padding."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for _ in range(n_pairs):
        p = torch.randint(3, vocab, (int(torch.randint(*prompt_len, (1,), generator=g)),), generator=g)
        seqs.append((p, torch.randint(3, vocab, (int(torch.randint(*resp_len, (1,), generator=g)),), generator=g)))
    rej = [(p, torch.randint(3, vocab, (int(torch.randint(*resp_len, (1,), generator=g)),), generator=g)) for p, _ in seqs]
    allseq = seqs + rej
    L = max(len(p) + len(r) for p, r in allseq)
    N = len(allseq)
    ids = torch.zeros(N, L, dtype=torch.long)
    att = torch.zeros(N, L, dtype=torch.long)
    comp = torch.zeros(N, L, dtype=torch.long)
    for i, (p, r) in enumerate(allseq):
        n = len(p) + len(r)
        off = L - n if padding_side == "left" else 0
        ids[i, off:off + n] = torch.cat([p, r])
        att[i, off:off + n] = 1
        comp[i, off + len(p):off + n] = 1
    return {"input_ids": ids, "attention_mask": att, "completion_mask": comp}


@pytest.fixture
def gpt2_model():
    return tiny_gpt2()


@pytest.fixture
def llama_model():
    return tiny_llama()


def _need(path: Path):
    if not path.exists():
        pytest.skip(f"{path} not present (../shared is only in the development checkout and CI)")


@pytest.fixture(scope="session")
def hh_rows():
    """Raw HH-RLHF harmless-test rows ({"chosen", "rejected"} full dialogues)."""
    _need(HH_PATH)
    with gzip.open(HH_PATH, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def stories_dir():
    _need(STORIES_DIR)
    return STORIES_DIR


@pytest.fixture
def stories_model(stories_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(stories_dir).eval()


@pytest.fixture
def stories_tokenizer(stories_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stories_dir)
    tok.pad_token = tok.eos_token
    return tok


def run_torchrun(cmd: list[str], completed, env: dict, timeout: int = 240):
    """Run a torchrun command; returns the process.

    gloo's threads occasionally abort ("terminate called without an active exception") at interpreter exit on
    one rank AFTER a complete run. That teardown flake of the backend is accepted only when ``completed`` (a
    file the script writes once all ranks have finished their work) exists; the caller then checks the outputs.
    Any other failure fails the test with the processes' output.
    """
    import subprocess

    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    teardown_abort = "terminate called without an active exception" in proc.stderr and Path(completed).exists()
    assert proc.returncode == 0 or teardown_abort, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc
