"""Tasks: items with disjoint splits, a prompt format and a scorer (schema: docs/tasks.md)."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from analysis.errors import GraftError, validation_problem
from analysis.eval.tasks.extract import Extraction, check_filter, clean_number, extract

Kind = Literal["generate", "choice", "perplexity"]
KINDS: tuple[str, ...] = ("generate", "choice", "perplexity")
SPLITS: tuple[str, ...] = ("probe", "dev", "test", "retention", "train")
REQUIRED: dict[str, tuple[str, ...]] = {
    "generate": ("prompt", "answer"),
    "choice": ("prompt", "choices", "answer"),
    "perplexity": ("text",),
}


class TaskConfig(BaseModel):
    """The task YAML; every key and its default is documented in docs/tasks.md."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    kind: Kind | None = None
    data: str | dict[str, str] | None = None
    builtin: str | None = None
    split_field: str = "split"
    fields: dict[str, str] = {}
    prompt: str = "{prompt}"
    target: str = " {answer}"
    choice_prefix: str = " "
    description: str = ""
    filter: str | None = None
    metric: str | None = None
    stop: list[str] = ["\n"]
    max_new_tokens: int = 32
    fewshot: int = 0
    fewshot_split: str = "dev"
    fewshot_seed: int = 0
    fewshot_separator: str = "\n\n"
    chat_template: bool = False
    system: str | None = None
    retention: str | None = None
    overlap: Literal["error", "drop"] = "error"


@dataclass(frozen=True)
class Item:
    """One task item. ``fields`` holds every source field (renamed), for prompt templates."""

    id: str
    fields: Mapping[str, Any]
    split: str | None = None
    where: str = ""  # "file:line", for error messages

    @property
    def prompt(self) -> str:
        return str(self.fields.get("prompt", ""))

    @property
    def answer(self) -> Any:
        return self.fields.get("answer")

    @property
    def choices(self) -> list[str]:
        return [str(c) for c in self.fields.get("choices") or []]

    @property
    def text(self) -> str:
        return str(self.fields.get("text", ""))


@dataclass(frozen=True)
class Overlap:
    """Items of ``split`` that also occur in ``other`` (same id or prompt): (the item, its twin) pairs."""

    split: str
    other: str
    pairs: list[tuple[Item, Item]]

    def describe(self, shown: int = 3) -> str:
        """E.g. ``5 items of probe also in test (arith.jsonl:3 = arith.jsonl:812, …)``."""
        where = ", ".join(f"{_short(a.where or a.id)} = {_short(b.where or b.id)}" for a, b in self.pairs[:shown])
        more = ", …" if len(self.pairs) > shown else ""
        noun = "item" if len(self.pairs) == 1 else "items"
        return f"{len(self.pairs)} {noun} of {self.split} also in {self.other} ({where}{more})"


def _short(where: str) -> str:
    """An item's place without its folders: ``/data/arith.jsonl:3`` → ``arith.jsonl:3``, ``/data/ds [test 4]`` →
    ``ds [test 4]``."""
    return re.sub(r"^[^\s\[]*/(?=[^/\s\[]+(?::\d+$| \[))", "", where)


@dataclass(frozen=True)
class Example:
    """A fixed few-shot example: a prompt (already formatted) and what follows it."""

    prompt: str
    target: str


@dataclass
class Task:
    """A loaded task. ``items(split)`` gives the items; ``render`` and ``score`` format and grade them."""

    name: str
    kind: str
    config: TaskConfig
    source: str
    all_items: list[Item]
    has_splits: bool
    retention: Task | None = None
    default_split: str | None = None
    limit: int | None = None
    fixed_fewshot: list[Example] = field(default_factory=list)
    excluded: frozenset[tuple[str | None, str]] = frozenset()  # (split, id) of items dropped by ``without``

    # -- items ----------------------------------------------------------------------------------
    @property
    def splits(self) -> list[str]:
        """Split names present (``retention`` included when the task has a retention set)."""
        names = [s for s in SPLITS if any(it.split == s for it in self.all_items)] if self.has_splits else []
        if self.retention is not None and "retention" not in names:
            names.append("retention")
        return names

    def resolve_split(self, split: str | None) -> str | None:
        """``None`` → the default split (``test`` when the task has splits, else the whole task)."""
        split = split if split is not None else self.default_split
        if split is None:
            return "test" if self.has_splits else None
        return split

    def items(self, split: str | None = None, limit: int | None = None) -> list[Item]:
        """Items of ``split`` (``"all"``: every item), at most ``limit`` (or the task's limit)."""
        split = self.resolve_split(split)
        limit = limit if limit is not None else self.limit
        if split == "retention" and self.retention is not None:
            ret = self.retention
            own = "retention" if "retention" in ret.splits else ("test" if "test" in ret.splits else "all")
            return ret.items(own, limit)
        if split is None or split == "all":
            chosen = list(self.all_items)
        elif not self.has_splits:
            raise GraftError(
                f"{self.source}: has no splits, so split {split!r} does not exist",
                "add a 'split' field to the items (or one file per split in a task YAML), or ask for no split",
            )
        elif split not in self.splits:
            raise GraftError(
                f"{self.source}: no split {split!r} (splits: {', '.join(self.splits) or 'none'})",
                "ask for one of those splits",
            )
        else:
            chosen = [it for it in self.all_items if it.split == split]
        if self.excluded:
            chosen = [it for it in chosen if (it.split, it.id) not in self.excluded]
        return chosen[:limit] if limit is not None else chosen

    def without(self, items: Iterable[Item]) -> Task:
        """A copy whose ``items()`` skip ``items`` — each in its own split only, so an id shared by two
        splits leaves the other split's item in place."""
        return replace(self, excluded=self.excluded | {(it.split, it.id) for it in items})

    def overlaps(self, splits: Sequence[str]) -> list[Overlap]:
        """Items of each split that also occur in a later one of ``splits`` (same id or the same rendered
        prompt — a perplexity item's text), one :class:`Overlap` per pair of splits that share any, in the
        order of ``splits``."""
        def shown(it: Item) -> str:  # what the model reads of the item
            return it.text if self.kind == "perplexity" else self.prompt_text(it)

        found: list[Overlap] = []
        for i, split in enumerate(splits):
            mine = self.items(split, limit=None)
            for other in splits[i + 1:]:
                theirs: dict[str, Item] = {}
                for it in self.items(other, limit=None):
                    theirs.setdefault(f"id:{it.id}", it)
                    theirs.setdefault(f"prompt:{shown(it)}", it)
                pairs = [(it, match) for it in mine
                         if (match := theirs.get(f"id:{it.id}") or theirs.get(f"prompt:{shown(it)}"))]
                if pairs:
                    found.append(Overlap(split, other, pairs))
        return found

    # -- scoring options ------------------------------------------------------------------------
    @property
    def filter(self) -> str:
        return self.config.filter or "exact"

    @property
    def metric(self) -> str:
        if self.config.metric:
            return self.config.metric
        return {"generate": "flexible", "choice": "acc", "perplexity": "perplexity"}[self.kind]

    @property
    def stop(self) -> list[str]:
        return list(self.config.stop)

    @property
    def max_new_tokens(self) -> int:
        return self.config.max_new_tokens

    # -- prompts --------------------------------------------------------------------------------
    def _format(self, template: str, item: Item) -> str:
        try:
            return template.format(**item.fields)
        except KeyError as err:
            raise GraftError(
                f"{item.where}: the template {template!r} uses field {err.args[0]!r}, which this item lacks",
                "add the field to every item or change the template",
            ) from None
        except (IndexError, ValueError) as err:
            raise GraftError(
                f"{self.source}: bad template {template!r} ({err})", "double literal braces: {{ and }}"
            ) from None

    def prompt_text(self, item: Item) -> str:
        """The item's own prompt, without description or few-shot examples."""
        return self._format(self.config.prompt, item)

    def _example_text(self, ex: Item) -> str:
        if self.kind == "choice":
            return self.prompt_text(ex) + self.config.choice_prefix + ex.choices[int(ex.answer)]
        return self.prompt_text(ex) + self._format(self.config.target, ex)

    def fewshot_examples(self, item: Item) -> list[str]:
        """The few-shot examples for ``item``: a seeded sample that never contains the item itself."""
        k = self.config.fewshot
        if k <= 0 or self.kind == "perplexity":
            return []
        if self.fixed_fewshot:
            return [ex.prompt + ex.target for ex in self.fixed_fewshot[:k]]
        pool = [it for it in self.items(self.config.fewshot_split, limit=None) if it.id != item.id] \
            if self.has_splits else [it for it in self.all_items if it.id != item.id]
        if len(pool) < k:
            raise GraftError(
                f"{self.source}: fewshot {k} needs {k} examples but split {self.config.fewshot_split!r} "
                f"has {len(pool)}",
                "lower fewshot or set fewshot_split",
            )
        # Seeded per item: the examples of an item do not depend on which other items are evaluated.
        rng = random.Random(f"{self.config.fewshot_seed}:{item.id}")
        return [self._example_text(ex) for ex in rng.sample(pool, k)]

    def render(self, item: Item, tokenizer: Any = None) -> str:
        """The full prompt text: description, few-shot examples, the prompt; chat template if asked."""
        sep = self.config.fewshot_separator
        parts = [*self.fewshot_examples(item), self.prompt_text(item)]
        text = self._format(self.config.description, item) + sep.join(parts)
        if not self.config.chat_template:
            return text
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise GraftError(
                f"{self.source}: chat_template is on but the tokenizer has no chat template",
                "set chat_template: false, or use an instruction-tuned model's tokenizer",
            )
        messages = ([{"role": "system", "content": self.config.system}] if self.config.system else [])
        messages.append({"role": "user", "content": text})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def continuations(self, item: Item) -> list[str]:
        """Choice kind: the text scored after the prompt, one per choice."""
        return [self.config.choice_prefix + c for c in item.choices]

    def score(self, item: Item, output: str) -> Extraction:
        """Generation kind: extract the answer from ``output`` and compare it with the item's."""
        return extract(output, str(item.answer), self.filter)

    def fingerprint(self, with_retention: bool = True) -> str:
        """sha256 of everything an evaluation of this task reads: its kind and config (templates,
        filter, few-shot settings), every item of every split with its fields, the fixed few-shot
        examples, the items dropped by :meth:`without` and (``with_retention``) the retention set's own
        fingerprint. Two tasks with the same fingerprint score every model the same."""
        import hashlib

        digest = hashlib.sha256()

        def add(value: Any) -> None:
            digest.update(json.dumps(value, sort_keys=True, default=str, ensure_ascii=False).encode())
            digest.update(b"\n")

        add({"kind": self.kind, "config": self.config.model_dump(mode="json"), "has_splits": self.has_splits,
             "excluded": sorted(map(list, self.excluded), key=str)})
        for it in self.all_items:
            add([it.split, it.id, dict(it.fields)])
        add([[ex.prompt, ex.target] for ex in self.fixed_fewshot])
        if with_retention:
            add(self.retention.fingerprint() if self.retention is not None else None)
        return digest.hexdigest()

    def with_options(self, **overrides: Any) -> Task:
        """A copy with config keys replaced (e.g. ``fewshot=0``), validated like a YAML."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if not overrides:
            return self
        config = _validate_config({**self.config.model_dump(), **overrides}, self.source)
        return replace(self, config=config)


# -- reading files ------------------------------------------------------------------------------

def _validate_config(raw: Mapping[str, Any], where: str) -> TaskConfig:
    try:
        config = TaskConfig.model_validate(raw)
    except ValidationError as err:
        raise GraftError(f"{where}: {validation_problem(err, TaskConfig)}",
                         "see docs/tasks.md for the task YAML schema") from None
    if config.filter is not None:
        check_filter(config.filter, where)
    if config.metric is not None and config.metric not in ("strict", "flexible", "acc", "acc_norm"):
        raise GraftError(f"{where}: unknown metric {config.metric!r}", "use strict, flexible, acc or acc_norm")
    if config.fewshot < 0 or config.max_new_tokens < 1:
        raise GraftError(f"{where}: fewshot must be >= 0 and max_new_tokens >= 1", "fix the values")
    return config


def default_filter(items: Iterable[Item]) -> str:
    """``numeric`` when every answer is a number, else ``exact``."""
    answers = [it.answer for it in items]
    return "numeric" if answers and all(clean_number(str(a)) is not None for a in answers) else "exact"
