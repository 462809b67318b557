"""The sweep: resumable after kills, refuses a changed config, keeps probe/dev/test apart."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import build_model, write_task

from analysis.errors import GraftError
from analysis.study.config import Controls, SweepConfig
from analysis.study.runfolder import Results
from analysis.study.sweep import sweep


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SweepConfig]:
    root = tmp_path_factory.mktemp("study")
    donor = build_model(root / "donor", "llama", seed=1)
    target = build_model(root / "target", "llama", seed=2)
    task = write_task(root)
    cfg = SweepConfig(donor=str(donor), target=str(target), task=str(task), methods=["weight"], k=[1, 2],
                      alpha=[0.5, 1.0], components=["head", "mlp"], controls={"random_seeds": [0, 1]}, batch_size=4)
    return root, cfg


def per_item(run: Path) -> dict[str, list]:
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)), "duplicate points"
    return {r["key"]: r.get("items") or r.get("perplexity") for r in rows}


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


def small(cfg: SweepConfig, **update: object) -> SweepConfig:
    """The study on a few items: a handful of quick evaluations."""
    return SweepConfig.model_validate({**cfg.model_dump(), "k": [1], "alpha": [1.0], "dev_limit": 2, "test_limit": 2,
                                       "retention_limit": 2, "probe_limit": 2,
                                       "controls": {"random_seeds": [0], "copy_all": False, "weight": False},
                                       **update})


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


def test_retention_keeps_per_text_results_for_the_cost_interval(study: tuple[Path, SweepConfig],
                                                                 tmp_path: Path) -> None:
    from analysis import report

    _, cfg = study
    run = sweep(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    retention = [r for r in rows if r.get("split") == "retention"]
    assert len(retention) == 3  # donor, target, the chosen point
    for r in retention:
        nll, tokens = sum(i["nll"] for i in r["items"]), sum(i["n_tokens"] for i in r["items"])
        assert math.exp(nll / tokens) == pytest.approx(r["perplexity"], rel=1e-9)
    (summary,) = report.summarize(run)
    change = summary.methods[0].retention_change
    assert change is not None and change.ci_low <= change.value <= change.ci_high


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


def test_k_as_shares_of_the_components(study: tuple[Path, SweepConfig], tmp_path: Path) -> None:
    """k: [10%, 20%, 50] over the tiny pair's 10 heads and MLPs is K = 1, 2 and 10 (50 clipped); the grid
    runs those, and the report states what the shares became and the clip."""
    from analysis import report
    from analysis.study.config import resolve_k

    assert resolve_k(SweepConfig.model_validate({**study[1].model_dump(), "k": ["5%", "10%", "20%", 50]}).k, 20) \
        .__dict__ == {"requested": [50, "5%", "10%", "20%"], "resolved": [1, 2, 4, 20], "clipped": [50],
                      "n_components": 20}
    assert resolve_k(["1%", "2.5%", 3], 20).resolved == [1, 3]  # at least 1; rounded down; duplicates merged
    with pytest.raises(ValueError, match="neither a positive integer nor a share"):
        SweepConfig.model_validate({**study[1].model_dump(), "k": ["0%"]})
    _, cfg = study
    shares = cfg.model_copy(update={"k": ["10%", "20%", 50], "alpha": [1.0],
                                    "controls": Controls(random_seeds=[0], copy_all=False, weight=False)})
    run = sweep(SweepConfig.model_validate(shares.model_dump()), tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert sorted(r["top_k"] for r in rows if r.get("phase") == "grid") == [1, 2, 10]
    (summary,) = report.summarize(run)
    assert "k: 10% → K=1, 20% → K=2 of 10 components; K=50 exceeds the 10 components and was clipped to K=10." \
        in summary.notes


def test_the_hash_of_an_integer_k_config_is_unchanged() -> None:
    """Runs written before k shares and overlap existed resume: their config hash is what it was (their
    stored config names its components; the default kinds have since gained kv)."""
    cfg = SweepConfig(donor="demo:gen1", target="demo:gen2", task="demo:arith", methods=["attribution", "weight"],
                      k=[8, 1, 2, 4], alpha=[1.0, 0.5], components=["head", "mlp"])
    assert cfg.k == [1, 2, 4, 8] and cfg.digest() == "241660348230e5e0"
    assert cfg.model_copy(update={"overlap": "drop"}).digest() != cfg.digest()


def test_auto_order_says_when_the_target_became_the_donor(study: tuple[Path, SweepConfig], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from analysis import report
    from analysis.study import sweep as sweep_module

    _, cfg = study
    monkeypatch.setattr(sweep_module, "_order", lambda cfg, base: ("b", "a"))  # as if the target did better
    swapped = cfg.model_copy(update={"auto_order": True, "k": [1], "alpha": [1.0],
                                     "controls": Controls(random_seeds=[0], copy_all=False, weight=False)})
    run = sweep(swapped, tmp_path / "run", progress=True)
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("auto_order:"))
    assert line.startswith("auto_order: target was better on dev (") and line.endswith("so it is the donor here")
    (summary,) = report.summarize(run)
    assert summary.donor_ref == cfg.target and line + "." in summary.notes


def test_a_pair_of_other_shapes_is_refused_before_any_work(study: tuple[Path, SweepConfig], tmp_path: Path) -> None:
    _, cfg = study
    other = build_model(tmp_path / "other", "llama", seed=3, intermediate_size=48)
    with pytest.raises(GraftError, match="must share architecture"):
        sweep(cfg.model_copy(update={"target": str(other), "auto_order": True}), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_torn_last_line_is_dropped(tmp_path: Path) -> None:
    (tmp_path / "results.jsonl").write_text('{"key": "a", "x": 1}\n{"key": "b", "x"')
    results = Results(tmp_path)
    assert "a" in results and "b" not in results
    results.add({"key": "b", "x": 2})
    assert [json.loads(x)["key"] for x in (tmp_path / "results.jsonl").read_text().splitlines()] == ["a", "b"]


def test_selection_never_sees_test(study: tuple[Path, SweepConfig], tmp_path: Path) -> None:
    _, cfg = study
    run = sweep(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert {r["split"] for r in rows if r.get("phase") == "grid"} == {"dev"}
    assert {r["phase"] for r in rows if r.get("split") == "test"} <= {"baseline", "chosen", "control"}


def test_the_report_says_how_to_ship_the_chosen_point(study: tuple[Path, SweepConfig], tmp_path: Path) -> None:
    """The report's transplant command, run as printed, writes a model that transformers loads."""
    import shlex

    from transformers import AutoModelForCausalLM

    from analysis import report
    from analysis.cli import main

    _, cfg = study
    run = sweep(cfg, tmp_path / "run", progress=False)
    md = report.write(run).read_text()
    assert "## Ship or roll back" in md
    command = next(line.strip() for line in md.splitlines() if line.strip().startswith("graftlm transplant"))
    args = shlex.split(command)[1:]
    args[args.index("--out") + 1] = str(tmp_path / "shipped")
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code in (0, None)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "shipped").config.model_type == "llama"
    assert "<pre><code>graftlm transplant" in (run / "report.html").read_text()


def test_each_decoding_length_is_a_study_of_its_own(study: tuple[Path, SweepConfig], tmp_path: Path) -> None:
    from analysis import report

    _, cfg = study
    two = SweepConfig.model_validate({**cfg.model_dump(), "max_new_tokens": [2, 3], "k": [1, 2], "alpha": [1.0],
                                      "controls": {"random_seeds": [0], "copy_all": False, "weight": False}})
    run = sweep(two, tmp_path / "run", progress=False)
    assert [s.max_new_tokens for s in report.summarize(run)] == [2, 3]
    assert {p.name for p in run.glob("plan-*.yaml")} == {"plan-weight-tokens2.yaml", "plan-weight-tokens3.yaml"}
    report.write(run)
    assert {"recovery-tokens2.png", "recovery-tokens3.png"} <= {p.name for p in (run / "figures").iterdir()}


def test_every_config_key_is_documented() -> None:
    from analysis.study.config import Controls, RayOptions

    doc = (Path(__file__).parents[1] / "docs" / "sweep.md").read_text()
    for name in [*SweepConfig.model_fields, *Controls.model_fields, *RayOptions.model_fields]:
        assert f"\n{name}:" in doc or f"  {name}:" in doc, f"docs/sweep.md does not document {name}"


def test_bad_config_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("donor: a\ntarget: b\ntask: t\nk: [0]\n")
    with pytest.raises(GraftError, match="k"):
        SweepConfig.load(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("donor: a\ntarget: b\ntask: t\nalpha: [1.5]\n")
    with pytest.raises(GraftError, match="alpha"):
        SweepConfig.load(tmp_path / "d.yaml")


def test_reused_activations_give_the_same_study(study: tuple[Path, SweepConfig], tmp_path: Path) -> None:
    """A choice task: the grid replays the layers below each transplant, with results identical to full
    forwards (per item, and the retention perplexities to the last bit)."""
    root, cfg = study
    rng = random.Random(1)
    rows = []
    for i, split in enumerate(["probe"] * 4 + ["dev"] * 10 + ["test"] * 12):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        choices = [str(a + b), str(a + b + 1), str(a * b)]
        rows.append({"id": f"c{i}", "prompt": f"{a}+{b}=", "choices": choices, "answer": i % 3, "split": split})
    (tmp_path / "choice.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "choice.yaml").write_text(f"kind: choice\ndata: choice.jsonl\nretention: {root / 'ret.jsonl'}\n")
    with_reuse = cfg.model_copy(update={"task": str(tmp_path / "choice.yaml"), "k": [1, 2, 3], "alpha": [0.5, 1.0]})
    without = with_reuse.model_copy(update={"reuse_memory_gb": 0.0})
    ranking = [["L1.H1", 3.0], ["L1.mlp", 2.0], ["L0.H2", 1.0]]  # stored as a resumed run would find it
    for name in ("reuse", "full"):
        (tmp_path / name / "rankings").mkdir(parents=True)
        (tmp_path / name / "rankings" / "weight.json").write_text(json.dumps(ranking))
    fast = sweep(with_reuse, tmp_path / "reuse", progress=False)
    slow = sweep(without, tmp_path / "full", progress=False)
    assert per_item(fast) == per_item(slow)
    reuse = json.loads((fast / "environment.json").read_text())["reuse"]
    assert reuse["forward_calls_replayed"] > 0 and reuse["layer_forwards_skipped"] > 0
    assert json.loads((slow / "environment.json").read_text())["reuse"]["forward_calls_replayed"] == 0


def test_a_grid_point_drafts_only_while_neighbours_agree(study: tuple[Path, SweepConfig], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Drafts pay only when most rows keep their outputs: a grid point verifies the previous point's
    generations when that point agreed with the one before it on at least half of the items."""
    from analysis.eval import evaluate
    from analysis.study import points

    _, cfg = study
    agreements = iter([0.2, 0.9, 0.1, 0.5])  # after points 1, 2, 3 and 4
    monkeypatch.setattr(points, "agreement", lambda mine, theirs: next(agreements))
    drafted: list[bool] = []
    run = evaluate.run

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        drafted.append(kwargs.get("drafts") is not None)
        return run(*args, **kwargs)

    monkeypatch.setattr(evaluate, "run", recording)
    sweep(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    calls = [r["phase"] for r in rows if r["key"] != "order|None"]
    grid = [d for d, phase in zip(drafted, calls, strict=True) if phase == "grid"]
    assert grid == [True, False, True, False]  # the first drafts from the target's baseline


def test_grid_with_drafts_equals_plain_evaluation(study: tuple[Path, SweepConfig], tmp_path: Path) -> None:
    """Each dev point verifies the previous point's generations as drafts; what it reports is exactly what
    evaluating the transplanted model from scratch gives."""
    from analysis.eval import evaluate
    from analysis.io.models import load
    from analysis.plan import Plan
    from analysis.transplant import applied

    _, cfg = study
    run = sweep(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    grid = [r for r in rows if r.get("phase") == "grid"]
    assert grid and all("tokens" in it for r in grid for it in r["items"])
    donor, target = load(cfg.donor, dtype="float32"), load(cfg.target, dtype="float32")
    for row in grid:
        with applied(target, donor, Plan.of(row["plan"], alpha=row["alpha"])):
            plain = evaluate.run(target.model, target.tokenizer, cfg.task, split="dev", batch_size=cfg.batch_size,
                                 progress=False)
        assert [(it["id"], it["correct"], it["tokens"]) for it in row["items"]] == \
            [(r["id"], r["correct"], r["tokens"]) for r in plain.records]


@pytest.mark.real
def test_a_study_of_a_real_pair(tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct and a copy whose MLPs in layers 20–29 got noise, on real ARC-Easy items:
    the whole study runs, the dataless weight ranking finds exactly the changed MLPs, copy-all is the
    donor item for item, and the chosen point ships as a folder `from_pretrained` loads."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    from analysis import report
    from analysis.cli import main

    spec = importlib.util.spec_from_file_location("bench_sweep", Path(__file__).resolve().parents[1] / "bench" / "sweep.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = bench.scoring_config(dev=16, test=30).model_copy(update={
        "methods": ["weight", "attribution"], "k": [1, 4], "alpha": [1.0], "probe_limit": 8,
        "controls": Controls(random_seeds=[0], copy_all=True, weight=True)})
    run = sweep(cfg, tmp_path / "run", progress=False)
    weight = json.loads((run / "rankings" / "weight.json").read_text())["ranking"]
    assert {cid for cid, _ in weight[:10]} == {f"L{layer}.mlp" for layer in range(20, 30)}
    assert all(score == 0 for _, score in weight[10:])
    (summary,) = report.summarize(run)
    copy_all = next(f for f in summary.controls if f.method == "copy-all")
    assert copy_all.acc == summary.donor["test"]
    report.write(run)
    assert (run / "report.md").read_text().startswith("# graftlm sweep report")
    out = tmp_path / "shipped"
    with pytest.raises(SystemExit) as exit_info:
        main(["transplant", "-d", cfg.donor, "-t", cfg.target, "--plan", str(run / "plan-weight.yaml"), "--out", str(out)])
    assert exit_info.value.code in (0, None)
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 30


def test_device_map_runs_the_study_with_the_same_results(study: tuple[Path, SweepConfig], tmp_path: Path) -> None:
    """device_map: auto (here every module lands on the CPU) runs localization, the grid and the controls
    through the placed models, with the per-item results of a plain load; it is part of the config hash."""
    cfg = small(study[1])
    mapped = cfg.model_copy(update={"device_map": "auto"})
    assert mapped.digest() != cfg.digest()
    assert per_item(sweep(mapped, tmp_path / "mapped", progress=False)) == \
        per_item(sweep(cfg, tmp_path / "plain", progress=False))
