"""Bridge to lm-evaluation-harness: any lm-eval task on a live (e.g. transplanted) model.

The model is handed over in memory through ``HFLM(pretrained=model, tokenizer=..., batch_size=...)``, so
an in-memory transplant is evaluated without writing it to disk. ``export_task`` writes one of our tasks
as an lm-eval task YAML over local JSONL (offline, same items), to run both harnesses side by side.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from analysis.errors import GraftError
from analysis.eval import metrics
from analysis.eval.tasks import Task

INSTALL = "pip install lm-eval==0.4.13"


def _require() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise GraftError("the lm-evaluation-harness bridge needs the lm-eval package", f"run: {INSTALL}") from None


def harness_model(model: Any, tokenizer: Any, *, batch_size: int = 8, max_length: int | None = None) -> Any:
    """An lm-eval ``HFLM`` around an already loaded model and tokenizer."""
    _require()
    from lm_eval.models.huggingface import HFLM

    kwargs: dict[str, Any] = {"pretrained": model, "tokenizer": tokenizer, "batch_size": batch_size}
    if max_length is not None:
        kwargs["max_length"] = max_length
    return HFLM(**kwargs)


def evaluate(model: Any, tokenizer: Any, tasks: str | Sequence[str], *, batch_size: int = 8,
             limit: int | float | None = None, include_path: str | Path | None = None,
             num_fewshot: int | None = None, log_samples: bool = False, **kwargs: Any) -> dict[str, Any]:
    """Run lm-eval ``tasks`` (names, or YAMLs under ``include_path``) on ``model``; lm-eval's results dict."""
    _require()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm = kwargs.pop("lm", None) or harness_model(model, tokenizer, batch_size=batch_size)
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    manager = None
    if include_path is not None:  # indexing lm-eval's thousands of built-in YAMLs takes seconds: skip if we can
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        if not set(names) <= set(manager.all_tasks):
            manager = None
    if manager is None:
        manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise GraftError(f"lm-eval does not know task(s) {', '.join(unknown)}",
                         "check the name, or pass include_path= the folder holding the task YAML")
    results = simple_evaluate(model=lm, tasks=names, limit=limit, task_manager=manager, num_fewshot=num_fewshot,
                              log_samples=log_samples, **kwargs)
    if results is None:  # non-zero ranks in distributed runs
        raise GraftError("lm-eval returned no results", "run on a single process")
    return results


def accuracy(results: dict[str, Any], task: str, metric: str = "acc") -> metrics.Accuracy:
    """Our Accuracy (k/n, Wilson interval) from an lm-eval results dict."""
    row = results["results"][task]
    key = next((k for k in row if k.split(",")[0] == metric), None)
    if key is None:
        raise GraftError(f"lm-eval results for {task!r} have no metric {metric!r}", f"use one of {sorted(row)}")
    n = int(results["n-samples"][task]["effective"])
    return metrics.accuracy(round(float(row[key]) * n), n)


def export_task(task: Task, folder: str | Path, *, split: str | None = None, limit: int | None = None,
                name: str | None = None) -> tuple[str, Path]:
    """Write ``task``'s items (rendered prompts) as JSONL plus an lm-eval task YAML over it, in ``folder``.
    Returns (lm-eval task name, YAML path); pass ``include_path=folder`` to :func:`evaluate`."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    name = name or f"graftlm_{task.name}".replace("/", "_").replace(":", "_")
    items = task.items(split, limit)
    data = folder / f"{name}.jsonl"
    with data.open("w", encoding="utf-8") as fh:
        for it in items:
            row: dict[str, Any] = {"id": it.id}
            if task.kind == "perplexity":
                row["text"] = it.text
            else:
                row["prompt"] = task.render(it)
                if task.kind == "choice":
                    row.update(choices=it.choices, answer=int(it.answer))
                else:
                    row["answer"] = str(it.answer)
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    spec: dict[str, Any] = {
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
    }
    if task.kind == "choice":
        spec.update(output_type="multiple_choice", doc_to_text="{{prompt}}", doc_to_choice="{{choices}}",
                    doc_to_target="{{answer}}", target_delimiter=task.config.choice_prefix,
                    metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}])
    elif task.kind == "generate":
        spec.update(output_type="generate_until", doc_to_text="{{prompt}}", doc_to_target="{{answer}}",
                    generation_kwargs={"until": task.stop, "do_sample": False, "max_gen_toks": task.max_new_tokens},
                    metric_list=[{"metric": "exact_match"}])
    else:
        spec.update(output_type="loglikelihood_rolling", doc_to_text="", doc_to_target="{{text}}",
                    metric_list=[{"metric": "word_perplexity"}])
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")  # JSON is valid YAML
    return name, path
