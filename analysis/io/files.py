"""The user's files: read as text with one-line errors; written whole or not at all.

Every output graftlm writes — a transplanted model or a patch, ``eval --out``, ``localize --out``, the
files of a sweep's run folder, figures and reports — is built beside its final place under a name
this module recognises, ``.NAME.graftlm-PID-XXXX``, and renamed into place only when complete
(:func:`staged` for a folder, :func:`staged_file` and :func:`write_file` for a file). A killed run leaves
at most such a hidden entry; the next run that writes in the same folder removes those whose process
is dead. ``--force`` swaps the new folder with the old one in one atomic exchange where the system
offers it (Linux ``renameat2``); elsewhere a kill between its two renames leaves the old folder aside,
and the next run puts it back.

:func:`check_out` is the check every verb runs on its ``--out`` before any work: not a source, not
inside one, not a file, not an existing folder unless replacing it was asked for, writable.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from analysis.errors import GraftError

TAG = ".graftlm-"
LEFTOVER = re.compile(r"^\.(?P<name>.+)\.graftlm-(?P<pid>\d+)-(?P<old>old-)?[0-9a-f]+$")
KILL_AT = "GRAFTLM_TEST_KILL_AT"  # tests: "N" sends SIGKILL (or "N:TERM", SIGTERM) to itself at moment N


# --- reading --------------------------------------------------------------------------------------

def read_text(path: str | os.PathLike[str], what: str = "file") -> str:
    """A text file as UTF-8, or one line naming the file and what is wrong with it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise GraftError(f"{path} is a folder, not a {what}", f"pass the {what} itself") from None
    except FileNotFoundError:
        raise GraftError(f"no such {what}: {path}", "check the path") from None
    return decode(data, path)


def decode(data: bytes, path: str | os.PathLike[str]) -> str:
    """``data`` read from ``path`` as UTF-8, or one line naming the file, the line and the byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise GraftError(f"{path} is not UTF-8 text (byte 0x{data[err.start]:02x} on line {line})",
                         "save it as UTF-8") from None


def parse_yaml(text: str, source: str | os.PathLike[str], fix: str) -> object:
    """YAML text → data, or one whole line: the file, the line and column, and what the parser found."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise GraftError(f"{source}{where}: not valid YAML ({problem})", fix) from None


# --- where an output may go -----------------------------------------------------------------------

def _real(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def check_out(out: str | os.PathLike[str], *, force: bool = False, sources: Iterable[str | os.PathLike[str]] = (),
              replace: bool = True, flag: str = "--out") -> Path:
    """Refuse an ``out`` that is, or lies inside, a source (or holds one it would replace), that is a
    file, that exists when ``force`` is off (``replace=False``: an existing folder is written into,
    as a sweep's run folder is), or that cannot be written. Returns ``out`` with ``~`` expanded."""
    out = Path(out).expanduser()
    real = _real(out)
    exists = out.exists() or out.is_symlink()
    for source in sources:
        src = _real(source)
        if real == src:
            raise GraftError(f"{flag} {out} is a source of this command ({source})",
                             f"choose an {flag} outside the sources; they are never modified")
        if src in real.parents:
            raise GraftError(f"{flag} {out} lies inside a source of this command ({source})",
                             f"choose an {flag} outside the sources; they are never modified")
        if real in src.parents and exists and replace:
            raise GraftError(f"{flag} {out} holds a source of this command ({source}); replacing it would delete it",
                             f"choose another {flag}")
    if exists:
        if not out.is_dir():
            raise GraftError(f"{flag} {out} is a file, not a folder", f"choose a folder path for {flag}")
        if replace and not force:
            raise GraftError(f"{out} already exists", f"choose another {flag}, or pass --force to replace it")
        if not replace:
            if not os.access(out, os.W_OK | os.X_OK):
                raise GraftError(f"{flag} {out} is not writable", f"choose a writable {flag}")
            return out
    writable_parent(out, flag)
    return out


def writable_parent(path: Path, flag: str = "--out") -> None:
    """The folder ``path`` would be created in exists as a folder (or can be made) and is writable."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise GraftError(f"{flag} {path}: {parent} is a file, not a folder", f"choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise GraftError(f"{flag} {path}: {parent} is not writable", f"choose a writable {flag}")


# --- leftovers of killed runs --------------------------------------------------------------------

def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def clean(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove what killed runs left in ``folder`` (``.NAME.graftlm-PID-…`` of processes no longer
    running); an old output set aside by ``--force`` whose replacement never arrived is put back."""
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = LEFTOVER.match(entry.name)
        if m is None or _alive(int(m.group("pid"))):
            continue
        path = Path(entry.path)
        if m.group("old"):
            kept, home = path / m.group("name"), folder / m.group("name")
            if kept.exists() and not (home.exists() or home.is_symlink()):
                with contextlib.suppress(OSError):
                    os.replace(kept, home)
        with contextlib.suppress(FileNotFoundError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink()
        removed.append(path)
    return removed


def _tmp_name(final: Path, old: bool = False) -> Path:
    return final.parent / f".{final.name}{TAG}{os.getpid()}-{'old-' if old else ''}{secrets.token_hex(4)}"


# --- writing ------------------------------------------------------------------------------------

_moments = 0
_moments_lock = threading.Lock()


def moment(what: str = "") -> None:
    """A point at which a test may kill this process (``GRAFTLM_TEST_KILL_AT``); nothing otherwise."""
    at = os.environ.get(KILL_AT)
    if not at:
        return
    global _moments
    with _moments_lock:
        _moments += 1
        now = _moments
    number, _, how = at.partition(":")
    if now == int(number):
        os.kill(os.getpid(), signal.SIGTERM if how == "TERM" else signal.SIGKILL)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _publish(tmp: Path, out: Path) -> None:
    """Move the complete ``tmp`` to ``out``, replacing an existing ``out`` in one step where possible."""
    if not (out.exists() or out.is_symlink()):
        os.replace(tmp, out)
        return
    if out.is_dir() and not out.is_symlink() and _exchange(tmp, out):
        moment("exchanged")
        shutil.rmtree(tmp, ignore_errors=True)  # the old output, now at tmp's name
        return
    aside = _tmp_name(out, old=True)
    aside.mkdir()
    os.replace(out, aside / out.name)
    moment("set aside")
    os.replace(tmp, out)
    shutil.rmtree(aside, ignore_errors=True)


def _folder_mode(path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)  # mkdtemp/mkstemp make it private; the output is an ordinary one


@contextlib.contextmanager
def staged(out: str | os.PathLike[str], *, force: bool = False, sources: Iterable[str | os.PathLike[str]] = (),
           flag: str = "--out") -> Iterator[Path]:
    """A fresh folder beside ``out``, renamed to ``out`` when the block completes; removed otherwise.

    ``out`` is checked first (:func:`check_out`); an existing ``out`` is replaced only with ``force``."""
    out = check_out(out, force=force, sources=sources, flag=flag)
    tmp = _tmp_name(out)
    made: list[Path] = []
    done = False
    try:
        try:
            made = _make_parents(out.parent)
            clean(out.parent)
            tmp.mkdir()
        except OSError as err:  # named by the output asked for, not the staging folder's name
            raise OSError(err.errno, err.strerror, str(out)) from None
        moment("staging folder made")
        yield tmp
        moment("staged output complete")
        _folder_mode(tmp)
        _publish(tmp, out)
        done = True
        moment("published")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if not done:
            _remove_empty(made)


@contextlib.contextmanager
def staged_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path`` to write the whole file to; renamed to ``path`` on success.

    The temporary name has no suffix of its own: a writer that infers a format from it needs telling."""
    path = Path(path)
    made = _make_parents(path.parent)
    tmp = _tmp_name(path)
    done = False
    try:
        clean(path.parent)
        yield tmp
        if tmp.exists():
            os.replace(tmp, path)
        done = True
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if not done:
            _remove_empty(made)


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; the ones this call made, outermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return list(reversed(missing))


def _remove_empty(made: list[Path]) -> None:
    """Undo :func:`_make_parents` where the folders stayed empty (a failed write leaves no trace)."""
    for path in reversed(made):
        with contextlib.suppress(OSError):
            path.rmdir()


def write_file(path: str | os.PathLike[str], data: str | bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` whole or not at all (text as UTF-8)."""
    path = Path(path)
    with staged_file(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
    return path


def write_with(path: str | os.PathLike[str], writer: Callable[[Path], object]) -> Path:
    """Let ``writer(tmp)`` write the whole file at a temporary path; then rename it to ``path``."""
    path = Path(path)
    with staged_file(path) as tmp:
        writer(tmp)
    return path
