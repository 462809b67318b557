"""The one exception users see: a problem and its fix, on one line. What the operating system reports about
a user's files and disks is said the same way (:func:`problem_of`).

Everything below ``cli.py`` raises :class:`GraftError` for bad input; the CLI prints its message and
exits with code 2, without a traceback.
"""

from __future__ import annotations

import difflib
import errno
import os
from collections.abc import Iterable
from typing import Any


def one_line(text: str) -> str:
    """``text`` with its line breaks (and the blanks around them) folded into single spaces."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


class GraftError(Exception):
    """Bad input. ``str(err)`` is one line naming the problem and how to fix it."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = one_line(problem)
        self.fix = one_line(fix) if fix else None
        super().__init__(f"{self.problem} — {self.fix}" if self.fix else self.problem)


class Terminated(BaseException):
    """SIGTERM arrived (the CLI turns the signal into this, so that staged outputs are cleaned up)."""


def validation_problem(err: Any, model: Any = None) -> str:
    """The first problem of a pydantic ``ValidationError`` as ``where: what``. A misspelt key comes
    first, with the key of ``model`` (a pydantic model class) it resembles — not the 'Field required'
    its absence causes."""
    problems = err.errors()
    extra = [p for p in problems if p.get("type") == "extra_forbidden"]
    first = (extra or problems)[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first.get("type") == "extra_forbidden":
        close = difflib.get_close_matches(str(first["loc"][-1]), _keys_at(model, first["loc"][:-1]), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown key {where!r}{hint}"
    return f"{where}: {first['msg']}"


def _keys_at(model: Any, loc: Iterable[Any]) -> list[str]:
    """The field names of the (nested) pydantic model found at ``loc`` under ``model``."""
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


# What the operating system reports about a user's files and disks, and what to do about it.
OS_FIXES = {
    errno.ENOSPC: "free some space on that disk, or write to another one (nothing half-written was kept)",
    errno.EDQUOT: "free some space within your quota, or write elsewhere (nothing half-written was kept)",
    errno.EFBIG: "write to a file system that takes files this large",
    errno.EROFS: "choose a writable place (this file system is read-only)",
    errno.EACCES: "check the permissions of that path (an --out must be somewhere you may write)",
    errno.EPERM: "check the permissions of that path (an --out must be somewhere you may write)",
    errno.EISDIR: "a folder stands where a file is expected: check the paths",
    errno.ENOTDIR: "a file stands where a folder is expected: check the paths",
    errno.ENOENT: "check the path (a file or folder went missing while graftlm ran?)",
    errno.EEXIST: "choose another path",
    errno.ENOTEMPTY: "choose another path",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.ELOOP: "check the symbolic links in the path",
    errno.EIO: "the disk reported an error: check it, or write elsewhere",
    errno.EMFILE: "raise the limit of open files (ulimit -n)",
    errno.ENFILE: "close other programs' files, or raise the system's limit",
    errno.EXDEV: "write --out on the same file system as its parent folder",
    errno.ENOLCK: "this file system cannot lock files: put the run folder on a local disk",
}


def problem_of(err: BaseException) -> str | None:
    """The one line for an exception that is bad input or the user's environment; None for a bug."""
    if isinstance(err, GraftError):
        return str(err)
    if isinstance(err, OSError) and err.errno in OS_FIXES:
        where = next((f for f in (err.filename, err.filename2) if f), None)
        what = err.strerror or os.strerror(err.errno)
        return f"{what}{f': {where}' if where else ''} — {OS_FIXES[err.errno]}"
    if isinstance(err, UnicodeDecodeError):  # a text file that is not UTF-8, read where no reader named it
        return f"a file is not UTF-8 text ({err.reason} at byte {err.start}) — save it as UTF-8"
    if isinstance(err, MemoryError):
        return "out of memory — use a smaller batch size or limit, or a machine with more memory"
    return None
