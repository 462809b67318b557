"""Read a checkpoint's tensors lazily: names, shapes, dtypes, slices and file hashes, never a whole model.

Safetensors folders are read straight from their files (headers parsed, tensors read on demand).
A GGUF file or a pickle checkpoint has no such layout: it is loaded once through :mod:`analysis.models`
and its state dict is served from memory instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from analysis.errors import GraftError
from analysis.models import LoadedModel, ModelRef, resolve, weight_files

# safetensors dtype names → torch dtypes (the format's own spelling).
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
HASH_CACHE = Path(os.environ.get("GRAFTLM_CACHE", Path.home() / ".cache" / "graftlm")) / "sha256.json"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the tensor's data in ``file``
    nbytes: int


def read_header(file: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse a safetensors header: tensor locations and the file's metadata."""
    try:
        with open(file, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GraftError(f"{file} is not a readable safetensors file ({err})", "re-save the checkpoint") from err
    metadata = header.pop("__metadata__", None) or {}
    infos = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        dtype = ST_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise GraftError(f"{file}: tensor {name} has unsupported dtype {entry['dtype']}",
                             "convert the checkpoint to float weights")
        infos[name] = TensorInfo(name, file, dtype, tuple(entry["shape"]), 8 + length + begin, end - begin)
    return infos, metadata


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
        files = weight_files(mref)
        if files:
            infos: dict[str, TensorInfo] = {}
            for file in files:
                if not file.is_file():
                    raise GraftError(f"{mref.text}: weight file {file.name} is missing", "re-download the model")
                infos.update(read_header(file)[0])
            return cls(mref, infos, None)
        from analysis.models import load

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
        if self.infos is not None:
            return self.infos[name].dtype
        return self._tensors[name].dtype  # type: ignore[index]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: self.shape(n) for n in self.names()}

    def dtypes(self) -> dict[str, torch.dtype]:
        return {n: self.dtype(n) for n in self.names()}

    def get(self, name: str) -> torch.Tensor:
        """One whole tensor, read from disk (safetensors) or from memory."""
        if self.infos is None:
            return self._tensors[name]  # type: ignore[index]
        info = self.infos[name]
        with safe_open(str(info.file), framework="pt") as fh:
            return fh.get_tensor(name)

    def iter_tensors(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Read several tensors, opening each file once."""
        if self.infos is None:
            for n in names:
                yield n, self._tensors[n]  # type: ignore[index]
            return
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.infos[n].file, []).append(n)
        for file, group in by_file.items():
            with safe_open(str(file), framework="pt") as fh:
                for n in group:
                    yield n, fh.get_tensor(n)

    def sha256(self) -> dict[str, str]:
        """sha256 of each weight file (cached by path, size and mtime, so a sweep hashes once)."""
        if self.infos is None:
            files = [self.ref.path / self.ref.gguf_file] if self.ref.gguf_file and self.ref.path else []
            files += [p for p in (self.ref.path.iterdir() if self.ref.path else []) if p.suffix in (".bin", ".pt")]
        else:
            files = sorted({i.file for i in self.infos.values()})
        if len(files) > 1:
            with ThreadPoolExecutor(max_workers=2) as pool:
                return dict(zip((f.name for f in files), pool.map(file_sha256, files), strict=True))
        return {f.name: file_sha256(f) for f in files}


def file_sha256(file: Path) -> str:
    """sha256 of a file, remembered by path, size, inode and mtime (hashing gigabytes takes seconds)."""
    stat = file.stat()
    key = f"{file.resolve()}:{stat.st_size}:{stat.st_ino}:{stat.st_mtime_ns}"
    with _CACHE_LOCK:
        cached = _read_hash_cache().get(key)
    if cached:
        return cached
    with open(file, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()  # releases the GIL: files hash in parallel
    with _CACHE_LOCK:
        cache = _read_hash_cache()
        cache[key] = digest
        _write_hash_cache(cache)
    return digest


_CACHE_LOCK = threading.Lock()


def _read_hash_cache() -> dict[str, str]:
    try:
        return json.loads(HASH_CACHE.read_text()) if HASH_CACHE.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _write_hash_cache(cache: dict[str, str]) -> None:
    try:
        HASH_CACHE.parent.mkdir(parents=True, exist_ok=True)
        tmp = HASH_CACHE.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        tmp.replace(HASH_CACHE)
    except OSError:
        pass  # a read-only home only costs a rehash next time
