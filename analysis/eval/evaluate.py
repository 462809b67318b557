"""Evaluate a Hugging Face causal LM on a task: batched greedy generation, batched log-likelihood
scoring (a shared prompt is encoded once for all its choices) and perplexity; per-item records.

Works on any model called as ``model(input_ids, attention_mask=..., position_ids=..., past_key_values=...)``
— a plain ``PreTrainedModel``, or one whose modules a TransformerLens ``TransformerBridge`` wraps.
Batches are sorted by length; the batch size changes speed, not results (tested).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from analysis.errors import GraftError
from analysis.eval import metrics
from analysis.eval.decoding import generate
from analysis.eval.replay import LayerReplay
from analysis.eval.scoring import loglikelihoods, token_nlls
from analysis.eval.tasks import Item, Task
from analysis.eval.tasks import load as load_task


@dataclass
class EvalResult:
    """Per-item ``records`` (in item order) and a ``summary`` (k, n, accuracy, ci_low, ci_high, ...)."""

    records: list[dict[str, Any]]
    summary: dict[str, Any]
    paths: dict[str, str] = field(default_factory=dict)

    @property
    def correct(self) -> list[bool]:
        return [bool(r["correct"]) for r in self.records]

    @property
    def accuracy(self) -> metrics.Accuracy:
        return metrics.accuracy_of(self.correct)

    def save(self, out: str | Path, *, force: bool = False, sources: Sequence[str | Path] = ()) -> dict[str, str]:
        """Write ``records.jsonl`` and ``summary.json`` as folder ``out`` (staged: whole or not at all; an
        existing ``out`` is replaced only with ``force``; ``out`` may not be, or lie inside, a source)."""
        from analysis.io.files import staged

        folder = Path(out).expanduser()
        with staged(folder, force=force, sources=sources) as tmp:
            with (tmp / "records.jsonl").open("w", encoding="utf-8") as fh:
                for r in self.records:
                    fh.write(json.dumps(r, ensure_ascii=False) + "\n")
            (tmp / "summary.json").write_text(json.dumps(self.summary, indent=2, ensure_ascii=False) + "\n",
                                              encoding="utf-8")
        self.paths = {"records": str(folder / "records.jsonl"), "summary": str(folder / "summary.json")}
        return self.paths


# -- tokenisation -----------------------------------------------------------------------------------


# -- generation -------------------------------------------------------------------------------------


# -- log-likelihood ---------------------------------------------------------------------------------


# -- the task-level entry point ---------------------------------------------------------------------

def check_options(*, batch_size: int = 8, limit: int | None = None, max_new_tokens: int | None = None) -> None:
    """The evaluation's numbers, checked before any work (one line each, naming the value)."""
    if batch_size < 1:
        raise GraftError(f"batch size must be at least 1, got {batch_size}", "pass a batch size of 1 or more")
    if limit is not None and limit < 1:
        raise GraftError(f"limit must be at least 1, got {limit}", "pass a limit of 1 or more (or none: every item)")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise GraftError(f"max_new_tokens must be at least 1, got {max_new_tokens}",
                         "pass 1 or more (or none: the task's own)")


def sources_of(model: Any, task: Any) -> list[Path]:
    """The folders and files an evaluation reads (a model's folder, a task's file), where known."""
    found = [getattr(getattr(model, "config", None), "_name_or_path", None), getattr(task, "source", task)]
    return [Path(p) for p in found if isinstance(p, str | Path) and str(p) and Path(p).exists()]


def run(model: Any, tokenizer: Any, task: Task | str | Path, *, split: str | None = None, limit: int | None = None,
        batch_size: int = 8, max_new_tokens: int | None = None, out: str | Path | None = None,
        progress: bool = True, replay: LayerReplay | None = None,
        drafts: Mapping[str, Sequence[int]] | None = None, force: bool = False) -> EvalResult:
    """Evaluate ``model`` on ``task``'s ``split`` (None: ``test`` when the task has splits, else every
    item; ``"retention"``: the retention set, as perplexity). Writes records.jsonl + summary.json into
    ``out`` when given. A ``replay`` (:class:`~analysis.eval.replay.LayerReplay` over ``model``) replays the
    layers it knows unchanged since an earlier evaluation of the same items (for generation, the
    prompts; not with drafts);
    ``drafts`` (item id → token ids a similar model generated) save generation tasks sequential steps
    (see :func:`generate`). ``out`` is written whole or not at all, and an existing one is replaced only
    with ``force``."""
    check_options(batch_size=batch_size, limit=limit, max_new_tokens=max_new_tokens)
    sources = sources_of(model, task)
    if out is not None:
        from analysis.io.files import check_out

        check_out(out, force=force, sources=sources)
    task = task if isinstance(task, Task) else load_task(task)
    split_name = task.resolve_split(split)
    items = task.items(split_name, limit)
    scored = task.retention if split_name == "retention" and task.retention is not None else task
    if not items:
        raise GraftError(f"{task.source}: split {split_name!r} has no items", "choose another split or a larger limit")
    was_training = getattr(model, "training", False)
    model.eval()
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            if scored.kind == "generate":
                records = _run_generate(model, tokenizer, scored, items, batch_size, max_new_tokens, progress, drafts,
                                        replay)
            elif scored.kind == "choice":
                records = _run_choice(model, tokenizer, scored, items, batch_size, progress, replay)
            else:
                records = _run_perplexity(model, tokenizer, items, batch_size, progress, replay)
    finally:
        if was_training:
            model.train()
    wall = time.perf_counter() - start
    summary = summarise(scored, records)
    summary.update({
        "task": task.name, "source": task.source, "kind": scored.kind, "split": split_name or "all",
        "model": str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__),
        "batch_size": batch_size, "wall_s": round(wall, 3),
    })
    if scored.kind == "generate":
        summary["max_new_tokens"] = max_new_tokens or scored.max_new_tokens
    result = EvalResult(records, summary)
    if out is not None:
        result.save(out, force=force, sources=sources)
    return result


def _run_generate(model: Any, tokenizer: Any, task: Task, items: list[Item], batch_size: int,
                  max_new_tokens: int | None, progress: bool,
                  drafts: Mapping[str, Sequence[int]] | None, replay: LayerReplay | None) -> list[dict[str, Any]]:
    prompts = [task.render(it, tokenizer) for it in items]
    outs = generate(model, tokenizer, prompts, stop=task.stop, max_new_tokens=max_new_tokens or task.max_new_tokens,
                    batch_size=batch_size, progress=progress,
                    drafts=None if drafts is None else [drafts.get(it.id) for it in items], replay=replay)
    strict = task.metric == "strict"
    records = []
    for it, (text, logprob, n_tok, tokens) in zip(items, outs, strict=True):
        ex = task.score(it, text)
        records.append({
            "id": it.id, "split": it.split, "prompt": task.prompt_text(it), "output": text,
            "extracted": ex.strict if strict else ex.flexible, "gold": ex.gold,
            "correct": ex.correct_strict if strict else ex.correct_flexible,
            "extracted_strict": ex.strict, "extracted_flexible": ex.flexible,
            "correct_strict": ex.correct_strict, "correct_flexible": ex.correct_flexible,
            "logprob": logprob, "n_tokens": n_tok, "tokens": tokens,
        })
    return records


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first maximum, as numpy's argmax


def _run_choice(model: Any, tokenizer: Any, task: Task, items: list[Item], batch_size: int,
                progress: bool, replay: LayerReplay | None) -> list[dict[str, Any]]:
    requests = [(task.render(it, tokenizer), task.continuations(it)) for it in items]
    lls = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, progress=progress, replay=replay)
    norm = task.metric == "acc_norm"
    records = []
    for it, ll in zip(items, lls, strict=True):
        pred = _argmax(ll)
        # acc_norm divides by the choice's length in characters, as lm-evaluation-harness does.
        pred_norm = _argmax([v / max(len(c), 1) for v, c in zip(ll, it.choices, strict=True)])
        gold = int(it.answer)
        records.append({
            "id": it.id, "split": it.split, "prompt": task.prompt_text(it), "answer": gold,
            "extracted": pred_norm if norm else pred,
            "correct": (pred_norm if norm else pred) == gold,
            "pred": pred, "pred_norm": pred_norm, "correct_acc": pred == gold, "correct_acc_norm": pred_norm == gold,
            "logprobs": ll,
        })
    return records


def _run_perplexity(model: Any, tokenizer: Any, items: list[Item], batch_size: int,
                    progress: bool, replay: LayerReplay | None) -> list[dict[str, Any]]:
    nlls = token_nlls(model, tokenizer, [it.text for it in items], batch_size=batch_size, progress=progress,
                      replay=replay)
    return [{"id": it.id, "split": it.split, "nll": nll, "n_tokens": n,
             "perplexity": math.exp(nll / n) if n else math.nan} for it, (nll, n) in zip(items, nlls, strict=True)]


def summarise(task: Task, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Summary of per-item records: k, n, accuracy, Wilson interval, both readings (or perplexity)."""
    if task.kind == "perplexity":
        total = sum(r["nll"] for r in records)
        tokens = sum(r["n_tokens"] for r in records)
        mean = total / tokens if tokens else math.nan
        return {"metric": "perplexity", "n": len(records), "k": None, "accuracy": None, "ci_low": None,
                "ci_high": None, "n_tokens": tokens, "mean_nll": mean, "perplexity": math.exp(mean) if tokens else None}
    acc = metrics.accuracy_of([r["correct"] for r in records])
    summary: dict[str, Any] = {"metric": task.metric, **acc.as_dict()}
    names = ("strict", "flexible") if task.kind == "generate" else ("acc", "acc_norm")
    for name in names:
        key = f"correct_{name}"
        other = metrics.accuracy_of([r[key] for r in records])
        summary[name] = {"k": other.k, "accuracy": other.accuracy, "ci_low": other.ci_low, "ci_high": other.ci_high}
    if task.kind == "generate":
        summary["filter"] = task.filter
    return summary


def describe(summary: dict[str, Any]) -> str:
    """One human line for a summary: accuracy with k/n and interval, or perplexity."""
    head = f"{summary.get('task')} ({summary.get('split')})"
    if summary.get("kind") == "perplexity":
        return f"{head}: perplexity {summary['perplexity']:.3f} (mean NLL {summary['mean_nll']:.4f} over " \
               f"{summary['n_tokens']} tokens, {summary['n']} texts)"
    acc = metrics.Accuracy(summary["k"], summary["n"], summary["accuracy"], summary["ci_low"], summary["ci_high"])
    return f"{head} {summary['metric']}: {acc}"
