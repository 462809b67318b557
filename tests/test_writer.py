"""analysis.io.writer: a cold transplant reads each target file once — copied and hashed in one pass — and
the hashes it records are the files' own."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from conftest import build_model

from analysis.errors import GraftError
from analysis.io import checkpoint, writer
from analysis.plan import Plan
from analysis.transplant import transplant


@pytest.fixture
def sharded_pair(tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    monkeypatch.setattr(checkpoint, "HASH_CACHE", tmp_path / "cache" / "sha256.json")  # a cold cache
    donor = build_model(tmp_path / "donor", "llama", seed=1, shard="40KB")
    target = build_model(tmp_path / "target", "llama", seed=2, shard="40KB")
    return donor, target


def test_a_cold_transplant_hashes_the_target_while_copying_it(sharded_pair, tmp_path: Path, monkeypatch) -> None:
    donor, target = sharded_pair
    shards = sorted(target.glob("*.safetensors"))
    assert len(shards) > 1
    hashed_alone: list[Path] = []
    alone = checkpoint.file_sha256
    monkeypatch.setattr(writer, "file_sha256", lambda f, verify=False: hashed_alone.append(f) or alone(f, verify))
    streamed: list[Path] = []
    copy_and_hash = writer.copy_and_hash
    monkeypatch.setattr(writer, "copy_and_hash",
                        lambda file, fd, gaps, digest: streamed.append(file) or copy_and_hash(file, fd, gaps, digest))
    monkeypatch.setattr(writer, "STREAM_CHUNK", 4096)  # many chunks per shard: ranges cut across chunks
    out = transplant(donor, target, Plan.of(["L0.H1", "L1.mlp"], alpha=0.5), out=tmp_path / "out")
    assert sorted(streamed) == shards  # every target shard: one pass, copied and hashed
    assert not set(hashed_alone) & set(shards)  # ... and never read a second time to hash it
    assert set(donor.glob("*.safetensors")) <= set(hashed_alone)  # the donor's are hashed on their own
    card = (out / "README.md").read_text()
    for s in shards:
        assert hashlib.sha256(s.read_bytes()).hexdigest() in card
        assert checkpoint.cached_sha256(s) == hashlib.sha256(s.read_bytes()).hexdigest()  # remembered
    again = transplant(donor, target, Plan.of(["L0.H1", "L1.mlp"], alpha=0.5), out=tmp_path / "again")
    for a, b in zip(sorted(out.glob("*.safetensors")), sorted(again.glob("*.safetensors")), strict=True):
        assert a.read_bytes() == b.read_bytes()  # the plain kernel copy (hashes remembered) writes the same bytes


def test_a_target_changed_while_it_is_copied_stops_the_transplant(sharded_pair, tmp_path: Path, monkeypatch) -> None:
    """The bytes hashed are the bytes written only if nothing writes the file meanwhile: a file whose
    identity (size, mtime, ctime) moved during the copy stops the transplant, nothing remembered or written."""
    donor, target = sharded_pair
    identity = checkpoint.file_identity
    seen: dict[Path, int] = {}

    def moving(file: Path) -> tuple[str, int]:  # the second look at a target shard sees it changed
        key, ctime = identity(file)
        seen[file] = seen.get(file, 0) + 1
        return (key, ctime + 1) if file.parent == target and seen[file] > 1 else (key, ctime)

    monkeypatch.setattr(writer, "file_identity", moving)
    with pytest.raises(GraftError, match="changed while it was read"):
        transplant(donor, target, Plan.of(["L0.H1"], alpha=0.5), out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert all(checkpoint.cached_sha256(s) is None for s in target.glob("*.safetensors"))
