"""The one exception users see: a problem and its fix, on one line.

Everything below ``cli.py`` raises :class:`GraftError` for bad input; the CLI prints its message and
exits with code 2, without a traceback.
"""

from __future__ import annotations

import difflib
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
