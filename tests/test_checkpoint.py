"""Raw tensor access without torch: headers, byte ranges, float conversions bit for bit as torch's, hashes."""

from __future__ import annotations

from pathlib import Path

import pytest

from analysis.io.checkpoint import cached_sha256, file_sha256


def test_hash_cache_remembers_by_file_identity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    import analysis.io.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "HASH_CACHE", tmp_path / "cache" / "sha256.json")
    f = tmp_path / "w.bin"
    f.write_bytes(b"weights" * 1000)
    assert cached_sha256(f) is None
    assert file_sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest() == cached_sha256(f)
    f.write_bytes(b"other weights")  # new size and mtime: not taken from the cache
    assert cached_sha256(f) is None and file_sha256(f) == hashlib.sha256(b"other weights").hexdigest()


def test_a_hub_cache_file_is_known_by_its_blob_name(tiny_pairs, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub names a weight file's blob by its sha256: nothing is read to know it, and a blob
    damaged after the download is caught when hashes are verified."""
    import hashlib

    import analysis.io.checkpoint as checkpoint
    from analysis.errors import GraftError
    from tests.conftest import hub_cache_entry

    monkeypatch.setattr(checkpoint, "HASH_CACHE", tmp_path / "cache" / "sha256.json")
    _, target = tiny_pairs("llama")
    weights = hub_cache_entry(target, tmp_path / "hub", "org/tiny") / "model.safetensors"
    truth = hashlib.sha256((Path(target) / "model.safetensors").read_bytes()).hexdigest()
    monkeypatch.setattr(hashlib, "file_digest", lambda *a, **k: pytest.fail("read a file it knew"))
    assert cached_sha256(weights) == file_sha256(weights) == truth
    monkeypatch.undo()
    monkeypatch.setattr(checkpoint, "HASH_CACHE", tmp_path / "cache" / "sha256.json")
    blob = weights.resolve()
    blob.write_bytes(blob.read_bytes()[:-1] + b"!")
    assert file_sha256(weights) == truth  # trusted, as huggingface_hub trusts it
    with pytest.raises(GraftError, match="damaged"):
        file_sha256(weights, verify=True)
    plain = tmp_path / "plain.safetensors"
    plain.write_bytes(b"x")
    assert cached_sha256(plain) is None  # not in a hub cache: computed


def test_a_folder_from_hf_download_local_dir_is_known_by_its_download_record(tiny_pairs, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """``hf download ID --local-dir DIR`` records each LFS file's sha256 (its etag) under
    DIR/.cache/huggingface/download: read, not computed, while the file is not newer than the record
    (huggingface_hub's rule); a file edited since is hashed, and a damaged one fails verification."""
    import hashlib
    import os
    import shutil
    import time

    import analysis.io.checkpoint as checkpoint
    from analysis.errors import GraftError

    monkeypatch.setattr(checkpoint, "HASH_CACHE", tmp_path / "cache" / "sha256.json")
    _, target = tiny_pairs("llama")
    folder = tmp_path / "local-dir"
    shutil.copytree(target, folder)
    weights = folder / "model.safetensors"
    truth = hashlib.sha256(weights.read_bytes()).hexdigest()
    record = folder / ".cache" / "huggingface" / "download" / "model.safetensors.metadata"
    record.parent.mkdir(parents=True)
    record.write_text(f"{'c' * 40}\n{truth}\n{time.time()}\n")  # as huggingface_hub writes it
    with monkeypatch.context() as m:
        m.setattr(hashlib, "file_digest", lambda *a, **k: pytest.fail("read a file it knew"))
        assert cached_sha256(weights) == file_sha256(weights) == truth
    weights.write_bytes(weights.read_bytes()[:-1] + b"!")
    os.utime(weights, (time.time() - 3600, time.time() - 3600))  # the download's mtime, bytes changed
    with pytest.raises(GraftError, match="damaged.*the hub lists"):
        file_sha256(weights, verify=True)
    later = time.time() + 10
    os.utime(weights, (later, later))  # edited after the download: the record no longer speaks for it
    assert cached_sha256(weights) is None
    assert file_sha256(weights) == hashlib.sha256(weights.read_bytes()).hexdigest()
    record.write_text("not a record")
    assert checkpoint.listed_sha256(weights) is None


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 3 * 4096 + 17, 9 * 4096])
def test_a_file_hashes_to_its_sha256_whatever_its_size(size: int, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Hashing reads a memory map in chunks and unmaps those behind it: every byte counts once, an empty
    file (which cannot be mapped) included."""
    import hashlib

    import analysis.io.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "HASH_CACHE", tmp_path / "cache" / "sha256.json")
    monkeypatch.setattr(checkpoint, "HASH_CHUNK", 4096)
    data = bytes(range(256)) * (size // 256 + 1)
    f = tmp_path / "w.bin"
    f.write_bytes(data[:size])
    assert file_sha256(f) == hashlib.sha256(data[:size]).hexdigest()
    chunks = [(pos, bytes(chunk)) for pos, chunk in checkpoint.mapped_chunks(f, 4096)]
    assert b"".join(c for _, c in chunks) == data[:size] and [p for p, _ in chunks] == list(range(0, size, 4096))
