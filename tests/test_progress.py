"""analysis.study.progress: where the output is a log, one line per finished evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest

from analysis.study.config import SweepConfig
from analysis.study.sweep import sweep


def test_a_log_gets_a_line_per_evaluation(study: tuple[Path, SweepConfig], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """In a log file (no terminal: a batch job, `make demo > log`) a progress bar would show nothing
    until the end; each finished evaluation is a line with its result and the time left instead."""
    _, cfg = study
    sweep(cfg, tmp_path / "run", progress=True)
    lines = capsys.readouterr().err.splitlines()
    total = len((tmp_path / "run" / "results.jsonl").read_text().splitlines()) - 1  # less the order line
    counted = [line for line in lines if line.startswith("[")]
    assert len(counted) == total and counted[-1].startswith(f"[{total}/{total}] ")
    assert any(line.startswith("localized by weight on the probe split") for line in lines)
    assert any(" grid weight K=2 α=1.0 dev: " in line and "/12)" in line and " left" in line for line in counted)
    sweep(cfg, tmp_path / "run", progress=True)  # all done: resumed, said once
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    assert said == [f"[{total}/{total}] {total} evaluations resumed from results.jsonl"]
