"""Benchmark: a 4 K × 4 α sweep on the demo pair, graftlm's sweep against the loop a user would write.

Same work on both sides: baselines of donor and target on dev and test, the 16 grid points on dev,
and the best point on test, from one ranking computed beforehand (localization is timed apart).
The naive loop reloads both models for every point, copies the components' slices, and evaluates
with the same evaluator; graftlm loads once and transplants in memory. Ratio printed last.

    .venv/bin/python bench/sweep.py                 # the demo pair (examples/demo.yaml)
    .venv/bin/python bench/sweep.py --config C.yaml # any sweep config
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from analysis import select, tasks, units
from analysis.evaluate import run as evaluate
from analysis.models import load
from analysis.sweep import DEMO_CONFIG, Controls, SweepConfig, sweep


def naive(cfg: SweepConfig, ranking: list[str], method: str) -> dict[tuple[int, float], float]:
    """Reload, transplant, evaluate for each point, as a first script would."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task = tasks.load(cfg.task)
    results = {}

    def fresh(ref: str) -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(load(ref).ref.path, dtype=torch.float32).eval()

    tokenizer = AutoTokenizer.from_pretrained(load(cfg.target).ref.path)
    limits = {"dev": cfg.dev_limit, "test": cfg.test_limit}

    def transplanted(k: int, alpha: float) -> torch.nn.Module:
        target, donor = fresh(cfg.target), fresh(cfg.donor)
        tp, dp = dict(target.named_parameters()), dict(donor.named_parameters())
        lay = units.layout(target.config, {n: tuple(p.shape) for n, p in tp.items()})
        with torch.no_grad():
            for comp in units.select(lay, ranking[:k]):
                for s in comp.slices:
                    idx = s.index(tp[s.param].ndim)
                    tp[s.param][idx] = (1 - alpha) * tp[s.param][idx] + alpha * dp[s.param][idx]
        return target

    for ref in (cfg.donor, cfg.target):
        for split in ("dev", "test"):
            evaluate(fresh(ref), tokenizer, task, split=split, limit=limits[split], batch_size=cfg.batch_size,
                     progress=False)
    for k in cfg.k:
        for alpha in cfg.alpha:
            res = evaluate(transplanted(k, alpha), tokenizer, task, split="dev", limit=cfg.dev_limit,
                           batch_size=cfg.batch_size, progress=False)
            results[k, alpha] = res.summary["accuracy"]
    best = max(results, key=lambda ka: (results[ka], -ka[0], -ka[1]))
    evaluate(transplanted(*best), tokenizer, task, split="test", limit=cfg.test_limit, batch_size=cfg.batch_size,
             progress=False)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEMO_CONFIG)
    parser.add_argument("--method", default="attribution")
    args = parser.parse_args()
    base = SweepConfig.load(args.config)
    cfg = base.model_copy(update={"methods": [args.method], "k": [1, 2, 4, 8], "alpha": [0.25, 0.5, 0.75, 1.0],
                                  "controls": Controls(random_seeds=[], copy_all=False, weight=False),
                                  "retention": None, "max_new_tokens": [None]})
    load(cfg.target)  # imports (transformers' model code, scipy) warm for both sides

    start = time.perf_counter()
    ranking = select.rank(args.method, donor=cfg.donor, target=cfg.target, task=cfg.task, kinds=cfg.components,
                          limit=cfg.probe_limit)
    localize_s = time.perf_counter() - start
    run = Path(tempfile.mkdtemp(prefix="graftlm-bench-sweep-"))
    (run / "rankings").mkdir()
    (run / "rankings" / f"{args.method}.json").write_text(json.dumps([[c, s] for c, s in ranking]))
    start = time.perf_counter()
    sweep(cfg, run, progress=False)
    ours = time.perf_counter() - start
    start = time.perf_counter()
    naive(cfg, [c for c, _ in ranking], args.method)
    theirs = time.perf_counter() - start
    shutil.rmtree(run, ignore_errors=True)
    print(f"\n{args.config}: {args.method}, {len(cfg.k)} K × {len(cfg.alpha)} α on dev + baselines + best on test")
    print(f"localization ({args.method}, once, not in either figure): {localize_s:.2f} s")
    print(f"graftlm sweep (load once, in-memory transplant): {ours:.2f} s")
    print(f"naive loop (reload, transplant, evaluate per point): {theirs:.2f} s")
    print(f"\nsweep / naive wall: {ours / theirs:.2f}×   (goal ≤ 0.35×)")


if __name__ == "__main__":
    main()
