"""What a sweep found, in numbers: the run folder read back into findings and a verdict.

``summarize(run)`` turns RUN/results.jsonl into per-method findings (test accuracy with k/n and a 95%
interval, TIR, gap recovery, McNemar against the target) beside every control. The verdict comes first:
when no method beats the random control beyond its interval, or the donor is not better, it says so; a
method that misses that strict test but beats random components item by item is said to, with its margin.
Notes follow: the grid's K (shares resolved, values clipped, a choice at the top of the grid), the donor
that auto_order picked, items that overlap: drop removed, what copy-all cannot reach. :mod:`analysis.report`
renders these as text and :mod:`analysis.report.figures` as pictures; both read them from here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analysis.errors import GraftError
from analysis.eval import metrics
from analysis.interp.methods import named
from analysis.io.files import parse_yaml, read_text
from analysis.report.notes import localization_notes, notes
from analysis.study.points import chosen_point
from analysis.study.runfolder import rankings_meta, read_results


@dataclass
class Finding:
    """One evaluated transplant on test, with its comparisons."""

    label: str
    method: str
    k: int
    alpha: float
    acc: metrics.Accuracy
    tir: float
    recovery: metrics.Recovery
    vs_target: metrics.McNemar
    retention: float | None = None  # on the retention set, when measured: its perplexity, or its accuracy
    plan: list[str] = field(default_factory=list)
    retention_change: metrics.Change | None = None  # against the target's (perplexity: relative; accuracy: points)
    vs_random: metrics.Change | None = None  # accuracy minus the random control's at its budget (seeds averaged)


@dataclass
class Summary:
    """Everything the report shows for one decoding length."""

    max_new_tokens: int | None
    donor_ref: str
    target_ref: str
    task: str
    donor: dict[str, metrics.Accuracy]  # split → accuracy
    target: dict[str, metrics.Accuracy]
    donor_vs_target: metrics.McNemar
    retention: dict[str, float | None]  # donor / target perplexity (or accuracy: ``retention_metric``)
    donor_retention_change: metrics.Change | None  # the donor's against the target's
    methods: list[Finding]
    controls: list[Finding]
    random_pooled: dict[tuple[int, float], metrics.Accuracy]
    verdict: list[str]
    notes: list[str] = field(default_factory=list)  # what qualifies the numbers: K grid, auto_order, dropped items
    retention_metric: str = "perplexity"  # what the retention set measures: perplexity or accuracy


def read_rows(run: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """RUN's config (as a dict) and its results, each key once (the last line written for it)."""
    run = Path(run)
    path = run / "results.jsonl"
    if not run.is_dir():
        raise GraftError(f"{run} is not a run folder" if run.exists() else f"no such run folder: {run}",
                         "pass a folder written by `graftlm sweep`")
    if not path.is_file():
        raise GraftError(f"{run} holds no results.jsonl", "pass a folder written by `graftlm sweep`")
    by_key, _, _ = read_results(path, strict=True)
    for row in by_key.values():
        if not _well_formed(row):
            raise GraftError(f"{path}: the line of {row['key']!r} lacks fields a result has",
                             "restore the file, or rerun the sweep into a new --out")
    config = {}
    if (run / "config.yaml").is_file():
        config = parse_yaml(read_text(run / "config.yaml", "config.yaml"), run / "config.yaml", "restore the file")
    return config if isinstance(config, dict) else {}, list(by_key.values())


# What each kind of results line holds (an evaluation holds accuracy or perplexity besides).
ROW_FIELDS = {"order": ("max_new_tokens", "donor", "target", "donor_ref", "target_ref"),
              "evaluation": ("phase", "split", "who", "items")}


def _well_formed(row: dict[str, Any]) -> bool:
    kind = "order" if row.get("phase") == "order" else "evaluation"
    if not all(f in row for f in ROW_FIELDS[kind]):
        return False
    if kind == "order":
        return True
    if row["who"] == "transplant" and not all(f in row for f in ("method", "top_k", "alpha", "seed")):
        return False
    numbers = ("k", "n") if row.get("perplexity") is None else ("perplexity",)
    return (isinstance(row["items"], list) and all(isinstance(i, dict) and "id" in i for i in row["items"])
            and all(isinstance(row.get(f), int | float) and not isinstance(row.get(f), bool) for f in numbers))


def _acc(row: dict[str, Any]) -> metrics.Accuracy:
    return metrics.accuracy(int(row["k"]), int(row["n"]))


def _items(row: dict[str, Any]) -> dict[str, bool]:
    return {str(i["id"]): bool(i["correct"]) for i in row.get("items") or []}


def _aligned(*rows: dict[str, Any]) -> list[list[bool]]:
    """The rows' per-item correctness on the items they share, in one order."""
    items = [_items(r) for r in rows]
    ids = sorted(set.intersection(*(set(i) for i in items)))
    return [[it[i] for i in ids] for it in items]


def _paired(a: dict[str, Any], b: dict[str, Any]) -> metrics.McNemar:
    return metrics.mcnemar(*_aligned(a, b))


def summarize(run: str | Path) -> list[Summary]:
    """One Summary per decoding length found in the run."""
    config, rows = read_rows(run)
    orders = [r for r in rows if r.get("phase") == "order"]
    if not orders:
        raise GraftError(f"{run}: the sweep has not finished its baselines yet", "run or resume `graftlm sweep`")
    config = config or {}
    summaries = [_summary(order, rows, config.get("task", "?"), list(config.get("methods") or [])) for order in orders]
    localized = rankings_meta(run)
    for s, order in zip(summaries, orders, strict=True):
        if s is not None:
            s.notes += localization_notes(localized, order, [f.method for f in s.methods], several=len(orders) > 1)
    return [s for s in summaries if s is not None]


def _summary(order: dict[str, Any], rows: list[dict[str, Any]], task: str, config_methods: list[str]) -> Summary | None:
    mnt = order["max_new_tokens"]
    by_key = {r["key"]: r for r in rows}

    def get(phase: str, split: str, model: str, method: str | None = None, top_k: Any = None, alpha: Any = None,
            seed: Any = None) -> dict[str, Any] | None:
        return by_key.get("|".join([phase, split, model, method or "-", str(top_k), str(alpha), str(mnt), str(seed)]))

    d, t = order["donor"], order["target"]
    donor = {s: _acc(r) for s in ("dev", "test") if (r := get("baseline", s, d))}
    target = {s: _acc(r) for s in ("dev", "test") if (r := get("baseline", s, t))}
    target_test, donor_test = get("baseline", "test", t), get("baseline", "test", d)
    if target_test is None or donor_test is None:
        return None
    d_vs_t = _paired(donor_test, target_test)
    target_retention = get("baseline", "retention", t)
    # a retention set of texts measures perplexity; one of questions (a second benchmark) measures accuracy
    measure = "accuracy" if target_retention and target_retention.get("perplexity") is None else "perplexity"
    retention = {role: (r.get(measure) if (r := get("baseline", "retention", name)) else None)
                 for role, name in (("donor", d), ("target", t))}

    def _current(chosen: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each method's chosen row for the point its dev grid chooses now: a study resumed by a graftlm whose
        grid grows further keeps the test row of the point chosen before, which is no longer the choice."""
        chosen = list(chosen)
        grid = [r for r in rows if r.get("phase") == "grid" and r.get("max_new_tokens") == mnt]
        keep = []
        for method in dict.fromkeys(r["method"] for r in chosen):
            mine = [r for r in chosen if r["method"] == method]
            points = [r for r in grid if r["method"] == method]
            now = chosen_point(points) if points else None
            keep += [r for r in mine if (r["top_k"], r["alpha"]) == now] or mine
        return keep

    def finding(row: dict[str, Any], label: str) -> Finding:
        acc = _acc(row)
        ret = get(row["phase"], "retention", "transplant", row["method"], row["top_k"], row["alpha"], row["seed"])
        return Finding(label, row["method"], row["top_k"], row["alpha"], acc,
                       metrics.tir(acc.accuracy, target["test"].accuracy),
                       metrics.gap_recovery(acc, target["test"], donor["test"], d_vs_t.p_value,
                                            items=_recovery_items(row, target_test, donor_test)),
                       _paired(row, target_test), ret.get(measure) if ret else None, row.get("plan") or [],
                       _retention_change(ret, target_retention))

    same = [r for r in rows if r.get("max_new_tokens") == mnt and r.get("split") == "test"]
    # Rows in a fixed order, not the order they were written (Ray workers finish in any order): methods as
    # the config lists them; controls by budget, random seeds then weight-ranked, copy-all last.
    chosen_rows = sorted(_current(r for r in same if r["phase"] == "chosen"),
                         key=lambda r: config_methods.index(r["method"]) if r["method"] in config_methods
                         else len(config_methods))
    methods = [finding(r, f"{r['method']} (K={r['top_k']}, α={r['alpha']})") for r in chosen_rows]
    control_rows = sorted((r for r in same if r["phase"] == "control"),
                          key=lambda r: (r["method"] == "copy-all", r["top_k"], r["alpha"], r["method"] != "random",
                                         r.get("seed") or 0))
    for f, r in zip(methods, chosen_rows, strict=True):
        f.vs_random = _vs_random(r, [c for c in control_rows if c["method"] == "random"
                                     and (c["top_k"], c["alpha"]) == (f.k, f.alpha)])
    controls = [finding(r, _control_label(r)) for r in control_rows]
    summary = Summary(mnt, order.get("donor_ref", d), order.get("target_ref", t), task, donor, target, d_vs_t,
                      retention, _retention_change(get("baseline", "retention", d), target_retention), methods,
                      controls, _pool_random(control_rows), [], retention_metric=measure)
    summary.verdict = verdict(summary)
    grid = [r for r in rows if r.get("phase") == "grid" and r.get("max_new_tokens") == mnt]
    summary.notes = notes(summary, order, {m: {r["top_k"] for r in grid if r["method"] == m} for m in
                                           {f.method for f in methods}})
    return summary


def _recovery_items(row: dict[str, Any], target: dict[str, Any], donor: dict[str, Any]
                    ) -> tuple[list[bool], list[bool], list[bool]] | None:
    t, tg, d = _aligned(row, target, donor)
    return (t, tg, d) if t else None  # rows without per-item results: no interval


def _vs_random(row: dict[str, Any], random_rows: list[dict[str, Any]]) -> metrics.Change | None:
    """The chosen point's accuracy minus the random control's at the same budget, paired by item (each
    item's random score is the mean over the seeds); None without random seeds or per-item results."""
    if not random_rows:
        return None
    mine, *seeds = _aligned(row, *random_rows)
    if not mine:
        return None
    return metrics.accuracy_difference(mine, [sum(s) / len(seeds) for s in zip(*seeds, strict=True)])


def _retention_change(row: dict[str, Any] | None, target: dict[str, Any] | None) -> metrics.Change | None:
    """The change on the retention set against the target, paired by item: perplexity's relative change
    over texts, or accuracy's difference in points over questions (None for runs written before per-item
    results were kept)."""
    if row is None or target is None:
        return None
    if row.get("perplexity") is None and row.get("accuracy") is not None:
        mine, theirs = _aligned(row, target)
        return metrics.accuracy_difference(mine, theirs) if mine else None
    mine = {str(i["id"]): i for i in row.get("items") or [] if "nll" in i}
    theirs = {str(i["id"]): i for i in target.get("items") or [] if "nll" in i}
    ids = sorted(mine.keys() & theirs.keys())
    if not ids or not sum(theirs[i]["n_tokens"] for i in ids):
        return None
    return metrics.perplexity_change([mine[i]["nll"] for i in ids], [theirs[i]["nll"] for i in ids],
                                     [theirs[i]["n_tokens"] for i in ids])


def _control_label(row: dict[str, Any]) -> str:
    if row["method"] == "random":
        return f"random K={row['top_k']} α={row['alpha']} seed {row['seed']}"
    if row["method"] == "copy-all":
        return "copy-all (every component, α=1)"
    return f"{row['method']}-ranked K={row['top_k']} α={row['alpha']}"


def _pool_random(control_rows: list[dict[str, Any]]) -> dict[tuple[int, float], metrics.Accuracy]:
    """All random-control items of one budget pooled (k and n summed over seeds)."""
    sums: dict[tuple[int, float], list[int]] = {}
    for r in control_rows:
        if r["method"] == "random":
            acc = _acc(r)
            s = sums.setdefault((r["top_k"], r["alpha"]), [0, 0])
            s[0], s[1] = s[0] + acc.k, s[1] + acc.n
    return {key: metrics.accuracy(k, n) for key, (k, n) in sums.items()}


def beats_random(f: Finding, pooled: dict[tuple[int, float], metrics.Accuracy]) -> bool | None:
    """True when the method's interval lies above the pooled random control's at the same budget."""
    rnd = pooled.get((f.k, f.alpha))
    if rnd is None:
        return None
    return f.acc.ci_low > rnd.ci_high


def verdict(s: Summary) -> list[str]:
    """The first lines of the report: what a reader must know before any table. Each method gets one line:
    beyond the pooled random control's interval (the strict test), or else its paired margin over random
    components at the same budget — above zero, below, or not distinguishable from it."""
    lines = []
    gap = s.donor["test"].accuracy - s.target["test"].accuracy
    if gap <= 0:
        lines.append(f"The donor is not better than the target on test ({s.donor['test']} vs {s.target['test']}): "
                     "there is no gap to recover, and transplanting cannot be expected to help.")
    elif s.donor_vs_target.p_value >= 0.05:
        lines.append(f"The donor–target gap on test is within noise (McNemar p = {s.donor_vs_target.p_value:.3g}): "
                     "recovery figures are unstable.")
    if not s.methods:
        lines.append("No method has a chosen point on test yet.")
        return lines
    winners = [f for f in s.methods if beats_random(f, s.random_pooled)]
    if not winners:
        names = ", ".join(f.method for f in s.methods)
        if any(_margin_above_zero(f) for f in s.methods):
            lines.append(f"No method ({names}) beats the random control beyond its 95% interval (the strict test); "
                         "the margins over random components at the same budget, paired over test items, follow.")
        else:
            lines.append(f"No method ({names}) beats the random control beyond its 95% interval: the localized "
                         "components are not shown to be better than chance on this pair.")
    ordered = [*winners, *(f for f in s.methods if f not in winners and _margin_above_zero(f)),
               *(f for f in s.methods if f not in winners and not _margin_above_zero(f))]
    for f in ordered:
        lines.append(_method_line(f, s, f in winners))
    return lines


def _margin_above_zero(f: Finding) -> bool:
    return f.vs_random is not None and f.vs_random.ci_low > 0


def _method_line(f: Finding, s: Summary, wins: bool) -> str:
    """One method's verdict: the strict test, else its margin over random components at its budget."""
    r = f.retention_change
    cost = "" if r is None else f", retention perplexity {r}" if s.retention_metric == "perplexity" else \
        f", retention accuracy {r.value * 100:+.1f} points (95% CI {r.ci_low * 100:+.1f} to {r.ci_high * 100:+.1f})"
    numbers = f"test {f.acc} vs target {s.target['test']}, gap recovery {f.recovery}"
    m = f.vs_random
    if wins:
        margin = f" by {_points(m)}" if m is not None else ""
        return (f"{named(f.method)} beats the random control beyond its interval{margin}: {numbers}, "
                f"McNemar p = {f.vs_target.p_value:.3g}{cost}.")
    if m is not None and m.ci_low > 0:
        return (f"{named(f.method)} does not clear the random control's interval, but beats random components at "
                f"the same budget by {_points(m)}: {numbers}{cost}.")
    if m is not None and m.ci_high < 0:
        return f"{named(f.method)} does worse than random components at the same budget: {_points(m)}."
    if m is not None:
        return (f"{named(f.method)} is not distinguishable from random components at the same budget (margin "
                f"{_points(m, paired=False)}).")
    if beats_random(f, s.random_pooled) is None:
        return f"{named(f.method)}: no random control at its budget (K={f.k}, α={f.alpha}), so not compared with chance."
    return f"{named(f.method)}: not better than the random control beyond its interval."


def _points(change: metrics.Change, paired: bool = True) -> str:
    """An accuracy difference in percentage points with its interval (in brackets, or after a comma)."""
    interval = f"95% CI {change.ci_low * 100:+.1f} to {change.ci_high * 100:+.1f}, paired over test items"
    return f"{change.value * 100:+.1f} points ({interval})" if paired else f"{change.value * 100:+.1f} points, {interval}"
