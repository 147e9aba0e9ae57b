"""The built-in default: a word-level tokenizer, a small GPT-2 and a sentiment preference task, all from code.

Nothing here downloads anything. The task follows the controlled sentiment experiment of Yuan et al.
(arXiv:2410.13828): a prompt such as ``"review : the movie was"``, a positive continuation as the chosen
response and a negative one as the rejected response. Pairs come in four kinds that set how much the two
responses share (THEORY.md §7: shared tokens in a shared context entangle the two gradients):

- ``last_token``   same response body, only the final token differs;
- ``short_suffix`` same body, the last 2 or 3 tokens differ (every one of them);
- ``long_suffix``  same short start (a few tokens), then two long, independently drawn sentiment clauses;
- ``unrelated``    two independently drawn responses with little vocabulary in common.

Responses start with a space, as in TRL's standard format (``prompt + chosen`` is the full text).
"""

from __future__ import annotations

import random
import re

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
KINDS = ("last_token", "short_suffix", "long_suffix", "unrelated")
MAX_POSITIONS = 128

# ---- grammar --------------------------------------------------------------------------------------------
# Slots in templates: {s} subject, {pa}/{na} positive/negative adverb, {pj}/{nj} adjective,
# {pn}/{nn} noun, {pv}/{nv} past-tense verb. Adjectives start with a consonant (they follow "a"), and no
# adverb shares a stem with an adjective ("brilliantly brilliant").

PROMPTS = (
    "review : the movie was",
    "review : the film was",
    "review : this movie is",
    "review : the show was",
    "review : the sequel was",
    "review : that film was",
    "review : the new movie was",
    "review : the documentary was",
)
# Neutral continuations of the prompt's copula: the shared start of a response.
OPENERS = (
    "based on a book",
    "two hours long",
    "shot in paris",
    "shot in london",
    "set in a small town",
    "made last year",
    "about a family",
    "about two friends",
    "a remake",
    "in black and white",
    "released in the summer",
    "directed by a newcomer",
)
# Neutral clauses ending on a copula; a sentiment word completes them.
CLAUSES = (
    "the {s} was",
    "i thought the {s} was",
    "honestly the {s} was",
    "in the end the {s} was",
    "my friends said the {s} was",
    "to be fair the {s} was",
)
SUBJECTS = (
    "story", "plot", "acting", "cast", "music", "ending", "script", "dialogue",
    "pacing", "soundtrack", "lead", "humor", "finale", "editing", "direction",
)
POSITIVE = {
    "pa": ("truly", "wonderfully", "genuinely", "thoroughly", "remarkably", "brilliantly"),
    "pj": ("great", "charming", "superb", "moving", "fun", "beautiful",
           "lovely", "gripping", "clever", "funny", "touching", "delightful"),
    "pn": ("gem", "joy", "treat", "triumph", "pleasure", "masterpiece"),
    "pv": ("loved", "enjoyed", "adored", "admired", "relished", "savored"),
}
NEGATIVE = {
    "na": ("painfully", "terribly", "dreadfully", "horribly", "hopelessly", "woefully"),
    "nj": ("weak", "boring", "dull", "bland", "tedious", "poor",
           "clumsy", "lifeless", "forgettable", "messy", "stale", "predictable"),
    "nn": ("mess", "disaster", "bore", "letdown", "failure", "chore"),
    "nv": ("hated", "disliked", "regretted", "loathed", "endured", "resented"),
}
# short_suffix: the last k tokens, every one sentiment-bearing; k = 3 needs an article in the body.
SHORT_SUFFIXES = {2: ("{pa} {pj}", "{na} {nj}"), 3: ("{pa} {pj} {pn}", "{na} {nj} {nn}")}
# long_suffix: after the opener; the first token already carries the sentiment ("and" vs "but").
LONG_POSITIVE = (
    "and {pa} {pj} from start to finish , i {pv} the {s} and the {s}",
    "and it was a {pj} {pn} with a {pj} {s} and a {pj} {s}",
    "and the {s} was {pa} {pj} , i {pv} every single minute of it",
)
LONG_NEGATIVE = (
    "but {na} {nj} from start to finish , i {nv} the {s} and the {s}",
    "but it was a {nj} {nn} with a {nj} {s} and a {nj} {s}",
    "but the {s} was {na} {nj} , i {nv} every single minute of it",
)
# unrelated: standalone responses with few function words in common across the two lists.
UNRELATED_POSITIVE = (
    "{pa} {pj} from start to finish , i {pv} every minute",
    "a {pj} {pn} with a {pj} {s}",
    "{pj} ! the {s} made me smile",
)
UNRELATED_NEGATIVE = (
    "{na} {nj} and far too long",
    "so {nj} that i {nv} it , even the {s} felt {nj}",
    "one long {nn} . nothing worked",
)
# Common words beyond the grammar, so that short hand-written text mostly avoids <unk>.
EXTRA_WORDS = (
    "a an the this that these those it its i you he she we they me my your his her our their them",
    "is was are were be been being am do did does done have has had will would can could should not no yes",
    "and or but so if then than because while when where what who which how why very too also just only",
    "of in on at to for with from by about as into over after before under again more most less some any",
    "all one two three four five ten first last new old good bad best worst better worse big small long short",
    "movie movies film films show series actor actors actress director scene scenes character characters",
    "time times year years day night people man woman life world love hate like liked think felt feel see saw",
    "watch watched watching review rating stars star out end start story . , ! ? : ; ' \" - ( ) 0 1 2 3 4 5 6 7 8 9 10",
)

_SLOT = re.compile(r"\{(\w+)\}")
_SLOT_WORDS: dict[str, tuple[str, ...]] = {"s": SUBJECTS, **POSITIVE, **NEGATIVE}


def _words(*groups: object) -> list[str]:
    """Every literal word and slot filler in the given strings / tuples / dicts, in order of appearance."""
    out: list[str] = []
    for g in groups:
        if isinstance(g, str):
            out.extend(w for w in g.split() if not _SLOT.fullmatch(w))
        elif isinstance(g, dict):
            out.extend(_words(*g.values()))
        else:
            out.extend(_words(*g))
    return out


VOCABULARY: tuple[str, ...] = tuple(dict.fromkeys(
    SPECIAL_TOKENS + tuple(_words(
        PROMPTS, OPENERS, CLAUSES, SUBJECTS, POSITIVE, NEGATIVE, SHORT_SUFFIXES.values(),
        LONG_POSITIVE, LONG_NEGATIVE, UNRELATED_POSITIVE, UNRELATED_NEGATIVE, EXTRA_WORDS,
    ))
))


# ---- tokenizer and model ------------------------------------------------------------------------------

def builtin_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over :data:`VOCABULARY` (ids are positions in it; ``<pad>`` is 0).

    Text is split on whitespace and punctuation; every encoding starts with ``<bos>`` (added by the
    post-processor, so the first real token has a context); decoding joins tokens with single spaces, so
    text whose words and punctuation are space-separated round-trips exactly. Padding is on the right.
    """
    vocab = {w: i for i, w in enumerate(VOCABULARY)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        model_max_length=MAX_POSITIONS, padding_side="right", clean_up_tokenization_spaces=False,
    )


def builtin_model(
    tokenizer: PreTrainedTokenizerFast | None = None,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    seed: int = 0,
) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 (tied embeddings, learned positions, 128 positions) sized to ``tokenizer``.

    Dropout is off, so train and eval mode give the same gradients. Initialisation depends only on ``seed``
    (the caller's torch RNG state is left as it was). Returned in eval mode, float32, on CPU.
    """
    import torch

    tokenizer = tokenizer if tokenizer is not None else builtin_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=MAX_POSITIONS, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model.eval()


# ---- preference pairs ---------------------------------------------------------------------------------

def _fill(template: str, rng: random.Random) -> str:
    """Fill the slots of ``template`` with random words, no word twice ("the plot and the plot")."""
    used: set[str] = set()

    def pick(m: re.Match) -> str:
        word = rng.choice([w for w in _SLOT_WORDS[m.group(1)] if w not in used])
        used.add(word)
        return word

    return _SLOT.sub(pick, template)


def _body(rng: random.Random) -> str:
    return f"{rng.choice(OPENERS)} and {_fill(rng.choice(CLAUSES), rng)}"


def _pair(kind: str, rng: random.Random) -> tuple[str, str]:
    """One (chosen, rejected) pair of response texts of the given kind, without the leading space."""
    if kind == "last_token":
        body = _body(rng)
        return f"{body} {_fill('{pj}', rng)}", f"{body} {_fill('{nj}', rng)}"
    if kind == "short_suffix":
        k = rng.choice((2, 3))
        body = _body(rng) + (" a" if k == 3 else "")
        pos, neg = SHORT_SUFFIXES[k]
        return f"{body} {_fill(pos, rng)}", f"{body} {_fill(neg, rng)}"
    if kind == "long_suffix":
        start = rng.choice(OPENERS)
        return (f"{start} {_fill(rng.choice(LONG_POSITIVE), rng)}",
                f"{start} {_fill(rng.choice(LONG_NEGATIVE), rng)}")
    if kind == "unrelated":
        return _fill(rng.choice(UNRELATED_POSITIVE), rng), _fill(rng.choice(UNRELATED_NEGATIVE), rng)
    raise ValueError(f"unknown pair kind {kind!r}; expected one of {KINDS}")


def builtin_pairs(n: int = 64, seed: int = 0) -> list[dict[str, str]]:
    """``n`` sentiment preference pairs in TRL's standard format, plus the pair's kind.

    Each row is ``{"prompt": str, "chosen": str, "rejected": str, "kind": str}``: chosen is the positive
    continuation, rejected the negative one, both starting with a space (``prompt + chosen`` is the text).
    Kinds cycle through :data:`KINDS` in order, so any ``4m`` consecutive rows hold ``m`` of each.
    Deterministic given ``seed``; every word is in :data:`VOCABULARY`.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        prompt = rng.choice(PROMPTS)
        chosen, rejected = _pair(kind, rng)
        rows.append({"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected, "kind": kind})
    return rows


def builtin_sft_rows(n: int = 256, seed: int = 1) -> list[dict[str, str]]:
    """``n`` chosen-only texts ``{"text": prompt + chosen}`` for a short supervised warm-up before DPO.

    Drawn like :func:`builtin_pairs` (all four kinds); the default seed differs from its default so the
    warm-up does not contain the evaluated pairs verbatim.
    """
    return [{"text": r["prompt"] + r["chosen"]} for r in builtin_pairs(n, seed)]
