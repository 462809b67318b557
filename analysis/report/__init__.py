"""What a study found: its numbers (:mod:`.summary`), its text (:mod:`.text`: report.md and report.html)
and its pictures (:mod:`.figures`). ``report.summarize(run)`` and ``report.write(run)`` are what users call."""

from __future__ import annotations

from analysis.interp.methods import named
from analysis.report.notes import ANSWER_SOURCES, localization_notes, notes
from analysis.report.summary import Finding, Summary, beats_random, read_rows, summarize, verdict
from analysis.report.text import HEADER, header, headline, markdown, write

__all__ = ["ANSWER_SOURCES", "HEADER", "Finding", "Summary", "beats_random", "header", "headline", "localization_notes",
           "markdown", "named", "notes", "read_rows", "summarize", "verdict", "write"]
