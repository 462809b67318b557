"""The one exception users see: a problem and its fix, on one line.

Everything below ``cli.py`` raises :class:`GraftError` for bad input; the CLI prints its message and
exits with code 2, without a traceback.
"""

from __future__ import annotations


class GraftError(Exception):
    """Bad input. ``str(err)`` is one line naming the problem and how to fix it."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} — {fix}" if fix else problem)
