"""analysis.metrics against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest

from analysis.errors import GraftError
from analysis.eval import metrics


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval written out (textbook formula)."""
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return centre - half, centre + half


@pytest.mark.parametrize(("k", "n", "low", "high"), [(7, 10, 0.3968, 0.8922), (0, 10, 0.0, 0.2775),
                                                       (10, 10, 0.7225, 1.0), (3, 5, 0.2307, 0.8824)])
def test_wilson_interval_hand_checked(k: int, n: int, low: float, high: float) -> None:
    acc = metrics.accuracy(k, n)
    assert (acc.k, acc.n, acc.accuracy) == (k, n, k / n)
    assert acc.ci_low == pytest.approx(low, abs=1e-4) and acc.ci_high == pytest.approx(high, abs=1e-4)
    assert (acc.ci_low, acc.ci_high) == pytest.approx(wilson(k, n), abs=1e-9)
    assert f"({k}/{n}, 95% CI" in str(acc)


def test_accuracy_edge_cases() -> None:
    assert math.isnan(metrics.accuracy(0, 0).accuracy)
    with pytest.raises(GraftError):
        metrics.accuracy(5, 3)
    assert metrics.accuracy_of([True, False, True, True]).k == 3


def test_mcnemar_exact() -> None:
    # 1 pair only A right, 6 only B right: p = 2·P(X ≤ 1 | n=7, ½) = 2·(1 + 7)/128
    a = [True] + [False] * 6 + [True] * 5 + [False] * 3
    b = [False] + [True] * 6 + [True] * 5 + [False] * 3
    test = metrics.mcnemar(a, b)
    assert (test.b, test.c, test.n) == (1, 6, 15)
    assert test.p_value == pytest.approx(16 / 128)
    assert metrics.mcnemar([True, False], [True, False]).p_value == 1.0
    with pytest.raises(GraftError, match="paired"):
        metrics.mcnemar([True], [True, False])


def test_tir() -> None:
    assert metrics.tir(0.6, 0.4) == pytest.approx(1.5)
    assert metrics.tir(0.3, 0.0) == math.inf


def test_gap_recovery() -> None:
    target, donor = metrics.accuracy(50, 100), metrics.accuracy(80, 100)
    rec = metrics.gap_recovery(metrics.accuracy(65, 100), target, donor)
    assert rec.value == pytest.approx(0.5) and rec.gap == pytest.approx(0.3) and not rec.unstable
    # the donor is not better: undefined, never a division by a negative or zero gap
    worse = metrics.gap_recovery(metrics.accuracy(65, 100), donor, target)
    assert worse.value is None and "undefined" in worse.reason
    # a one-item gap on 20 items is noise
    small = metrics.gap_recovery(metrics.accuracy(11, 20), metrics.accuracy(10, 20), metrics.accuracy(11, 20))
    assert small.value == pytest.approx(1.0) and small.unstable
    # with a paired test, its p-value decides
    paired = metrics.gap_recovery(metrics.accuracy(65, 100), target, donor, paired_p=0.2)
    assert paired.unstable and "p = 0.2" in paired.reason


def test_recovery_interval_is_paired_seeded_and_honest_about_a_vanishing_gap() -> None:
    n = 200
    target = [i % 10 < 2 for i in range(n)]  # 20%
    donor = [i % 10 < 8 for i in range(n)]  # 80%
    half = [i % 10 < 5 for i in range(n)]  # 50%: recovers half the gap
    rec = metrics.gap_recovery(metrics.accuracy_of(half), metrics.accuracy_of(target), metrics.accuracy_of(donor),
                               items=(half, target, donor))
    assert rec.ci_low is not None and rec.ci_high is not None
    assert rec.ci_low < 0.5 < rec.ci_high and rec.ci_high - rec.ci_low < 0.2
    assert metrics.recovery_interval(half, target, donor) == (rec.ci_low, rec.ci_high)  # seeded
    # the same accuracies without the pairing (the transplant right on other items) give a wider interval
    shuffled = [i % 10 >= 5 for i in range(n)]
    low, high = metrics.recovery_interval(shuffled, target, donor)
    assert high - low > rec.ci_high - rec.ci_low
    assert "50% (95% CI" in str(rec)
    # a gap of one item in twenty: some resamples have no gap, and the interval says it is unbounded
    t20, d20 = [i < 10 for i in range(20)], [i < 11 for i in range(20)]
    low, high = metrics.recovery_interval(d20, t20, d20)
    assert low == -math.inf or high == math.inf
    with pytest.raises(GraftError, match="same items"):
        metrics.recovery_interval(half, target[:10], donor)


def test_perplexity_change_is_token_weighted_with_a_paired_interval() -> None:
    tokens = [10, 30, 20, 40] * 10
    reference = [2.0 * t for t in tokens]  # 2 nats a token
    worse = [2.1 * t for t in tokens]  # 2.1 nats a token everywhere: a sure cost
    change = metrics.perplexity_change(worse, reference, tokens)
    assert change.value == pytest.approx(math.exp(0.1) - 1)
    assert change.ci_low == pytest.approx(change.value) and change.ci_high == pytest.approx(change.value)
    even = [20] * 40
    mixed = [2.0 * 20 + (10 if i % 2 else -10) for i in range(40)]  # half the texts better, half worse
    noisy = metrics.perplexity_change(mixed, [2.0 * 20] * 40, even)
    assert noisy.value == pytest.approx(0.0, abs=1e-12)
    assert noisy.ci_low < 0 < noisy.ci_high  # some texts better, some worse: the interval spans zero
    assert str(change).startswith("+10.5% (95% CI")
    with pytest.raises(GraftError, match="same texts"):
        metrics.perplexity_change(worse[:3], reference, tokens)


def test_pair_aligns_by_id() -> None:
    a = [{"id": "x", "correct": True}, {"id": "y", "correct": False}]
    b = [{"id": "y", "correct": True}, {"id": "x", "correct": True}]
    assert metrics.pair(a, b) == ([True, False], [True, True])
    with pytest.raises(GraftError, match="different items"):
        metrics.pair(a, b[:1])


def test_accuracy_difference_is_paired_and_takes_a_seed_averaged_reference() -> None:
    method = [i % 10 < 6 for i in range(100)]  # 60%
    random_mean = [(1.0 if i % 10 < 2 else 0.0) if i % 2 else 0.5 for i in range(100)]  # seeds disagree on half
    d = metrics.accuracy_difference(method, random_mean)
    assert d.value == pytest.approx(0.6 - sum(random_mean) / 100)
    assert d.ci_low < d.value < d.ci_high and d.ci_low > 0
    assert d == metrics.accuracy_difference(method, random_mean)  # seeded
    assert metrics.accuracy_difference(method, method) == metrics.Change(0.0, 0.0, 0.0)
    with pytest.raises(GraftError):
        metrics.accuracy_difference(method, random_mean[:10])
