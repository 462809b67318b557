"""A study's progress: one bar with ETA over every evaluation (rich), or one line per finished evaluation
where the output is not a terminal (a log file, a batch job)."""

from __future__ import annotations

from typing import Any

from analysis.study.points import Point


class Progress:
    """One progress bar with ETA over the whole study (rich). Where the output is no terminal (a log
    file, a batch job), where a bar would print nothing until the end, one line per finished evaluation
    instead: its result, its time and the time left."""

    def __init__(self, total: int, enabled: bool, names: dict[str, str]) -> None:
        self.names = names  # who → what a person calls the model
        self.progress: Any = None
        self.console: Any = None
        self.total, self.done, self.resumed, self.computed, self.seconds = total, 0, 0, 0, 0.0
        if not enabled:
            return
        from rich.console import Console

        console = Console(stderr=True)
        if not (console.is_terminal or console.is_jupyter):
            self.console = console
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), console=console, transient=False)
        self.progress.start()
        self.task = self.progress.add_task("sweep", total=total)

    def advance(self, point: Point, row: dict[str, Any], seconds: float | None) -> None:
        """``seconds``: how long the evaluation took; None when it was resumed from results.jsonl."""
        self.done += 1
        if point.who == "transplant":
            seed = f" seed {point.seed}" if point.seed is not None else ""
            label = f"{point.phase} {point.method} K={point.top_k} α={point.alpha}{seed} {point.split}"
        else:
            label = f"baseline {self.names.get(point.who, point.who)} {point.split}"
        if self.progress is not None:
            self.progress.update(self.task, advance=1, description=label[:48].ljust(48))
        if self.console is None:
            return
        if seconds is None:
            self.resumed += 1
            return
        self._say_resumed(self.done - 1)
        self.computed += 1
        self.seconds += seconds
        # resumed points cost nothing: the rate is that of the points computed in this process
        left = self.seconds / self.computed * (self.total - self.done)
        result = (f"perplexity {row['perplexity']:.3f}" if "perplexity" in row else
                  f"{row['accuracy']:.1%} ({row['k']}/{row['n']})" if "accuracy" in row else "done")
        self.console.print(f"[{self.done}/{self.total}] {label}: {result} in {seconds:.1f} s, "
                           f"~{_duration(left)} left", highlight=False, soft_wrap=True)

    def fewer(self, n: int) -> None:
        """``n`` of the counted evaluations will not happen (they were counted at most); negative: more will."""
        self.total -= n
        if self.progress is not None:
            self.progress.update(self.task, total=self.total)

    def note(self, text: str) -> None:
        """A stage outside the count (localization): a line in logs, above the bar in a terminal."""
        if self.progress is not None:
            self.progress.console.print(text, highlight=False)
        elif self.console is not None:
            self.console.print(text, highlight=False, soft_wrap=True)

    def _say_resumed(self, upto: int) -> None:
        if self.resumed:
            self.console.print(f"[{upto}/{self.total}] {self.resumed} evaluations resumed from "
                               "results.jsonl", highlight=False, soft_wrap=True)
            self.resumed = 0

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        elif self.console is not None:
            self._say_resumed(self.done)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else \
        f"{seconds / 3600:.1f} h"
