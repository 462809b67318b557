"""The safetensors format without torch: headers parsed and checked against their files, raw elements read
with ``pread``, float formats converted with numpy bit for bit as torch does (:func:`to_float32`,
:func:`from_float32`). The file-to-file transplant streams tensors through these."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from analysis.errors import GraftError

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


def read_headers(label: str, files: list[Path]) -> dict[str, TensorInfo]:
    """Every tensor of a model's weight files by name, each header checked against its file (a missing or
    truncated file is one line naming it)."""
    infos: dict[str, TensorInfo] = {}
    for file in files:
        if not file.is_file():
            raise GraftError(f"{label}: weight file {file.name} is missing", "re-download the model")
        infos.update(read_header(file)[0])
    return infos
