"""Honest numbers: accuracy with k/n and a 95% Wilson interval, TIR, gap recovery and perplexity
change with paired bootstrap intervals, exact McNemar."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import binomtest, bootstrap

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
    """Share of the donor–target gap the transplant recovers; ``value`` is None when undefined.
    ``ci_low``/``ci_high``: its paired bootstrap interval over items, when per-item results were given
    (±inf where resampled gaps vanish: the interval is then unbounded on that side)."""

    value: float | None
    gap: float
    unstable: bool
    reason: str
    ci_low: float | None = None
    ci_high: float | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def describe(self, interval_prefix: str = "95% CI ") -> str:
        """``83% (95% CI 79%–86%)``; ``undefined`` when there is no gap; no interval when none was made."""
        if self.value is None:
            return "undefined"
        if self.ci_low is None or self.ci_high is None:
            return f"{self.value:.0%}"
        return f"{self.value:.0%} ({interval_prefix}{percent(self.ci_low)}–{percent(self.ci_high)})"

    def __str__(self) -> str:
        return self.describe()


def percent(x: float) -> str:
    """A share as a whole percentage; unbounded ends as ∞."""
    return "∞" if x == math.inf else "−∞" if x == -math.inf else f"{x:.0%}"


def gap_recovery(acc_transplanted: Accuracy, acc_target: Accuracy, acc_donor: Accuracy,
                 paired_p: float | None = None, alpha: float = 0.05,
                 items: tuple[Sequence[bool], Sequence[bool], Sequence[bool]] | None = None) -> Recovery:
    """(t − target)/(donor − target). Undefined when the donor is not better; ``unstable`` when the gap
    is within noise: the donor–target McNemar p-value (``paired_p``) ≥ ``alpha`` when given, else the
    two Wilson intervals overlap. ``items``: per-item correctness of (transplanted, target, donor) on
    the same items, in the same order, for the 95% interval (:func:`recovery_interval`)."""
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
    low, high = recovery_interval(*items) if items is not None else (None, None)
    return Recovery(value, gap, unstable, ("gap within noise: " if unstable else "") + why, low, high)


def recovery_interval(transplanted: Sequence[bool], target: Sequence[bool], donor: Sequence[bool],
                      confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the gap recovery, resampling items with their three results
    together (the three models answered the same items, so their errors are correlated). A resample
    whose donor–target gap is not positive counts as ±inf (the sign of the transplant's gain), so a
    gap within noise gives an unbounded interval instead of a falsely narrow one. Seeded: the same
    results give the same interval."""
    n = len(transplanted)
    if not n or len(target) != n or len(donor) != n:
        raise GraftError(f"recovery interval needs the three models' results on the same items "
                         f"({len(transplanted)}, {len(target)}, {len(donor)})", "evaluate all three on one split")

    def statistic(t: np.ndarray, tg: np.ndarray, d: np.ndarray, axis: int = -1) -> np.ndarray:
        gain, gap = t.mean(axis) - tg.mean(axis), d.mean(axis) - tg.mean(axis)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(gap > 0, gain / gap, np.where(gain >= 0, np.inf, -np.inf))

    data = tuple(np.asarray(x, dtype=float) for x in (transplanted, target, donor))
    with warnings.catch_warnings(), np.errstate(invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # means over ±inf in scipy's bookkeeping
        ci = bootstrap(data, statistic, paired=True, vectorized=True, method="percentile",
                       confidence_level=confidence, n_resamples=resamples, batch=200, rng=np.random.default_rng(seed)
                       ).confidence_interval
    return float(ci.low), float(ci.high)


@dataclass(frozen=True)
class Change:
    """A relative change (0.01 = +1%) with its 95% interval."""

    value: float
    ci_low: float
    ci_high: float

    def __str__(self) -> str:
        return f"{self.value:+.1%} (95% CI {self.ci_low:+.1%}–{self.ci_high:+.1%})"


def perplexity_change(nll: Sequence[float], nll_reference: Sequence[float], tokens: Sequence[int],
                      confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> Change:
    """Relative change of perplexity, exp((Σ nll − Σ nll_reference) / Σ tokens) − 1, over the same texts
    (summed NLL per text, its predicted token count), with a percentile bootstrap interval that
    resamples texts with both results together. Seeded: the same results give the same interval."""
    n = len(nll)
    if not n or len(nll_reference) != n or len(tokens) != n or not sum(tokens):
        raise GraftError(f"perplexity change needs both models' results on the same texts "
                         f"({len(nll)}, {len(nll_reference)}, {len(tokens)})", "evaluate both on one retention set")

    def statistic(a: np.ndarray, b: np.ndarray, t: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.expm1((a.sum(axis) - b.sum(axis)) / t.sum(axis))

    data = tuple(np.asarray(x, dtype=float) for x in (nll, nll_reference, tokens))
    ci = bootstrap(data, statistic, paired=True, vectorized=True, method="percentile", confidence_level=confidence,
                   n_resamples=resamples, batch=200, rng=np.random.default_rng(seed)).confidence_interval
    return Change(float(statistic(*data)), float(ci.low), float(ci.high))


def accuracy_difference(correct: Sequence[float], reference: Sequence[float], confidence: float = 0.95,
                        resamples: int = 2000, seed: int = 0) -> Change:
    """Accuracy minus a reference's on the same items (a reference may score an item fractionally: the
    mean over a control's seeds), with a percentile bootstrap interval resampling items with both
    results together. ``value`` is in accuracy units (0.1 = 10 points). Seeded."""
    n = len(correct)
    if not n or len(reference) != n:
        raise GraftError(f"an accuracy difference needs both results on the same items ({n}, {len(reference)})",
                         "evaluate both on one split")

    def statistic(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
        return a.mean(axis) - b.mean(axis)

    data = tuple(np.asarray(x, dtype=float) for x in (correct, reference))
    if np.array_equal(*data):  # no item differs: every resample gives 0 (scipy would warn of a degenerate set)
        return Change(0.0, 0.0, 0.0)
    ci = bootstrap(data, statistic, paired=True, vectorized=True, method="percentile", confidence_level=confidence,
                   n_resamples=resamples, batch=200, rng=np.random.default_rng(seed)).confidence_interval
    return Change(float(statistic(*data)), float(ci.low), float(ci.high))


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
