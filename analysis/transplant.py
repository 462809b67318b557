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
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import struct
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from analysis import __version__, units
from analysis.check import check, require_compatible
from analysis.errors import GraftError
from analysis.io.checkpoint import Checkpoint, cached_sha256, file_sha256
from analysis.io.files import check_out, moment, staged
from analysis.io.models import LoadedModel
from analysis.io.refs import PICKLE_SUFFIXES, load_config, source_paths
from analysis.io.safetensors import (
    FLOAT_DTYPES,
    RAW_DTYPES,
    TensorInfo,
    from_float32,
    read_header,
    to_float32,
    torch_dtype,
)
from analysis.plan import Plan, now

if TYPE_CHECKING:
    import torch

PATCH_FILE = "graft.safetensors"
PLAN_FILE = "graft.yaml"
WEIGHT_SUFFIXES = (".safetensors", ".gguf", *PICKLE_SUFFIXES)
CHUNK = 1 << 19  # elements blended per job: of 128K … 1M, the fastest with the copy running beside it
# Jobs at once: the cores this process may use (numpy, hashlib and copy_file_range release the GIL).
WORKERS = max(2, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2))


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
    import torch

    params = target.parameters()
    lay = units.layout(target.model.config, {n: tuple(p.shape) for n, p in params.items()})
    edits = edits_for(plan, lay, allow_extrapolation=allow_extrapolation)
    donor_src = donor if isinstance(donor, Checkpoint) else donor.parameters()
    touched = {e.slice.param for e in edits}
    for name in touched:
        if name not in donor_src:
            raise GraftError(f"the donor has no tensor {name}", "run `graftlm check` on the pair")
        if tuple(params[name].shape) != tuple(donor_src[name].shape if not isinstance(donor_src, Checkpoint)
                                              else donor_src.shape(name)):
            raise GraftError(f"tensor {name} has different shapes in donor and target", "run `graftlm check`")
    storage = {n: target.storage_dtypes.get(n, params[n].dtype) for n in touched}
    changed = compute_changes(edits, params, donor_src, storage)
    saved = {n: params[n].detach().clone() for n in touched}
    try:
        with torch.no_grad():
            for name, value in changed.items():
                params[name].copy_(value.to(params[name].dtype))
        target.sync(changed)  # the bridge's split copies of fused q/k/v and gate/up follow the edit
        yield Applied(target, changed)
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)
        target.sync(saved)


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


def _with_hashes(plan: Plan, donor_sha: dict[str, str], target_sha: dict[str, str]) -> Plan:
    provenance = plan.provenance.model_copy(update={"donor_sha256": donor_sha, "target_sha256": target_sha})
    return plan.model_copy(update={"provenance": provenance})


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
        return _with_hashes(self.plan, *self.hashes())


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

class _Jobs:
    """A thread pool whose first failure cancels what has not started; started jobs always finish.

    Jobs write into the staging folder: it may only be removed once none is running any more.
    """

    def __init__(self, workers: int = WORKERS) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers)
        self._futures: list[Future[Any]] = []

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future = self._pool.submit(fn, *args)
        self._futures.append(future)
        return future

    def wait(self, futures: Iterable[Future[Any]]) -> None:
        try:
            for future in futures:
                future.result()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for future in self._futures:
            future.cancel()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> _Jobs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Hashes:
    """The sources' sha256: remembered ones at once, the others computed as jobs (first in the queue)."""

    def __init__(self, jobs: _Jobs, *sources: Checkpoint, verify: bool = False) -> None:
        self._parts: list[list[tuple[str, str | Future[str]]]] = []
        for ck in sources:
            self._parts.append([(f.name, (None if verify else cached_sha256(f)) or jobs.submit(file_sha256, f, verify))
                                for f in ck.hashed_files()])

    def placeholders(self) -> list[dict[str, str]]:
        """Stand-ins as long as any real answer's YAML: an all-digit hex digest gets quoted."""
        return [dict.fromkeys((name for name, _ in part), "0" * 64) for part in self._parts]

    def result(self) -> list[dict[str, str]]:
        return [{name: h if isinstance(h, str) else h.result() for name, h in part} for part in self._parts]


# --- bytes in and out ----------------------------------------------------------------------------

def _pwrite_all(fd: int, data: np.ndarray | bytes, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


# copy_file_range refuses some pairs of files (across file systems on older kernels, some FUSE/NFS mounts)
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM}


def _copy_range(src: Path, dst_fd: int, src_offset: int, dst_offset: int, nbytes: int) -> None:
    """Copy bytes between files inside the kernel (falling back to read/write where it cannot)."""
    src_fd = os.open(src, os.O_RDONLY)
    kernel = hasattr(os, "copy_file_range")  # Linux only
    try:
        while nbytes > 0:
            n = -1
            if kernel:
                try:
                    n = os.copy_file_range(src_fd, dst_fd, nbytes, src_offset, dst_offset)
                except OSError as err:
                    if err.errno not in _NO_KERNEL_COPY:
                        raise
                    kernel = False
            if n < 0:  # through memory, 8 MB at a time
                buf = os.pread(src_fd, min(nbytes, 8 << 20), src_offset)
                _pwrite_all(dst_fd, buf, dst_offset)
                n = len(buf)
            if n == 0:
                raise GraftError(f"{src} ended early", "re-download the model")
            src_offset, dst_offset, nbytes = src_offset + n, dst_offset + n, nbytes - n
    finally:
        os.close(src_fd)


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
    _pwrite_all(fd, out, base + start * ti.itemsize)


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
    _pwrite_all(fd, new, base)


def _write_torch(tensor: Callable[[], torch.Tensor], fd: int, base: int) -> None:
    import torch

    _pwrite_all(fd, tensor().contiguous().view(torch.uint8).numpy(), base)


@dataclass(frozen=True)
class _Out:
    """A changed tensor to write: its safetensors dtype, shape and size, and the jobs that write its bytes.

    Each writer is called as ``writer(fd, offset)`` with the tensor's offset in the open file, and
    writes its own part; writers of one tensor may run at the same time.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    writers: tuple[Callable[[int, int], None], ...]


def _outs(edits: list[Edit], tck: Checkpoint, dck: Checkpoint) -> tuple[list[_Out], bool]:
    """The changed tensors as writers; True beside them when some need torch (other formats or dtypes)."""
    outs: list[_Out] = []
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
            outs.append(_Out(name, ti.dtype, ti.shape, ti.nbytes, writers))
            continue
        needs_torch = True  # GGUF or pickle sources, or dtypes numpy does not blend (F64, integers)
        dtype = tck.st_dtype(name)
        if dtype is None:
            raise GraftError(f"target tensor {name} has dtype {tck.dtype(name)}, which safetensors cannot hold",
                             "convert the target to float weights")
        shape = tck.shape(name)
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(RAW_DTYPES[dtype]).itemsize
        compute = partial(_changed_tensor, group, tck, dck, name, dtype)
        outs.append(_Out(name, dtype, shape, nbytes, (partial(_write_torch, compute),)))
    return outs, needs_torch


def _changed_tensor(group: list[Edit], tck: Checkpoint, dck: Checkpoint, name: str, dtype: str) -> torch.Tensor:
    return compute_changes(group, tck, dck, {name: torch_dtype(dtype)})[name]


def _copy_small_files(src: Path, tmp: Path) -> None:
    """The target folder's files besides the weights (config, tokenizer, index, generation config)."""
    for item in sorted(src.iterdir()):
        if item.is_dir() or item.name == "README.md" or item.name.startswith(".") or item.suffix in WEIGHT_SUFFIXES:
            continue
        shutil.copyfile(item, tmp / item.name)


def _copy_gaps(file: Path, fd: int, gaps: list[tuple[int, int]]) -> None:
    for start, end in gaps:
        _copy_range(file, fd, start, start, end - start)
    moment(f"copied {file.name}")


def _write_folder(tmp: Path, tck: Checkpoint, outs: list[_Out], jobs: _Jobs) -> None:
    """The target's files with the changed tensors' bytes replaced, written by parallel jobs.

    The kernel copies every byte range no changed tensor covers, one job per file (two copies into
    one file contend for its lock and run no faster than one; into two files they run twice as
    fast); the writers fill the rest, as many small jobs that keep every core busy to the end.
    """
    assert tck.infos is not None and tck.ref.path is not None
    _copy_small_files(tck.ref.path, tmp)
    moment("small files copied")
    changed = {o.name: o for o in outs}
    by_file: dict[Path, list[TensorInfo]] = {}
    for info in tck.infos.values():
        by_file.setdefault(info.file, [])
        if info.name in changed:
            out = changed[info.name]
            if (out.dtype, out.shape, out.nbytes) != (info.dtype, info.shape, info.nbytes):
                raise GraftError(f"tensor {info.name} does not fit the target's storage", "apply it to its own target")
            by_file[info.file].append(info)
    fds: list[int] = []
    try:
        copies, writes = [], []
        for file, infos in sorted(by_file.items(), key=lambda kv: -kv[0].stat().st_size):  # longest copy first
            fd = os.open(tmp / file.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            fds.append(fd)
            gaps, pos = [], 0
            for info in sorted(infos, key=lambda i: i.offset):
                gaps.append((pos, info.offset))
                writes += [(w, fd, info.offset) for w in changed[info.name].writers]
                pos = info.offset + info.nbytes
            gaps.append((pos, file.stat().st_size))
            copies.append((_copy_gaps, file, fd, [(a, b) for a, b in gaps if b > a]))
        jobs.wait([jobs.submit(*job) for job in copies + writes])
    finally:
        for fd in fds:
            os.close(fd)


def _patch_header(plan: Plan, outs: list[_Out], offsets: dict[str, tuple[int, int]]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "graftlm": __version__, "plan": plan.to_yaml()}}
    for o in outs:
        header[o.name] = {"dtype": o.dtype, "shape": list(o.shape), "data_offsets": list(offsets[o.name])}
    return json.dumps(header, separators=(",", ":")).encode()


def _write_patch(tmp: Path, outs: list[_Out], plan: Plan, hashes: _Hashes, jobs: _Jobs) -> Plan:
    """graft.safetensors: the changed tensors (written at their offsets as they are blended) + the plan.

    The header holds the plan with the sources' hashes, which may still be computing while the
    tensors are written: room is kept for it (placeholder hashes take the most room YAML can need).
    """
    outs = sorted(outs, key=lambda o: o.name)
    offsets, pos = {}, 0
    for o in outs:
        offsets[o.name] = (pos, pos + o.nbytes)
        pos += o.nbytes
    room = len(_patch_header(_with_hashes(plan, *hashes.placeholders()), outs, offsets)) + 256
    room += -room % 8  # tensor data 8-byte aligned, as safetensors writes it
    fd = os.open(tmp / PATCH_FILE, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        jobs.wait([jobs.submit(w, fd, 8 + room + offsets[o.name][0]) for o in outs for w in o.writers])
        final = _with_hashes(plan, *hashes.result())
        header = _patch_header(final, outs, offsets)
        if len(header) > room:
            raise GraftError("the patch header outgrew its room", "this is a bug in graftlm: please report it")
        _pwrite_all(fd, struct.pack("<Q", room) + header + b" " * (room - len(header)), 0)
    finally:
        os.close(fd)
    return final


# --- to disk -------------------------------------------------------------------------------------

@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """One torch thread while copying and hashing: idle OpenMP workers spin and starve those otherwise."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


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
) -> Path:
    """Write the transplanted target to ``out``: an HF folder, or a graft patch with ``patch=True``.
    ``alpha`` sets every component's strength (``strength`` is its older name, still accepted)."""
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
    with (staged(out, force=force, sources=sources) as tmp, _Jobs() as jobs,
          _torch_threads(1) if needs_torch else contextlib.nullcontext()):
        hashes = _Hashes(jobs, dck, tck)
        if patch:
            final = _write_patch(tmp, outs, the_plan, hashes, jobs)
            _patch_files(tmp, final, len(outs), out)
        else:
            if materialize:
                if tck.ref.path is not None:
                    _copy_small_files(tck.ref.path, tmp)
                _save_materialized(tck, compute_changes(edits, tck, dck, tck.dtypes()), tmp)
            else:
                _write_folder(tmp, tck, outs, jobs)
            _card_files(tmp, _with_hashes(the_plan, *hashes.result()), list(_by_param(edits)))
    return out


def _patch_files(tmp: Path, plan: Plan, n_changed: int, out: Path) -> None:
    (tmp / PLAN_FILE).write_text(plan.to_yaml())
    (tmp / "README.md").write_text(
        f"# graft patch\n\nChanged tensors: {n_changed}. Apply with\n\n"
        f"    graftlm apply-patch --target {plan.provenance.target} --patch {out} --out DIR\n\n"
        f"The target's weight files must have these sha256:\n\n"
        + "".join(f"- `{k}`: `{v}`\n" for k, v in plan.provenance.target_sha256.items()))


def _card_files(tmp: Path, plan: Plan, changed: Sized) -> None:
    (tmp / PLAN_FILE).write_text(plan.to_yaml())
    (tmp / "README.md").write_text(model_card(plan, changed))


def _patch_layout(patch: str | Path) -> tuple[Path, Plan, dict[str, TensorInfo]]:
    """A patch folder (or its graft.safetensors file) → the file, its plan and where its tensors are."""
    path = Path(patch).expanduser()
    file = path / PATCH_FILE if path.is_dir() else path
    if not file.is_file():
        raise GraftError(f"no graft patch at {patch}", f"pass the folder written by `graftlm transplant --patch` "
                                                         f"(it holds {PATCH_FILE})")
    infos, metadata = read_header(file)
    if "plan" not in metadata:
        raise GraftError(f"{file} is not a graft patch (no plan in its metadata)", "pass a patch written by graftlm")
    return file, Plan.from_yaml(metadata["plan"], str(file)), infos


def read_patch(patch: str | Path) -> tuple[Plan, dict[str, torch.Tensor]]:
    """A patch folder (or its graft.safetensors file) → its plan and changed tensors."""
    from safetensors import safe_open

    file, plan, _ = _patch_layout(patch)
    with safe_open(str(file), framework="pt") as fh:
        tensors = {n: fh.get_tensor(n) for n in fh.keys()}  # noqa: SIM118 (safe_open is not a dict)
    return plan, tensors


def apply_patch(target: str | Path, patch: str | Path, *, out: str | Path, force: bool = False,
                allow_pickle: bool = False, verify: bool = False) -> Path:
    """Rebuild the transplanted folder from its target and a graft patch, checking the target's hashes.

    The target's sha256 are remembered between runs (by path, size, inode, mtime, and the ctime they
    were computed at: an edit in place is hashed again); ``verify`` hashes them anew regardless."""
    sources = [*source_paths(target), Path(patch)]
    out = check_out(out, force=force, sources=sources)
    file, plan, infos = _patch_layout(patch)
    tck = Checkpoint.open(target, allow_pickle=allow_pickle)
    for name, info in infos.items():
        if name not in tck or tck.shape(name) != info.shape:
            raise GraftError(f"patch tensor {name} does not fit the target", "apply the patch to its own target")
    raw = tck.streamable and all(tck.st_dtype(n) == i.dtype for n, i in infos.items())
    with (staged(out, force=force, sources=sources) as tmp, _Jobs() as jobs,
          _torch_threads(1) if not raw else contextlib.nullcontext()):
        hashes = _Hashes(jobs, tck, verify=verify)
        if raw:  # the patch holds the final bytes: the kernel copies them in like the rest
            outs = [_Out(n, i.dtype, i.shape, i.nbytes, (partial(_copy_patch_tensor, i),)) for n, i in infos.items()]
            _write_folder(tmp, tck, outs, jobs)
        else:
            _, changed = read_patch(file)
            if tck.streamable:
                outs = [_Out(n, tck.st_dtype(n) or "", tuple(t.shape), tck.infos[n].nbytes,  # type: ignore[index]
                             (partial(_write_torch, partial(t.to, tck.dtype(n))),)) for n, t in changed.items()]
                _write_folder(tmp, tck, outs, jobs)
            else:
                if tck.ref.path is not None:
                    _copy_small_files(tck.ref.path, tmp)
                _save_materialized(tck, changed, tmp)
        expected = plan.provenance.target_sha256
        if expected and expected != hashes.result()[0]:  # checked before the folder is moved into place
            raise GraftError(f"the patch was made for another target (weight hashes differ from {target})",
                             f"apply it to the target it was made from: {plan.provenance.target}")
        _card_files(tmp, plan, list(infos))
    return out


def _copy_patch_tensor(info: TensorInfo, fd: int, base: int) -> None:
    _copy_range(info.file, fd, info.offset, base, info.nbytes)


def _save_materialized(tck: Checkpoint, changed: dict[str, torch.Tensor], folder: Path) -> None:
    """GGUF or pickle targets: apply to the model loaded once, and save as safetensors with the tokenizer."""
    import torch

    loaded = tck.loaded
    assert loaded is not None
    params = loaded.parameters()
    with torch.no_grad():
        for name, value in changed.items():
            params[name].copy_(value.to(params[name].dtype))
    loaded.model.save_pretrained(folder, safe_serialization=True)
    loaded.tokenizer.save_pretrained(folder)


def model_card(plan: Plan, changed: Sized) -> str:
    p = plan.provenance
    lines = [
        "---",
        "library_name: transformers",
        "tags: [graftlm, transplant]",
        f"base_model: {p.target}" if p.target and "/" in p.target and not p.target.startswith(("/", ".")) else "",
        "---",
        "",
        "# Transplanted model",
        "",
        f"Made by graftlm {p.graftlm} on {p.created}: the target with components of the donor blended in,",
        "W' = W_target + α·(W_donor − W_target) on each component's slices. No training.",
        "",
        f"- target: `{p.target}`",
        f"- donor: `{p.donor}`",
        f"- method: {p.method or 'given by hand'}" + (f", task {p.task}" if p.task else ""),
        f"- components: {len(plan.components)}, changed tensors: {len(changed)}",
        "",
        "## Plan",
        "",
        "```yaml",
        plan.to_yaml().rstrip(),
        "```",
        "",
        "## Sources (sha256 of each weight file)",
        "",
        *[f"- target `{k}`: `{v}`" for k, v in p.target_sha256.items()],
        *[f"- donor `{k}`: `{v}`" for k, v in p.donor_sha256.items()],
        "",
        "Command: `" + " ".join(["graftlm", *sys.argv[1:]]) + "`" if sys.argv and "graftlm" in sys.argv[0] else "",
        "",
    ]
    return "\n".join(line for line in lines if line is not None)


__all__ = ["Prepared", "applied", "apply_patch", "blend", "blend_f32", "compute_changes", "edits_for", "expand",
           "prepare", "read_patch", "transplant"]
