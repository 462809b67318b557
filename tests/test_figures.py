"""Figures show what the numbers say: every estimate and interval end a reader needs is on the axes."""

from __future__ import annotations

import math

import pytest

from analysis.eval.metrics import Recovery
from analysis.report.figures import component_counts, recovery_axis


def recovery(value: float | None, low: float | None = None, high: float | None = None) -> Recovery:
    return Recovery(value, gap=0.1, unstable=False, reason="", ci_low=low, ci_high=high)


def test_recovery_axis_holds_every_finite_interval_end() -> None:
    """A small gap gives wide intervals (−50% … +50% around 0%): the axis must show them, not cut them."""
    lo, hi = recovery_axis([recovery(0.0, -0.5, 0.5), recovery(0.43, -0.2, 0.88), recovery(1.0, 1.0, 1.0)])
    assert lo < -0.5 and hi > 1.0


def test_recovery_axis_stays_readable_with_unbounded_or_huge_ends() -> None:
    """An unbounded end (the resampled gap vanished) or an absurd one does not squash the rest."""
    lo, hi = recovery_axis([recovery(0.3, -math.inf, math.inf), recovery(0.5, -40.0, 90.0), recovery(None)])
    assert -1.7 < lo <= -1.5 and 2.5 <= hi < 2.7
    assert recovery_axis([]) == pytest.approx((-0.2, 1.2))


def test_chosen_components_count_per_layer_and_the_tensors_outside_the_layers() -> None:
    """Each plan's components land in their layer × kind cell; an LM head or the embeddings in a row of
    their own (outer), never dropped from the picture."""
    table = component_counts([["L0.H1", "L2.mlp", "lm_head.weight"], ["L2.mlp", "model.embed_tokens.weight"]])
    assert list(table.index) == [0, 1, 2, "outer"]
    assert table.loc[2, "mlp"] == 2 and table.loc[0, "H1"] == 1 and table.loc[1].sum() == 0
    assert table.loc["outer", "lm_head"] == 1 and table.loc["outer", "embed_tokens"] == 1
    assert int(table.to_numpy().sum()) == 5
