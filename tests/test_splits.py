"""analysis.study.splits: splits that play other roles, overlaps refused or dropped from probe and dev (never test), selection that never sees test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_task

from analysis.errors import GraftError
from analysis.study.config import Controls, SweepConfig
from analysis.study.sweep import sweep


def test_task_splits_can_play_other_roles(study: tuple[Path, SweepConfig], tmp_path: Path) -> None:
    """A task whose localization items sit in `train` is studied with splits: {probe: train}; the split
    map is checked like the default one, and leaves the hash of a run without it unchanged."""
    _, cfg = study
    lines = (write_task(tmp_path).parent / "task.jsonl").read_text().replace('"split": "probe"', '"split": "train"')
    (tmp_path / "task.jsonl").write_text(lines)
    task = str(tmp_path / "task.yaml")
    with pytest.raises(GraftError, match="has no probe split"):
        sweep(cfg.model_copy(update={"task": task}), tmp_path / "refused", progress=False)
    mapped = SweepConfig.model_validate({**cfg.model_dump(), "task": task, "splits": {"probe": "train"}})
    assert mapped.splits == {"probe": "train", "dev": "dev", "test": "test"}
    run = sweep(mapped, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert {r["split"] for r in rows if r.get("phase") == "grid"} == {"dev"}
    assert cfg.digest() == SweepConfig.model_validate({k: v for k, v in cfg.model_dump().items()
                                                       if k != "splits"}).digest()
    with pytest.raises(ValueError, match="three different splits"):
        SweepConfig.model_validate({**cfg.model_dump(), "splits": {"probe": "dev"}})


def test_overlapping_splits_are_refused(study: tuple[Path, SweepConfig], tmp_path: Path) -> None:
    """The error counts the shared items per pair of splits and names the first three by file and line."""
    from test_tasks import write_overlapping

    _, cfg = study
    task = write_task(tmp_path, overlap=True)
    with pytest.raises(GraftError, match=r"task task: 1 item of probe also in test \(task.jsonl:1 = task.jsonl:35\)"):
        sweep(cfg.model_copy(update={"task": str(task)}), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # bad input creates no run folder
    with pytest.raises(GraftError) as err:
        sweep(cfg.model_copy(update={"task": str(write_overlapping(tmp_path))}), tmp_path / "run", progress=False)
    assert str(err.value).startswith(
        "task o: 1 item of probe also in dev (o.jsonl:15 = o.jsonl:20), 4 items of probe also in test (o.jsonl:11 = "
        "o.jsonl:1, o.jsonl:12 = o.jsonl:2, o.jsonl:13 = o.jsonl:3, …), 2 items of dev also in test (o.jsonl:17 = "
        "o.jsonl:9, o.jsonl:18 = o.jsonl:10)")
    assert "overlap: drop" in str(err.value)  # the fix names the way out
    assert not (tmp_path / "run").exists()


def test_overlap_drop_cleans_probe_and_dev_never_test(study: tuple[Path, SweepConfig], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """overlap: drop (sweep config, or the task's own key) drops shared items from probe and dev before
    localization and the grid read them; test keeps every item; the log and the report say how many."""
    import importlib

    from test_tasks import write_overlapping

    from analysis import report
    from analysis.eval import tasks
    from analysis.study.splits import check_splits

    _, cfg = study
    for task, overlap in ((write_overlapping(tmp_path), "drop"), (write_overlapping(tmp_path, "drop"), "error")):
        roles, cleaned, dropped = check_splits(tasks.load(task), cfg.model_copy(update={"overlap": overlap}))
        assert [it.id for it in cleaned.items("probe")] == ["p5"] and len(cleaned.items("test")) == 10
        assert dropped.counts == {"probe": 5, "dev": 2}
    seen: list[list[str]] = []
    localize_module = importlib.import_module("analysis.interp.localize")  # the module (analysis.localize is the verb)
    localize = localize_module.localize

    def recording(donor, target, task, **kwargs):  # type: ignore[no-untyped-def]
        seen.append([it.id for it in task.items(kwargs["split"])])
        return localize(donor, target, task, **kwargs)

    monkeypatch.setattr(localize_module, "localize", recording)
    dropping = cfg.model_copy(update={"task": str(write_task(tmp_path, overlap=True)), "overlap": "drop",
                                      "controls": Controls(random_seeds=[0], copy_all=False, weight=False)})
    run = sweep(dropping, tmp_path / "run", progress=True)
    said = "overlap: drop removed 1 probe item also in a later split; test is whole " \
           "(1 item of probe also in test (task.jsonl:1 = task.jsonl:35))"
    assert said in capsys.readouterr().err.splitlines()
    assert seen == [[f"q{i}" for i in range(1, 6)]]  # localization read probe without q0
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert {r["n"] for r in rows if r.get("split") == "dev"} == {12}
    assert {r["n"] for r in rows if r.get("split") == "test"} == {17}  # test keeps the repeated prompt
    (summary,) = report.summarize(run)
    assert said + "." in summary.notes


def test_selection_never_sees_test(study: tuple[Path, SweepConfig], tmp_path: Path) -> None:
    _, cfg = study
    run = sweep(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert {r["split"] for r in rows if r.get("phase") == "grid"} == {"dev"}
    assert {r["phase"] for r in rows if r.get("split") == "test"} <= {"baseline", "chosen", "control"}
