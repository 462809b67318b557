"""Activation shifts between donor and target on a task's probe items, streamed through scoped hooks.

Every component is seen at a TransformerLens hook point of the bridge (``units.Component.hooks``), read
on the HF model's own modules wherever the point is one's input or output (:func:`reading`,
:mod:`analysis.interp.hfhooks`: KV cache, shared few-shot opening, sdpa), else on the bridge; a
:class:`Site` views one hook point as G equal components (the heads of ``hook_z``, the neurons of
``mlp.hook_post``, or the whole output of ``hook_mlp_out`` / a projection). Hooks reduce each batch to
per-prompt numbers on the spot and add them to running sums, so memory is O(components) across
prompts — never a cache of every prompt's activations.

Two modes:
- ``teacher``: both models read the same text (the rendered prompt + the reference answer). Statistics
  over ``positions``: ``answer`` (the positions that predict the answer's tokens: the last prompt token
  and every answer token but the last), ``all`` (every real token) or ``last`` (the last prompt token).
  Because the tokens are the same, the two runs pair position by position, which gives ``rel_dist``:
  how far the donor's activation is from the target's, relative to their size.
- ``generate``: each model decodes greedily from the prompt; the statistic is taken at the newest token
  of every decoding step and averaged over steps (the paper's last-generated-token statistic, ``lae``).

Per component and prompt the magnitude is the mean absolute value over the component's features
(the paper's choice). Across prompts: the donor's and the target's mean, the shift (donor − target)
with its spread and the paired effect size (mean / sd of the per-prompt shifts: consistent, not just
large), and in teacher mode the relative distance with its spread.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from analysis import units
from analysis.errors import GraftError
from analysis.interp import hfhooks
from analysis.interp.batching import forward
from analysis.interp.probe import Probe, probe_items

if TYPE_CHECKING:
    import pandas as pd

    from analysis.eval.tasks import Task
    from analysis.io.models import LoadedModel

Mode = Literal["teacher", "generate"]
Positions = Literal["answer", "all", "last"]
DEFAULT_KINDS: tuple[units.Kind, ...] = units.DEFAULT_KINDS
# Kinds that have a hook point of their own (tensor-level components have none).
MEASURABLE: tuple[units.Kind, ...] = ("layer", "attn", "mlp", "head", "kv", "group", "neuron", "linear")
# Kinds without a hook point: seen only through their weights (weight-space methods, weight, random).
UNHOOKED: tuple[units.Kind, ...] = ("outer",)


# --- sites: hook points seen as rows of components ------------------------------------------------

@dataclass(frozen=True)
class Site:
    """One hook point seen as ``len(ids)`` equal components, in index order along its component axis."""

    hook: str
    kind: units.Kind
    layer: int
    ids: tuple[str, ...]
    parts: int = 1  # how many sites make up these components together (a KV head: hook_k and hook_v)

    @property
    def key(self) -> str:
        """What the components' statistics are kept under: one key for all the sites that make them up."""
        return f"blocks.{self.layer}.{self.kind}:{self.kind}" if self.parts > 1 else f"{self.hook}:{self.kind}"

    def view(self, act: Tensor) -> Float[Tensor, "batch pos comp feat"]:
        """The activation as [batch, pos, component, feature] (heads, KV groups, neurons or one block)."""
        # A view where the layout allows (patching writes through it): hook_z's heads, hook_k/v's KV heads,
        # a group's heads together, hook_post's neurons, or a block's output as one component.
        flat = rearrange(act, "b p ... -> b p (...)")
        if self.kind == "neuron":
            return rearrange(flat, "b p (n f) -> b p n f", f=1)
        return rearrange(flat, "b p (c f) -> b p c f", c=len(self.ids))


def sites(lay: units.Layout, kinds: Sequence[str] = DEFAULT_KINDS) -> list[Site]:
    """The sites covering every component of ``kinds``, layer by layer (ids as ``units.component_ids``)."""
    unknown = [k for k in kinds if k not in MEASURABLE and k not in UNHOOKED]
    if unknown:
        raise GraftError(f"cannot measure components of kind {unknown[0]!r}",
                         f"use {', '.join(MEASURABLE)}")
    out: list[Site] = []  # unhooked kinds have no site: describe_ids lists them
    for L in range(lay.n_layers):
        for kind in kinds:
            ids = units.layer_ids(lay, L, kind)  # type: ignore[arg-type]
            if not ids:
                continue
            if kind == "linear":  # each projection is a hook point of its own
                out += [Site(units.component(lay, cid).hooks[0], "linear", L, (cid,)) for cid in ids]
                continue
            # the hook names are the components' own (a KV head is seen at its keys and at its values)
            hooks = units.component(lay, ids[0]).hooks
            out += [Site(hook, kind, L, tuple(ids), parts=len(hooks)) for hook in hooks]  # type: ignore[arg-type]
    return out


def layout_of(loaded: LoadedModel, donor: LoadedModel | None = None) -> units.Layout:  # donor: Layout.unshared
    return units.layout(loaded.model.config, *({n: tuple(p.shape) for n, p in m.parameters().items()}
                                               for m in (loaded, donor) if m is not None))


def describe_ids(site_list: Sequence[Site]) -> list[dict[str, Any]]:
    """id, kind, layer, index of every component of the sites, in site order."""
    rows = []
    for s in unique(site_list):
        for i, cid in enumerate(s.ids):
            rows.append({"id": cid, "kind": s.kind, "layer": s.layer, "index": i if len(s.ids) > 1 else None})
    return rows


def unique(site_list: Sequence[Site]) -> list[Site]:
    """One site per statistics key (the first of a KV head's two), in order: one row per component."""
    return list({s.key: s for s in reversed(site_list)}.values())[::-1]


def by_key(site_list: Sequence[Site]) -> list[list[Site]]:
    """The sites grouped by statistics key, in order: each group makes up the same components."""
    grouped: dict[str, list[Site]] = {}
    for s in site_list:
        grouped.setdefault(s.key, []).append(s)
    return list(grouped.values())


def by_hook(site_list: Sequence[Site]) -> dict[str, list[Site]]:
    grouped: dict[str, list[Site]] = {}
    for s in site_list:
        grouped.setdefault(s.hook, []).append(s)
    return grouped


@contextlib.contextmanager
def reading(loaded: LoadedModel, fwd: list[tuple[str, Callable[..., Any]]], *, fused_attention: bool = False
            ) -> Iterator[Any]:
    """Read-only hooks at bridge hook points for the block, yielding the model to run: the HF model itself
    with the hooks on its modules where every point has one (:mod:`analysis.interp.hfhooks`: its KV cache
    works, no wrappers; ``fused_attention``: sdpa while the block runs — for forced tokens, not for
    decoding, whose greedy tokens must be the evaluation's), else the bridge-wrapped copy with bridge hooks."""
    from analysis.eval.engine import Forward

    where = hfhooks.points(loaded, [name for name, _ in fwd])
    model = loaded.model if where is not None else loaded.hooked
    Forward(model).caches  # noqa: B018 (whether the KV cache works is probed once, before any hook sees a forward)
    if where is not None:
        with hfhooks.attached(where, fwd), hfhooks.sdpa(model) if fused_attention else contextlib.nullcontext():
            yield model
    else:
        with hooked(loaded, fwd):
            yield model


@contextlib.contextmanager
def hooked(loaded: LoadedModel, fwd: list[tuple[str, Callable[..., Any]]]) -> Iterator[None]:
    """Bridge hooks for the duration of the block; removed on exit, also when the block raises."""
    bridge = loaded.bridge  # boots the bridge: its hook points wrap the HF model's modules
    with bridge.hooks(fwd_hooks=fwd):
        yield



# --- per-batch recording --------------------------------------------------------------------------

class _Recorder:
    """Hooks that reduce each forward to per-prompt numbers: Σ_pos w · mean|a| per component, and (teacher
    mode, against a kept reference run) Σ_pos w · rms(a − a_ref) and Σ_pos w · (rms a + rms a_ref)/2."""

    def __init__(self, site_list: Sequence[Site], keep: bool = False):
        self.sites = by_hook(site_list)
        self.keep, self.ref = keep, None  # ref: the reference run's kept activations (teacher mode: :meth:`start`)
        self.weights: Tensor | None = None  # [b, p], set before each forward
        # or, while decoding: the newest position of the rows still decoding, which prompts the rows are
        self.newest: Tensor | None = None  # [b], 1 where the row still decodes
        self.rows: Tensor | None = None  # [b], the prompt of each row
        self.n_rows = 0
        self.mag: dict[str, Tensor] = {}
        self.dist: dict[str, Tensor] = {}
        self.norm: dict[str, Tensor] = {}
        self.kept: dict[str, Tensor] = {}
        self._selected: tuple[Any, ...] | None = None  # the weighted positions, gathered once per forward

    def start(self, weights: Tensor, ref: dict[str, Tensor] | None = None) -> None:
        """A new batch (teacher mode): its position weights [b, p] and the reference run's kept
        activations; the sums start again."""
        self.weights, self.ref = weights, ref
        self.mag, self.dist, self.norm, self.kept = {}, {}, {}, {}
        self._selected = None

    def decoding(self, rows: Tensor, newest: Tensor) -> None:
        """The next forward while decoding: which prompts its rows are, and which rows still decode."""
        self.rows, self.newest = rows, newest
        self._selected = None

    def _selection(self, act: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(positions read [b, p] bool, the row of each, its weight [n_sel, 1]) on ``act``'s device: every
        hook point of a forward sees the same positions, so they are found once per forward."""
        key = (tuple(act.shape[:2]), act.device)
        if self._selected is None or self._selected[0] != key:
            w = self.weights
            if self.newest is not None:
                w = torch.zeros(act.shape[:2])
                w[:, -1] = self.newest
            assert w is not None
            w = w.to(act.device, torch.float32)
            sel = w > 0
            self._selected = (key, sel, sel.nonzero()[:, 0], w[sel][:, None])
        return self._selected[1:]

    def hooks(self) -> list[tuple[str, Callable[..., Any]]]:
        return [(hook, self._fn(hook, group)) for hook, group in self.sites.items()]

    def _add(self, store: dict[str, Tensor], key: str, value: Tensor) -> None:
        if self.rows is not None:  # rows → their prompts' slots
            value = value.new_zeros((self.n_rows, *value.shape[1:])).index_add_(0, self.rows.to(value.device), value)
        store[key] = store[key] + value if key in store else value

    def _fn(self, hook: str, group: list[Site]) -> Callable[..., None]:
        def fn(act: Tensor, hook: Any = None) -> None:
            if self.newest is not None and not len(self.newest):
                return  # the forward of an opening all prompts share: no prompt's newest token is in it
            # Only the weighted positions are read (the answer's few, or the newest token): every
            # statistic is a weighted sum over them, gathered once per hook point.
            sel, rows, ws = self._selection(act)
            picked = act.detach()[sel].float()  # [n_sel, ...]
            if self.keep:
                self.kept[group[0].hook] = picked
            b = act.shape[0]
            for s in group:
                here = s.view(picked[None])[0]  # [n_sel, g, f]
                mag = torch.zeros(b, len(s.ids), device=act.device).index_add_(0, rows, ws * here.abs().mean(-1))
                self._add(self.mag, s.key, mag / s.parts)
                if self.ref is not None:
                    r = s.view(self.ref[s.hook][None])[0]  # [n_sel, g, f]
                    rms = lambda t: t.pow(2).mean(-1).sqrt()  # noqa: E731
                    dist = torch.zeros(b, len(s.ids), device=act.device).index_add_(0, rows, ws * rms(here - r))
                    norm = torch.zeros_like(dist).index_add_(0, rows, ws * (rms(here) + rms(r)) / 2)
                    self._add(self.dist, s.key, dist)
                    self._add(self.norm, s.key, norm)
        return fn


class Running:
    """Sums over prompts (float64) of per-prompt statistics, per site: O(components) memory."""

    def __init__(self) -> None:
        self.n = 0
        self.sums: dict[str, dict[str, Tensor]] = {}

    def add(self, key: str, **stats: Tensor) -> None:
        slot = self.sums.setdefault(key, {})
        for name, value in stats.items():
            v = value.double().cpu()
            for suffix, part in (("", v.sum(0)), ("2", v.pow(2).sum(0))):
                slot[name + suffix] = slot[name + suffix] + part if name + suffix in slot else part

    def mean_sd(self, key: str, name: str) -> tuple[Tensor, Tensor]:
        s, s2, n = self.sums[key][name], self.sums[key][name + "2"], self.n
        mean = s / max(n, 1)
        var = (s2 - n * mean.pow(2)) / (n - 1) if n > 1 else torch.full_like(mean, math.nan)
        return mean, var.clamp(min=0).sqrt()


def effect_size(mean: Tensor, sd: Tensor) -> Tensor:
    """Paired effect size mean / sd: 0 where there is no shift at all, about ±1e9 where every prompt
    shifts by the same amount, NaN with a single prompt."""
    out = mean / (sd + 1e-9 * mean.abs() + 1e-30)
    return torch.where(mean == 0, torch.zeros_like(out), out)


# --- the measurement ------------------------------------------------------------------------------

def measure(
    donor: LoadedModel,
    target: LoadedModel,
    task: Task,
    *,
    kinds: Sequence[str] = DEFAULT_KINDS,
    mode: Mode = "teacher",
    positions: Positions = "answer",
    batch_size: int = 8,
    limit: int | None = None,
    max_new_tokens: int | None = None,
    progress: bool = True,
    split: str = "probe",
    answers: str = "donor",
    probe: Probe | None = None,
) -> pd.DataFrame:
    """Per-component activation statistics of donor and target on the probe items (see the module doc;
    ``split`` names the task split that serves as the probe). Teacher mode reads the prompts with the
    answers a :class:`~analysis.interp.probe.Probe` forces (built here from ``answers`` when not given).

    Columns: ``donor``, ``target`` (mean |activation|), ``shift`` = donor − target with ``shift_sd`` and
    ``effect``; teacher mode adds ``rel_dist`` and ``rel_dist_sd``; ``n_prompts``. One row per component.
    """
    import pandas as pd

    lay = layout_of(target)
    site_list = sites(lay, kinds)
    run = Running()
    if mode == "teacher":
        from analysis.interp import probe as probe_mod

        probe = probe or probe_mod.build(task, donor, split=split, limit=limit, answers=answers,
                                         batch_size=batch_size, max_new_tokens=max_new_tokens)
        batches = probe.batches(batch_size, choices=False)
        bar = tqdm(total=len(probe.items), desc="shifts (teacher)", disable=not progress, leave=False)
        rec_d, rec_t = _Recorder(site_list, keep=True), _Recorder(site_list)
        with torch.no_grad(), contextlib.ExitStack() as whole:
            # Each model's hooks go on once for all batches; one model passed as both (a sanity run)
            # takes its two recorders' hooks in turn, batch by batch.
            once = donor.model is not target.model
            held = {id(rec): whole.enter_context(reading(m, rec.hooks(), fused_attention=True))
                    for m, rec in ((donor, rec_d), (target, rec_t))} if once else {}

            def side(loaded: LoadedModel, rec: _Recorder) -> contextlib.AbstractContextManager[Any]:
                return contextlib.nullcontext(held[id(rec)]) if once else reading(loaded, rec.hooks(), fused_attention=True)

            for batch in batches:
                w = batch.weights(positions)
                rec_d.start(w)
                with side(donor, rec_d) as model:
                    forward(donor, batch, hooked=model is donor.hooked, logits_to_keep=1)
                rec_t.start(w, ref=rec_d.kept)
                with side(target, rec_t) as model:
                    forward(target, batch, hooked=model is target.hooked, logits_to_keep=1)
                count = w.sum(1, keepdim=True).clamp(min=1)
                for s in unique(site_list):
                    md, mt = rec_d.mag[s.key] / count, rec_t.mag[s.key] / count
                    rel = rec_t.dist[s.key] / rec_t.norm[s.key].clamp(min=1e-30)
                    run.add(s.key, donor=md, target=mt, shift=md - mt, rel_dist=rel)
                run.n += len(batch)
                bar.update(len(batch))
        bar.close()
    elif mode == "generate":
        items = probe_items(task, limit, split)
        prompts = [task.render(it, target.tokenizer) for it in items]
        new = max_new_tokens or task.max_new_tokens
        bar = tqdm(total=len(items), desc="shifts (generate)", disable=not progress, leave=False)
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start:start + batch_size]
                mags = []
                for loaded in (donor, target):
                    rec = _Recorder(site_list)
                    with reading(loaded, rec.hooks()) as model:
                        steps = decode(model, loaded.tokenizer, chunk, task.stop, new, rec)
                    mags.append({k: v / steps[:, None].clamp(min=1) for k, v in rec.mag.items()})
                for s in unique(site_list):
                    md, mt = mags[0][s.key], mags[1][s.key]
                    run.add(s.key, donor=md, target=mt, shift=md - mt)
                run.n += len(chunk)
                bar.update(len(chunk))
        bar.close()
    else:
        raise GraftError(f"unknown mode {mode!r}", "use teacher or generate")
    rows = []
    for s in unique(site_list):
        d, _ = run.mean_sd(s.key, "donor")
        t, _ = run.mean_sd(s.key, "target")
        sh, sh_sd = run.mean_sd(s.key, "shift")
        eff = effect_size(sh, sh_sd)
        rel = run.mean_sd(s.key, "rel_dist") if mode == "teacher" else None
        for g, cid in enumerate(s.ids):
            row = {"id": cid, "kind": s.kind, "layer": s.layer, "index": g if len(s.ids) > 1 else None,
                   "donor": float(d[g]), "target": float(t[g]), "shift": float(sh[g]),
                   "shift_sd": float(sh_sd[g]), "effect": float(eff[g])}
            if rel is not None:
                row["rel_dist"], row["rel_dist_sd"] = float(rel[0][g]), float(rel[1][g])
            row["n_prompts"] = run.n
            rows.append(row)
    return pd.DataFrame(rows).set_index("id")


def decode(model: Any, tokenizer: Any, prompts: Sequence[str], stop: Sequence[str], max_new_tokens: int,
           rec: _Recorder) -> Tensor:
    """Greedy decoding (:func:`analysis.eval.decoding.generate`) on the model the hooks ride on; before each
    forward the recorder learns which prompts its rows are and which still decode, so its hooks read the
    newest token of those. Returns the decoding steps per prompt."""
    from analysis.eval.decoding import generate

    steps = torch.zeros(len(prompts))
    rec.n_rows = len(prompts)

    def observe(rows: list[int], decoding: list[bool]) -> None:
        rec.decoding(torch.tensor(rows, dtype=torch.long), torch.tensor(decoding, dtype=torch.float32))
        steps[rec.rows] += rec.newest  # (no rows: the shared opening's forward, which no statistic reads)

    generate(model, tokenizer, list(prompts), stop=stop, max_new_tokens=max_new_tokens,
             batch_size=len(prompts), observe=observe)
    return steps
