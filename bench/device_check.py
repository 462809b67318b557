"""Device check: the study on a GPU gives the study on the CPU, and its shortcuts stay exact there.

1. The demo sweep (examples/demo.yaml) on ``--device`` from the rankings of a CPU run (``--reference``,
   a run folder of `graftlm demo`): per-item results compared with the CPU run's, point by point.
2. A choice-task sweep on the demo pair with activation reuse on and off: per-item results identical,
   and how many forward calls were replayed.
Walls are printed beside each.

    graftlm demo --out runs/demo                                   # the CPU reference
    python bench/device_check.py --device cuda --reference runs/demo
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

from analysis.study.config import DEMO_CONFIG, SweepConfig
from analysis.study.sweep import sweep


def rows(run: Path) -> dict[str, dict]:
    return {r["key"]: r for r in map(json.loads, (run / "results.jsonl").read_text().splitlines())}


def with_rankings(reference: Path, run: Path) -> Path:
    shutil.copytree(reference / "rankings", run / "rankings")
    return run


def choice_task(folder: Path) -> Path:
    """demo:arith items as a 4-way choice task (the sum against near misses)."""
    from analysis.eval import tasks

    rng = random.Random(0)
    arith = tasks.load("demo:arith")
    lines = []
    for split, limit in (("probe", 20), ("dev", 100), ("test", 200)):
        for it in arith.items(split, limit):
            answer = int(it.answer)
            wrong = rng.sample([answer + 1, answer - 1, answer + 10, answer - 10, answer + 11], 3)
            choices = [str(answer), *map(str, wrong)]
            rng.shuffle(choices)
            lines.append({"id": it.id, "prompt": arith.render(it), "choices": choices,
                          "answer": choices.index(str(answer)), "split": split})
    (folder / "choice.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (folder / "choice.yaml").write_text("kind: choice\ndata: choice.jsonl\nchoice_prefix: ''\n")
    return folder / "choice.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--reference", type=Path, required=True, help="a CPU run folder of `graftlm demo`")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="graftlm-device-"))

    cfg = SweepConfig.load(DEMO_CONFIG).model_copy(update={"device": args.device})
    start = time.perf_counter()
    run = sweep(cfg, with_rankings(args.reference, tmp / "demo"), progress=False)
    wall = time.perf_counter() - start
    ours, ref = rows(run), rows(args.reference)
    missing = sorted(set(ref) ^ set(ours))
    # accuracy items must agree exactly; perplexity rows are compared by their value below
    differ = {k: sum(a != b for a, b in zip(ours[k].get("items") or [], ref[k].get("items") or [], strict=True))
              if ours[k].get("perplexity") is None else 0 for k in sorted(set(ref) & set(ours))}
    ppl = [abs(ours[k]["perplexity"] - ref[k]["perplexity"]) for k in differ if ours[k].get("perplexity")]
    print(f"1. demo sweep on {args.device}: {wall:.1f} s, {len(ours)} points; keys only on one side: {missing}")
    print(f"   points whose per-item results differ from the CPU run: {sum(1 for v in differ.values() if v)} "
          f"(items: {sum(differ.values())}); max |Δ perplexity| {max(ppl, default=0):.2e}")
    for k, v in differ.items():
        if v:
            print(f"   {k}: {v} items")

    task = choice_task(tmp)
    base = SweepConfig.model_validate({**cfg.model_dump(), "task": str(task), "methods": ["attribution"],
                                       "controls": {"random_seeds": [0]}})
    walls, found = {}, {}
    for label, reuse in (("reuse", 2.0), ("full", 0.0)):
        start = time.perf_counter()
        out = sweep(base.model_copy(update={"reuse_memory_gb": reuse}),
                    with_rankings(args.reference, tmp / label), progress=False)
        walls[label] = time.perf_counter() - start
        found[label] = {k: r.get("items") or r.get("perplexity") for k, r in rows(out).items()}
        print(f"2. choice sweep, reuse {label}: {walls[label]:.1f} s; "
              f"{json.loads((out / 'environment.json').read_text())['reuse']}")
    same = found["reuse"] == found["full"]
    print(f"   per-item results identical with and without reuse: {same}")
    shutil.rmtree(tmp, ignore_errors=True)
    if missing or not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
