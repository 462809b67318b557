"""Studies on Ray: the same lines as the local runner, a killed worker loses nothing, Ray stays optional.

One local Ray (2 CPUs, no dashboard) serves the module and is shut down after it. Skipped where Ray is
not installed (it is the optional extra ``graftlm[ray]``); the missing-Ray error is tested everywhere.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import build_model, write_task

from analysis.errors import GraftError
from analysis.study.config import RayOptions, SweepConfig
from analysis.study.sweep import sweep


def lines(run: Path) -> dict[str, dict[str, Any]]:
    """results.jsonl by key, each key once, without the measured walls (they differ between any runs)."""
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)), "a key written twice"
    for r in rows:
        if isinstance(r.get("result"), dict):
            r["result"].pop("wall_s")
    return {r["key"]: r for r in rows}


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> SweepConfig:
    root = tmp_path_factory.mktemp("ray-study")
    return SweepConfig(donor=str(build_model(root / "donor", "llama", seed=1)),
                       target=str(build_model(root / "target", "llama", seed=2)), task=str(write_task(root)),
                       methods=["weight"], k=[1, 2], alpha=[1.0], components=["head", "mlp"], batch_size=4,
                       controls={"random_seeds": [0, 1], "copy_all": True, "weight": False})


@pytest.fixture(scope="module")
def ray_here() -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def test_on_ray_the_same_lines_and_report_as_here(study: SweepConfig, ray_here: Any, tmp_path: Path) -> None:
    """Two workers: every line of results.jsonl (per-item results, tokens included) as the local
    runner wrote it, and the same report."""
    from analysis import report

    here = sweep(study, tmp_path / "here", progress=False)
    there = sweep(study, tmp_path / "ray", progress=False, ray=True)
    assert lines(there) == lines(here)
    env = json.loads((there / "environment.json").read_text())["reuse"]
    assert env["ray_workers"] == 2 and env["ray_points_retried"] == 0
    assert report.write(there).read_text().replace(str(there), "RUN") == \
        report.write(here).read_text().replace(str(here), "RUN")


def test_a_raced_study_on_ray_writes_the_lines_it_writes_here(study: SweepConfig, ray_here: Any, tmp_path: Path) -> None:
    """race: the dev grid races in the driver (sequential by nature), the rest runs on the workers: every
    line, raced ones included, as a raced study here writes it."""
    raced = study.model_copy(update={"race": 0.05, "k": [1, 2, 4], "alpha": [0.5, 1.0]})
    here = sweep(raced, tmp_path / "here", progress=False)
    there = sweep(raced, tmp_path / "ray", progress=False, ray=True)
    assert lines(there) == lines(here)
    assert json.loads((there / "environment.json").read_text())["reuse"]["ray_workers"] == 2


def test_a_worker_killed_mid_point_loses_nothing(study: SweepConfig, ray_here: Any, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL one actor while it holds a point: the point runs again on a new actor, every key is written
    once, and the lines equal the local runner's."""
    from analysis.study import cluster

    executors: list[cluster.RayExecutor] = []
    made = cluster.RayExecutor.__init__

    def keep(self: cluster.RayExecutor, *args: Any) -> None:
        made(self, *args)
        executors.append(self)

    monkeypatch.setattr(cluster.RayExecutor, "__init__", keep)
    killed: list[int] = []

    def kill_once(point: Any, row: dict[str, Any]) -> None:
        # the first grid line is in: both workers hold a point (one was sent before this line was written)
        if point.phase == "grid" and not killed:
            pid = executors[0].pids[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    run = sweep(study.model_copy(update={"k": [1, 2, 3], "alpha": [0.5, 1.0]}), tmp_path / "ray",
                progress=False, on_point=kill_once, ray=True)
    assert killed
    assert json.loads((run / "environment.json").read_text())["reuse"]["ray_points_retried"] >= 1
    here = sweep(study.model_copy(update={"k": [1, 2, 3], "alpha": [0.5, 1.0]}), tmp_path / "here", progress=False)
    assert lines(run) == lines(here)


def test_a_study_begun_here_resumes_on_ray(study: SweepConfig, ray_here: Any, tmp_path: Path) -> None:
    """How a study runs is not in its hash: a run folder with the baselines and part of the grid resumes
    on Ray, which computes only what is missing."""
    full = sweep(study, tmp_path / "here", progress=False)
    run = tmp_path / "mixed"
    run.mkdir()
    kept = (full / "results.jsonl").read_text().splitlines()[:8]  # baselines, order, retention, a grid point
    (run / "results.jsonl").write_text("\n".join(kept) + "\n")
    for name in ("config.yaml", "inputs.json"):
        (run / name).write_text((full / name).read_text())
    (run / "rankings").mkdir()
    for path in (full / "rankings").iterdir():
        (run / "rankings" / path.name).write_text(path.read_text())
    computed: list[str] = []
    sweep(study.model_copy(update={"ray": RayOptions(workers=2)}), run, progress=False,
          on_point=lambda point, row: computed.append(point.key))
    assert lines(run) == lines(full)
    assert not any(key.startswith("baseline") for key in computed) and len(computed) == len(lines(full)) - 8


def test_without_ray_asking_for_it_is_one_line(study: SweepConfig, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if it were not installed
    with pytest.raises(GraftError, match=r"pip install 'graftlm\[ray\]'") as err:
        sweep(study, tmp_path / "run", progress=False, ray=True)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_cli_ray_flag_takes_an_optional_address() -> None:
    from analysis.cli import ray_argument

    assert ray_argument(["sweep", "c.yaml", "--ray", "--out", "r"]) == ["sweep", "c.yaml", "--ray", "", "--out", "r"]
    assert ray_argument(["sweep", "c.yaml", "--out", "r", "--ray"]) == ["sweep", "c.yaml", "--out", "r", "--ray", ""]
    assert ray_argument(["sweep", "--ray", "c.yaml", "--out", "r"]) == ["sweep", "--ray", "", "c.yaml", "--out", "r"]
    for address in ("auto", "10.0.0.2:6379", "ray://head:10001", "local"):
        assert ray_argument(["sweep", "c.yaml", "--ray", address]) == ["sweep", "c.yaml", "--ray", address]
    assert ray_argument(["eval", "--ray"]) == ["eval", "--ray"]  # only sweep has the flag
