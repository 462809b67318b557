"""analysis.study.runfolder: resumable after kills, a changed config or input refused, one sweep per folder, a torn last line dropped, no folder left by a study that stopped early."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import per_item, small

from analysis.errors import GraftError
from analysis.study.config import SweepConfig
from analysis.study.runfolder import Results
from analysis.study.sweep import sweep


def test_killed_three_times_then_resumed_equals_uninterrupted(study: tuple[Path, SweepConfig], tmp_path: Path) -> None:
    _, cfg = study
    (tmp_path / "cfg.yaml").write_text(cfg.to_yaml())
    whole = sweep(cfg, tmp_path / "whole", progress=False)
    expected = per_item(whole)
    run = tmp_path / "killed"
    rng = random.Random(7)
    script = ("import sys; from analysis.study.sweep import sweep; "
              "sweep(sys.argv[1], sys.argv[2], progress=False)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(3):
        have = len((run / "results.jsonl").read_text().splitlines()) if (run / "results.jsonl").exists() else 0
        stop_at = have + rng.randint(1, 4)
        proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "cfg.yaml"), str(run)], env=env)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            lines = (run / "results.jsonl").read_text().splitlines() if (run / "results.jsonl").exists() else []
            if len(lines) >= stop_at:
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    sweep(tmp_path / "cfg.yaml", run, progress=False)
    assert per_item(run) == expected


def test_resume_with_another_config_is_refused(study: tuple[Path, SweepConfig], tmp_path: Path) -> None:
    _, cfg = study
    sweep(cfg, tmp_path / "run", progress=False)
    again = sweep(cfg, tmp_path / "run", progress=False)  # same config: resumes, adds nothing
    assert per_item(again) == per_item(tmp_path / "run")
    changed = cfg.model_copy(update={"alpha": [0.25, 1.0]})
    with pytest.raises(GraftError, match="another config"):
        sweep(changed, tmp_path / "run", progress=False)


def test_resume_after_an_input_changed_is_refused(study: tuple[Path, SweepConfig], tmp_path: Path) -> None:
    """Resume keys on content, not paths: gold answers changed in the task file, a retention text changed,
    a weight file edited in place — each refuses the rerun with one line naming what changed; restored,
    the run resumes with nothing to compute."""
    import shutil

    root, cfg = study
    for name in ("task.yaml", "task.jsonl", "ret.jsonl"):
        shutil.copy(root / name, tmp_path / name)
    shutil.copytree(root / "target", tmp_path / "target")
    mine = small(cfg, task=str(tmp_path / "task.yaml"), target=str(tmp_path / "target"))
    run = sweep(mine, tmp_path / "run", progress=False)
    done = per_item(run)
    assert json.loads((run / "inputs.json").read_text())["target"]["model.safetensors"]
    edits = {"task.jsonl": (lambda t: t.replace('"answer": "1', '"answer": "9'), "the task's items or settings"),
             "ret.jsonl": (lambda t: t.replace("cat", "dog"), "the task's retention set")}
    for name, (edit, said) in edits.items():
        original = (tmp_path / name).read_text()
        (tmp_path / name).write_text(edit(original))
        with pytest.raises(GraftError, match="computed from other inputs") as err:
            sweep(mine, run, progress=False)
        assert said in str(err.value) and "\n" not in str(err.value)
        (tmp_path / name).write_text(original)
    weights = tmp_path / "target" / "model.safetensors"
    original_bytes = weights.read_bytes()
    with open(weights, "r+b") as fh:  # the same size, the same path: only the content differs
        fh.seek(-4, os.SEEK_END)
        fh.write(b"\x00\x00\x80\x3f")
    with pytest.raises(GraftError, match=r"the target's files \(model.safetensors of "):
        sweep(mine, run, progress=False)
    weights.write_bytes(original_bytes)
    assert per_item(sweep(mine, run, progress=False)) == done


def test_a_study_that_stops_before_any_result_leaves_no_run_folder(study: tuple[Path, SweepConfig], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A study stopped after its checks but before its first result (the donor check of the probe, say)
    removes the folder it made; the corrected config then runs there, refused by nothing."""
    from analysis.study import sweep as sweep_module

    cfg = small(study[1])

    def stopped(*args: object, **kwargs: object) -> None:
        raise GraftError("the donor does not write the forced answers", "fix the task")

    with monkeypatch.context() as m:
        m.setattr(sweep_module, "_ranking", stopped)
        with pytest.raises(GraftError, match="forced answers"):
            sweep(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    (tmp_path / "run").mkdir()  # a folder that holds no results yet takes a corrected config
    (tmp_path / "run" / "config.yaml").write_text(cfg.to_yaml())
    per_item(sweep(cfg.model_copy(update={"batch_size": 2}), tmp_path / "run", progress=False))


def test_two_sweeps_on_one_folder(study: tuple[Path, SweepConfig], tmp_path: Path) -> None:
    """While a sweep runs, a second one on the same --out is refused with one line naming the first's pid;
    the first finishes alone, every key once."""
    cfg = small(study[1])
    (tmp_path / "cfg.yaml").write_text(cfg.to_yaml())
    run = tmp_path / "run"
    script = ("import sys, time; from analysis.study.sweep import sweep; "
              "sweep(sys.argv[1], sys.argv[2], progress=False, on_point=lambda *_: time.sleep(0.5))")
    first = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "cfg.yaml"), str(run)],
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None and not (
                (run / "results.jsonl").exists() and (run / "results.jsonl").read_text().strip()):
            time.sleep(0.02)
        assert first.poll() is None, "the first sweep ended before the second began"
        with pytest.raises(GraftError, match=rf"is in use by another sweep \(pid {first.pid}\)"):
            sweep(cfg, run, progress=False)
    finally:
        assert first.wait(timeout=300) == 0
    per_item(run)  # asserts every key is there once
    again = sweep(cfg, run, progress=False)  # the lock went with the first: the folder resumes
    assert per_item(again) == per_item(run)


def test_torn_last_line_is_dropped(tmp_path: Path) -> None:
    (tmp_path / "results.jsonl").write_text('{"key": "a", "x": 1}\n{"key": "b", "x"')
    results = Results(tmp_path)
    assert "a" in results and "b" not in results
    results.add({"key": "b", "x": 2})
    assert [json.loads(x)["key"] for x in (tmp_path / "results.jsonl").read_text().splitlines()] == ["a", "b"]


def test_a_run_made_before_grids_grew_resumes_as_it_was_made(study: tuple[Path, SweepConfig], tmp_path: Path) -> None:
    """A run folder whose stored config has no k_grow_to (written before grids grew) resumes with its grid
    as given — growing it would choose anew beside chosen points already on test — and asking for growth
    by name there is refused; new folders grow."""
    from analysis.study.runfolder import grows

    _, cfg = study
    run = sweep(small(cfg), tmp_path / "run", progress=False)
    assert grows(small(cfg), run) and grows(small(cfg), tmp_path / "new")
    stored = run / "config.yaml"
    stored.write_text("".join(x for x in stored.read_text().splitlines(keepends=True) if not x.startswith("k_grow_to:")))
    loaded = SweepConfig.load(stored)
    assert loaded.k_grow_to == "50%" and not grows(loaded, run)
    assert not grows(small(cfg, k_grow_to=None), run)
    with pytest.raises(GraftError, match="made before K grids grew"):
        grows(small(cfg, k_grow_to="50%"), run)
    before = (run / "results.jsonl").read_bytes()
    sweep(loaded, run, progress=False)  # resumed as made: nothing to add
    assert (run / "results.jsonl").read_bytes() == before
