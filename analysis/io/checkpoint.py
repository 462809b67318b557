"""Read a checkpoint's tensors lazily: names, shapes, dtypes, slices and file hashes, never a whole model.

Safetensors folders are read straight from their files (headers parsed, tensors read on demand).
A GGUF file or a pickle checkpoint has no such layout: it is loaded once through :mod:`analysis.io.models`
and its state dict is served from memory instead.

Nothing here imports torch until a torch tensor is asked for: the file-to-file transplant reads raw
elements with :func:`read_raw` and converts float formats with numpy (:func:`to_float32`,
:func:`from_float32`), bit for bit as torch does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from analysis.errors import GraftError
from analysis.io.models import LoadedModel
from analysis.io.refs import ModelRef, refuse_quantized, resolve, weight_files
from analysis.io.safetensors import TensorInfo, read_headers, st_dtype, torch_dtype

if TYPE_CHECKING:
    import torch

HASH_CACHE = Path(os.environ.get("GRAFTLM_CACHE", Path.home() / ".cache" / "graftlm")) / "sha256.json"


class Checkpoint:
    """A read-only view of one model's weights, by HF parameter name."""

    def __init__(self, ref: ModelRef, infos: dict[str, TensorInfo] | None,
                 tensors: dict[str, torch.Tensor] | None, loaded: LoadedModel | None = None) -> None:
        self.ref = ref
        self.infos = infos  # set for safetensors folders
        self._tensors = tensors  # set for checkpoints loaded into memory (GGUF, pickle)
        self.loaded = loaded  # the model those tensors belong to

    @classmethod
    def open(cls, ref: str | os.PathLike[str] | ModelRef, *, allow_pickle: bool = False,
             trust_remote_code: bool = False) -> Checkpoint:
        mref = resolve(ref)
        refuse_quantized(mref)  # before its headers: an FP8 tensor would be "an unsupported dtype" otherwise
        files = weight_files(mref)
        if files:
            return cls(mref, read_headers(mref.text, files), None)
        from analysis.io.models import load

        loaded = load(mref, dtype="auto", allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        state = {name: p.detach() for name, p in loaded.parameters().items()}
        return cls(mref, None, state, loaded)

    @property
    def streamable(self) -> bool:
        """True when tensors can be read and written file by file (a safetensors folder)."""
        return self.infos is not None

    def names(self) -> list[str]:
        return list(self.infos) if self.infos is not None else list(self._tensors or {})

    def __contains__(self, name: str) -> bool:
        return name in (self.infos if self.infos is not None else self._tensors or {})

    def shape(self, name: str) -> tuple[int, ...]:
        if self.infos is not None:
            return self.infos[name].shape
        return tuple(self._tensors[name].shape)  # type: ignore[index]

    def dtype(self, name: str) -> torch.dtype:
        """The tensor's storage dtype, as a torch dtype (imports torch)."""
        if self.infos is not None:
            return torch_dtype(self.infos[name].dtype)
        return self._tensors[name].dtype  # type: ignore[index]

    def st_dtype(self, name: str) -> str | None:
        """The tensor's storage dtype in safetensors spelling ("BF16", ...), without importing torch."""
        if self.infos is not None:
            return self.infos[name].dtype
        return st_dtype(self._tensors[name].dtype)  # type: ignore[index]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: self.shape(n) for n in self.names()}

    def dtypes(self) -> dict[str, torch.dtype]:
        return {n: self.dtype(n) for n in self.names()}

    def get(self, name: str) -> torch.Tensor:
        """One whole tensor, read from disk (safetensors) or from memory."""
        if self.infos is None:
            return self._tensors[name]  # type: ignore[index]
        from safetensors import safe_open

        info = self.infos[name]
        with safe_open(str(info.file), framework="pt") as fh:
            return fh.get_tensor(name)

    def iter_tensors(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Read several tensors, opening each file once."""
        if self.infos is None:
            for n in names:
                yield n, self._tensors[n]  # type: ignore[index]
            return
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.infos[n].file, []).append(n)
        for file, group in by_file.items():
            with safe_open(str(file), framework="pt") as fh:
                for n in group:
                    yield n, fh.get_tensor(n)

    def hashed_files(self) -> list[Path]:
        """The weight files whose sha256 identify this checkpoint (:meth:`sha256`)."""
        if self.infos is None:
            files = [self.ref.path / self.ref.gguf_file] if self.ref.gguf_file and self.ref.path else []
            files += [p for p in (self.ref.path.iterdir() if self.ref.path else []) if p.suffix in (".bin", ".pt")]
            return files
        return sorted({i.file for i in self.infos.values()})

    def sha256(self, verify: bool = False) -> dict[str, str]:
        """sha256 of each weight file (remembered, so a sweep hashes once; ``verify``: computed anew)."""
        files = self.hashed_files()
        if len(files) > 1:
            with ThreadPoolExecutor(max_workers=2) as pool:
                digests = pool.map(lambda f: file_sha256(f, verify=verify), files)
                return dict(zip((f.name for f in files), digests, strict=True))
        return {f.name: file_sha256(f, verify=verify) for f in files}


# The files besides the weights that change what a model computes or how it reads text.
IDENTITY_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt")


def fingerprint(ref: str | os.PathLike[str] | ModelRef) -> dict[str, str]:
    """File name → sha256 of a model's weight files and its config and tokenizer files, without loading
    it (hashes are remembered: a second call on unchanged files reads nothing). A hub id is looked up
    in the local hub cache; one that is not there is identified by its name only."""
    from analysis.io.refs import pickle_files

    mref = resolve(ref)
    folder = mref.path
    if folder is None:  # a hub id not in the cache, or no such id: the load reports it
        return {"ref": mref.text}
    if mref.kind == "gguf" and mref.gguf_file:
        files = [folder / mref.gguf_file]
    else:
        files = weight_files(mref) or pickle_files(mref)
        files += [folder / n for n in IDENTITY_FILES if (folder / n).is_file()]
    return {f.name: file_sha256(f) for f in files}


def _cache_key(file: Path) -> tuple[str, int]:
    """(path, size, inode and mtime), and the file's ctime: an entry is trusted only while the ctime it
    was computed at is still the file's. Writing a file in place and setting its mtime back changes its
    ctime (no program can set that), so such an edit is hashed again."""
    stat = file.stat()
    return f"{file.resolve()}:{stat.st_size}:{stat.st_ino}:{stat.st_mtime_ns}", stat.st_ctime_ns


def listed_sha256(file: Path) -> str | None:
    """A weight file's sha256 as the hub lists it (its LFS object id), known without reading the file,
    or None. huggingface_hub keeps it in two places: a hub cache stores each LFS file as ``blobs/SHA256``
    and links the snapshot's file name to it; ``hf download --local-dir DIR`` records it (the file's
    etag) in ``DIR/.cache/huggingface/download/NAME.metadata``, trusted while the file is not newer than
    the record (huggingface_hub's own rule, 1 s of slack). ``verify`` checks the bytes against it."""
    if file.is_symlink() and file.parent.parent.name == "snapshots":
        blob = file.resolve()
        if blob.parent.name == "blobs" and blob.parent.parent.name.startswith("models--") and \
                SHA256_NAME.fullmatch(blob.name):
            return blob.name
        return None
    record = file.parent / ".cache" / "huggingface" / "download" / f"{file.name}.metadata"
    try:
        _, etag, timestamp = record.read_text().splitlines()[:3]
        fresh = file.stat().st_mtime - 1 <= float(timestamp)
    except (OSError, ValueError):  # no record, or not huggingface_hub's three lines
        return None
    return etag.strip() if fresh and SHA256_NAME.fullmatch(etag.strip()) else None


SHA256_NAME = re.compile(r"[0-9a-f]{64}")


def cached_sha256(file: Path) -> str | None:
    """The sha256 of a file known without reading it — as the hub lists it (:func:`listed_sha256`), or
    remembered — or None when it must be computed."""
    listed = listed_sha256(file)
    if listed:
        return listed
    key, ctime = _cache_key(file)
    with _CACHE_LOCK:
        entry = _read_hash_cache().get(key)
    if isinstance(entry, dict) and entry.get("ctime_ns") == ctime and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    return None  # unknown, changed since, or written by an older graftlm (path and mtime only)


def file_sha256(file: Path, verify: bool = False) -> str:
    """sha256 of a file, remembered by path, size, inode, mtime and ctime (hashing gigabytes takes
    seconds); ``verify`` ignores what was remembered."""
    cached = None if verify else cached_sha256(file)
    if cached:
        return cached
    key, ctime = _cache_key(file)
    h = hashlib.sha256()
    for _, data in mapped_chunks(file):
        h.update(data)  # releases the GIL: files hash in parallel
    digest = h.hexdigest()
    check_listed(file, digest)
    remember_sha256(file, digest, (key, ctime))
    return digest


HASH_CHUNK = 8 << 20


def mapped_chunks(file: Path, chunk: int = HASH_CHUNK) -> Iterator[tuple[int, memoryview]]:
    """A file's bytes as (offset, bytes) chunks of one read-only memory map: hashing (and writing) from the
    page cache itself, where ``read()`` first copies every byte into a buffer — a third of the CPU time of
    hashing a model on two cores. A chunk stays mapped until two more have been handed out (a caller may
    still be writing the one before), then is unmapped: the process's memory stays flat, the page cache
    keeps the bytes."""
    with open(file, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:  # an empty file cannot be mapped
            return
        data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        view = memoryview(data)
        try:
            if hasattr(mmap, "MADV_SEQUENTIAL"):
                data.madvise(mmap.MADV_SEQUENTIAL)  # read ahead
            for pos in range(0, size, chunk):
                yield pos, view[pos: pos + chunk]
                if pos >= 2 * chunk and hasattr(mmap, "MADV_DONTNEED") and chunk % mmap.PAGESIZE == 0:
                    data.madvise(mmap.MADV_DONTNEED, pos - 2 * chunk, chunk)
        finally:
            view.release()
            with contextlib.suppress(BufferError):  # a chunk still held (by a failure's traceback): unmapped when it goes
                data.close()


def check_listed(file: Path, digest: str) -> None:
    """A downloaded file whose bytes do not hash to the sha256 the hub lists for it (its blob's name, its
    download record) was damaged or changed after the download."""
    listed = listed_sha256(file)
    if listed and listed != digest:
        raise GraftError(f"{file} is damaged: its sha256 {digest[:12]}… is not the {listed[:12]}… the hub lists for "
                         f"it", "download it again (hf download ID --force-download, with --local-dir for a folder)")


def remember_sha256(file: Path, digest: str, identity: tuple[str, int] | None = None) -> None:
    """Remember a file's sha256 computed elsewhere (while it was copied), under the file's identity as it
    was when reading began (``identity``: a change during the read then leaves it unmatched)."""
    key, ctime = identity or _cache_key(file)
    with _CACHE_LOCK:
        cache = _read_hash_cache()
        cache[key] = {"sha256": digest, "ctime_ns": ctime}
        _write_hash_cache(cache)


def file_identity(file: Path) -> tuple[str, int]:
    """What the hash cache knows a file by (path, size, inode, mtime; and ctime)."""
    return _cache_key(file)


_CACHE_LOCK = threading.Lock()


def _read_hash_cache() -> dict[str, object]:
    try:
        cache = json.loads(HASH_CACHE.read_text()) if HASH_CACHE.is_file() else {}
    except (OSError, ValueError):  # unreadable or not JSON (UnicodeDecodeError is a ValueError)
        return {}
    return cache if isinstance(cache, dict) else {}


def _write_hash_cache(cache: dict[str, object]) -> None:
    from analysis.io.files import write_file

    try:
        write_file(HASH_CACHE, json.dumps(cache))
    except OSError:
        pass  # a read-only or full home only costs a rehash next time
