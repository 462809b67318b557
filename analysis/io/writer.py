"""The byte engine that writes weights: jobs on every core (numpy, hashing and the kernel's copy release the
GIL), source hashes computed beside them, kernel copies of the byte ranges nothing changes
(``copy_file_range``), and each changed tensor written at its offset by the writers an :class:`Out` carries.
It knows nothing about blending: :mod:`analysis.transplant` makes the writers, this module runs them."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from analysis.errors import GraftError
from analysis.io.checkpoint import (
    Checkpoint,
    cached_sha256,
    check_listed,
    file_identity,
    file_sha256,
    mapped_chunks,
    remember_sha256,
)
from analysis.io.files import moment
from analysis.io.refs import PICKLE_SUFFIXES
from analysis.io.safetensors import (
    TensorInfo,
)

if TYPE_CHECKING:
    import torch

WEIGHT_SUFFIXES = (".safetensors", ".gguf", *PICKLE_SUFFIXES)


# Jobs at once: the cores this process may use (numpy, hashlib and copy_file_range release the GIL).
WORKERS = max(2, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2))


class Jobs:
    """A thread pool whose first failure cancels what has not started; started jobs always finish.

    Jobs write into the staging folder: it may only be removed once none is running any more.
    """

    def __init__(self, workers: int = WORKERS) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers)
        self._futures: list[Future[Any]] = []

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future = self._pool.submit(fn, *args)
        self._futures.append(future)
        return future

    def wait(self, futures: Iterable[Future[Any]]) -> None:
        try:
            for future in futures:
                future.result()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for future in self._futures:
            future.cancel()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Jobs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Hashes:
    """The sources' sha256: remembered ones at once, the others computed as jobs (first in the queue) —
    except the weight files of ``copied``, whose bytes :func:`write_folder` reads anyway: it hashes them
    as they stream to the output (one read of each file, not two)."""

    def __init__(self, jobs: Jobs, *sources: Checkpoint, verify: bool = False, copied: Checkpoint | None = None) -> None:
        self._parts: list[list[tuple[str, str | Future[str]]]] = []
        self._verify = verify
        self._streamed: dict[Path, Future[str]] = {}  # weight files write_folder hashes while copying
        for ck in sources:
            part: list[tuple[str, str | Future[str]]] = []
            for f in ck.hashed_files():
                known = None if verify else cached_sha256(f)
                if known:
                    part.append((f.name, known))
                elif ck is copied and ck.infos is not None and f.suffix == ".safetensors":
                    self._streamed[f] = Future()
                    part.append((f.name, self._streamed[f]))
                else:
                    part.append((f.name, jobs.submit(file_sha256, f, verify)))
            self._parts.append(part)

    def streamed(self, file: Path) -> Future[str] | None:
        """The pending hash of ``file`` for the job that copies it to compute (taken once)."""
        return self._streamed.pop(file, None)

    def placeholders(self) -> list[dict[str, str]]:
        """Stand-ins as long as any real answer's YAML: an all-digit hex digest gets quoted."""
        return [dict.fromkeys((name for name, _ in part), "0" * 64) for part in self._parts]

    def result(self) -> list[dict[str, str]]:
        for file, future in list(self._streamed.items()):  # no copy read them: hash them on their own
            future.set_result(file_sha256(file, self._verify))
            del self._streamed[file]
        return [{name: h if isinstance(h, str) else h.result() for name, h in part} for part in self._parts]


def pwrite_all(fd: int, data: np.ndarray | bytes, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


# copy_file_range refuses some pairs of files (across file systems on older kernels, some FUSE/NFS mounts)
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM}


def copy_range(src: Path, dst_fd: int, src_offset: int, dst_offset: int, nbytes: int) -> None:
    """Copy bytes between files inside the kernel (falling back to read/write where it cannot)."""
    src_fd = os.open(src, os.O_RDONLY)
    kernel = hasattr(os, "copy_file_range")  # Linux only
    try:
        while nbytes > 0:
            n = -1
            if kernel:
                try:
                    n = os.copy_file_range(src_fd, dst_fd, nbytes, src_offset, dst_offset)
                except OSError as err:
                    if err.errno not in _NO_KERNEL_COPY:
                        raise
                    kernel = False
            if n < 0:  # through memory, 8 MB at a time
                buf = os.pread(src_fd, min(nbytes, 8 << 20), src_offset)
                pwrite_all(dst_fd, buf, dst_offset)
                n = len(buf)
            if n == 0:
                raise GraftError(f"{src} ended early", "re-download the model")
            src_offset, dst_offset, nbytes = src_offset + n, dst_offset + n, nbytes - n
    finally:
        os.close(src_fd)


def write_torch(tensor: Callable[[], torch.Tensor], fd: int, base: int) -> None:
    import torch

    pwrite_all(fd, tensor().contiguous().view(torch.uint8).numpy(), base)


@dataclass(frozen=True)
class Out:
    """A changed tensor to write: its safetensors dtype, shape and size, and the jobs that write its bytes.

    Each writer is called as ``writer(fd, offset)`` with the tensor's offset in the open file, and
    writes its own part; writers of one tensor may run at the same time.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    writers: tuple[Callable[[int, int], None], ...]


def copy_small_files(src: Path, tmp: Path) -> None:
    """The target folder's files besides the weights (config, tokenizer, index, generation config)."""
    for item in sorted(src.iterdir()):
        if item.is_dir() or item.name == "README.md" or item.name.startswith(".") or item.suffix in WEIGHT_SUFFIXES:
            continue
        shutil.copyfile(item, tmp / item.name)


STREAM_CHUNK = 8 << 20  # bytes hashed, then written, at a time when a copy also hashes


def copy_and_hash(file: Path, fd: int, gaps: list[tuple[int, int]], digest: Future[str]) -> None:
    """Read ``file`` once, front to back: every byte into its sha256, the bytes inside ``gaps`` written to
    ``fd`` at the same offsets; the digest is remembered and set on ``digest`` (its exception too).

    The file is mapped, not read: the hash reads the page cache in place and the writes copy from it,
    one copy of each byte in all. While this thread hashes a chunk, a writer thread writes the previous
    chunk's ranges (hashlib and pwrite release the GIL), so the copy costs no more than the hash it
    rides on; a chunk is written after it is hashed, from the same mapping."""
    def write(view: memoryview, pos: int) -> None:
        end = pos + len(view)
        for a, b in gaps:
            if a < end and b > pos:
                lo, hi = max(a, pos), min(b, end)
                pwrite_all(fd, view[lo - pos: hi - pos], lo)

    try:
        identity = file_identity(file)
        h = hashlib.sha256()
        with ThreadPoolExecutor(max_workers=1) as writer:
            pending: Future[None] | None = None
            for pos, chunk in mapped_chunks(file, STREAM_CHUNK):
                h.update(chunk)
                if pending is not None:
                    pending.result()  # one chunk written while the next is hashed
                pending = writer.submit(write, chunk, pos)
                del chunk
            if pending is not None:
                pending.result()
        moment(f"copied and hashed {file.name}")
        if file_identity(file) != identity:
            raise GraftError(f"{file} changed while it was read", "run the command again once nothing writes it")
        check_listed(file, h.hexdigest())
        remember_sha256(file, h.hexdigest(), identity)
        digest.set_result(h.hexdigest())
    except BaseException as err:
        digest.set_exception(err)
        raise


def copy_gaps(file: Path, fd: int, gaps: list[tuple[int, int]]) -> None:
    for start, end in gaps:
        copy_range(file, fd, start, start, end - start)
    moment(f"copied {file.name}")


def write_folder(tmp: Path, tck: Checkpoint, outs: list[Out], jobs: Jobs, hashes: Hashes | None = None) -> None:
    """The target's files with the changed tensors' bytes replaced, written by parallel jobs.

    The kernel copies every byte range no changed tensor covers, one job per file (two copies into
    one file contend for its lock and run no faster than one; into two files they run twice as
    fast); the writers fill the rest, as many small jobs that keep every core busy to the end. A file
    whose sha256 ``hashes`` still needs is read once instead, hashed as its ranges are written.
    """
    assert tck.infos is not None and tck.ref.path is not None
    copy_small_files(tck.ref.path, tmp)
    moment("small files copied")
    changed = {o.name: o for o in outs}
    by_file: dict[Path, list[TensorInfo]] = {}
    for info in tck.infos.values():
        by_file.setdefault(info.file, [])
        if info.name in changed:
            out = changed[info.name]
            if (out.dtype, out.shape, out.nbytes) != (info.dtype, info.shape, info.nbytes):
                raise GraftError(f"tensor {info.name} does not fit the target's storage", "apply it to its own target")
            by_file[info.file].append(info)
    fds: list[int] = []
    try:
        copies, writes = [], []
        for file, infos in sorted(by_file.items(), key=lambda kv: -kv[0].stat().st_size):  # longest copy first
            fd = os.open(tmp / file.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            fds.append(fd)
            gaps, pos = [], 0
            for info in sorted(infos, key=lambda i: i.offset):
                gaps.append((pos, info.offset))
                writes += [(w, fd, info.offset) for w in changed[info.name].writers]
                pos = info.offset + info.nbytes
            gaps.append((pos, file.stat().st_size))
            ranges = [(a, b) for a, b in gaps if b > a]
            digest = hashes.streamed(file) if hashes is not None else None
            copies.append((copy_gaps, file, fd, ranges) if digest is None else (copy_and_hash, file, fd, ranges, digest))
        jobs.wait([jobs.submit(*job) for job in copies + writes])
    finally:
        for fd in fds:
            os.close(fd)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """One torch thread while copying and hashing: idle OpenMP workers spin and starve those otherwise."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def copy_tensor_bytes(info: TensorInfo, fd: int, base: int) -> None:
    copy_range(info.file, fd, info.offset, base, info.nbytes)


def save_materialized(tck: Checkpoint, changed: dict[str, torch.Tensor], folder: Path) -> None:
    """GGUF or pickle targets: apply to the model loaded once, and save as safetensors with the tokenizer."""
    loaded = tck.loaded
    assert loaded is not None
    with loaded.edited(changed):  # the one way a loaded model's weights change (and change back)
        loaded.model.save_pretrained(folder, safe_serialization=True)
    loaded.tokenizer.save_pretrained(folder)


def tensor_header(outs: list[Out], offsets: dict[str, tuple[int, int]], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata}
    for o in outs:
        header[o.name] = {"dtype": o.dtype, "shape": list(o.shape), "data_offsets": list(offsets[o.name])}
    return json.dumps(header, separators=(",", ":")).encode()


def write_tensor_file(path: Path, outs: list[Out], jobs: Jobs, draft: dict[str, str],
                      final: Callable[[], dict[str, str]]) -> None:
    """One safetensors file of ``outs``, each written at its offset by its writers, with header metadata
    known only at the end (``final()``, called once the tensors are written): room is kept for a header
    with the ``draft`` metadata, which must take at least as much room as the final one."""
    outs = sorted(outs, key=lambda o: o.name)
    offsets, pos = {}, 0
    for o in outs:
        offsets[o.name] = (pos, pos + o.nbytes)
        pos += o.nbytes
    room = len(tensor_header(outs, offsets, draft)) + 256
    room += -room % 8  # tensor data 8-byte aligned, as safetensors writes it
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        jobs.wait([jobs.submit(w, fd, 8 + room + offsets[o.name][0]) for o in outs for w in o.writers])
        header = tensor_header(outs, offsets, final())
        if len(header) > room:
            raise GraftError("the patch header outgrew its room", "this is a bug in graftlm: please report it")
        pwrite_all(fd, struct.pack("<Q", room) + header + b" " * (room - len(header)), 0)
    finally:
        os.close(fd)
