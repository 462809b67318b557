"""Causal evidence: the donor's activations patched into the target's run on the same tokens.

The metric is the *receiver's* log-probability of the answer the probe forces (:mod:`analysis.interp.probe`:
by default the donor's own correct outputs; for choice items, the right choice normalised over the
item's choices), or a logit difference: each forced token's logit minus that of the receiver's own best
other token (fixed from the unpatched run, so the metric is a fixed linear read-out). Per item, per
component:

- :func:`attribute` — attribution patching, (a_source − a_receiver) · ∂metric/∂a summed over positions
  and the component's features: every head, MLP and neuron at once from one forward + backward of the
  receiver and one forward of the source per batch. A first-order estimate of :func:`patch`.
- :func:`patch` — activation patching: rerun the receiver with one component's activation taken from
  the source (all positions, or one position counted from the end); the metric change is the
  component's causal effect. Several components run side by side as copies of the batch.

Donor → target (``receiver=target``) asks which donor components are *sufficient* to move the target
towards the answer; the converse (``receiver=donor, source=target``) asks which are *necessary* for
the donor: a negative effect there means the target's version breaks the donor.

We write the patching loop with bridge hooks instead of calling ``transformer_lens.patching``: its
functions run the model without an attention mask, so padded batches would be wrong; on unpadded
input both agree (tests/test_patching.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from analysis.interp.batching import (
    METRICS,
    Batch,
    Metric,
    MetricFn,
    alternatives,
    forward,
    metric_values,
    per_item,
)
from analysis.interp.shifts import Running, Site, by_hook, by_key, hooked, unique

__all__ = ["METRICS", "Metric", "attribute", "metric_values", "patch", "patch_positions"]

if TYPE_CHECKING:
    import pandas as pd
    from transformer_lens import ActivationCache

    from analysis.io.models import LoadedModel

def capture(loaded: LoadedModel, batch: Batch, hooks: Sequence[str]) -> tuple[ActivationCache, Tensor]:
    """The activations at ``hooks`` (detached, whole batch) as a TransformerLens ``ActivationCache`` over
    the model's bridge, and the logits at the batch's kept positions, from one forward that honours the
    batch's padding and positions (``bridge.run_with_cache`` on the same unpadded ids gives the same)."""
    from transformer_lens import ActivationCache

    cache: dict[str, Tensor] = {}

    def keep(name: str) -> Callable[..., None]:
        def fn(act: Tensor, hook: Any = None) -> None:
            cache[name] = act.detach()
        return fn

    with torch.no_grad(), hooked(loaded, [(h, keep(h)) for h in hooks]):
        logits = forward(loaded, batch, logits_to_keep=batch.keep)
    return ActivationCache(cache, loaded.bridge), logits


def _rows(site_list: Sequence[Site], run: Running, column: str) -> list[dict[str, Any]]:
    rows = []
    for s in unique(site_list):
        mean, sd = run.mean_sd(s.key, column)
        for g, cid in enumerate(s.ids):
            rows.append({"id": cid, "kind": s.kind, "layer": s.layer, "index": g if len(s.ids) > 1 else None,
                         column: float(mean[g]), f"{column}_sd": float(sd[g])})
    return rows


def _keeper(acts: dict[str, Tensor], name: str) -> Callable[..., Tensor]:
    def fn(act: Tensor, hook: Any = None) -> Tensor:
        # Returned, not just read: some hook points (hook_z) see a reshaped copy of the tensor the
        # model goes on with; returning it puts this tensor on the path to the metric.
        acts[name] = act = act.view_as(act)
        return act
    return fn


def _leaf(act: Tensor, hook: Any = None) -> Tensor:
    """The embeddings as a leaf that needs a gradient: a graph to differentiate even when the
    parameters are frozen."""
    return act.detach().requires_grad_(True)


def attribute(receiver: LoadedModel, source: LoadedModel, batches: Sequence[Batch], site_list: Sequence[Site], *,
              metric: Metric | MetricFn = "logprob", column: str = "attribution", progress: bool = True,
              source_batches: Sequence[Batch] | None = None) -> pd.DataFrame:
    """Attribution patching of ``source`` into ``receiver`` for every component of ``site_list``.

    Columns ``{column}`` (mean over items of the estimated metric change) and ``{column}_sd``.
    ``df.attrs`` holds the receiver's and the source's mean metric (the gap patching could close).
    ``source_batches`` (row for row like ``batches``): what the source reads instead of the receiver's
    text — the clean prompts of (clean, corrupted) pairs, with the receiver on the corrupted ones.
    """
    import pandas as pd

    groups = by_hook(site_list)
    run, gap = Running(), Running()
    bar = tqdm(total=sum(b.n_items for b in batches), desc=column, disable=not progress, leave=False)
    for i, batch in enumerate(batches):
        src, src_logits = capture(source, batch if source_batches is None else source_batches[i], list(groups))
        acts: dict[str, Tensor] = {}
        with torch.enable_grad(), hooked(receiver, [("hook_embed", _leaf)] + [(h, _keeper(acts, h)) for h in groups]):
            logits = forward(receiver, batch, logits_to_keep=batch.keep)
            alt = alternatives(logits, batch) if metric == "logit_diff" and batch.single else None
            values = metric_values(logits, batch, metric, alt)
            names = list(acts)
            grads = torch.autograd.grad(values.sum(), [acts[n] for n in names], allow_unused=True)
        mask = batch.mask.to(logits.device).float()
        per_key: dict[str, Tensor] = {}  # a KV head's keys and values add up to one estimate
        for name, grad in zip(names, grads, strict=True):
            if grad is None:  # the hook point does not reach the metric (e.g. after the last answer)
                grad = torch.zeros_like(acts[name])
            for s in groups[name]:
                delta = s.view(src[name]).float() - s.view(acts[name].detach()).float()
                contrib = (delta * s.view(grad).float()).sum(-1)  # [b, p, g]
                part = per_item(torch.einsum("bpg,bp->bg", contrib, mask), batch)
                per_key[s.key] = per_key[s.key] + part if s.key in per_key else part
        for key, value in per_key.items():
            run.add(key, **{column: value})
        src_values = metric_values(src_logits, batch, metric, alt)
        gap.add("metric", receiver=values.detach()[:, None], source=src_values[:, None])
        run.n += batch.n_items
        gap.n += batch.n_items
        bar.update(batch.n_items)
    bar.close()
    df = pd.DataFrame(_rows(site_list, run, column)).set_index("id")
    df.attrs = {"receiver_metric": float(gap.mean_sd("metric", "receiver")[0][0]),
                "source_metric": float(gap.mean_sd("metric", "source")[0][0]), "metric": metric}
    return df


def patch(receiver: LoadedModel, source: LoadedModel, batches: Sequence[Batch], site_list: Sequence[Site], *,
          metric: Metric | MetricFn = "logprob", column: str = "patching", max_rows: int = 32,
          progress: bool = True, source_batches: Sequence[Batch] | None = None) -> pd.DataFrame:
    """Activation patching of ``source`` into ``receiver``, one component at a time, all positions.

    Components run side by side: copy c of the batch patches component c, up to ``max_rows`` rows per
    forward. Columns ``{column}`` (mean over items of metric(patched) − metric(receiver)) and
    ``{column}_sd``. ``source_batches``: as for :func:`attribute`.
    """
    import pandas as pd

    groups = by_hook(site_list)
    units = _units(site_list)
    run = Running()
    bar = tqdm(total=len(batches) * len(units), desc=column, disable=not progress, leave=False)
    for i, batch in enumerate(batches):
        src, _ = capture(source, batch if source_batches is None else source_batches[i], list(groups))
        with torch.no_grad():
            clean = forward(receiver, batch, logits_to_keep=batch.keep)
            alt = alternatives(clean, batch) if metric == "logit_diff" and batch.single else None
            base = metric_values(clean, batch, metric, alt)
        m = batch.n_items
        effects = {s.key: torch.zeros(m, len(s.ids)) for s in site_list}
        per = max(1, max_rows // len(batch))
        for start in range(0, len(units), per):
            chunk = units[start:start + per]
            delta = _patched_metric(receiver, batch, chunk, src, metric, alt) - base.repeat(len(chunk)).cpu()
            for c, (parts, g) in enumerate(chunk):
                effects[parts[0].key][:, g] = delta[c * m:(c + 1) * m]
            bar.update(len(chunk))
        for key, value in effects.items():
            run.add(key, **{column: value})
        run.n += m
    bar.close()
    return pd.DataFrame(_rows(site_list, run, column)).set_index("id")


def _units(site_list: Sequence[Site]) -> list[tuple[list[Site], int]]:
    """Every component once, as (the sites that make it up, its index along them): a KV head is patched
    at its keys and its values together."""
    return [(parts, g) for parts in by_key(site_list) for g in range(len(parts[0].ids))]


def _patched_metric(receiver: LoadedModel, batch: Batch, chunk: Sequence[tuple[list[Site], int]],
                    src: dict[str, Tensor], metric: Metric | MetricFn, alt: Tensor | None,
                    column: int | None = None) -> Tensor:
    """Metric per item of the batch repeated once per unit of ``chunk``, copy c patching unit c (at
    every position, or only at ``column``)."""
    b = len(batch)
    at: dict[str, list[tuple[int, Site, int]]] = {}
    for c, (parts, g) in enumerate(chunk):
        for s in parts:
            at.setdefault(s.hook, []).append((c, s, g))

    def setter(name: str) -> Callable[..., Tensor]:
        def fn(act: Tensor, hook: Any = None) -> Tensor:
            out = act.clone()
            for c, s, g in at[name]:
                view = s.view(out)  # a view of ``out`` (contiguous clone), so writes land in it
                source = s.view(src[name])
                rows = slice(c * b, (c + 1) * b)
                if column is None:
                    view[rows, :, g] = source[:, :, g].to(out.dtype)
                else:
                    view[rows, column, g] = source[:, column, g].to(out.dtype)
            return out
        return fn

    big = batch.repeat(len(chunk))
    with torch.no_grad(), hooked(receiver, [(h, setter(h)) for h in at]):
        logits = forward(receiver, big, logits_to_keep=big.keep)
    return metric_values(logits, big, metric, None if alt is None else alt.repeat(len(chunk), 1)).cpu()


def patch_positions(receiver: LoadedModel, source: LoadedModel, batches: Sequence[Batch], site_list: Sequence[Site],
                    *, metric: Metric = "logprob", max_rows: int = 32, progress: bool = True) -> pd.DataFrame:
    """Activation patching per component and position, positions counted from the end (−1 = the last
    token; left padding aligns them). Rows: component ids; columns: −n … −1; mean over the items whose
    right answer is long enough to have that position."""
    import pandas as pd

    units = _units(site_list)
    width = max(int(b.ids.shape[1]) for b in batches)
    sums = torch.zeros(len(units), width, dtype=torch.float64)
    counts = torch.zeros(width, dtype=torch.float64)
    bar = tqdm(total=sum(int(b.ids.shape[1]) for b in batches) * len(units), desc="patching per position",
               disable=not progress, leave=False)
    for batch in batches:
        groups = by_hook(site_list)
        src, _ = capture(source, batch, list(groups))
        with torch.no_grad():
            clean = forward(receiver, batch, logits_to_keep=batch.keep)
            alt = alternatives(clean, batch) if metric == "logit_diff" and batch.single else None
            base = metric_values(clean, batch, metric, alt).cpu()
        w = int(batch.ids.shape[1])
        m = batch.n_items
        per = max(1, max_rows // len(batch))
        real = batch.mask.bool() & batch.correct[:, None]
        for col in range(w):
            k = width - w + col  # the same distance from the end in every batch
            present = per_item(real[:, col].float(), batch) > 0
            counts[k] += float(present.sum())
            for start in range(0, len(units), per):
                chunk = units[start:start + per]
                delta = _patched_metric(receiver, batch, chunk, src, metric, alt, column=col) - base.repeat(len(chunk))
                for c in range(len(chunk)):
                    sums[start + c, k] += float((delta[c * m:(c + 1) * m] * present).sum())
                bar.update(len(chunk))
    bar.close()
    mean = sums / counts.clamp(min=1)
    mean[:, counts == 0] = float("nan")
    cols = [f"{k - width}" for k in range(width)]
    return pd.DataFrame(mean.numpy(), index=[parts[0].ids[g] for parts, g in units], columns=cols)
