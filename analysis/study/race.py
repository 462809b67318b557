"""The racing dev grid: a point clearly below the best so far stops before it has seen every dev item.

With ``race: R`` in a sweep config, each grid point is evaluated in looks of ``batch_size`` dev items.
After each look its per-item results are paired with those of the best point of its method so far (the
best completed one, by the rule that chooses K and α) on the same items, and a one-sided exact sign test
on the discordant items asks whether it is worse; it stops when that test's p-value is below
R / (number of looks), Bonferroni over the looks. A method's points run from the largest change down
(K, then α), so the point to beat tends to come early. So a point whose dev accuracy is not below the best's
is stopped with probability at most R, whatever the look at which that would happen; with a method's
points evaluated in the grid's order and the best one among them, the chosen point is the full grid's
except with probability at most R per point that would have been chosen.

A stopped point's line says so (``raced``: the items it saw of how many, the p-value, the point it lost
to, R); its accuracy is over the items it saw and it is never chosen. A point that was not stopped has
the line the full grid gives it: evaluation by looks does not change a per-item result (the batch
composition never does).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from analysis.study.points import Job, PointRunner, Resumed


def run_raced(runner: PointRunner, job: Job, best: dict[str, Any] | None, error: float) -> dict[str, Any]:
    """The line of a grid point raced against ``best``; says so (``raced``) when it stopped early."""
    ids = [it.id for it in runner.task_of(job).items(job.items_split, job.limit)]
    records, summary, stopped = raced(job, ids, runner.batch_size, best, error, runner.task_of(job), runner.evaluate)
    row = runner.row(job, records, summary)
    if stopped is not None:
        row["raced"] = stopped
    return row


def worse_p(mine: list[bool], best: list[bool]) -> float:
    """One-sided exact sign test that ``mine`` is worse than ``best`` (paired per item): the chance of at
    most this many items right only in ``mine`` among the discordant ones, were each side equally likely."""
    only_mine = sum(a and not b for a, b in zip(mine, best, strict=True))
    discordant = only_mine + sum(b and not a for a, b in zip(mine, best, strict=True))
    return sum(math.comb(discordant, i) for i in range(only_mine + 1)) / 2**discordant


def better(row: dict[str, Any], than: dict[str, Any] | None) -> bool:
    """The rule that chooses K and α: higher dev accuracy, then the smaller change (smaller K, then α)."""
    key = lambda r: (r["accuracy"], -r["top_k"], -r["alpha"])  # noqa: E731
    return than is None or key(row) > key(than)


def raced(job: Job, ids: list[str], look: int, best: dict[str, Any] | None, error: float, task: Any,
          evaluate: Callable[[Job], Any]) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any] | None]:
    """Grid point ``job`` over dev items ``ids``, ``look`` items at a time (``evaluate`` runs a part and
    returns its EvalResult), stopped early against ``best`` (a results line; None: nothing to race
    against, all at once): its records, its summary over them, and what stopped it (None if nothing did)."""
    from analysis.eval.evaluate import summarise

    if best is None:
        res = evaluate(job)
        return res.records, res.summary, None
    theirs = {it["id"]: it["correct"] for it in best["items"]}
    looks = [ids[i:i + look] for i in range(0, len(ids), look)]
    records: list[dict[str, Any]] = []
    stopped, wall, first = None, 0.0, None
    for n, part in enumerate(looks, start=1):
        res = evaluate(replace(job, only=tuple(part)))
        first = first or res.summary
        wall += res.summary["wall_s"]
        records += res.records
        if n == len(looks):
            break
        p = worse_p([r["correct"] for r in records], [theirs[r["id"]] for r in records])
        if p < error / len(looks):
            stopped = {"stopped": True, "n_seen": len(records), "n_items": len(ids), "p": p,
                       "against": best["key"], "error": error}
            break
    assert first is not None
    # the summary a single evaluation of these records gives (its fields, its accuracy), walls summed
    summary = {**first, **summarise(task, records), "wall_s": round(wall, 3)}
    return records, summary, stopped


@dataclass
class Raced:
    """An executor (:class:`~analysis.study.points.Executor`) for the dev grid: its points one after the other
    in this process, each raced against the best completed point of its method so far."""

    runner: PointRunner
    error: float
    best: dict[str | None, dict[str, Any]] = field(default_factory=dict)

    def run(self, jobs: list[Job], resumed: Resumed) -> Iterator[tuple[Job, dict[str, Any], float | None]]:
        # The largest change first (per method: K, then α, descending): the point to beat comes early, so
        # the points after it can stop; the order changes no choice, only how soon the losers stop.
        methods = list(dict.fromkeys(j.point.method for j in jobs))
        for job in sorted(jobs, key=lambda j: (methods.index(j.point.method), -(j.point.top_k or 0),
                                               -(j.point.alpha or 0.0))):
            method = job.point.method
            row = resumed(job)
            seconds = None
            if row is not None:
                if job.chain is not None:
                    self.runner.follow(job.chain, row)
            else:
                started = time.perf_counter()
                row = run_raced(self.runner, job, self.best.get(method), self.error)
                seconds = time.perf_counter() - started
            if "raced" not in row and better(row, self.best.get(method)):
                self.best[method] = row
            yield job, row, seconds

    def stats(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        pass
