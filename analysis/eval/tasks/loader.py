"""``load(ref)``: a task YAML, a JSONL file, a datasets folder, a built-in benchmark or ``demo:NAME``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from analysis.demo import TASKS_DIR as DEMO_DIR
from analysis.errors import GraftError
from analysis.eval.tasks.builtin import BUILTINS, load_builtin
from analysis.eval.tasks.core import Item, Task, TaskConfig, _validate_config, default_filter
from analysis.eval.tasks.readers import (
    check_unique,
    infer_kind,
    make_item,
    read_datasets_folder,
    read_hub_dataset,
    read_jsonl,
)


def load(
    ref: str | Path | Task,
    *,
    split: str | None = None,
    limit: int | None = None,
    fewshot: int | None = None,
    chat_template: bool | None = None,
    max_new_tokens: int | None = None,
) -> Task:
    """Load a task. ``split``/``limit`` set what ``task.items()`` gives by default; the other keywords
    override the task's YAML keys of the same name."""
    task = replace(ref) if isinstance(ref, Task) else _load_ref(str(ref), base=Path.cwd())  # never mutate the caller's
    task = task.with_options(fewshot=fewshot, chat_template=chat_template, max_new_tokens=max_new_tokens)
    if split is not None:
        task.items(split, limit=0)  # fail now, naming the file, if the split does not exist
        task.default_split = split
    if limit is not None:
        if limit < 0:
            raise GraftError(f"limit must be >= 0, got {limit}", "pass a non-negative --limit")
        task.limit = limit
    return task


def _load_ref(ref: str, base: Path) -> Task:
    if ref.startswith("demo:"):
        name = ref[len("demo:") :]
        path = DEMO_DIR / f"{name}.yaml"
        if not path.is_file():
            have = sorted(p.stem for p in DEMO_DIR.glob("*.yaml")) if DEMO_DIR.is_dir() else []
            raise GraftError(f"no demo task {name!r}", f"use one of: {', '.join(have) or '(none installed)'}")
        return _load_yaml(path)
    if ref.startswith("hf:"):
        return _from_records(read_hub_dataset(ref[3:]), TaskConfig(), source=ref, name=ref[3:].replace("/", "_"))
    path = Path(ref) if Path(ref).is_absolute() else base / ref
    if path.is_dir():
        return _from_records(_folder_records(path), TaskConfig(), source=str(path), name=path.name)
    if path.is_file():
        if path.suffix in (".yaml", ".yml"):
            return _load_yaml(path)
        if path.suffix in (".jsonl", ".json"):
            return _from_records(_jsonl_records(path, None), TaskConfig(), source=str(path), name=path.stem)
        raise GraftError(f"{path}: unknown task file type {path.suffix!r}", "give a .yaml task or a .jsonl file")
    if ref in BUILTINS:
        config, items, fixed = load_builtin(ref)
        return Task(name=ref, kind=config.kind or "generate", config=config, source=f"builtin:{ref}",
                    all_items=items, has_splits=True, fixed_fewshot=fixed)
    raise GraftError(
        f"task {ref!r} not found: no such file or folder, and not a built-in",
        f"give a task YAML, a JSONL file, a datasets folder, demo:NAME or one of {', '.join(BUILTINS)}",
    )


RawRecord = tuple[str, dict[str, Any], str | None]  # (where, record, split given by the file layout)


def _jsonl_records(path: Path, split: str | None) -> list[RawRecord]:
    return [(f"{path}:{n}", rec, split) for n, rec in read_jsonl(path)]


def _folder_records(path: Path) -> list[RawRecord]:
    return read_datasets_folder(path)


def _records(data: str | dict[str, str], base: Path) -> list[RawRecord]:
    if isinstance(data, dict):
        out: list[RawRecord] = []
        for split, ref in data.items():
            out += _records_one(ref, base, split)
        return out
    return _records_one(data, base, None)


def _records_one(ref: str, base: Path, split: str | None) -> list[RawRecord]:
    """Records of one data reference: ``hf:owner/name[:config]``, a datasets folder or a JSONL file."""
    if ref.startswith("hf:"):
        rows = read_hub_dataset(ref[3:])
    elif (base / ref).is_dir():
        rows = _folder_records(base / ref)
    else:
        return _jsonl_records(base / ref, split)
    return [(w, r, split or s) for w, r, s in rows]


def _from_records(records: list[RawRecord], config: TaskConfig, *, source: str, name: str,
                  retention: Task | None = None) -> Task:
    """Build a task from raw records: infer the kind, validate every record, split off retention lines."""
    kind = config.kind or infer_kind(records[0][1])
    split_field = config.split_field
    items: list[Item] = []
    retention_items: list[Item] = []
    for index, (where, rec, split) in enumerate(records):
        rec_split = split or (rec.get(split_field) if isinstance(rec.get(split_field), str) else None)
        # Retention lines in a generation/choice file are perplexity texts: they form the retention set.
        item_kind = "perplexity" if rec_split == "retention" and kind != "perplexity" else kind
        item = make_item(rec, kind=item_kind, where=where, index=index, rename=config.fields,
                         split_field="" if split else split_field, split=split)
        (retention_items if item_kind != kind else items).append(item)
    if not items:
        raise GraftError(f"{source}: no {kind} items (only retention lines)", "add items outside the retention split")
    check_unique(items + retention_items)
    if retention is None and retention_items:
        retention = Task(name=f"{name}/retention", kind="perplexity", config=TaskConfig(kind="perplexity"),
                         source=source, all_items=retention_items, has_splits=True, default_split="retention")
    if kind == "generate" and config.filter is None:
        config = config.model_copy(update={"filter": default_filter(items)})
    has_splits = any(it.split is not None for it in items)
    return Task(name=config.name or name, kind=kind, config=config, source=source, all_items=items,
                has_splits=has_splits, retention=retention)


def _load_yaml(path: Path) -> Task:
    from analysis.io.files import parse_yaml, read_text

    raw = parse_yaml(read_text(path, "task YAML"), path, "fix the YAML")
    if raw is None:
        raise GraftError(f"{path}: empty file", "write a task YAML (docs/tasks.md)")
    if not isinstance(raw, dict):
        raise GraftError(f"{path}: a task YAML must be a mapping of keys", "see docs/tasks.md")
    config = _validate_config(raw, str(path))
    base = path.parent
    retention = _load_ref(config.retention, base) if config.retention else None
    if config.builtin is not None:
        if config.builtin not in BUILTINS:
            raise GraftError(f"{path}: unknown builtin {config.builtin!r}", f"use one of {', '.join(BUILTINS)}")
        defaults, items, fixed = load_builtin(config.builtin)
        merged = {**defaults.model_dump(), **{k: raw[k] for k in raw if k not in ("builtin", "data")}}
        merged_config = _validate_config(merged, str(path))
        return Task(name=config.name or config.builtin, kind=merged_config.kind or "generate", config=merged_config,
                    source=str(path), all_items=items, has_splits=True, retention=retention, fixed_fewshot=fixed)
    if config.data is None:
        raise GraftError(f"{path}: missing key 'data'", "add data: <file relative to the YAML> (or builtin: NAME)")
    records = _records(config.data, base)
    return _from_records(records, config, source=str(path), name=path.stem, retention=retention)
