"""Honest numbers: accuracy with k/n and a 95% Wilson interval, TIR, gap recovery, exact McNemar."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from scipy.stats import binomtest

from analysis.errors import GraftError


@dataclass(frozen=True)
class Accuracy:
    """k correct of n, with a Wilson score interval at ``confidence``."""

    k: int
    n: int
    accuracy: float
    ci_low: float
    ci_high: float
    confidence: float = 0.95

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.accuracy:.3f} ({self.k}/{self.n}, 95% CI {self.ci_low:.3f}–{self.ci_high:.3f})"


def accuracy(k: int, n: int, confidence: float = 0.95) -> Accuracy:
    """Accuracy k/n with its Wilson interval (scipy). n = 0 gives NaN, not an error: an empty split."""
    if n < 0 or not 0 <= k <= max(n, 0):
        raise GraftError(f"accuracy needs 0 <= k <= n, got k={k}, n={n}", "count correct items of the evaluated ones")
    if n == 0:
        return Accuracy(0, 0, math.nan, math.nan, math.nan, confidence)
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return Accuracy(k, n, k / n, float(ci.low), float(ci.high), confidence)


def accuracy_of(correct: Sequence[bool], confidence: float = 0.95) -> Accuracy:
    """Accuracy of per-item correctness flags."""
    return accuracy(sum(bool(c) for c in correct), len(correct), confidence)


def tir(acc_transplanted: float, acc_target: float) -> float:
    """Transplant improvement ratio acc_transplanted / acc_target (inf when the target scores 0)."""
    if acc_target == 0:
        return math.inf if acc_transplanted > 0 else math.nan
    return acc_transplanted / acc_target


@dataclass(frozen=True)
class Recovery:
    """Share of the donor–target gap the transplant recovers; ``value`` is None when undefined."""

    value: float | None
    gap: float
    unstable: bool
    reason: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def gap_recovery(acc_transplanted: Accuracy, acc_target: Accuracy, acc_donor: Accuracy,
                 paired_p: float | None = None, alpha: float = 0.05) -> Recovery:
    """(t − target)/(donor − target). Undefined when the donor is not better; ``unstable`` when the gap
    is within noise: the donor–target McNemar p-value (``paired_p``) ≥ ``alpha`` when given, else the
    two Wilson intervals overlap."""
    gap = acc_donor.accuracy - acc_target.accuracy
    if not gap > 0:
        return Recovery(None, gap, True, "undefined: the donor is not better than the target")
    if paired_p is not None:
        unstable = paired_p >= alpha
        why = f"donor vs target McNemar p = {paired_p:.3g}"
    else:
        unstable = acc_donor.ci_low <= acc_target.ci_high
        why = "donor and target 95% intervals overlap" if unstable else "donor and target 95% intervals are disjoint"
    value = (acc_transplanted.accuracy - acc_target.accuracy) / gap
    return Recovery(value, gap, unstable, ("gap within noise: " if unstable else "") + why)


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test on paired items: b = only A right, c = only B right."""

    b: int
    c: int
    n: int
    p_value: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> McNemar:
    """Two-sided exact McNemar test (binomial on the discordant pairs) of two systems on the same items."""
    if len(correct_a) != len(correct_b):
        raise GraftError(f"McNemar needs paired items: {len(correct_a)} vs {len(correct_b)} results",
                         "evaluate both models on the same items")
    b = sum(1 for x, y in zip(correct_a, correct_b, strict=True) if x and not y)
    c = sum(1 for x, y in zip(correct_a, correct_b, strict=True) if y and not x)
    p = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)
    return McNemar(b, c, len(correct_a), p)


def pair(records_a: Sequence[dict], records_b: Sequence[dict], key: str = "correct") -> tuple[list[bool], list[bool]]:
    """Align two runs' per-item records by ``id`` (items missing from either are an error)."""
    a = {r["id"]: bool(r[key]) for r in records_a}
    b = {r["id"]: bool(r[key]) for r in records_b}
    if a.keys() != b.keys():
        only = sorted(a.keys() ^ b.keys())[:3]
        raise GraftError(f"the two runs cover different items (e.g. {only})", "evaluate both on the same split and limit")
    ids = sorted(a)
    return [a[i] for i in ids], [b[i] for i in ids]
