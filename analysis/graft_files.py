"""What a transplant writes beside the weights, and the way back from a patch: the model card (README.md)
and graft.yaml of every output, the graft patch (graft.safetensors: only the changed tensors, with the plan
and both sources' sha256 in its metadata), reading one, and ``apply_patch``: a patch plus its target
rebuilt into the same folder a transplant writes, the target's hashes checked first."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sized
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from analysis import __version__
from analysis.errors import GraftError
from analysis.io.checkpoint import Checkpoint
from analysis.io.files import check_out, staged
from analysis.io.refs import source_paths
from analysis.io.safetensors import (
    TensorInfo,
    read_header,
)
from analysis.io.writer import (
    Hashes,
    Jobs,
    Out,
    copy_small_files,
    copy_tensor_bytes,
    save_materialized,
    torch_threads,
    write_folder,
    write_tensor_file,
    write_torch,
)
from analysis.plan import Plan

if TYPE_CHECKING:
    import torch

PATCH_FILE = "graft.safetensors"


PLAN_FILE = "graft.yaml"


def write_patch(tmp: Path, outs: list[Out], plan: Plan, hashes: Hashes, jobs: Jobs) -> Plan:
    """graft.safetensors: the changed tensors (written at their offsets as they are blended) + the plan with
    the sources' hashes in its metadata (they may still be computing while the tensors are written)."""
    def metadata(p: Plan) -> dict[str, str]:
        return {"format": "pt", "graftlm": __version__, "plan": p.to_yaml()}

    final: list[Plan] = []

    def finished() -> dict[str, str]:
        final.append(plan.with_hashes(*hashes.result()))
        return metadata(final[0])

    # placeholder hashes take the most room YAML can need (an all-digit hex digest gets quoted)
    write_tensor_file(tmp / PATCH_FILE, outs, jobs, metadata(plan.with_hashes(*hashes.placeholders())), finished)
    return final[0]


def write_patch_readme(tmp: Path, plan: Plan, n_changed: int, out: Path) -> None:
    (tmp / PLAN_FILE).write_text(plan.to_yaml())
    (tmp / "README.md").write_text(
        f"# graft patch\n\nChanged tensors: {n_changed}. Apply with\n\n"
        f"    graftlm apply-patch --target {plan.provenance.target} --patch {out} --out DIR\n\n"
        f"The target's weight files must have these sha256:\n\n"
        + "".join(f"- `{k}`: `{v}`\n" for k, v in plan.provenance.target_sha256.items()))


def write_card(tmp: Path, plan: Plan, changed: Sized) -> None:
    (tmp / PLAN_FILE).write_text(plan.to_yaml())
    (tmp / "README.md").write_text(model_card(plan, changed))


def patch_layout(patch: str | Path) -> tuple[Path, Plan, dict[str, TensorInfo]]:
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

    file, plan, _ = patch_layout(patch)
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
    file, plan, infos = patch_layout(patch)
    tck = Checkpoint.open(target, allow_pickle=allow_pickle)
    for name, info in infos.items():
        if name not in tck or tck.shape(name) != info.shape:
            raise GraftError(f"patch tensor {name} does not fit the target", "apply the patch to its own target")
    raw = tck.streamable and all(tck.st_dtype(n) == i.dtype for n, i in infos.items())
    with (staged(out, force=force, sources=sources) as tmp, Jobs() as jobs,
          torch_threads(1) if not raw else contextlib.nullcontext()):
        hashes = Hashes(jobs, tck, verify=verify, copied=tck if tck.streamable else None)
        if raw:  # the patch holds the final bytes: the kernel copies them in like the rest
            outs = [Out(n, i.dtype, i.shape, i.nbytes, (partial(copy_tensor_bytes, i),)) for n, i in infos.items()]
            write_folder(tmp, tck, outs, jobs, hashes)
        else:
            _, changed = read_patch(file)
            if tck.streamable:
                outs = [Out(n, tck.st_dtype(n) or "", tuple(t.shape), tck.infos[n].nbytes,  # type: ignore[index]
                             (partial(write_torch, partial(t.to, tck.dtype(n))),)) for n, t in changed.items()]
                write_folder(tmp, tck, outs, jobs, hashes)
            else:
                if tck.ref.path is not None:
                    copy_small_files(tck.ref.path, tmp)
                save_materialized(tck, changed, tmp)
        expected = plan.provenance.target_sha256
        if expected and expected != hashes.result()[0]:  # checked before the folder is moved into place
            raise GraftError(f"the patch was made for another target (weight hashes differ from {target})",
                             f"apply it to the target it was made from: {plan.provenance.target}")
        write_card(tmp, plan, list(infos))
    return out


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
