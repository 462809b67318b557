"""analysis.graft_files: a patch plus its target rebuilds the folder byte for byte; a target edited in place is hashed again and refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from conftest import raw_bytes, tensors

from analysis.graft_files import apply_patch, read_patch
from analysis.transplant import transplant


def test_patch_then_apply_reproduces_the_folder(tiny_pairs, tmp_path: Path) -> None:
    donor, target = tiny_pairs("qwen2")
    folder = transplant(donor, target, components=["L1.mlp", "L0.H3"], alpha=0.6, out=tmp_path / "folder")
    patch = transplant(donor, target, components=["L1.mlp", "L0.H3"], alpha=0.6, out=tmp_path / "patch", patch=True)
    rebuilt = apply_patch(target, patch, out=tmp_path / "rebuilt")
    a, b = tensors(folder), tensors(rebuilt)
    assert set(a) == set(b) and all(raw_bytes(a[n]) == raw_bytes(b[n]) for n in a)
    assert (folder / "model.safetensors").read_bytes() == (rebuilt / "model.safetensors").read_bytes()
    # the rebuilt folder carries the patch's plan and provenance as written; the folder made directly has the
    # same, but for the moment it was created (a second boundary may fall between the two transplants)
    assert (rebuilt / "graft.yaml").read_bytes() == (patch / "graft.yaml").read_bytes()
    plans = [yaml.safe_load((d / "graft.yaml").read_text()) for d in (folder, rebuilt)]
    for plan_data in plans:
        plan_data["provenance"].pop("created")
    assert plans[0] == plans[1]
    plan, changed = read_patch(patch)  # safetensors reads the patch (header written last, in its kept room)
    assert plan.provenance.target_sha256 and all(raw_bytes(t) == raw_bytes(a[n]) for n, t in changed.items())
    patch_size = sum(f.stat().st_size for f in patch.iterdir())
    assert patch_size < sum(f.stat().st_size for f in Path(target).glob("*.safetensors"))
    umask = os.umask(0)
    os.umask(umask)
    for out in (folder, patch, rebuilt):  # ordinary folders (the staging folder was private while written)
        assert out.stat().st_mode & 0o777 == 0o777 & ~umask


def test_apply_patch_rehashes_a_target_edited_in_place(tiny_pairs, tmp_path: Path) -> None:
    """Remembered hashes are keyed on path, size, inode and mtime — and trusted only while the file's
    ctime is the one they were computed at: a target edited in place with its mtime set back is hashed
    again and refused; --verify hashes anew whatever was remembered."""
    import shutil
    import time

    from analysis.errors import GraftError
    from analysis.io.checkpoint import cached_sha256, file_sha256

    donor, target = tiny_pairs("llama")
    copy = tmp_path / "target"
    shutil.copytree(target, copy)
    patch = transplant(donor, copy, components=["L0.mlp"], out=tmp_path / "patch", patch=True)
    weights = copy / "model.safetensors"
    assert cached_sha256(weights) == file_sha256(weights)
    stat = weights.stat()
    time.sleep(0.05)
    with open(weights, "r+b") as fh:
        fh.seek(-4, os.SEEK_END)
        fh.write(b"\x00\x00\x80\x3f")
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert cached_sha256(weights) is None  # the edit changed the ctime: nothing remembered is trusted
    with pytest.raises(GraftError, match="another target"):
        apply_patch(copy, patch, out=tmp_path / "o")
    assert not (tmp_path / "o").exists()
    # a remembered hash that is wrong although the file's stat did not change (a file system without a
    # trustworthy ctime, say): trusted by default, not with --verify
    from analysis.io import checkpoint

    shutil.copytree(target, copy, dirs_exist_ok=True)
    key, ctime = checkpoint._cache_key(weights)
    checkpoint._write_hash_cache({**checkpoint._read_hash_cache(), key: {"sha256": "0" * 64, "ctime_ns": ctime}})
    with pytest.raises(GraftError, match="another target"):
        apply_patch(copy, patch, out=tmp_path / "o")
    assert apply_patch(copy, patch, out=tmp_path / "o", verify=True).is_dir()
    assert cached_sha256(weights) == file_sha256(target / "model.safetensors")  # and remembered right
