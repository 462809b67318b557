"""Scores for a transplant as what it is: a weight edit, measured with the components moving together.

Activation patching asks "what if this activation were the donor's"; a transplant changes weights, and
everything downstream moves with them. Here the target's weights are a function of one strength per
candidate component,

    W(m) = W_target + Σ_c m_c · 1_c ⊙ (W_donor − W_target)        (1_c: the slices of component c)

so m = 0 is the target, m = e_c transplants c alone, m = 1 transplants every candidate (the sweep's
copy-all control), and ∂metric/∂m_c = Σ over c's slices of ∂metric/∂W · (W_donor − W_target). The metric
is the probe's (:mod:`analysis.interp.probe`: the forced answers' log-probability, summed over items). Three
methods of ``localize`` and ``sweep`` read it:

- ``gradient`` — integrated gradients along the straight path m = s·1, s from 0 to 1 (Gauss–Legendre
  nodes): each component's share of the metric change from the target to copy-all, estimated for the
  weight edit itself and with every other component moving too. The shares sum to that change; the sum
  and the change are both measured and recorded (``completeness``).
- ``greedy`` — forward selection: from the target, repeatedly add the component whose transplant, given
  those already chosen, most raises the probe metric. Candidates come from the gradient at the current
  point; the best few are verified by real forwards. The ranking is the order of selection, so K = 8
  means the first eight chosen together (past 16, components are added in chunks of 2, 4, … so that a
  K of hundreds costs about as much as one of tens).
- ``mask`` — a strength per component learned on the probe under a budget (Localize-and-Stitch's sparse
  mask at component granularity: one scalar per component is optimized, no weight is trained), ranked
  by the learned strength.

Nothing here writes weights: the strengths enter through ``torch.func.functional_call``, so the
model's own parameters are never modified.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from analysis import units
from analysis.errors import GraftError
from analysis.interp.batching import Batch, Metric, alternatives, metric_values

if TYPE_CHECKING:
    from analysis.io.models import LoadedModel

GRADIENT_STEPS = 8  # Gauss–Legendre nodes: exact for a metric polynomial of degree 15 along the path
COMPLETENESS = 0.01  # gradient's scores must sum to the measured change within this (relative) ...
GRADIENT_MAX_STEPS = 32  # ... or the nodes double, up to this many
GREEDY_VERIFY = 3  # proposals verified by a real forward at each greedy step
GREEDY_SINGLE = 16  # greedy adds one component per step up to here, then chunks (see chunk_size)
MASK_STEPS = 40
MASK_LR = 0.1


@dataclass
class _Axis:
    """How one tensor's rows (or columns) map to components: ``layers`` of index vectors, each naming
    per row the candidate that owns it (``n``: none); slices that overlap go to separate layers."""

    dim: int
    size: int
    layers: list[Tensor] = field(default_factory=list)

    def add(self, c: int, start: int, stop: int, n: int) -> None:
        for idx in self.layers:
            if bool((idx[start:stop] == n).all()):
                idx[start:stop] = c
                return
        idx = torch.full((self.size,), n, dtype=torch.long)
        idx[start:stop] = c
        self.layers.append(idx)


@dataclass
class _Tensor:
    """One touched tensor: the components that own it whole, and its sliced axes."""

    whole: list[int] = field(default_factory=list)
    axes: dict[int, _Axis] = field(default_factory=dict)


class Blend:
    """The target's logits as a differentiable function of one strength per candidate component."""

    def __init__(self, target: LoadedModel, donor: LoadedModel, ids: Sequence[str], lay: units.Layout) -> None:
        if not ids:
            raise GraftError("no candidate components to score", "pass component kinds such as head,mlp")
        if target.offloaded or donor.offloaded:
            # functional_call's weights would be replaced by accelerate's hooks, which load the stored ones
            first = (target.offloaded or donor.offloaded)[0]
            raise GraftError(f"gradient, greedy and mask differentiate the weights, which must stay on a device; "
                             f"{first} is offloaded", "give device_map room for every module, or localize with "
                             "shifts, lae, attribution, patching or weight")
        self.model = target.model
        self.ids = list(ids)
        self.n = len(self.ids)
        params, dparams = target.parameters(), donor.parameters()
        self.tensors: dict[str, _Tensor] = {}
        for c, cid in enumerate(self.ids):
            for s in units.component(lay, cid).slices:
                spec = self.tensors.setdefault(s.param, _Tensor())
                if s.dim is None:
                    spec.whole.append(c)
                else:
                    size = params[s.param].shape[s.dim]
                    spec.axes.setdefault(s.dim, _Axis(s.dim, size)).add(c, s.start, s.stop, self.n)
        # Which name the model's own module tree gives each touched tensor (functional_call's keys).
        own = {id(p): name for name, p in self.model.named_parameters(remove_duplicate=False)}
        self.names = {name: own[id(params[name])] for name in self.tensors}
        self.base = {name: params[name].detach() for name in self.tensors}
        self.delta = {name: dparams[name].detach().float() - params[name].detach().float() for name in self.tensors}
        # Which candidates the donor changes at all: an unchanged one cannot move the metric at any strength.
        self.moved = torch.zeros(self.n, dtype=torch.bool)
        for c, cid in enumerate(self.ids):
            for s in units.component(lay, cid).slices:
                if bool(self.delta[s.param][s.index(self.delta[s.param].ndim)].ne(0).any()):
                    self.moved[c] = True
                    break

    def weights(self, m: Float[Tensor, " n"]) -> dict[str, Tensor]:
        """Every touched tensor at strengths ``m`` (keyed as the model's module tree names them)."""
        padded = torch.cat([m, m.new_zeros(1)])
        out = {}
        for name, spec in self.tensors.items():
            base, delta = self.base[name], self.delta[name]
            scale: Tensor | None = padded[spec.whole].sum() if spec.whole else None
            for dim, axis in spec.axes.items():
                per_row = sum(padded[idx.to(m.device)] for idx in axis.layers)
                shape = [1] * delta.ndim
                shape[dim] = axis.size
                term = per_row.view(shape)  # type: ignore[union-attr]
                scale = term if scale is None else scale + term
            out[self.names[name]] = (base.float() + scale * delta).to(base.dtype)
        return out

    def logits(self, m: Float[Tensor, " n"], batch: Batch) -> Tensor:
        """The target's logits at strengths ``m`` on the batch's last :attr:`Batch.keep` positions."""
        dev = self.model.device
        kwargs = {"attention_mask": batch.mask.to(dev), "position_ids": batch.pos.to(dev), "use_cache": False,
                  "logits_to_keep": batch.keep}
        out = torch.func.functional_call(self.model, self.weights(m.to(dev)), (batch.ids.to(dev),), kwargs)
        return out.logits


@contextlib.contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    """The model's parameters need no gradient while the strengths are differentiated (less memory);
    restored on exit."""
    was = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in was:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in was.items():
            p.requires_grad_(flag)


class _Objective:
    """The probe metric at strengths m: its value (summed over items) and its gradient in m."""

    def __init__(self, blend: Blend, batches: Sequence[Batch], metric: Metric) -> None:
        self.blend, self.batches, self.metric = blend, list(batches), metric
        self.n_items = sum(b.n_items for b in self.batches)
        self.alt: list[Tensor | None] = [None] * len(self.batches)
        if metric == "logit_diff":  # the alternative tokens are the target's own, fixed from the unedited run
            with torch.no_grad():
                zero = torch.zeros(blend.n)
                self.alt = [alternatives(blend.logits(zero, b), b) if b.single else None for b in self.batches]
        self.forwards = 0

    def value(self, m: Tensor) -> float:
        with torch.no_grad():
            total = 0.0
            for b, alt in zip(self.batches, self.alt, strict=True):
                total += float(metric_values(self.blend.logits(m, b), b, self.metric, alt).sum())
                self.forwards += 1
        return total

    def gradient(self, m: Tensor) -> tuple[float, Tensor]:
        """(value, ∂value/∂m), accumulated batch by batch (memory of one batch's graph)."""
        total, grad = 0.0, torch.zeros(self.blend.n, dtype=torch.float64)
        for b, alt in zip(self.batches, self.alt, strict=True):
            point = m.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                value = metric_values(self.blend.logits(point, b), b, self.metric, alt).sum()
                (g,) = torch.autograd.grad(value, point)
            total += float(value.detach())
            grad += g.double().cpu()
            self.forwards += 3  # a backward costs about two forwards
        return total, grad


def gradient(blend: Blend, batches: Sequence[Batch], *, metric: Metric = "logprob", steps: int = GRADIENT_STEPS,
             tolerance: float | None = COMPLETENESS, max_steps: int = GRADIENT_MAX_STEPS,
             progress: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """Integrated gradients along m = s·1 (see the module doc). Returns the score per candidate (mean per
    item) and ``info``: the sum of the scores, the measured metric change from target to copy-all
    (both per item), their relative difference, the nodes used. While the scores' sum misses the
    measured change by more than ``tolerance`` (relative), the quadrature is redone with twice the
    nodes, up to ``max_steps``: a path along which the metric bends sharply needs more of them."""
    if steps < 1:
        raise GraftError(f"gradient steps must be at least 1, got {steps}", "pass steps=8")
    obj = _Objective(blend, batches, metric)
    with _frozen(blend.model):
        start, end = obj.value(torch.zeros(blend.n)), obj.value(torch.ones(blend.n))
        change = (end - start) / obj.n_items
        tried: list[int] = []
        while True:
            nodes, weights = np.polynomial.legendre.leggauss(steps)
            total = torch.zeros(blend.n, dtype=torch.float64)
            bar = tqdm(total=steps, desc=f"gradient ({steps} nodes)", disable=not progress, leave=False)
            for x, w in zip(nodes, weights, strict=True):
                _, g = obj.gradient(torch.full((blend.n,), (x + 1) / 2))
                total += (w / 2) * g
                bar.update(1)
            bar.close()
            scores = (total / obj.n_items).numpy()
            error = abs(float(scores.sum()) - change) / max(abs(change), 1e-12)
            tried.append(steps)
            if tolerance is None or error <= tolerance or steps * 2 > max_steps:
                break
            steps *= 2
    info = {"steps": steps, "sum_of_scores": float(scores.sum()), "metric_change": change,
            "relative_error": error, "tolerance": tolerance, "nodes_tried": tried,
            "target_metric": start / obj.n_items, "copy_all_metric": end / obj.n_items, "forwards": obj.forwards}
    return scores, info


def chunk_size(n_chosen: int) -> int:
    """How many components one greedy step adds: one at a time for the first :data:`GREEDY_SINGLE`, then
    2, 4, 8, … as the selection doubles — a large K costs about as many steps as a small one, where
    the grid's K values are far apart anyway."""
    return 1 if n_chosen < GREEDY_SINGLE else 2 ** int(math.log2(n_chosen / (GREEDY_SINGLE / 2)))


def greedy(blend: Blend, batches: Sequence[Batch], k: int, *, metric: Metric = "logprob",
           verify: int | None = None, progress: bool = True) -> tuple[list[int], np.ndarray, dict[str, Any]]:
    """Forward selection of ``k`` candidates (see the module doc). Each step proposes, from the gradient
    at the current point, the ``verify`` best components (past the first :data:`GREEDY_SINGLE`: chunks of
    :func:`chunk_size` components, the gradient's best first), measures each proposal's metric with a real
    forward, and adds the best. Returns the ranking (the chosen in order, then the rest by their last
    gradient), a score per candidate (the verified metric gain per item of the step that chose it; the
    rest: the gradient's estimate of theirs) and ``info``."""
    verify = GREEDY_VERIFY if verify is None else verify
    if k < 1 or verify < 1:
        raise GraftError(f"greedy needs k >= 1 and verify >= 1, got {k} and {verify}", "pass a larger top K")
    obj = _Objective(blend, batches, metric)
    k = min(k, blend.n)
    m = torch.zeros(blend.n)
    chosen: list[int] = []
    scores = np.full(blend.n, math.nan)
    steps = 0
    with _frozen(blend.model):
        current, grad = obj.gradient(m)
        start = current
        end = obj.value(torch.ones(blend.n))  # copy-all: is there a gap to close at all (probe.no_gap)
        bar = tqdm(total=k, desc="greedy", disable=not progress, leave=False)
        while len(chosen) < k:
            size = min(chunk_size(len(chosen)), k - len(chosen))
            # ties broken by the candidates' order, so a ranking is deterministic
            remaining = sorted((c for c in range(blend.n) if c not in chosen), key=lambda c: (-float(grad[c]), c))
            proposals = [remaining[i:i + size] for i in range(0, min(len(remaining), verify * size), size)]
            values = []
            for group in proposals:
                trial = m.clone()
                trial[group] = 1.0
                values.append(obj.value(trial))
            best = max(range(len(proposals)), key=lambda i: (values[i], -i))
            scores[proposals[best]] = (values[best] - current) / obj.n_items
            chosen += proposals[best]
            m[proposals[best]] = 1.0
            current = values[best]
            steps += 1
            bar.update(len(proposals[best]))
            if len(chosen) < k:
                _, grad = obj.gradient(m)
        bar.close()
    rest = sorted((c for c in range(blend.n) if c not in chosen), key=lambda c: (-float(grad[c]), c))
    scores[rest] = grad[rest].numpy() / obj.n_items
    info = {"k": k, "steps": steps, "verify": verify, "target_metric": start / obj.n_items,
            "chosen_metric": current / obj.n_items, "copy_all_metric": end / obj.n_items, "forwards": obj.forwards}
    return chosen + rest, scores, info


def mask(blend: Blend, batches: Sequence[Batch], budget: int, *, metric: Metric = "logprob",
         steps: int = MASK_STEPS, lr: float = MASK_LR, progress: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """Strengths m = sigmoid(θ) learned on the probe (Adam on θ, full batch), maximising the metric gain
    over the target (in units of copy-all's gain) with Σ m held at most ``budget`` by a Lagrange
    multiplier. Starts from m = budget/n everywhere. Returns the learned strength per candidate and
    ``info``."""
    if budget < 1 or steps < 1:
        raise GraftError(f"mask needs a budget >= 1 and steps >= 1, got {budget} and {steps}", "pass a larger top K")
    obj = _Objective(blend, batches, metric)
    moved = blend.moved.float()  # candidates the donor does not change stay at strength 0, outside the budget
    n_moved = max(int(moved.sum()), 1)
    budget = min(budget, n_moved)
    p0 = min(max(budget / n_moved, 0.02), 0.98)
    theta = torch.full((blend.n,), math.log(p0 / (1 - p0)), requires_grad=True)
    opt = torch.optim.Adam([theta], lr=lr)
    lam = 0.0
    with _frozen(blend.model):
        start, end = obj.value(torch.zeros(blend.n)), obj.value(torch.ones(blend.n))
        scale = max(abs(end - start), 1e-6)
        bar = tqdm(total=steps, desc="mask", disable=not progress, leave=False)
        gain = 0.0
        for _ in range(steps):
            m = torch.sigmoid(theta) * moved
            value, grad = obj.gradient(m.detach())
            gain = (value - start) / scale
            over = (m.sum() - budget) / budget
            # d(−gain + λ·over)/dθ = −(∂gain/∂m)·m' + λ·m'/budget
            opt.zero_grad()
            m.backward(-(grad.float() / scale) + lam / budget)
            opt.step()
            lam = max(0.0, lam + float(over.detach()))
            bar.update(1)
        bar.close()
    strength = (torch.sigmoid(theta.detach()) * moved).double().numpy()
    info = {"budget": budget, "steps": steps, "lr": lr, "gain": gain, "sum_of_strengths": float(strength.sum()),
            "target_metric": start / obj.n_items, "copy_all_metric": end / obj.n_items, "forwards": obj.forwards}
    return strength, info
