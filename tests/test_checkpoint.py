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
