"""One evaluation of a study: a :class:`Point` (who, which plan, which split) run on loaded models.

The sweep's driver decides *what* to evaluate (:class:`Job`: a point with its plan, split and limit);
:class:`PointRunner` evaluates it on the pair it holds and returns the result line, without writing
anything. The same runner runs in the driver (the local study) and in every Ray actor
(:mod:`analysis.study.cluster`), so a point's per-item results are the same wherever it ran: same code, same
batch size, same replay of the layers below the transplant, the same drafting rule.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from analysis.plan import Plan

DRAFT_AGREEMENT = 0.5  # below it, a draft's extra forward and re-run prompts cost more than its saved steps


@dataclass(frozen=True)
class Point:
    """One evaluation: who, with which plan, on which split."""

    phase: Literal["baseline", "grid", "chosen", "control"]
    split: str
    who: Literal["a", "b", "transplant"]  # a: the config's donor, b: its target
    method: str | None = None
    top_k: int | None = None  # the number of components transplanted (K)
    alpha: float | None = None
    max_new_tokens: int | None = None
    seed: int | None = None

    @property
    def key(self) -> str:
        parts = [self.phase, self.split, self.who, self.method or "-", str(self.top_k), str(self.alpha),
                 str(self.max_new_tokens), str(self.seed)]
        return "|".join(parts)


@dataclass(frozen=True)
class Job:
    """What a runner needs to evaluate a point: small and picklable (it travels to Ray actors).

    ``model`` and ``donor`` name models of the pair ('a', 'b'); ``items_split`` is the task's split
    (``retention`` with ``on_retention`` and the task's own retention set); ``record`` names the layers
    worth recording for later points; ``chain`` names a sequence of neighbouring grid points whose
    generations draft each other, starting from ``drafts_base`` (the target's own dev outputs).
    """

    point: Point
    model: str
    items_split: str | None
    limit: int | None
    plan: Plan | None = None
    donor: str | None = None
    on_retention: bool = False
    record: frozenset[int] = frozenset()
    record_baseline: bool = False  # an untouched model records what the points to come replay
    chain: str | None = None
    drafts_base: dict[str, list[int]] | None = None
    only: tuple[str, ...] | None = None  # a part of the split's items (a racing point's next look)


def tokens(row: dict[str, Any]) -> dict[str, list[int]]:
    """Item id → the token ids a generation result kept (dev and baselines keep them)."""
    return {it["id"]: it["tokens"] for it in row.get("items") or () if "tokens" in it}


def agreement(mine: dict[str, list[int]], theirs: dict[str, list[int]]) -> float:
    """The share of items on which two generations (item id → token ids) agree (0 without items)."""
    shared = mine.keys() & theirs.keys()
    return sum(mine[i] == theirs[i] for i in shared) / len(shared) if shared else 0.0


def item_row(record: dict[str, Any], keep_tokens: bool) -> dict[str, Any]:
    """One item of a results line: its id and correctness (and, on dev, the generated token ids, which
    the next grid point uses as drafts); for perplexity, the text's summed NLL and token count (the
    report's retention change and its interval)."""
    if "nll" in record:
        return {"id": record["id"], "nll": record["nll"], "n_tokens": record["n_tokens"]}
    row = {"id": record["id"], "correct": bool(record.get("correct", False))}
    if keep_tokens and "tokens" in record:
        row["tokens"] = record["tokens"]
    return row


@dataclass
class _Chain:
    """The last two outputs of a run of neighbouring grid points (drafts for the next)."""

    previous: dict[str, list[int]]
    steady: bool = True  # the previous point agreed with the one before it (or had none before it)


@dataclass
class PointRunner:
    """Evaluates jobs on a loaded pair (``models``: 'a' the config's donor, 'b' its target).

    ``batch_size``, ``reuse_bytes``: the config's; ``task`` the study's (probe and dev cleaned of what test
    holds), ``retention`` its retention task (the task itself when the task carries its own set).
    """

    models: dict[str, Any]
    task: Any
    retention: Any
    batch_size: int
    reuse_bytes: int
    replays: dict[int, Any] = field(default_factory=dict)  # per model: the layers below each transplant
    chains: dict[str, _Chain] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from analysis import units

        first, second = (self.models[who] for who in ("a", "b"))
        self.layout = units.layout(first.model.config, {n: tuple(p.shape) for n, p in first.parameters().items()},
                                   {n: tuple(p.shape) for n, p in second.parameters().items()})

    def low(self, plan: Plan) -> int:
        """The lowest decoder layer ``plan`` touches: everything below it is the target's own."""
        from analysis import units
        from analysis.eval.replay import lowest_layer

        return lowest_layer([c.layer for c in units.select(self.layout, [c.id for c in plan.components])])

    def drafts(self, job: Job) -> dict[str, list[int]] | None:
        """What an earlier point of the job's chain generated, while neighbours agree (else nothing)."""
        if job.chain is None:
            return None
        chain = self.chains.get(job.chain)
        if chain is None:
            if job.drafts_base is None:
                return None
            chain = self.chains[job.chain] = _Chain(job.drafts_base)
        return chain.previous if chain.steady else None

    def evaluate(self, job: Job) -> Any:
        """``job`` evaluated (an :class:`~analysis.eval.evaluate.EvalResult`), the transplant applied and undone."""
        from analysis.eval.evaluate import run as evaluate
        from analysis.eval.replay import LayerReplay
        from analysis.transplant import applied

        point, loaded = job.point, self.models[job.model]
        the_task = self.task_of(job)
        drafts = self.drafts(job) if the_task.kind == "generate" else None
        if job.only is not None:
            keep = set(job.only)
            the_task = the_task.without(it for it in the_task.items(job.items_split) if it.id not in keep)
        replay = None
        with contextlib.ExitStack() as stack:
            if job.plan is not None:
                stack.enter_context(applied(loaded, self.models[job.donor], job.plan))
            if self.reuse_bytes > 0 and (job.plan is not None or job.record_baseline):
                if id(loaded.model) not in self.replays:
                    self.replays[id(loaded.model)] = LayerReplay(loaded.model, budget_bytes=self.reuse_bytes)
                replay = self.replays[id(loaded.model)]
                # the untouched target (a baseline) records for the points to come
                start = self.low(job.plan) if job.plan is not None else replay.depth
                stack.enter_context(replay.unchanged_below(start, record=job.record))
            return evaluate(loaded.model, loaded.tokenizer, the_task, split=job.items_split, limit=job.limit,
                            batch_size=self.batch_size, max_new_tokens=point.max_new_tokens, progress=False,
                            replay=replay, drafts=drafts)

    def task_of(self, job: Job) -> Any:
        return self.retention if job.on_retention else self.task

    def run(self, job: Job) -> dict[str, Any]:
        """The result line of ``job`` (not written: the driver alone writes results.jsonl)."""
        res = self.evaluate(job)
        return self.row(job, res.records, res.summary)

    def row(self, job: Job, records: list[dict[str, Any]], summary: dict[str, Any]) -> dict[str, Any]:
        point = job.point
        headline = {k: summary[k] for k in ("k", "n", "accuracy", "ci_low", "ci_high", "perplexity") if k in summary}
        row = {"key": point.key, **point.__dict__, **headline, "result": summary,
               "plan": [c.id for c in job.plan.components] if job.plan is not None else None,
               "items": [item_row(r, keep_tokens=point.split == "dev") for r in records]}
        if job.chain is not None:
            self.follow(job.chain, row)
        return row

    def follow(self, chain: str, row: dict[str, Any]) -> None:
        """``row`` is the newest point of ``chain``: the next one drafts from it if it agreed with the
        point before it on at least DRAFT_AGREEMENT of the items."""
        before, now = self.chains.get(chain), tokens(row)
        self.chains[chain] = _Chain(now, before is None or agreement(now, before.previous) >= DRAFT_AGREEMENT)

    def reuse(self) -> dict[str, int]:
        """How many forward calls replayed recorded activations, and how many layer forwards that spared."""
        replays = self.replays.values()
        return {"forward_calls_replayed": sum(p.stats.replayed for p in replays),
                "layer_forwards_skipped": sum(p.stats.skipped_layers for p in replays),
                "forward_calls_full": sum(p.stats.full for p in replays)}


Resumed = Callable[[Job], "dict[str, Any] | None"]  # a job's line already in results.jsonl, if any


class Executor(Protocol):
    """Where a study's batches of points run: here (:class:`Local`) or on Ray actors
    (:class:`analysis.study.cluster.RayExecutor`). ``run`` yields (job, row, seconds) as points finish —
    seconds None for a row read back from results.jsonl — and never writes: the driver does."""

    def run(self, jobs: list[Job], resumed: Resumed) -> Iterator[tuple[Job, dict[str, Any], float | None]]: ...

    def stats(self) -> dict[str, int]:
        """Counts to add to the driver's own (activations replayed elsewhere, workers, retries)."""
        ...

    def close(self) -> None: ...


@dataclass
class Local:
    """Points one after the other in this process, in the order given."""

    runner: PointRunner

    def run(self, jobs: list[Job], resumed: Resumed) -> Iterator[tuple[Job, dict[str, Any], float | None]]:
        for job in jobs:
            row = resumed(job)
            if row is not None:
                if job.chain is not None:  # a resumed point still drafts the next one
                    self.runner.follow(job.chain, row)
                yield job, row, None
                continue
            started = time.perf_counter()
            row = self.runner.run(job)
            yield job, row, time.perf_counter() - started

    def stats(self) -> dict[str, int]:
        return {}  # the runner is the driver's: its counts are the driver's

    def close(self) -> None:
        pass


def chosen_point(rows: list[dict[str, Any]]) -> tuple[int, float]:
    """A method's chosen (K, α) among its dev grid rows: the best accuracy, ties to the smaller change (K, then
    α); never a point its race stopped. The sweep evaluates it on test; the report reads that row back."""
    best = max((r for r in rows if "raced" not in r), key=lambda r: (r["accuracy"], -r["top_k"], -r["alpha"]))
    return best["top_k"], best["alpha"]
