"""Transplant: W' = (1 − α)·W_target + α·W_donor on the plan's slices. The only module that writes weights.

Three ways out, all computing the same tensors:

- :func:`applied` edits a loaded target in memory and restores it bit-exactly on exit (sweeps);
- :func:`transplant` writes a Hugging Face folder (sharded safetensors + index, config, tokenizer,
  generation config, a model card with the plan and both sources' sha256), or with ``patch=True`` a
  graft patch holding only the changed tensors, the plan and the hashes;
- :func:`apply_patch` turns a patch plus its target back into the same folder.

Safetensors targets are written by copying each file and overwriting the changed tensors' bytes in
place, so tensors outside the plan are byte-identical and peak memory is the changed tensors alone.
Outputs are built in a temporary folder beside ``out`` and renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from analysis import __version__, units
from analysis.check import check, require_compatible
from analysis.checkpoint import Checkpoint, read_header
from analysis.errors import GraftError
from analysis.models import PICKLE_SUFFIXES, LoadedModel, load_config
from analysis.plan import Plan, now

PATCH_FILE = "graft.safetensors"
PLAN_FILE = "graft.yaml"
WEIGHT_SUFFIXES = (".safetensors", ".gguf", *PICKLE_SUFFIXES)


# --- the arithmetic -------------------------------------------------------------------------------

def blend(target: torch.Tensor, donor: torch.Tensor, alpha: float, out_dtype: torch.dtype) -> torch.Tensor:
    """(1 − α)·target + α·donor in float32, cast to ``out_dtype``; α = 0 and α = 1 copy exactly."""
    if alpha == 0.0:
        return target.to(out_dtype)
    if alpha == 1.0:
        return donor.to(out_dtype)
    mixed = torch.lerp(target.to(torch.float32), donor.to(torch.float32), alpha)
    return mixed.to(out_dtype)


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


def _check_finite(name: str, blended: torch.Tensor, target: torch.Tensor, donor: torch.Tensor) -> None:
    """NaN/Inf in a source reaches the blend: check the (float32-fast) result, then name the culprit."""
    # A sum is a fast screen (NaN and Inf propagate); only a non-finite sum pays for the full check.
    if not blended.is_floating_point() or torch.isfinite(blended.sum()) or torch.isfinite(blended).all():
        return
    who = "target" if not torch.isfinite(target.float()).all() else "donor"
    raise GraftError(f"{who} tensor {name} holds NaN or Inf values", f"repair or re-export the {who} model")


def compute_changes(
    edits: list[Edit],
    target_get: Mapping[str, torch.Tensor] | Checkpoint,
    donor: Checkpoint | Mapping[str, torch.Tensor],
    out_dtypes: Mapping[str, torch.dtype],
) -> dict[str, torch.Tensor]:
    """Every tensor the plan touches, as it will be after the transplant (whole tensors)."""
    by_param: dict[str, list[Edit]] = {}
    for e in edits:
        by_param.setdefault(e.slice.param, []).append(e)
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

@contextlib.contextmanager
def applied(
    target: LoadedModel,
    donor: LoadedModel | Checkpoint,
    plan: Plan,
    *,
    allow_extrapolation: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Transplant into the loaded target for the duration of the block; restore it bit-exactly after.

    Values are rounded through the checkpoint's storage dtype, so the in-memory model equals the
    folder :func:`transplant` writes, loaded the same way. Yields the changed tensors by name.
    """
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
        target.sync(changed)
        yield changed
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)
        target.sync(saved)


# --- to disk -------------------------------------------------------------------------------------

@contextlib.contextmanager
def _staged(out: Path, force: bool) -> Iterator[Path]:
    """A temporary folder beside ``out``, renamed to ``out`` only when the block completes."""
    out = out.expanduser()
    if out.exists() and not force:
        raise GraftError(f"{out} already exists", "choose another --out, or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.graftlm-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _resolve_plan(plan: Plan | str | Path | None, components: list[str] | None, strength: float | None) -> Plan:
    if plan is not None and components:
        raise GraftError("both a plan and components were given", "pass either --plan or --components")
    if plan is None and not components:
        raise GraftError("nothing to transplant", "pass --plan P.yaml or --components PATTERN…")
    if plan is None:
        the_plan = Plan.of(list(components or []), alpha=1.0 if strength is None else strength)
    else:
        the_plan = plan if isinstance(plan, Plan) else Plan.load(plan)
        if strength is not None:
            the_plan = the_plan.with_alpha(strength)
    return the_plan


@dataclass
class Prepared:
    """A validated transplant, computed but not written: the plan, the sources, the changed tensors."""

    plan: Plan
    donor: Checkpoint
    target: Checkpoint
    changed: dict[str, torch.Tensor]
    hashes: Callable[[], tuple[dict[str, str], dict[str, str]]]  # (donor, target) sha256, may still run

    def final_plan(self) -> Plan:
        """The plan with its provenance complete (waits for the source hashes)."""
        donor_sha, target_sha = self.hashes()
        provenance = self.plan.provenance.model_copy(update={"donor_sha256": donor_sha, "target_sha256": target_sha})
        return self.plan.model_copy(update={"provenance": provenance})


def prepare(
    donor: str | Path | Checkpoint,
    target: str | Path | Checkpoint,
    plan: Plan | str | Path | None = None,
    *,
    components: list[str] | None = None,
    strength: float | None = None,
    allow_extrapolation: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    pool: ThreadPoolExecutor | None = None,
) -> Prepared:
    """Validate the pair and the plan and compute the changed tensors; nothing is written.

    With a thread ``pool`` the sources' sha256 are computed in the background meanwhile: hashing
    gigabytes is the slowest step, and it overlaps with the checks, the arithmetic and the copy.
    """
    the_plan = _resolve_plan(plan, components, strength)
    tck, dck = (x if isinstance(x, Checkpoint) else Checkpoint.open(
        x, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code) for x in (target, donor))
    if pool is not None:
        futures = (pool.submit(dck.sha256), pool.submit(tck.sha256))
        hashes = lambda: (futures[0].result(), futures[1].result())  # noqa: E731
    else:
        hashes = lambda: (dck.sha256(), tck.sha256())  # noqa: E731
    report = check(dck, tck, trust_remote_code=trust_remote_code)
    lay = units.layout(load_config(tck.ref, trust_remote_code=trust_remote_code), tck.shapes())
    the_plan = expand(the_plan, lay)
    edits = edits_for(the_plan, lay, allow_extrapolation=allow_extrapolation)
    require_compatible(report, {e.slice.param for e in edits})
    changed = compute_changes(edits, tck, dck, tck.dtypes())
    provenance = the_plan.provenance.model_copy(update={
        "donor": dck.ref.text, "target": tck.ref.text, "created": the_plan.provenance.created or now(),
        "graftlm": __version__})
    return Prepared(the_plan.model_copy(update={"provenance": provenance}), dck, tck, changed, hashes)


def transplant(
    donor: str | Path,
    target: str | Path,
    plan: Plan | str | Path | None = None,
    *,
    out: str | Path,
    components: list[str] | None = None,
    strength: float | None = None,
    patch: bool = False,
    force: bool = False,
    allow_extrapolation: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Write the transplanted target to ``out``: an HF folder, or a graft patch with ``patch=True``."""
    out = Path(out)
    if out.exists() and not force:  # before any work: the answer does not depend on it
        raise GraftError(f"{out} already exists", "choose another --out, or pass --force to replace it")
    _resolve_plan(plan, components, strength)  # cheap argument errors first
    tck, dck = (Checkpoint.open(x, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
                for x in (target, donor))
    # Copying the target's files, hashing both sources and computing the blend run side by side; torch
    # gets one thread, since its idle OpenMP workers spin and starve the copy and the hashes otherwise.
    # The pool sits inside the staging folder's block: on an error, the copy finishes before the folder goes.
    with _staged(out, force) as tmp, ThreadPoolExecutor(max_workers=3) as pool, _torch_threads(1):
        copied = None if patch else pool.submit(_copy_target_files, tck, tmp)
        prepared = prepare(dck, tck, plan, components=components, strength=strength,
                           allow_extrapolation=allow_extrapolation, trust_remote_code=trust_remote_code, pool=pool)
        if patch:
            _fill_patch(tmp, prepared.final_plan(), prepared.changed, out)
        else:
            assert copied is not None
            copied.result()
            _fill_folder(tmp, prepared.final_plan, tck, prepared.changed)
    return out


def _fill_patch(tmp: Path, plan: Plan, changed: dict[str, torch.Tensor], out: Path) -> None:
    tensors = {n: t.contiguous() for n, t in changed.items()}
    save_file(tensors, str(tmp / PATCH_FILE), metadata={"format": "pt", "graftlm": __version__, "plan": plan.to_yaml()})
    (tmp / PLAN_FILE).write_text(plan.to_yaml())
    (tmp / "README.md").write_text(
        f"# graft patch\n\nChanged tensors: {len(changed)}. Apply with\n\n"
        f"    graftlm apply-patch --target {plan.provenance.target} --patch {out} --out DIR\n\n"
        f"The target's weight files must have these sha256:\n\n"
        + "".join(f"- `{k}`: `{v}`\n" for k, v in plan.provenance.target_sha256.items()))


def read_patch(patch: str | Path) -> tuple[Plan, dict[str, torch.Tensor]]:
    """A patch folder (or its graft.safetensors file) → its plan and changed tensors."""
    path = Path(patch).expanduser()
    file = path / PATCH_FILE if path.is_dir() else path
    if not file.is_file():
        raise GraftError(f"no graft patch at {patch}", f"pass the folder written by `graftlm transplant --patch` "
                                                         f"(it holds {PATCH_FILE})")
    _, metadata = read_header(file)
    if "plan" not in metadata:
        raise GraftError(f"{file} is not a graft patch (no plan in its metadata)", "pass a patch written by graftlm")
    plan = Plan.from_yaml(metadata["plan"], str(file))
    with safe_open(str(file), framework="pt") as fh:
        tensors = {n: fh.get_tensor(n) for n in fh.keys()}  # noqa: SIM118 (safe_open is not a dict)
    return plan, tensors


def apply_patch(target: str | Path, patch: str | Path, *, out: str | Path, force: bool = False,
                allow_pickle: bool = False) -> Path:
    """Rebuild the transplanted folder from its target and a graft patch, checking the target's hashes."""
    plan, changed = read_patch(patch)
    tck = Checkpoint.open(target, allow_pickle=allow_pickle)
    for name, tensor in changed.items():
        if name not in tck or tck.shape(name) != tuple(tensor.shape):
            raise GraftError(f"patch tensor {name} does not fit the target", "apply the patch to its own target")

    def verified() -> Plan:  # runs after the copy, before the folder is moved into place
        expected = plan.provenance.target_sha256
        if expected and expected != hashes.result():
            raise GraftError(f"the patch was made for another target (weight hashes differ from {target})",
                             f"apply it to the target it was made from: {plan.provenance.target}")
        return plan

    out = Path(out)
    with _staged(out, force) as tmp, ThreadPoolExecutor(max_workers=2) as pool:
        hashes = pool.submit(tck.sha256)
        _copy_target_files(tck, tmp)
        _fill_folder(tmp, verified, tck, changed)
    return out


def _copy_target_files(tck: Checkpoint, tmp: Path) -> None:
    """Copy the target folder's files (weights as they are; GGUF and pickle files are re-written later)."""
    src = tck.ref.path
    assert src is not None
    weight_names = {i.file.name for i in tck.infos.values()} if tck.infos is not None else set()
    for item in sorted(src.iterdir()):
        if item.is_dir() or item.name == "README.md" or item.name.startswith("."):
            continue
        if item.suffix in WEIGHT_SUFFIXES and item.name not in weight_names:
            continue
        shutil.copyfile(item, tmp / item.name)


def _fill_folder(tmp: Path, final_plan: Callable[[], Plan], tck: Checkpoint, changed: dict[str, torch.Tensor]) -> None:
    """Put the changed tensors into the copied folder, then the plan and the model card."""
    if tck.streamable:
        _overwrite_in_place(tck, changed, tmp)
    else:
        _save_materialized(tck, changed, tmp)
    plan = final_plan()
    (tmp / PLAN_FILE).write_text(plan.to_yaml())
    (tmp / "README.md").write_text(model_card(plan, changed))


def _overwrite_in_place(tck: Checkpoint, changed: dict[str, torch.Tensor], folder: Path) -> None:
    """Overwrite the changed tensors' bytes inside the copied shard files (same dtype and shape)."""
    assert tck.infos is not None
    by_file: dict[str, list[str]] = {}
    for name in changed:
        by_file.setdefault(tck.infos[name].file.name, []).append(name)
    for file_name, names in by_file.items():
        with open(folder / file_name, "r+b") as fh:
            for name in sorted(names, key=lambda n: tck.infos[n].offset):  # type: ignore[index]
                info = tck.infos[name]
                data = changed[name].to(info.dtype).contiguous().view(torch.uint8).numpy()
                if data.nbytes != info.nbytes:
                    raise GraftError(f"tensor {name} changed size", "this is a bug in graftlm: please report it")
                fh.seek(info.offset)
                fh.write(memoryview(data))


def _save_materialized(tck: Checkpoint, changed: dict[str, torch.Tensor], folder: Path) -> None:
    """GGUF or pickle targets: apply to the model loaded once, and save as safetensors with the tokenizer."""
    loaded = tck.loaded
    assert loaded is not None
    params = loaded.parameters()
    with torch.no_grad():
        for name, value in changed.items():
            params[name].copy_(value.to(params[name].dtype))
    loaded.model.save_pretrained(folder, safe_serialization=True)
    loaded.tokenizer.save_pretrained(folder)


def model_card(plan: Plan, changed: Mapping[str, torch.Tensor]) -> str:
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
        "W' = (1 − α)·W_target + α·W_donor on each component's slices. No training.",
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


__all__ = ["Prepared", "applied", "apply_patch", "blend", "compute_changes", "edits_for", "expand", "prepare",
           "read_patch", "transplant"]
