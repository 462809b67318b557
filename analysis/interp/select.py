"""Rank components by a localization method and turn the top K into a Plan.

Methods (DESIGN.md) and the column each ranks by, best first:

============  ==========================================================================================
shifts        teacher mode: ``rel_dist`` (how far the donor's activation is from the target's, relative
              to their size); generate mode: ``|effect|`` (paired effect size of the magnitude shift)
lae           ``|shift|``: the paper's |donor − target| of the mean |activation| at the last generated
              token (signed vs absolute is unknown in the paper; we rank by size)
attribution   ``attribution``, signed: the donor's component raises the target's metric the most first
patching      ``patching``, signed, as attribution
gradient      ``gradient``, signed: the component's share of the metric change from target to copy-all,
              integrated along the weight path (``analysis.interp.weightspace``)
greedy        the order of forward selection (``greedy_step``); ``greedy`` holds each one's verified gain
mask          ``mask``: the strength learned for it under a budget
weight        ``weight`` = ‖W_d − W_t‖ / ‖W_t‖ over the component's slices (dataless)
random        ``random``: a seeded permutation — the control for every claim
============  ==========================================================================================

Ties (and NaN, placed last) are broken by the components' natural order (layer, then kind and index
as ``units.component_ids`` lists them), so a ranking is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from analysis import units
from analysis.errors import GraftError
from analysis.interp.methods import METHODS, Method
from analysis.plan import Plan, PlanItem, Provenance, now

if TYPE_CHECKING:
    import pandas as pd

    from analysis.io.checkpoint import Checkpoint
    from analysis.io.models import LoadedModel

Getter = Callable[[str], torch.Tensor]


def check_method(method: str) -> Method:
    if method not in METHODS:
        raise GraftError(f"unknown method {method!r}", f"use one of {', '.join(METHODS)}")
    return method  # type: ignore[return-value]


def score_of(scores: pd.DataFrame, method: str, mode: str = "teacher") -> pd.Series:
    """The series a method ranks by (larger is better), from a scores table (see the module doc)."""
    check_method(method)
    if method == "shifts":
        col = scores["rel_dist"] if mode == "teacher" else scores["effect"].abs()
    elif method == "lae":
        col = scores["shift"].abs()
    else:
        col = scores[method]
    return col.rename(method)


def order(score: pd.Series) -> list[str]:
    """Component ids, best first; ties and NaN (last) in the table's order."""
    values = score.to_numpy(dtype=float)
    order = sorted(range(len(values)), key=lambda i: (math.inf if math.isnan(values[i]) else -values[i], i))
    return [str(score.index[i]) for i in order]



def random_ids(ids: Sequence[str], k: int, seed: int) -> list[str]:
    """``k`` components drawn at random (seeded): the random control of every claim, and the one random
    selector of the package (``random_scores`` ranks by it)."""
    import random

    return random.Random(seed).sample(list(ids), min(k, len(ids)))


def random_scores(ids: Sequence[str], seed: int = 0) -> np.ndarray:
    """A seeded random score per component (the order of :func:`random_ids` drawing all of them): the same
    seed and components give the same ranking."""
    rank = {cid: i for i, cid in enumerate(random_ids(ids, len(ids), seed))}
    return np.array([float(len(ids) - 1 - rank[cid]) for cid in ids])


def weight_scores(donor: Getter, target: Getter, lay: units.Layout, ids: Sequence[str]) -> np.ndarray:
    """‖W_d − W_t‖ / ‖W_t‖ over each component's slices; ``donor``/``target`` give a tensor by HF name.

    Per tensor we keep only the squared norms of its rows (or columns) along each sliced axis, so a
    head or neuron costs a sum over a few of those, and memory stays at one tensor pair.
    """
    comps = [units.component(lay, cid) for cid in ids]
    axes: dict[str, set[int | None]] = {}
    for c in comps:
        for s in c.slices:
            axes.setdefault(s.param, set()).add(s.dim)
    diff: dict[tuple[str, int | None], torch.Tensor] = {}
    base: dict[tuple[str, int | None], torch.Tensor] = {}
    for name, dims in axes.items():
        t, d = target(name).detach().double(), donor(name).detach().double()
        if d.shape != t.shape:
            raise GraftError(f"{name}: donor {tuple(d.shape)} vs target {tuple(t.shape)}", "run `graftlm check`")
        sq_d, sq_t = (d - t).pow(2), t.pow(2)
        for dim in dims:
            if dim is None:
                diff[name, dim], base[name, dim] = sq_d.sum()[None], sq_t.sum()[None]
            else:
                other = [a for a in range(t.ndim) if a != dim]
                diff[name, dim] = sq_d.sum(other) if other else sq_d
                base[name, dim] = sq_t.sum(other) if other else sq_t
    out = np.empty(len(comps))
    for i, c in enumerate(comps):
        num = den = 0.0
        for s in c.slices:
            part = slice(None) if s.dim is None else slice(s.start, s.stop)
            num += float(diff[s.param, s.dim][part].sum())
            den += float(base[s.param, s.dim][part].sum())
        out[i] = math.sqrt(num) / math.sqrt(den) if den > 0 else (0.0 if num == 0 else math.inf)
    return out


def outside(donor: Getter, target: Getter, lay: units.Layout, ids: Sequence[str], names: Sequence[str],
            top: int = 3) -> dict[str, Any]:
    """How much of the donor–target weight difference lies outside the candidate components ``ids``:
    the share of ‖W_d − W_t‖² (over the tensors ``names``) that no candidate's slices hold, and the
    ``top`` tensors with the largest relative change among those no candidate touches at all. Copy-all
    moves only the candidates, so a large share here is a ceiling on what any selection recovers."""
    covered: dict[str, torch.Tensor] = {}
    for cid in ids:
        for s in units.component(lay, cid).slices:
            t = target(s.param)
            mask = covered.setdefault(s.param, torch.zeros(t.shape, dtype=torch.bool))
            mask[s.index(t.ndim)] = True
    total = out = 0.0
    untouched = []
    for name in names:
        t = target(name).detach().float()
        # a new float32 tensor (never in place: .float() of a float32 parameter is the parameter itself)
        sq = torch.sub(donor(name).detach().float(), t).pow_(2)
        whole = float(sq.sum(dtype=torch.float64))
        total += whole
        if name in covered:
            out += float(sq[~covered[name]].sum(dtype=torch.float64))
        else:
            out += whole
            base = float(t.pow(2).sum(dtype=torch.float64))
            rel = math.sqrt(whole / base) if base > 0 else (0.0 if whole == 0 else math.inf)
            untouched.append((name, rel))
    untouched.sort(key=lambda x: -x[1])
    return {"share": out / total if total > 0 else 0.0,
            "largest": [[name, round(rel, 4)] for name, rel in untouched[:top] if rel > 0]}


def getter(source: LoadedModel | Checkpoint) -> Getter:
    """Tensor by HF name from a loaded model (its live parameters) or a lazy checkpoint."""
    from analysis.io.checkpoint import Checkpoint

    if isinstance(source, Checkpoint):
        ck = source

        def get(name: str) -> torch.Tensor:
            if name not in ck:
                raise GraftError(f"{ck.ref.text} has no tensor {name}", "run `graftlm check` on the pair")
            return ck.get(name)
        return get
    params = source.tensors()  # offloaded weights read where accelerate keeps them

    def get_param(name: str) -> torch.Tensor:
        if name not in params:
            raise GraftError(f"{source.name} has no tensor {name}", "run `graftlm check` on the pair")
        return params[name]
    return get_param


def plan(ranking: Sequence[str], k: int, *, alpha: float = 1.0, method: str | None = None, task: str | None = None,
         scores: pd.Series | Mapping[str, float] | None = None, donor: str | None = None, target: str | None = None,
         stamped: bool = True) -> Plan:
    """A plan of the top ``k`` components at strength ``alpha``, each with its score (NaN: none).
    ``stamped``: record when it was made (a sweep's plans leave it out, so a rerun writes the same bytes)."""
    if k < 1:
        raise GraftError(f"top K must be at least 1, got {k}", "pass --top 1 or more")
    chosen = list(ranking[:k])
    items = [PlanItem(id=cid, score=None if scores is None or math.isnan(float(scores[cid])) else float(scores[cid]))
             for cid in chosen]
    return Plan(alpha=alpha, components=items, provenance=Provenance(
        method=method, task=task, donor=donor, target=target, created=now() if stamped else None))
