"""Benchmark: scaling out — the demo study locally and on Ray, the racing grid, the streaming transplant.

1. The demo study (examples/demo.yaml) in this process, and on a local Ray with 2 workers (Ray started
   by the study, its start counted): walls and their ratio; the results.jsonl lines compared (walls aside).
2. The demo study with ``race: 0.05`` against the full grid: item evaluations, grid wall, chosen points.
3. A transplant of every layer at α = 0.5 of synthetic bf16 Llamas of three sizes, each in its own
   process: its peak RSS (VmHWM) against the model's size.

    OMP_NUM_THREADS=1 .venv/bin/python bench/scale.py

The three studies of 1 and 2 (local, Ray, racing) run interleaved, round by round, each one's best of
``--rounds`` counting; torch threads fixed (``--threads``, default 1, also for Ray's workers, which
import this checkout). Ratios are printed last.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/timing.py, also when loaded from elsewhere
from timing import Measured, fix_threads, interleaved, load_average, use_this_checkout  # noqa: E402

from analysis.study.config import DEMO_CONFIG, SweepConfig
from analysis.study.sweep import sweep

HERE = Path(__file__).resolve().parent


def rows(run: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for line in (run / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        if isinstance(r.get("result"), dict):
            r["result"].pop("wall_s")
        out[r["key"]] = r
    return out


def timed_sweep(cfg: SweepConfig, run: Path, **kw: Any) -> float:
    shutil.rmtree(run, ignore_errors=True)
    start = time.perf_counter()
    sweep(cfg, run, progress=False, **kw)
    return time.perf_counter() - start


def grid_figures(run: Path) -> tuple[int, float, list[tuple[Any, ...]]]:
    """The grid's item evaluations and summed evaluation wall, and the chosen points (method, K, α)."""
    every = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    grid = [r for r in every if r.get("phase") == "grid"]
    chosen = sorted((r["method"], r["top_k"], r["alpha"]) for r in every if r.get("phase") == "chosen"
                    and r["split"] == "test")
    return sum(r["n"] for r in grid), sum(r["result"]["wall_s"] for r in grid), chosen


PEAK = """
import sys
from analysis.transplant import transplant
transplant(sys.argv[1], sys.argv[2], components=["L*"], alpha=0.5, out=sys.argv[3])
print(int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024)
"""


def transplant_peaks(work: Path, layer_counts: tuple[int, ...]) -> list[tuple[int, int, float]]:
    spec = importlib.util.spec_from_file_location("bench_transplant", HERE / "transplant.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = []
    for layers in layer_counts:
        cfg = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers, num_attention_heads=8,
                   num_key_value_heads=2, vocab_size=8000)
        donor, target, dest = work / f"donor{layers}", work / f"target{layers}", work / f"out{layers}"
        bench.build(donor, cfg, seed=1, shard_bytes=64 << 20)
        bench.build(target, cfg, seed=2, shard_bytes=64 << 20)
        size = sum(p.stat().st_size for p in target.glob("*.safetensors"))
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", PEAK, str(donor), str(target), str(dest)], check=True,
                              capture_output=True, text=True)
        out.append((size, int(proc.stdout.split()[-1]), time.perf_counter() - start))
        for folder in (donor, target, dest):
            shutil.rmtree(folder)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "graftlm-bench-scale")
    parser.add_argument("--layers", type=int, nargs=3, default=(4, 8, 16), help="the three model sizes, in layers")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each study's best counts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, here and in Ray's workers")
    args = parser.parse_args()
    use_this_checkout()
    fix_threads(args.threads)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    cfg = SweepConfig.load(DEMO_CONFIG)

    t = interleaved({  # each writes its folder anew; the last round's folders are compared below
        "local": lambda: Measured(timed_sweep(cfg, work / "local")),
        "ray": lambda: Measured(timed_sweep(cfg, work / "ray", ray=True)),
        "race": lambda: Measured(timed_sweep(cfg.model_copy(update={"race": 0.05}), work / "race")),
    }, args.rounds, log=lambda line: print(line, flush=True))
    local, on_ray, raced = t.best["local"], t.best["ray"], t.best["race"]
    same = rows(work / "local") == rows(work / "ray")
    print(f"best of {args.rounds} interleaved rounds, {args.threads} torch thread(s), load average {load_average()}")
    print(f"demo study: here {local:.1f} s, on Ray with 2 workers {on_ray:.1f} s (Ray's start and the actors' "
          f"loading included); results.jsonl lines identical: {same}", flush=True)
    full_items, full_wall, full_chosen = grid_figures(work / "local")
    race_items, race_wall, race_chosen = grid_figures(work / "race")
    print(f"racing grid (race: 0.05): {race_items} item evaluations vs {full_items}, grid wall {race_wall:.1f} s "
          f"vs {full_wall:.1f} s, study {raced:.1f} s vs {local:.1f} s; chosen points the same: "
          f"{race_chosen == full_chosen}", flush=True)

    peaks = transplant_peaks(work, tuple(args.layers))
    for size, peak, wall in peaks:
        print(f"transplant of every layer, {size / 2**20:.0f} MB bf16: peak RSS {peak / 2**20:.0f} MB, {wall:.1f} s")
    growth = (peaks[-1][1] - peaks[0][1]) / (peaks[-1][0] - peaks[0][0])
    print(f"\nRay / local wall: {on_ray / local:.2f}; racing / full grid item evaluations: "
          f"{race_items / full_items:.2f}, grid wall {race_wall / full_wall:.2f}; transplant peak RSS growth per "
          f"MB of model: {growth:+.3f}")


if __name__ == "__main__":
    main()
