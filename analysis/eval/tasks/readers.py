"""Reading task items: JSONL files, a saved ``datasets`` folder, a hub dataset (from the local cache), each
record turned into an :class:`~analysis.eval.tasks.core.Item` of its kind, ids checked unique."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from analysis.errors import GraftError
from analysis.eval.tasks.core import REQUIRED, SPLITS, Item


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` pairs; bad JSON or non-objects raise naming file and line."""
    if not path.is_file():
        raise GraftError(f"{path}: no such file", "check the path (relative paths in a task YAML start at the YAML)")
    from analysis.io.files import decode

    records: list[tuple[int, dict[str, Any]]] = []
    text = decode(path.read_bytes(), path)
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise GraftError(f"{path}:{n}: malformed JSON ({err.msg})", "write one JSON object per line") from None
        if not isinstance(record, dict):
            raise GraftError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}",
                             "write one JSON object per line")
        records.append((n, record))
    if not records:
        raise GraftError(f"{path}: empty file", "add one JSON object per line")
    return records


def read_datasets_folder(path: Path) -> list[tuple[str, dict[str, Any], str | None]]:
    """Rows of a ``datasets.save_to_disk`` folder as ``(where, record, split)``."""
    try:
        import datasets
    except ImportError:
        raise GraftError(f"{path}: reading a datasets folder needs the datasets package",
                         "pip install datasets") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises several types for a folder it cannot read
        raise GraftError(f"{path}: not a datasets.save_to_disk folder ({err})", "point at the saved folder") from None
    parts = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    rows: list[tuple[str, dict[str, Any], str | None]] = []
    for split, ds in parts:
        name = {"validation": "dev"}.get(split, split) if split else None
        rows += [(f"{path} [{split or 'rows'} {i}]", dict(r), name) for i, r in enumerate(ds)]
    if not rows:
        raise GraftError(f"{path}: empty dataset", "save a dataset with at least one row")
    return rows


def read_hub_dataset(spec: str) -> list[tuple[str, dict[str, Any], str | None]]:
    """Rows of a hub dataset ``owner/name[:config]`` (needs network) as ``(where, record, split)``."""
    import os

    import datasets

    name, _, config = spec.partition(":")
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise GraftError(f"hf:{spec}: hub datasets need the network, and HF_HUB_OFFLINE is set",
                         "save it once with datasets' save_to_disk where online, and pass the folder")
    try:
        loaded = datasets.load_dataset(name, config or None)
    except Exception as err:  # network and not-found errors come in many types
        raise GraftError(f"hf:{spec}: cannot load from the hub ({type(err).__name__})",
                         "check the name, or pass a save_to_disk folder") from None
    rows: list[tuple[str, dict[str, Any], str | None]] = []
    for split, ds in loaded.items():
        name_ = {"validation": "dev"}.get(split, split)
        rows += [(f"hf:{spec} [{split} {i}]", dict(r), name_) for i, r in enumerate(ds)]
    return rows


def infer_kind(record: Mapping[str, Any]) -> str:
    """``choices`` → choice; ``text`` without ``prompt`` → perplexity; else generate."""
    if "choices" in record:
        return "choice"
    if "text" in record and "prompt" not in record:
        return "perplexity"
    return "generate"


def make_item(record: Mapping[str, Any], *, kind: str, where: str, index: int,
              rename: Mapping[str, str], split_field: str, split: str | None) -> Item:
    """Validate one record for ``kind`` (the error names ``where``) and build the item."""
    fields = dict(record)
    for canon, src in rename.items():
        if src in record:
            fields[canon] = record[src]
    need = REQUIRED[kind]
    if kind == "choice" and "choices" in fields and "answer" not in fields:
        raise GraftError(f"{where}: 'choices' without 'answer'", "add \"answer\": the index of the correct choice")
    for key in need:
        if key not in fields or fields[key] is None:
            src = rename.get(key, key)
            alias = next((a for a in ALIASES.get(key, ()) if a in record and key not in rename), None)
            fix = f"map it in a task YAML: fields: {{{key}: {alias}}}" if alias else f"add {src!r} to the item"
            raise GraftError(f"{where}: missing field {src!r} (a {kind} item needs {', '.join(need)})"
                             + (f"; it has {alias!r}" if alias else ""), fix)
    if kind == "choice":
        choices, labels = fields["choices"], None
        if isinstance(choices, Mapping) and "text" in choices:  # HF ARC-style {"text": [...], "label": [...]}
            labels = [str(label) for label in choices.get("label") or []] or None
            choices = fields["choices"] = list(choices["text"])
        if not isinstance(choices, list) or len(choices) < 2:
            raise GraftError(f"{where}: 'choices' must be a list of at least 2 strings", "fix the item")
        fields["answer"] = choice_index(fields["answer"], choices, labels, where)
    if kind == "generate" and isinstance(fields["answer"], list | dict):
        raise GraftError(f"{where}: 'answer' must be a string or a number", "fix the item")
    item_split = split
    if split_field in record and record[split_field] is not None:
        item_split = str(record[split_field])
        if item_split not in SPLITS:
            raise GraftError(f"{where}: unknown split {item_split!r}", f"use one of {', '.join(SPLITS)}")
    item_id = str(fields.get("id", index))
    return Item(id=item_id, fields=fields, split=item_split, where=where)


# Where datasets keep what graftlm calls prompt, answer and choices (GSM8K, ARC, MMLU, BIG-bench, chat
# exports): named in the error's fix, never taken silently — a wrong guess would score the wrong text.
ALIASES = {"prompt": ("question", "input", "query", "problem", "instruction"),
           "answer": ("answerKey", "label", "target", "completion", "output", "solution", "gold"),
           "choices": ("options", "endings")}


def choice_index(answer: Any, choices: list[Any], labels: list[str] | None, where: str) -> int:
    """The correct choice's index from what datasets store: the index (or its digits), the choice's label
    (ARC's answerKey "B" or "2" beside its labels), a letter A, B, … in order, or the choice's own text —
    refused when two of these readings disagree."""
    readings: set[int] = set()
    if isinstance(answer, str) and answer.strip().lstrip("-").isdigit() and labels is None:
        answer = int(answer)
    if isinstance(answer, int) and not isinstance(answer, bool):
        readings.add(answer)
    elif isinstance(answer, str):
        key = answer.strip()
        if labels is not None and key in labels:
            readings.add(labels.index(key))
        elif labels is not None and key.lstrip("-").isdigit():  # digits that are no label: an index, as before
            readings.add(int(key))
        elif len(key) == 1 and "A" <= key <= "Z" and labels is None:
            readings.add(ord(key) - ord("A"))
        if key in [str(c).strip() for c in choices] and labels is None:
            readings.add([str(c).strip() for c in choices].index(key))
    if len(readings) != 1 or not 0 <= (index := readings.pop()) < len(choices):
        raise GraftError(f"{where}: 'answer' must be an index into 'choices' (0..{len(choices) - 1}), a letter, a label "
                         f"or a choice's text, and say one choice; got {answer!r}", "give the correct choice's index")
    return index


def check_unique(items: Iterable[Item]) -> None:
    """Item ids must be unique: per-item records are keyed by them."""
    seen: dict[str, str] = {}
    for it in items:
        key = f"{it.split}:{it.id}" if it.split == "retention" else it.id
        if key in seen:
            raise GraftError(f"{it.where}: duplicate id {it.id!r} (also at {seen[key]})", "give every item its own id")
        seen[key] = it.where
