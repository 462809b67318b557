"""Read a checkpoint's tensors lazily: names, shapes, dtypes, slices and file hashes, never a whole model.

Safetensors folders are read straight from their files (headers parsed, tensors read on demand).
A GGUF file or a pickle checkpoint has no such layout: it is loaded once through :mod:`analysis.io.models`
and its state dict is served from memory instead.

Nothing here imports torch until a torch tensor is asked for: the file-to-file transplant reads raw
elements with :func:`read_raw` and converts float formats with numpy (:func:`to_float32`,
:func:`from_float32`), bit for bit as torch does.
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
from typing import TYPE_CHECKING

import numpy as np

from analysis.errors import GraftError
from analysis.io.models import LoadedModel, ModelRef, resolve, weight_files

if TYPE_CHECKING:
    import torch

# safetensors dtype names (the format's own spelling) → torch dtype names. Strings, so that reading a
# header does not import torch; :func:`torch_dtype` turns them into torch dtypes where torch is in use.
ST_DTYPES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
# Raw element storage: unsigned integers of each dtype's width, so that bytes move bit for bit.
RAW_DTYPES: dict[str, type[np.unsignedinteger]] = {
    "F64": np.uint64, "F32": np.uint32, "F16": np.uint16, "BF16": np.uint16, "I64": np.uint64, "I32": np.uint32,
    "I16": np.uint16, "I8": np.uint8, "U8": np.uint8, "BOOL": np.uint8,
}
# The float formats numpy converts to and from float32 exactly as torch does.
FLOAT_DTYPES = ("F32", "F16", "BF16")
HASH_CACHE = Path(os.environ.get("GRAFTLM_CACHE", Path.home() / ".cache" / "graftlm")) / "sha256.json"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    name: str
    file: Path
    dtype: str  # safetensors spelling: "BF16", "F32", ...
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the tensor's data in ``file``
    nbytes: int

    @property
    def itemsize(self) -> int:
        return np.dtype(RAW_DTYPES[self.dtype]).itemsize

    @property
    def numel(self) -> int:
        return self.nbytes // self.itemsize

    def read(self, start: int = 0, count: int | None = None, out: np.ndarray | None = None,
             fd: int | None = None) -> np.ndarray:
        """Flat elements ``start:start + count`` as raw unsigned integers, read straight from the file.

        ``out`` (contiguous, of :data:`RAW_DTYPES`) avoids an allocation; ``fd``, the file already open.
        """
        count = self.numel - start if count is None else count
        out = np.empty(count, RAW_DTYPES[self.dtype]) if out is None else out[:count]
        own = fd is None
        fd = os.open(self.file, os.O_RDONLY) if fd is None else fd
        try:
            pread_into(fd, out, self.offset + start * self.itemsize)
        finally:
            if own:
                os.close(fd)
        return out


def pread_into(fd: int, out: np.ndarray, offset: int) -> None:
    """Fill the contiguous array ``out`` with the file's bytes from ``offset`` on (no intermediate copy)."""
    view = memoryview(out).cast("B")
    done = 0
    while done < len(view):
        if hasattr(os, "preadv"):  # straight into the array
            n = os.preadv(fd, [view[done:]], offset + done)
        else:  # no preadv on this platform: one copy more
            chunk = os.pread(fd, len(view) - done, offset + done)
            view[done:done + len(chunk)] = chunk
            n = len(chunk)
        if n == 0:
            raise GraftError(f"weight file ended early (fd {fd}, offset {offset + done})", "re-download the model")
        done += n


def to_float32(raw: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """Raw elements of F32, F16 or BF16 → float32 values (exact: each such value is a float32)."""
    if dtype == "F32":
        if out is None:
            return raw.view(np.float32)
        np.copyto(out, raw.view(np.float32))
        return out
    out = np.empty(raw.shape, np.float32) if out is None else out
    if dtype == "BF16":  # a bfloat16 is the upper half of the float32 with the same value
        np.left_shift(raw, 16, out=out.view(np.uint32), dtype=np.uint32)
    elif dtype == "F16":
        np.copyto(out, raw.view(np.float16))
    else:
        raise ValueError(f"not a float format: {dtype}")
    return out


def from_float32(x: np.ndarray, dtype: str, out: np.ndarray | None = None, *, scratch: np.ndarray | None = None,
                 finite: bool = False) -> np.ndarray:
    """float32 values → raw elements of F32, F16 or BF16, rounded as torch's ``.to(dtype)`` rounds.

    F16 and BF16 round to nearest, ties to even; NaN stays NaN (BF16: 0x7FC0, torch's scalar answer).
    ``finite=True`` skips the NaN pass when the caller already knows there is none; ``scratch`` is a
    uint32 buffer of ``x``'s size for BF16.
    """
    out = np.empty(x.shape, RAW_DTYPES[dtype]) if out is None else out
    if dtype == "F32":
        np.copyto(out, x.view(np.uint32))
    elif dtype == "F16":
        with np.errstate(over="ignore"):  # beyond float16's range is Inf, as in torch
            np.copyto(out.view(np.float16), x, casting="same_kind")
    elif dtype == "BF16":
        bits = x.view(np.uint32)
        tmp = np.empty(x.shape, np.uint32) if scratch is None else scratch
        # round to nearest even on the 16 bits dropped: add 0x7FFF plus the lowest bit kept, truncate
        np.right_shift(bits, 16, out=tmp)
        np.bitwise_and(tmp, 1, out=tmp)
        np.add(tmp, 0x7FFF, out=tmp)
        np.add(tmp, bits, out=tmp)
        np.right_shift(tmp, 16, out=tmp)
        np.copyto(out, tmp, casting="unsafe")
        if not finite:
            nan = np.isnan(x)
            if nan.any():  # the bias would carry a NaN's payload into Inf or zero
                out[nan] = 0x7FC0
    else:
        raise ValueError(f"not a float format: {dtype}")
    return out


def torch_dtype(name: str) -> torch.dtype:
    """A safetensors dtype name as a torch dtype (imports torch)."""
    import torch

    return getattr(torch, ST_DTYPES[name])


def st_dtype(dtype: torch.dtype) -> str | None:
    """A torch dtype's safetensors name (None for dtypes the format has no name for here)."""
    name = str(dtype).removeprefix("torch.")
    return next((k for k, v in ST_DTYPES.items() if v == name), None)


def read_header(file: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse a safetensors header: tensor locations and the file's metadata.

    Everything is checked against the file before it is trusted: the header's length, each entry's
    dtype, shape and offsets, and that every tensor's bytes lie inside the file (a truncated download
    is refused here, not written out as a model that does not load)."""
    def bad(why: str) -> GraftError:
        return GraftError(f"{file} is not a readable safetensors file ({why})", "re-download or re-save the checkpoint")

    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise bad(f"{size} bytes, less than a header")
            (length,) = struct.unpack("<Q", head)
            if length > size - 8:
                raise bad(f"its header claims {length} bytes but the file has {size}")
            header = json.loads(fh.read(length))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise bad(f"its header is not JSON: {err}") from err
    except OSError as err:
        raise bad(err.strerror or str(err)) from err
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise bad("its __metadata__ is not a JSON object")
    infos = {}
    data_start = 8 + length
    for name, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise bad(f"tensor {name} lacks dtype, shape or data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in ST_DTYPES:
            raise GraftError(f"{file}: tensor {name} has unsupported dtype {dtype}",
                             "convert the checkpoint to float weights")
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
            raise bad(f"tensor {name} has a malformed shape or data_offsets")
        begin, end = offsets
        if end - begin != int(np.prod(shape, dtype=np.int64)) * np.dtype(RAW_DTYPES[dtype]).itemsize:
            raise bad(f"tensor {name}: {end - begin} bytes do not hold {dtype} {shape}")
        if data_start + end > size:
            raise bad(f"truncated: tensor {name} ends at byte {data_start + end}, the file has {size}")
        infos[name] = TensorInfo(name, file, dtype, tuple(shape), data_start + begin, end - begin)
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
    from analysis.io.models import pickle_files

    mref = resolve(ref)
    folder = mref.path
    if folder is None:
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(mref.text, local_files_only=True))
        except Exception:  # noqa: BLE001 (not in the cache, or no such id: the load reports it)
            return {"ref": mref.text}
        mref = ModelRef(mref.text, "folder", folder)
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


def cached_sha256(file: Path) -> str | None:
    """The remembered sha256 of a file, or None when it must be computed."""
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
    with open(file, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()  # releases the GIL: files hash in parallel
    with _CACHE_LOCK:
        cache = _read_hash_cache()
        cache[key] = {"sha256": digest, "ctime_ns": ctime}
        _write_hash_cache(cache)
    return digest


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
