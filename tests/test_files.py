"""Outputs appear whole or not at all: killed at any moment, a transplant leaves neither --out nor
litter once the next run has been; SIGTERM says so in one line; --force never loses --out."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import build_model

from analysis.cli import main
from analysis.io.files import KILL_AT, LEFTOVER, clean, staged


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A donor and a target in seven safetensors shards (a moment to kill at after each), and the
    transplant they make, written once without interruption."""
    root = tmp_path_factory.mktemp("sharded")
    donor = build_model(root / "donor", "llama", seed=1, shard="20KB")
    target = build_model(root / "target", "llama", seed=2, shard="20KB")
    assert len(list(target.glob("*.safetensors"))) >= 5
    reference = root / "reference"
    run_in_process(donor, target, reference)
    return donor, target, reference


def transplant_args(donor: Path, target: Path, out: Path, *extra: str) -> list[str]:
    return ["transplant", "-c", "L*", "-a", "0.5", "--donor", str(donor), "--target", str(target), "--out", str(out),
            *extra]


def run_in_process(donor: Path, target: Path, out: Path, *extra: str) -> None:
    with pytest.raises(SystemExit) as stop:
        main(transplant_args(donor, target, out, *extra))
    assert stop.value.code == 0


def killed_at(moment: int, donor: Path, target: Path, out: Path, *extra: str,
              how: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, KILL_AT: f"{moment}{how}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "analysis.cli", *transplant_args(donor, target, out, *extra)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def same_files(a: Path, b: Path) -> bool:
    """The same weight files, byte for byte (the model cards differ in their dates)."""
    names = sorted(p.name for p in a.iterdir() if p.suffix == ".safetensors")
    return names == sorted(p.name for p in b.iterdir() if p.suffix == ".safetensors") and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def test_sigkill_at_every_moment_of_a_transplant(sharded: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """SIGKILL at each moment of a transplant (its staging folder made, the small files copied, each
    shard copied, the output complete, renamed into place): --out is absent or whole, and after the
    next run — to the same --out or another one in that folder — no leftover remains."""
    donor, target, reference = sharded
    moments = 0
    while True:
        moments += 1
        parent = tmp_path / f"m{moments}"
        parent.mkdir()
        proc = killed_at(moments, donor, target, parent / "o")
        if proc.returncode == 0:  # no moment left to kill at: the run finished
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        out = parent / "o"
        assert not out.exists() or same_files(out, reference)  # never a partial --out
        nxt = parent / ("o" if moments % 2 else "o2")
        run_in_process(donor, target, nxt, "--force")
        assert sorted(p.name for p in parent.iterdir()) == sorted({nxt.name, *(["o"] if out.exists() else [])})
        assert same_files(nxt, reference)
    assert moments - 1 >= 10


def test_sigkill_while_force_replaces_an_output(sharded: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """With --force over an existing output, a kill at any moment leaves --out the old output or the new
    one, whole — never missing; the next run removes what was set aside."""
    donor, target, reference = sharded
    old = tmp_path / "old"
    run_in_process(target, target, old, "--force")  # a whole, different model: the target itself
    for moment in (9, 10, 11, 12):
        parent = tmp_path / f"f{moment}"
        parent.mkdir()
        out = parent / "o"
        subprocess.run(["cp", "-r", str(old), str(out)], check=True)
        proc = killed_at(moment, donor, target, out, "--force")
        assert proc.returncode in (-signal.SIGKILL, 0), proc.stderr
        assert same_files(out, old) or same_files(out, reference)
        run_in_process(donor, target, parent / "o2")
        assert sorted(p.name for p in parent.iterdir()) == ["o", "o2"]


def test_sigterm_says_so_in_one_line_and_leaves_nothing(sharded: tuple[Path, Path, Path], tmp_path: Path) -> None:
    donor, target, _ = sharded
    proc = killed_at(5, donor, target, tmp_path / "o", how=":TERM")
    assert proc.returncode == 143 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("terminated;")
    assert list(tmp_path.iterdir()) == []  # the staging folder went with it


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_an_output_set_aside_by_a_killed_force_is_put_back(tmp_path: Path) -> None:
    """Where the system cannot swap two folders in one step, --force moves the old output aside before
    renaming the new one into place; killed between the two, the next run puts the old one back."""
    pid = _dead_pid()
    aside = tmp_path / f".o.graftlm-{pid}-old-1a2b"
    (aside / "o").mkdir(parents=True)
    (aside / "o" / "weights").write_text("the old output")
    new = tmp_path / f".o.graftlm-{pid}-3c4d"  # the new one, complete but never renamed
    new.mkdir()
    alive = tmp_path / f".x.graftlm-{os.getpid()}-5e6f"  # this process's own: kept
    alive.mkdir()
    assert LEFTOVER.match(aside.name) and LEFTOVER.match(new.name)
    assert sorted(p.name for p in clean(tmp_path)) == sorted([aside.name, new.name])
    assert (tmp_path / "o" / "weights").read_text() == "the old output"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["o", alive.name])


def test_a_failed_output_leaves_no_folder_it_made(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "o"
    with pytest.raises(RuntimeError), staged(out) as tmp:
        (tmp / "x").write_text("half")
        raise RuntimeError("failed while writing")
    assert list(tmp_path.iterdir()) == []
