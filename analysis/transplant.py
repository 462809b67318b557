"""Transplant: W' = W_target + α·(W_donor − W_target) on the plan's slices. The only module that writes weights.

Three ways out, all computing the same tensors:

- :func:`applied` edits a loaded target in memory and restores it bit-exactly on exit (sweeps);
- :func:`transplant` writes a Hugging Face folder (sharded safetensors + index, config, tokenizer,
  generation config, a model card with the plan and both sources' sha256), or with ``patch=True`` a
  graft patch holding only the changed tensors, the plan and the hashes;
- :func:`apply_patch` turns a patch plus its target back into the same folder.

One formula, computed the same way everywhere: ``t + α·(d − t)`` in float32 as three rounded
operations (never a fused multiply-add, which numpy cannot reproduce), then rounded to the storage
dtype. The in-memory path computes it with torch (:func:`blend`); the file path with numpy on the raw
bytes (:func:`blend_f32`), so writing a model between safetensors folders never imports torch.

Safetensors targets are written file by file: the kernel copies the byte ranges the plan leaves alone
(``copy_file_range``), while the changed tensors are blended in pieces and written at their offsets —
on all cores, since numpy, hashing and the copy release the GIL. Tensors outside the plan are
byte-identical and memory stays at a few pieces. Outputs are built in a temporary folder beside
``out`` and renamed into place when complete.

Over 400 lines: the formula's three ways out (in memory, to a folder, to a patch) share its checks
and its float32 steps; apart, the one formula would be written twice (the bytes themselves are
:mod:`analysis.io.writer`'s).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from analysis import __version__, units
from analysis.check import check, require_compatible
from analysis.errors import GraftError
from analysis.graft_files import write_card, write_patch, write_patch_readme
from analysis.io.checkpoint import Checkpoint
from analysis.io.files import check_out, staged
from analysis.io.models import LoadedModel
from analysis.io.refs import load_config, source_paths
from analysis.io.safetensors import (
    FLOAT_DTYPES,
    RAW_DTYPES,
    TensorInfo,
    from_float32,
    to_float32,
    torch_dtype,
)
from analysis.io.writer import (
    Hashes,
    Jobs,
    Out,
    copy_small_files,
    pwrite_all,
    save_materialized,
    torch_threads,
    write_folder,
    write_torch,
)
from analysis.plan import Plan, now

if TYPE_CHECKING:
    import torch

CHUNK = 1 << 19  # elements blended per job: of 128K … 1M, the fastest with the copy running beside it


# --- the arithmetic -------------------------------------------------------------------------------

def alpha32(alpha: float) -> float:
    """α as the float32 both paths multiply by."""
    return float(np.float32(alpha))


def blend(target: torch.Tensor, donor: torch.Tensor, alpha: float, out_dtype: torch.dtype) -> torch.Tensor:
    """t + α·(d − t) in float32, cast to ``out_dtype``; α = 0 and α = 1 copy exactly.

    Three separately rounded float32 operations (not ``torch.lerp``, which may fuse them): the file
    path computes the same with numpy (:func:`blend_f32`), so both give the same bits.
    """
    import torch

    if alpha == 0.0:
        return target.to(out_dtype)
    if alpha == 1.0:
        return donor.to(out_dtype)
    t = target.to(torch.float32)
    mixed = donor.to(torch.float32) - t  # a new tensor: the in-place steps below leave the inputs alone
    mixed.mul_(alpha32(alpha)).add_(t)
    return mixed.to(out_dtype)


def blend_f32(t: np.ndarray, d: np.ndarray, alpha: float, out: np.ndarray | None = None) -> np.ndarray:
    """:func:`blend` on float32 numpy arrays, before the cast: the same operations, the same bits.

    α = 0 and α = 1 return ``t`` and ``d`` themselves; ``out`` may be ``d``.
    """
    if alpha == 0.0:
        return t
    if alpha == 1.0:
        return d
    with np.errstate(all="ignore"):  # Inf − Inf: NaN, reported by the finiteness check (not a warning)
        out = np.subtract(d, t, out=out)
        np.multiply(out, np.float32(alpha), out=out)
        np.add(out, t, out=out)
    return out


@dataclass(frozen=True)
class Edit:
    """One slice of one tensor to blend at strength ``alpha``."""

    slice: units.Slice
    alpha: float
    component: str


def edits_for(plan: Plan, lay: units.Layout, *, allow_extrapolation: bool = False) -> list[Edit]:
    """Resolve a plan's component ids into tensor slices (later entries win where they overlap)."""
    edits: list[Edit] = []
    if not plan.components:
        raise GraftError("the plan has no components", "add components to the plan, or pass --components")
    for cid, alpha in plan.strengths().items():
        if not math.isfinite(alpha):
            raise GraftError(f"strength α={alpha} for {cid} is not a finite number", "give a number, usually in [0, 1]")
        if not (0.0 <= alpha <= 1.0) and not allow_extrapolation:
            raise GraftError(f"strength α={alpha} for {cid} is outside [0, 1]",
                             "use 0 ≤ α ≤ 1, or pass --allow-extrapolation")
        for comp in units.select(lay, [cid]):
            edits += [Edit(s, alpha, comp.id) for s in comp.slices]
    return edits


def expand(plan: Plan, lay: units.Layout) -> Plan:
    """The plan with every pattern replaced by the concrete component ids it matches."""
    items = []
    for item in plan.components:
        items += [item.model_copy(update={"id": comp.id}) for comp in units.select(lay, [item.id])]
    return plan.model_copy(update={"components": items})


def _nonfinite(name: str, target_bad: bool) -> GraftError:
    who = "target" if target_bad else "donor"
    return GraftError(f"{who} tensor {name} holds NaN or Inf values", f"repair or re-export the {who} model")


def _check_finite(name: str, blended: torch.Tensor, target: torch.Tensor, donor: torch.Tensor) -> None:
    """NaN/Inf in a source reaches the blend: check the (float32-fast) result, then name the culprit."""
    import torch

    # A sum is a fast screen (NaN and Inf propagate); only a non-finite sum pays for the full check.
    if not blended.is_floating_point() or torch.isfinite(blended.sum()) or torch.isfinite(blended).all():
        return
    raise _nonfinite(name, not bool(torch.isfinite(target.float()).all()))


def _check_finite_np(name: str, blended: np.ndarray, target: np.ndarray) -> None:
    """:func:`_check_finite` for the numpy path (same screen, same message)."""
    with np.errstate(all="ignore"):  # a sum of huge values may overflow: then the full check decides
        if np.isfinite(np.add.reduce(blended, axis=None)) or np.isfinite(blended).all():
            return
    raise _nonfinite(name, not bool(np.isfinite(target).all()))


def _by_param(edits: Iterable[Edit]) -> dict[str, list[Edit]]:
    by_param: dict[str, list[Edit]] = {}
    for e in edits:
        by_param.setdefault(e.slice.param, []).append(e)
    return by_param


def compute_changes(
    edits: list[Edit],
    target_get: Mapping[str, torch.Tensor] | Checkpoint,
    donor: Checkpoint | Mapping[str, torch.Tensor],
    out_dtypes: Mapping[str, torch.dtype],
) -> dict[str, torch.Tensor]:
    """Every tensor the plan touches, as it will be after the transplant (whole tensors, torch)."""
    import torch

    by_param = _by_param(edits)
    names = list(by_param)
    targets = dict(target_get.iter_tensors(names)) if isinstance(target_get, Checkpoint) else {
        n: target_get[n] for n in names}
    donors = dict(donor.iter_tensors(names)) if isinstance(donor, Checkpoint) else {n: donor[n] for n in names}
    changed: dict[str, torch.Tensor] = {}
    for name, group in by_param.items():
        t, d = targets[name].detach(), donors[name].detach()
        if len(group) == 1 and group[0].slice.dim is None:  # a whole tensor: no copy of the target needed
            blended = blend(t, d, group[0].alpha, torch.float32)
            _check_finite(name, blended, t, d)
            changed[name] = blended.to(out_dtypes[name])
            continue
        new = t.to(out_dtypes[name], copy=True)
        for e in group:
            idx = e.slice.index(t.ndim)
            blended = blend(t[idx], d[idx], e.alpha, torch.float32)
            _check_finite(name, blended, t[idx], d[idx])
            new[idx] = blended.to(out_dtypes[name])
        changed[name] = new
    return changed


# --- in memory -----------------------------------------------------------------------------------

class Applied(dict):  # type: ignore[type-arg]
    """What :func:`applied` yields: the changed tensors by HF name (a dict), and the transplanted model —
    ``.bridge`` (TransformerLens: ``run_with_cache``, hooks by name) and ``.model`` (the HF model) — both
    computing with the transplant, fused projections included, until the block ends."""

    def __init__(self, target: LoadedModel, changed: dict[str, torch.Tensor]) -> None:
        super().__init__(changed)
        self.target = target

    @property
    def bridge(self) -> Any:
        return self.target.bridge

    @property
    def model(self) -> Any:
        return self.target.model


@contextlib.contextmanager
def applied(
    target: LoadedModel,
    donor: LoadedModel | Checkpoint,
    plan: Plan,
    *,
    allow_extrapolation: bool = False,
) -> Iterator[Applied]:
    """Transplant into the loaded target for the duration of the block; restore it bit-exactly after.

    Values are rounded through the checkpoint's storage dtype, so the in-memory model equals the
    folder :func:`transplant` writes, loaded the same way. Yields :class:`Applied`: the changed tensors
    by name, and ``.bridge`` / ``.model`` to run. ``with analysis.applied(t, d, plan) as grafted:
    grafted.bridge.run_with_cache(...)`` sees the transplanted weights at every hook.
    """
    params = target.parameters()
    lay = units.layout(target.model.config, {n: tuple(p.shape) for n, p in params.items()})
    edits = edits_for(plan, lay, allow_extrapolation=allow_extrapolation)
    donor_src = donor if isinstance(donor, Checkpoint) else donor.tensors()
    touched = {e.slice.param for e in edits}
    for name in touched:
        if name not in donor_src:
            raise GraftError(f"the donor has no tensor {name}", "run `graftlm check` on the pair")
        # shapes from the parameters (an offloaded one is an empty tensor of the right shape)
        shape = donor.shape(name) if isinstance(donor, Checkpoint) else donor.parameters()[name].shape
        if tuple(params[name].shape) != tuple(shape):
            raise GraftError(f"tensor {name} has different shapes in donor and target", "run `graftlm check`")
    storage = {n: target.storage_dtypes.get(n, params[n].dtype) for n in touched}
    changed = compute_changes(edits, target.tensors(), donor_src, storage)
    with target.edited(changed):
        yield Applied(target, changed)


# --- validation ----------------------------------------------------------------------------------

def _resolve_plan(plan: Plan | str | Path | None, components: list[str] | None, alpha: float | None) -> Plan:
    if alpha is not None and not math.isfinite(alpha):
        raise GraftError(f"strength α={alpha} is not a finite number", "pass a number, usually in [0, 1]")
    if plan is not None and components:
        raise GraftError("both a plan and components were given", "pass either --plan or --components")
    if plan is None and not components:
        raise GraftError("nothing to transplant", "pass --plan P.yaml or --components PATTERN…")
    if plan is None:
        the_plan = Plan.of(list(components or []), alpha=1.0 if alpha is None else alpha)
    else:
        the_plan = plan if isinstance(plan, Plan) else Plan.load(plan)
        if alpha is not None:
            the_plan = the_plan.with_alpha(alpha)
    return the_plan


def _validated(dck: Checkpoint, tck: Checkpoint, plan: Plan | str | Path | None, components: list[str] | None,
               alpha: float | None, allow_extrapolation: bool, trust_remote_code: bool) -> tuple[Plan, list[Edit]]:
    """Check the pair and the plan: the plan (patterns expanded, provenance but hashes) and its edits."""
    the_plan = _resolve_plan(plan, components, alpha)
    report = check(dck, tck, trust_remote_code=trust_remote_code)
    lay = units.layout(load_config(tck.ref, trust_remote_code=trust_remote_code), tck.shapes())
    the_plan = expand(the_plan, lay)
    edits = edits_for(the_plan, lay, allow_extrapolation=allow_extrapolation)
    require_compatible(report, {e.slice.param for e in edits})
    provenance = the_plan.provenance.model_copy(update={
        "donor": dck.ref.text, "target": tck.ref.text, "created": the_plan.provenance.created or now(),
        "graftlm": __version__})
    return the_plan.model_copy(update={"provenance": provenance}), edits


@dataclass
class Prepared:
    """A validated transplant, computed in memory but not written: the plan, the sources, the changed tensors."""

    plan: Plan
    donor: Checkpoint
    target: Checkpoint
    changed: dict[str, torch.Tensor]
    hashes: Callable[[], tuple[dict[str, str], dict[str, str]]]  # (donor, target) sha256, may still run

    def final_plan(self) -> Plan:
        """The plan with its provenance complete (waits for the source hashes)."""
        return self.plan.with_hashes(*self.hashes())


def prepare(
    donor: str | Path | Checkpoint,
    target: str | Path | Checkpoint,
    plan: Plan | str | Path | None = None,
    *,
    components: list[str] | None = None,
    alpha: float | None = None,
    allow_extrapolation: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    pool: ThreadPoolExecutor | None = None,
) -> Prepared:
    """Validate the pair and the plan and compute the changed tensors as torch tensors; nothing is written.

    With a thread ``pool`` the sources' sha256 are computed in the background meanwhile.
    """
    tck, dck = (x if isinstance(x, Checkpoint) else Checkpoint.open(
        x, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code) for x in (target, donor))
    if pool is not None:
        futures = (pool.submit(dck.sha256), pool.submit(tck.sha256))
        hashes = lambda: (futures[0].result(), futures[1].result())  # noqa: E731
    else:
        hashes = lambda: (dck.sha256(), tck.sha256())  # noqa: E731
    the_plan, edits = _validated(dck, tck, plan, components, alpha, allow_extrapolation, trust_remote_code)
    changed = compute_changes(edits, tck, dck, tck.dtypes())
    return Prepared(the_plan, dck, tck, changed, hashes)


# --- jobs on the cores ---------------------------------------------------------------------------


# --- bytes in and out ----------------------------------------------------------------------------


_scratch = threading.local()


def _buffers(n: int) -> tuple[np.ndarray, ...]:
    """This thread's working buffers for ``n`` elements: raw target, raw donor, 2 × float32, uint32, raw out."""
    bufs: tuple[np.ndarray, ...] | None = getattr(_scratch, "bufs", None)
    if bufs is None or bufs[2].size < n:
        bufs = (np.empty(4 * n, np.uint8), np.empty(4 * n, np.uint8), np.empty(n, np.float32),
                np.empty(n, np.float32), np.empty(n, np.uint32), np.empty(4 * n, np.uint8))
        _scratch.bufs = bufs
    return bufs


def _raw(buf: np.ndarray, dtype: str, n: int) -> np.ndarray:
    return buf[: n * np.dtype(RAW_DTYPES[dtype]).itemsize].view(RAW_DTYPES[dtype])


def _blend_piece(name: str, ti: TensorInfo, di: TensorInfo, alpha: float, start: int, count: int,
                 fd: int, base: int) -> None:
    """Blend elements ``start:start + count`` of a whole-tensor edit and write them at ``base`` + their offset."""
    raw_t, raw_d, f_t, f_d, scratch, raw_o = _buffers(CHUNK)
    t_raw = ti.read(start, count, _raw(raw_t, ti.dtype, count))
    t32 = to_float32(t_raw, ti.dtype, f_t[:count])
    if alpha == 0.0:
        mixed = t32
    else:
        d32 = to_float32(di.read(start, count, _raw(raw_d, di.dtype, count)), di.dtype, f_d[:count])
        mixed = blend_f32(t32, d32, alpha, out=d32)
    _check_finite_np(name, mixed, t32)
    out = from_float32(mixed, ti.dtype, _raw(raw_o, ti.dtype, count), scratch=scratch[:count], finite=True)
    pwrite_all(fd, out, base + start * ti.itemsize)


def _blend_sliced(name: str, ti: TensorInfo, di: TensorInfo, group: list[Edit], fd: int, base: int) -> None:
    """A tensor with several or partial edits (heads, neurons): blend each slice, write the whole tensor."""
    t_raw = ti.read().reshape(ti.shape)
    t32 = to_float32(t_raw, ti.dtype)
    d32 = to_float32(di.read(), di.dtype).reshape(di.shape)
    new = t_raw.copy()
    for e in group:  # each slice blends the original target: later edits simply win where they overlap
        idx = e.slice.index(len(ti.shape))
        mixed = np.ascontiguousarray(blend_f32(t32[idx], d32[idx], e.alpha))
        _check_finite_np(name, mixed, t32[idx])
        new[idx] = from_float32(mixed, ti.dtype, finite=True)
    pwrite_all(fd, new, base)


def _outs(edits: list[Edit], tck: Checkpoint, dck: Checkpoint) -> tuple[list[Out], bool]:
    """The changed tensors as writers; True beside them when some need torch (other formats or dtypes)."""
    outs: list[Out] = []
    needs_torch = False
    for name, group in _by_param(edits).items():
        ti = tck.infos.get(name) if tck.infos is not None else None
        di = dck.infos.get(name) if dck.infos is not None else None
        if ti is not None and di is not None and ti.dtype in FLOAT_DTYPES and di.dtype in FLOAT_DTYPES:
            if len(group) == 1 and group[0].slice.dim is None:
                alpha = group[0].alpha
                writers = tuple(partial(_blend_piece, name, ti, di, alpha, s, min(CHUNK, ti.numel - s))
                                for s in range(0, ti.numel, CHUNK))
            else:
                writers = (partial(_blend_sliced, name, ti, di, group),)
            outs.append(Out(name, ti.dtype, ti.shape, ti.nbytes, writers))
            continue
        needs_torch = True  # GGUF or pickle sources, or dtypes numpy does not blend (F64, integers)
        dtype = tck.st_dtype(name)
        if dtype is None:
            raise GraftError(f"target tensor {name} has dtype {tck.dtype(name)}, which safetensors cannot hold",
                             "convert the target to float weights")
        shape = tck.shape(name)
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(RAW_DTYPES[dtype]).itemsize
        compute = partial(_changed_tensor, group, tck, dck, name, dtype)
        outs.append(Out(name, dtype, shape, nbytes, (partial(write_torch, compute),)))
    return outs, needs_torch


def _changed_tensor(group: list[Edit], tck: Checkpoint, dck: Checkpoint, name: str, dtype: str) -> torch.Tensor:
    return compute_changes(group, tck, dck, {name: torch_dtype(dtype)})[name]


# --- to disk -------------------------------------------------------------------------------------


def transplant(
    donor: str | Path,
    target: str | Path,
    plan: Plan | str | Path | None = None,
    *,
    out: str | Path,
    components: list[str] | None = None,
    alpha: float | None = None,
    patch: bool = False,
    force: bool = False,
    allow_extrapolation: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    strength: float | None = None,
    verify: bool = False,
) -> Path:
    """Write the transplanted target to ``out``: an HF folder, or a graft patch with ``patch=True``.
    ``alpha`` sets every component's strength (``strength`` is its older name, still accepted). The card
    names both sources' sha256, remembered or as the hub lists them (a hub cache's blob names, the records
    of ``hf download --local-dir``) unless ``verify``."""
    if strength is not None:
        if alpha is not None and alpha != strength:
            raise GraftError(f"alpha={alpha} and strength={strength} disagree", "pass alpha only (strength is its old name)")
        alpha = strength
    sources = [*source_paths(donor), *source_paths(target), *([Path(plan)] if isinstance(plan, str | Path) else [])]
    out = check_out(out, force=force, sources=sources)  # before any work: the answer does not depend on it
    _resolve_plan(plan, components, alpha)  # cheap argument errors first
    tck, dck = (Checkpoint.open(x, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
                for x in (target, donor))
    the_plan, edits = _validated(dck, tck, plan, components, alpha, allow_extrapolation, trust_remote_code)
    materialize = not patch and not tck.streamable  # GGUF / pickle target: saved from the loaded model
    outs, needs_torch = ([], True) if materialize else _outs(edits, tck, dck)
    # The pool sits inside the staging folder's block: on an error, running jobs finish before the folder goes.
    with (staged(out, force=force, sources=sources) as tmp, Jobs() as jobs,
          torch_threads(1) if needs_torch else contextlib.nullcontext()):
        hashes = Hashes(jobs, dck, tck, verify=verify, copied=tck if not patch and not materialize else None)
        if patch:
            final = write_patch(tmp, outs, the_plan, hashes, jobs)
            write_patch_readme(tmp, final, len(outs), out)
        else:
            if materialize:
                if tck.ref.path is not None:
                    copy_small_files(tck.ref.path, tmp)
                save_materialized(tck, compute_changes(edits, tck, dck, tck.dtypes()), tmp)
            else:
                write_folder(tmp, tck, outs, jobs, hashes)
            write_card(tmp, the_plan.with_hashes(*hashes.result()), list(_by_param(edits)))
    return out


__all__ = ["Prepared", "applied", "blend", "blend_f32", "compute_changes", "edits_for", "expand", "prepare",
           "transplant"]
