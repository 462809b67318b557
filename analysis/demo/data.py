"""Synthetic data of the demo pair: the skills, their held-out splits, the filler language, the tokenizer.

Everything here is a pure function of a seed, so the build, the shipped task files and the tests agree
on which items are held out. Three skills, each a short answer after a short prompt:

- ``arith`` (skill A): two-digit addition, ``37+58=`` -> ``95``. gen2 never sees it again and forgets it.
- ``reverse`` (skill B): reverse a lowercase word, ``rev(cat)=`` -> ``tac``. Every generation trains on it.
- ``upper`` (skill C): uppercase a word, ``up(cat)=`` -> ``CAT``. New in gen2: what the newer model gained.
  It has no chat format: gen1-chat is tuned on the instruction format of A and B only.

plus filler language (simple sentences from a small grammar) whose held-out texts measure retention.
Each problem of A and B has a plain prompt (the base format) and a chat prompt (the instruction format of
gen1-chat); a held-out problem is held out in both formats.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
PAD, BOS, EOS, UNK = SPECIALS
# One token per character: the model's arithmetic and string skills are then about characters, and the
# vocabulary (~80 tokens) keeps embeddings negligible next to the blocks.
CHARS = ["\n", " "] + list("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,:;?!+-=()'")

SPLITS = {"probe": 64, "dev": 200, "test": 400}
N_RETENTION = {"dev": 100, "test": 100}
SKILLS = ("arith", "reverse", "upper")

# Words of the string skills: 3-8 random lowercase letters (~2e11 of them, so held-out words are rare
# to meet by chance and are excluded from training explicitly anyway).
WORD_LEN = (3, 8)
LETTERS = "abcdefghijklmnopqrstuvwxyz"


# ---------------------------------------------------------------- problems and their two formats


def arith_problem(rng: random.Random) -> tuple[int, int]:
    """Two two-digit operands."""
    return rng.randint(10, 99), rng.randint(10, 99)


def word_problem(rng: random.Random) -> str:
    """A random lowercase word of 3-8 letters."""
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(*WORD_LEN)))


def fields(skill: str, problem: object) -> dict[str, object]:
    """The fields a problem's prompt templates use: ``a`` and ``b``, or ``word``."""
    if skill == "arith":
        a, b = problem  # type: ignore[misc]
        return {"a": a, "b": b}
    return {"word": str(problem)}


def solve(skill: str, problem: object) -> str:
    """The answer to a problem."""
    if skill == "arith":
        a, b = problem  # type: ignore[misc]
        return str(a + b)
    word = str(problem)
    return {"reverse": word[::-1], "upper": word.upper()}[skill]


# The two formats of every skill, as str.format templates over ``fields``; the task YAMLs use the same
# templates, so what the models were trained on and what the tasks ask cannot drift apart.
PLAIN_TEMPLATES = {"arith": "{a}+{b}=", "reverse": "rev({word})=", "upper": "up({word})="}
CHAT_TEMPLATES = {
    "arith": "User: What is {a}+{b}?\nBot: ",
    "reverse": "User: Reverse the word {word}.\nBot: ",
}


def plain(skill: str, problem: object) -> tuple[str, str]:
    """The base-model format of a problem: (prompt, answer)."""
    return PLAIN_TEMPLATES[skill].format(**fields(skill, problem)), solve(skill, problem)


def chat(skill: str, problem: object) -> tuple[str, str]:
    """The instruction format of a problem: (prompt, answer); the answer follows ``Bot: ``."""
    return CHAT_TEMPLATES[skill].format(**fields(skill, problem)), solve(skill, problem)


FORMATS: dict[str, Callable[[str, object], tuple[str, str]]] = {"plain": plain, "chat": chat}

# ---------------------------------------------------------------- filler language

DET = ["the", "a", "my", "one", "this", "that", "every", "no"]
ADJ = ["big", "small", "red", "old", "new", "happy", "quiet", "green", "cold", "tall", "brave", "lazy"]
NOUN = ["dog", "cat", "bird", "girl", "boy", "tree", "house", "ball", "river", "king", "book", "car",
        "fox", "child", "farmer", "horse", "lamp", "ship", "garden", "friend"]
VERB = ["sees", "likes", "finds", "helps", "follows", "holds", "moves", "watches", "paints", "loves",
        "carries", "hears"]
PREP = ["near", "under", "behind", "with", "beside", "over"]
ADV = ["today", "again", "slowly", "at night", "every day", "now"]


def _noun_phrase(rng: random.Random) -> str:
    words = [rng.choice(DET)]
    if rng.random() < 0.5:
        words.append(rng.choice(ADJ))
    words.append(rng.choice(NOUN))
    return " ".join(words)


def sentence(rng: random.Random) -> str:
    """One simple sentence: subject verb object, sometimes a prepositional phrase or an adverb."""
    parts = [_noun_phrase(rng), rng.choice(VERB), _noun_phrase(rng)]
    if rng.random() < 0.3:
        parts += [rng.choice(PREP), _noun_phrase(rng)]
    if rng.random() < 0.3:
        parts.append(rng.choice(ADV))
    text = " ".join(parts)
    return text[0].upper() + text[1:] + "."


def text(rng: random.Random) -> str:
    """A filler text: one or two sentences."""
    return " ".join(sentence(rng) for _ in range(rng.randint(1, 2)))


# ---------------------------------------------------------------- held-out splits


@dataclass(frozen=True)
class HeldOut:
    """The held-out problems of every skill (by split) and the retention texts; training avoids them all."""

    problems: dict[str, dict[str, list[object]]]  # skill -> split -> problems
    retention: dict[str, list[str]]  # split -> texts

    def excluded(self, skill: str) -> set[object]:
        """Every held-out problem of ``skill``; words are shared by the string skills, so pooled."""
        skills = ["arith"] if skill == "arith" else ["reverse", "upper"]
        return {p for s in skills for split in self.problems[s].values() for p in split}

    @property
    def retention_texts(self) -> set[str]:
        return {t for split in self.retention.values() for t in split}


def held_out(seed: int = 0) -> HeldOut:
    """Draw disjoint probe / dev / test problems for each skill, and the retention texts."""
    rng = random.Random(f"graftlm-demo-heldout-{seed}")
    n = sum(SPLITS.values())
    problems: dict[str, dict[str, list[object]]] = {}
    # Arithmetic: a sample without replacement of the 8100 operand pairs.
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    rng.shuffle(pairs)
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < 2 * n:  # distinct words for reverse and upper, none shared
        w = word_problem(rng)
        if w not in seen:
            seen.add(w)
            words.append(w)
    pools: dict[str, list[object]] = {"arith": list(pairs[:n]), "reverse": list(words[:n]),
                                      "upper": list(words[n:])}
    for skill, pool in pools.items():
        problems[skill] = {}
        start = 0
        for split, size in SPLITS.items():
            problems[skill][split] = pool[start:start + size]
            start += size
    retention: dict[str, list[str]] = {}
    seen_texts: set[str] = set()
    for split, size in N_RETENTION.items():
        retention[split] = []
        while len(retention[split]) < size:
            t = text(rng)
            if t not in seen_texts:
                seen_texts.add(t)
                retention[split].append(t)
    return HeldOut(problems, retention)


def records(held: HeldOut, skill: str) -> list[dict[str, object]]:
    """The JSONL records of one skill's task: id, plain prompt, answer, split, and the template fields."""
    out: list[dict[str, object]] = []
    for split, problems in held.problems[skill].items():
        for i, p in enumerate(problems):
            prompt, answer = plain(skill, p)
            out.append({"id": f"{skill}-{split}-{i:03d}", "prompt": prompt, "answer": answer, "split": split,
                        **fields(skill, p)})
    return out


# ---------------------------------------------------------------- training stream


class Stream:
    """An endless stream of training lines (each ending in a newline) from a weighted mixture.

    ``mix`` maps a source to its weight; sources are ``{skill}:{fmt}`` or ``text``. Held-out problems
    and retention texts are never emitted.
    """

    def __init__(self, mix: dict[str, float], held: HeldOut, seed: int) -> None:
        self.sources = list(mix)
        self.weights = [mix[s] for s in self.sources]
        self.rng = random.Random(f"graftlm-demo-stream-{seed}")
        self.excluded = {s: held.excluded(s) for s in SKILLS}
        self.excluded_texts = held.retention_texts

    def line(self) -> tuple[str, str]:
        """The next training line as (context, target): the loss is taken on the target only.

        A skill's prompt is context (its operands are random: predicting them is noise that, measured
        here, keeps the skills from being learned in a CPU budget); its answer and newline are target.
        A filler text is all target.
        """
        source = self.rng.choices(self.sources, self.weights)[0]
        if source == "text":
            while True:
                t = text(self.rng)
                if t not in self.excluded_texts:
                    return "", t + "\n"
        skill, fmt = source.split(":")
        draw = arith_problem if skill == "arith" else word_problem
        while True:
            p = draw(self.rng)
            if p not in self.excluded[skill]:
                prompt, answer = FORMATS[fmt](skill, p)
                return prompt, answer + "\n"


# ---------------------------------------------------------------- tokenizer


def build_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    """A character-level tokenizer (WordLevel over single characters) that prepends ``<bos>``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character, newline and space included, is its own pre-token, hence its own token.
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()  # join characters back without separators
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        padding_side="left", clean_up_tokenization_spaces=False, model_max_length=128,
    )


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, keys in a stable order."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
