"""Shared fixtures: small models built from config (no downloads), the real data shipped in tests/data, one thread.

Plain helpers (model builders, batches, checks) live in helpers.py."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_gpt2, tiny_llama

DATA = Path(__file__).resolve().parent / "data"  # provenance and licences: tests/data/README.md
HH_PATH = DATA / "hh-rlhf-harmless-test.jsonl.gz"
STORIES_DIR = DATA / "stories260k"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread; with more, a loaded machine's spinning OpenMP workers slow them ~100x.

    Modules of tiny end-to-end runs use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def gpt2_model():
    return tiny_gpt2()


@pytest.fixture
def llama_model():
    return tiny_llama()


@pytest.fixture(scope="session")
def hh_rows():
    """Raw HH-RLHF harmless-test rows ({"chosen", "rejected"} full dialogues), all 2312 of them."""
    with gzip.open(HH_PATH, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def stories_dir():
    """The pretrained stories260k model folder (llama2.c's stories260K in Hugging Face format)."""
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
