"""The timing rule every bench follows, in one place (issue 17).

- the compared variants run interleaved, round by round (A, B, C, A, B, C, ...), so a change in the
  machine's load hits all of them alike;
- each variant's cost is its best (fastest) round of N;
- torch threads are fixed in this process and, through the environment, in every child process;
- children import this checkout's ``analysis`` (the virtualenv's editable install may point at another
  checkout: its console scripts and ``python -c`` would otherwise pick that one up).

    from timing import fix_threads, interleaved
    fix_threads(1)
    t = interleaved({"hf": run_hf, "ours": run_ours}, rounds=3)
    print(f"ours / hf: {t.ratio('ours', 'hf'):.2f}x")
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "BENCH_THREADS")


def use_this_checkout() -> None:
    """This process and its children import ``analysis`` from this checkout."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(ROOT)]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *paths])


def fix_threads(n: int) -> int:
    """``n`` torch threads here (``torch.set_num_threads``) and in children (OMP/MKL/OpenBLAS variables)."""
    for var in THREAD_VARS:
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)
    return n


@dataclass
class Measured:
    """What a variant may return to report a wall of its own (e.g. a child process timing only its
    work, without its start-up) and a value kept beside it."""

    wall: float
    value: Any = None


@dataclass
class Timings:
    walls: dict[str, list[float]] = field(default_factory=dict)  # every round, in order
    values: dict[str, list[Any]] = field(default_factory=dict)  # what each run returned

    @property
    def best(self) -> dict[str, float]:
        return {name: min(w) for name, w in self.walls.items()}

    def best_value(self, name: str) -> Any:
        """The value returned by ``name``'s fastest round."""
        w = self.walls[name]
        return self.values[name][w.index(min(w))]

    def ratio(self, a: str, b: str) -> float:
        return min(self.walls[a]) / min(self.walls[b])

    def spread(self, name: str) -> str:
        return " ".join(f"{w:.2f}" for w in self.walls[name])


def interleaved(variants: Mapping[str, Callable[[], Any]], rounds: int, *, offset: int = 0, rotate: bool = False,
                log: Callable[[str], None] | None = None) -> Timings:
    """Run every variant once per round, in order (A, B, C, A, B, C, ...), ``rounds`` rounds.

    A variant returns anything (kept in ``values``) or a :class:`Measured` whose wall replaces the one
    timed here. ``offset`` starts each round at another variant; ``rotate`` moves the start on by one
    each round (A B C, B C A, ...). ``log`` gets one line per round."""
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    names = list(variants)
    out = Timings({n: [] for n in names}, {n: [] for n in names})
    for r in range(rounds):
        s = (offset + (r if rotate else 0)) % len(names)
        for name in names[s:] + names[:s]:
            start = time.perf_counter()
            value = variants[name]()
            wall = time.perf_counter() - start
            if isinstance(value, Measured):
                wall, value = value.wall, value.value
            out.walls[name].append(wall)
            out.values[name].append(value)
        if log is not None:
            log(f"round {r + 1}/{rounds}: " + "; ".join(f"{n} {out.walls[n][-1]:.2f} s" for n in names))
    return out


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
