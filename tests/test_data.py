"""Tests for entangle.data: loading pairs from every source, and tokenising them exactly as TRL 1.16 does."""

from __future__ import annotations

import copy
import gzip
import json
import logging
import re

import pytest
import torch
from helpers import tiny_gpt2, tiny_llama

from entangle.capture.logprobs import sequence_logps
from entangle.data import PairError, encode_pairs, load_pairs, tokenize_pair

HH_IRREGULAR = [1254, 1688, 1950, 1952, 2036]
EOT = "<|endoftext|>"

STANDARD = [
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green and very far away.", "p_chosen": 0.9},
    {"prompt": "Cats like to", "chosen": " sleep in the sun.", "rejected": " bark.", "p_chosen": 0.75},
]
CONVERSATIONAL = [
    {
        "prompt": [{"role": "user", "content": "What colour is the sky?"}],
        "chosen": [{"role": "assistant", "content": "It is blue."}],
        "rejected": [{"role": "assistant", "content": "It is green, I think."}],
    },
    {
        "prompt": [
            {"role": "user", "content": "Hi."},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Tell me a story."},
        ],
        "chosen": [{"role": "assistant", "content": "Once upon a time there was a cat."}],
        "rejected": [{"role": "assistant", "content": "No."}],
    },
]
SIMPLE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# renders the prompt alone differently from the prompt followed by a reply: TRL starts the reply where they diverge
DIVERGENT_TEMPLATE = SIMPLE_TEMPLATE.replace("<|assistant|>\n{% endif %}", "<|assistant|>\n<think></think>{% endif %}")


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    """A GPT-2-style byte-level BPE tokenizer (no BOS, EOS "<|endoftext|>", its own pad), built offline."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    corpus = [r[k] for r in STANDARD for k in ("prompt", "chosen", "rejected")] * 20
    bpe.train_from_iterator(corpus, vocab_size=300, min_frequency=2, special_tokens=[EOT, "<pad>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOT, pad_token="<pad>")


def trl_trainer(model, tokenizer, rows, tmp_path, **config):
    """A real TRL DPOTrainer on ``rows``; its processed dataset and collator are the ground truth."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=str(tmp_path), report_to=[], bf16=False, use_cpu=True, activation_checkpointing=False,
        precompute_ref_log_probs=False, per_device_train_batch_size=len(rows), **config,
    )
    return DPOTrainer(
        model=model, ref_model=copy.deepcopy(model), args=args,
        train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
    )


def assert_same_as_trl(model, tokenizer, rows, tmp_path, max_length=None, truncation="keep_start"):
    """Our batch equals TRL's collated batch, and our log-probs equal TRL's fused-head log-probs."""
    trainer = trl_trainer(model, tokenizer, rows, tmp_path, max_length=max_length, truncation_mode=truncation)
    processed = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    assert len(processed) == len(rows)
    ours = encode_pairs(tokenizer, rows, max_length=max_length, truncation=truncation)
    theirs = trainer.data_collator(processed)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(ours[key], theirs[key]), key
    # already-tokenised rows (TRL's processed dataset) encode to the same batch
    pretokenised = encode_pairs(tokenizer, processed, max_length=max_length, truncation=truncation)
    assert all(torch.equal(pretokenised[k], ours[k]) for k in ours)
    with torch.no_grad():
        trl_chosen, trl_rejected = trainer.compute_ref_log_probs(trainer.model, theirs)
        lp = sequence_logps(model, ours)
    torch.testing.assert_close(lp, torch.cat([trl_chosen, trl_rejected]).float(), rtol=0, atol=1e-4)
    return ours


# ----------------------------------------------------------------------------------------------------------
# loading


@pytest.mark.parametrize("kind", ["hh-rlhf and no prompt", "standard with an extra column"])
def test_every_source_type_loads_the_same_rows(kind, tmp_path, request):
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict

    if kind == "standard with an extra column":
        raw = STANDARD
    else:
        raw = request.getfixturevalue("hh_rows")[:20] + [{"chosen": "The sky is blue.", "rejected": "The sky is red."}]
    expected = load_pairs(raw)
    assert len(expected) == len(raw) and all(set(r) == set(raw[0]) | {"prompt"} for r in expected)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in raw))
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in raw)
    (tmp_path / "a.json").write_text(json.dumps(raw))
    (tmp_path / "columns.json").write_text(json.dumps({k: [r[k] for r in raw] for k in raw[0]}))
    with gzip.open(tmp_path / "a.json.gz", "wt") as f:
        json.dump(raw, f)
    pq.write_table(pa.Table.from_pylist(raw), tmp_path / "a.parquet")
    pd.DataFrame(raw).to_csv(tmp_path / "a.csv", index=False)
    sources = [tmp_path / n for n in ("a.jsonl", "a.jsonl.gz", "a.json", "columns.json", "a.json.gz", "a.parquet")]
    sources += [str(tmp_path / "a.csv"), Dataset.from_list(raw), pd.DataFrame(raw), tuple(raw)]
    for source in sources:
        assert load_pairs(source) == expected, source
    assert load_pairs(DatasetDict({"test": Dataset.from_list(raw)}), split="test") == expected
    with pytest.raises(KeyError, match="splits present: \\['test'\\]"):
        load_pairs(DatasetDict({"test": Dataset.from_list(raw)}))


def test_conversational_rows_and_extra_columns_survive_every_source(tmp_path):
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    rows = [dict(r, p_chosen=p) for r, p in zip(CONVERSATIONAL, (0.6, 0.8), strict=True)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for source in (rows, Dataset.from_list(rows), tmp_path / "c.parquet", tmp_path / "c.jsonl",
                   pd.read_parquet(tmp_path / "c.parquet")):
        assert load_pairs(source) == rows, source


def test_hh_rlhf_split_on_real_rows(hh_rows):
    rows = load_pairs(hh_rows[:200])
    assert len(rows) == 200
    assert rows[0]["prompt"].startswith("\n\nHuman: ")
    assert rows[0]["prompt"].endswith(
        "\n\nHuman: okay some of these do not have anything to do with pens\n\nAssistant:"
    )
    assert rows[0]["chosen"].startswith(" No, sorry!  All of these involve a pen, the point is")
    assert rows[0]["rejected"].startswith(" There are lots of funny things you can do with pens")
    assert rows[86]["chosen"] == " "  # a whitespace-only reply is kept, as TRL keeps it (it trains on " " + EOS)
    for row, raw in zip(rows, hh_rows, strict=False):
        assert row["prompt"] + row["chosen"] == raw["chosen"]
        assert row["prompt"] + row["rejected"] == raw["rejected"]
        assert row["prompt"].endswith("\n\nAssistant:") and "\n\nAssistant:" not in row["chosen"]


def test_hh_rlhf_irregular_rows_are_reported_by_index(hh_rows, caplog):
    with caplog.at_level(logging.WARNING, logger="entangle.data"):
        rows = load_pairs(hh_rows)
    assert len(rows) == len(hh_rows) - 5 == 2307
    (record,) = caplog.records
    assert f"rows {HH_IRREGULAR}" in record.getMessage() and record.getMessage().startswith("5 HH-RLHF row(s)")
    caplog.clear()
    assert len(load_pairs(hh_rows, on_mismatch="skip")) == 2307 and not caplog.records
    with pytest.raises(PairError, match=f"rows {HH_IRREGULAR}".replace("[", "\\[").replace("]", "\\]")):
        load_pairs(hh_rows, on_mismatch="error")


@pytest.mark.parametrize(
    "chosen, rejected",
    [
        ("The sky is blue.", "The sky is green."),
        ("Short", "Shorter answer"),  # one is a prefix of the other
        ("x is 1", "y is 2"),  # nothing shared
        (
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away"}],
        ),
    ],
)
def test_rows_without_prompt_match_trl_extract_prompt(chosen, rejected):
    from trl.data_utils import extract_prompt

    (row,) = load_pairs([{"chosen": chosen, "rejected": rejected}])
    assert row == extract_prompt({"chosen": chosen, "rejected": rejected})


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"prompt": "a", "chosen": "b"}, r"missing field\(s\) \['rejected'\]; columns present: \['prompt', 'chosen'\]"),
        ({"prompt": "a", "chosen": "", "rejected": "c"}, "'chosen' response is empty"),
        ({"prompt": "a", "chosen": "b", "rejected": ""}, "'rejected' response is empty"),
        ({"prompt": "a", "chosen": "b", "rejected": "b"}, "'chosen' and 'rejected' are identical"),
        ({"prompt": "a", "chosen": 3, "rejected": "c"}, "'chosen' is int; expected a string"),
        ({"prompt": [{"role": "user", "content": "q"}], "chosen": "b", "rejected": "c"},
         "'chosen' is a string but 'prompt' is a message list"),
        ({"prompt": [{"content": "q"}], "chosen": [], "rejected": []}, "'prompt' message 0 is not a"),
        ({"prompt": [{"role": "user", "content": None}], "chosen": [], "rejected": []},
         "'prompt' message 0 has content of type NoneType"),
        ({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi\n\nAssistant: yo"},
         "HH-RLHF 'chosen' dialogue has no '\\\\n\\\\nAssistant:' turn"),
    ],
)
def test_bad_rows_are_named(bad, message, gpt2_tokenizer):
    good = {"prompt": "ok", "chosen": " yes", "rejected": " no"}
    with pytest.raises(PairError, match="^row 1: " + message):
        load_pairs([good, bad])
    with pytest.raises(PairError, match="^row 1: "):
        encode_pairs(gpt2_tokenizer, [good, bad])


@pytest.mark.parametrize("name, text, line, column", [
    ("pairs.jsonl", '{"prompt": "a", "chosen": " b", "rejected": " c"}\n\n{"prompt": "a", "chosen": " b",\n', 3, 32),
    ("pairs.jsonl.gz", '{"prompt": "a", "chosen": " b", "rejected": " c"}\nnot json\n', 2, 1),
    ("pairs.json", '[{"prompt": "a",\n  "chosen": " b" "rejected": " c"}]', 2, 18),
])
def test_malformed_json_names_the_file_and_line(tmp_path, name, text, line, column):
    path = tmp_path / name
    if name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    where = f"^{re.escape(str(path))}: line {line}: "
    with pytest.raises(PairError, match=where + f"not valid JSON \\(.*, column {column}\\)$"):
        load_pairs(path)
    with pytest.raises(PairError, match=where):   # a string path too
        load_pairs(str(path))


def test_a_missing_data_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"data file '{tmp_path / 'nope.jsonl'}' does not exist")):
        load_pairs(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match=re.escape(f"data file '{tmp_path}' is not a file")):
        load_pairs(str(tmp_path))


# ----------------------------------------------------------------------------------------------------------
# tokenisation


def test_completion_mask_order_and_padding(gpt2_tokenizer):
    tok = gpt2_tokenizer
    batch = encode_pairs(tok, STANDARD)
    B, eos, pad = len(STANDARD), tok.eos_token_id, tok.pad_token_id
    assert batch["input_ids"].shape[0] == 2 * B and all(v.dtype == torch.long for v in batch.values())
    for n in range(2 * B):
        row, key = STANDARD[n % B], ("chosen", "rejected")[n // B]
        prompt = tok(row["prompt"])["input_ids"]
        response = tok(row[key])["input_ids"]
        length = len(prompt) + len(response) + 1
        assert batch["input_ids"][n, :length].tolist() == prompt + response + [eos]  # chosen rows, then rejected
        assert batch["completion_mask"][n].tolist() == [0] * len(prompt) + [1] * (length - len(prompt)) + [0] * (
            batch["input_ids"].shape[1] - length
        )
        assert batch["attention_mask"][n].sum() == length
        assert (batch["input_ids"][n, length:] == pad).all() and not batch["attention_mask"][n, length:].any()
    assert batch["input_ids"].shape[1] == max(int(m.sum()) for m in batch["attention_mask"])


def test_truncation_keep_start_and_keep_end(gpt2_tokenizer):
    full = encode_pairs(gpt2_tokenizer, STANDARD)
    lengths = full["attention_mask"].sum(-1)
    start = encode_pairs(gpt2_tokenizer, STANDARD, max_length=6)
    end = encode_pairs(gpt2_tokenizer, STANDARD, max_length=10, truncation="keep_end")
    assert start["input_ids"].shape[1] == 6 and end["input_ids"].shape[1] == 10 < lengths.max()
    for n, L in enumerate(lengths.tolist()):
        keep = min(L, 6)
        for key in ("input_ids", "completion_mask"):
            assert start[key][n, :keep].tolist() == full[key][n, :keep].tolist()
        keep = min(L, 10)
        for key in ("input_ids", "completion_mask"):
            assert end[key][n, :keep].tolist() == full[key][n, L - keep:L].tolist()
    clipped = encode_pairs(gpt2_tokenizer, STANDARD, max_prompt_length=1)
    prompt = gpt2_tokenizer(STANDARD[0]["prompt"])["input_ids"]
    assert clipped["input_ids"][0, 0] == prompt[-1] and clipped["completion_mask"][0, :2].tolist() == [0, 1]


def test_standard_rows_match_trl_with_gpt2_tokenizer(gpt2_tokenizer, tmp_path):
    model = tiny_gpt2(vocab=len(gpt2_tokenizer))
    assert_same_as_trl(model, gpt2_tokenizer, STANDARD, tmp_path)
    assert_same_as_trl(model, gpt2_tokenizer, STANDARD, tmp_path, max_length=6)
    assert_same_as_trl(model, gpt2_tokenizer, STANDARD, tmp_path, max_length=10, truncation="keep_end")


@pytest.mark.slow
def test_hh_rows_match_trl_on_stories260k(hh_rows, stories_model, stories_tokenizer, tmp_path):
    rows = [r for r in load_pairs(hh_rows[:100]) if len(r["prompt"]) + max(len(r["chosen"]), len(r["rejected"])) < 400]
    rows = rows[:4] + [load_pairs(hh_rows[86:87])[0]]  # and the whitespace-only reply
    ours = assert_same_as_trl(stories_model, stories_tokenizer, rows, tmp_path)
    # Llama tokenizer: BOS first, EOS (== pad here) last on each response, and the reply starts after "Assistant:"
    lengths = ours["attention_mask"].sum(-1)
    assert (ours["input_ids"][:, 0] == stories_tokenizer.bos_token_id).all()
    assert (ours["input_ids"][torch.arange(len(lengths)), lengths - 1] == stories_tokenizer.eos_token_id).all()
    first = ours["completion_mask"].argmax(-1)
    assert stories_tokenizer.decode(ours["input_ids"][0, : first[0]]).endswith("Assistant:")
    # prompts are 40-156 tokens, prompt + response up to 204: both modes cut some sequences, none entirely
    assert lengths.max() > 170
    assert_same_as_trl(stories_model, stories_tokenizer, rows, tmp_path, max_length=170)
    assert_same_as_trl(stories_model, stories_tokenizer, rows, tmp_path, max_length=130, truncation="keep_end")


@pytest.mark.parametrize("template", [SIMPLE_TEMPLATE, DIVERGENT_TEMPLATE], ids=["simple", "divergent"])
def test_conversational_rows_match_trl(template, stories_tokenizer, tmp_path):
    stories_tokenizer.chat_template = template
    model = tiny_llama(vocab=len(stories_tokenizer))
    ours = assert_same_as_trl(model, stories_tokenizer, CONVERSATIONAL, tmp_path)
    prompt, chosen, _ = tokenize_pair(stories_tokenizer, 0, CONVERSATIONAL[0])
    alone = stories_tokenizer.apply_chat_template(CONVERSATIONAL[0]["prompt"], add_generation_prompt=True)["input_ids"]
    assert alone[: len(prompt)] == prompt
    assert stories_tokenizer.decode(alone[len(prompt):]) == ("" if template == SIMPLE_TEMPLATE else "<think></think>")
    rendered = stories_tokenizer.decode(prompt + chosen)
    assert rendered.endswith("<|assistant|>\nIt is blue.</s>\n")
    assert stories_tokenizer.decode(chosen).startswith("It is blue.")  # the divergent prompt tail is dropped
    assert ours["completion_mask"][0].sum() == len(chosen)


def test_encode_errors_name_the_row(gpt2_tokenizer):
    tok = copy.deepcopy(gpt2_tokenizer)
    long_prompt = {**STANDARD[1], "prompt": "Cats like to sleep in the sun"}
    with pytest.raises(PairError, match="^row 1: 'chosen' response entirely removed by truncation: the prompt is "
                       r"\d+ tokens and max_length=5"):
        encode_pairs(tok, [STANDARD[0], long_prompt], max_length=5)
    long_reply = {**STANDARD[1], "chosen": " sleep in the sun." * 5}
    with pytest.raises(PairError, match="^row 1: 'chosen' response would start at position 0.*removed the whole"):
        encode_pairs(tok, [STANDARD[0], long_reply], max_length=12, truncation="keep_end")
    with pytest.raises(PairError, match="^row 1: 'chosen' response would start at position 0.*no prompt token"):
        encode_pairs(tok, [STANDARD[0], {**STANDARD[1], "prompt": ""}])
    with pytest.raises(PairError, match="^row 0: 'chosen' and 'rejected' are identical"):
        encode_pairs(tok, [{"prompt": "a", "chosen": "b", "rejected": "b"}])
    with pytest.raises(PairError, match="^row 1: missing field"):
        encode_pairs(tok, [STANDARD[0], {"chosen": "a b", "rejected": "a c"}])
    with pytest.raises(PairError, match="^row 0: conversational row but the tokenizer has no chat template"):
        encode_pairs(tok, CONVERSATIONAL)
    tok.pad_token = None
    with pytest.raises(PairError, match=r"no pad token.*tokenizer\.pad_token = tokenizer\.eos_token"):
        encode_pairs(tok, STANDARD)
