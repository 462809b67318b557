"""Which items each stage of a study sees: probe (localization), dev (choosing K and α), test (the claim).
Items that appear in test are removed from probe and dev before anything runs, and the report says how
many — selection never sees a test item."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from analysis.errors import GraftError
from analysis.study.config import SweepConfig


@dataclass(frozen=True)
class Dropped:
    """What ``overlap: drop`` removed: items per role (probe, dev) and the overlaps found."""

    counts: dict[str, int]
    overlaps: list[str]

    @property
    def said(self) -> str:
        """One line for the log and the report ('' when nothing was dropped)."""
        return dropped_line(self.counts, self.overlaps)


def dropped_line(counts: dict[str, int], overlaps: list[str]) -> str:
    """E.g. ``overlap: drop removed 12 probe and 3 dev items also in a later split; test is whole (…)``."""
    if not counts:
        return ""
    what = " and ".join(f"{n} {role}" for role, n in counts.items())
    return (f"overlap: drop removed {what} item{'s' if sum(counts.values()) > 1 else ''} also in a later split; "
            f"test is whole ({'; '.join(overlaps)})")


def check_splits(task: Any, cfg: SweepConfig) -> tuple[dict[str, str], Any, Dropped]:
    """The task split of each role (probe, dev, test), the task to study and what was dropped from it.
    The roles must exist and share no item (id or prompt): asserted, not assumed. With ``overlap: drop``
    (sweep config or task) shared items leave probe and dev — never test — in the returned task, which
    localization and every evaluation then read. A perplexity task is refused: a study chooses K and α by
    accuracy on dev and claims k/n with an interval on test."""
    if task.kind == "perplexity":
        raise GraftError(f"task {task.name} is a perplexity task: a sweep chooses K and α by accuracy on dev and "
                         "reports k/n on test", "sweep a generate or choice task, with this one as its retention "
                         "set (retention: FILE); graftlm localize and graftlm eval take it as it is")
    missing = [s for s in cfg.splits.values() if s not in task.splits]
    if missing:
        raise GraftError(f"task {task.name} has no {', '.join(missing)} split (splits: {', '.join(task.splits) or 'none'})",
                         "a sweep needs disjoint probe, dev and test splits (a 'split' field in the items, or one "
                         "file per split); name others with splits: {probe: ..., dev: ..., test: ...}")
    roles = ("probe", "dev", "test")
    overlaps = task.overlaps([cfg.splits[r] for r in roles])
    if not overlaps:
        return dict(cfg.splits), task, Dropped({}, [])
    found = [o.describe() for o in overlaps]
    if "drop" not in (cfg.overlap, task.config.overlap):
        raise GraftError(f"task {task.name}: {', '.join(found)}",
                         "make probe, dev and test disjoint, or set overlap: drop (sweep config or task YAML) to "
                         "drop these items from probe and dev (test stays whole)")
    role_of = {cfg.splits[r]: r for r in roles}
    gone: dict[str, dict[str, Any]] = {}  # role → item id → item
    for o in overlaps:
        gone.setdefault(role_of[o.split], {}).update({it.id: it for it, _ in o.pairs})
    cleaned = task.without(it for items in gone.values() for it in items.values())
    for role in ("probe", "dev"):
        if not cleaned.items(cfg.splits[role], limit=None):
            raise GraftError(f"task {task.name}: every {role} item also occurs in a later split ({', '.join(found)})",
                             "give the task items of its own for each of probe, dev and test")
    return dict(cfg.splits), cleaned, Dropped({r: len(gone[r]) for r in roles if r in gone}, found)
