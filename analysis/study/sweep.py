"""The study: baselines, localization on probe, a K × α grid on dev, the chosen points and controls on test.

``sweep(config, out)`` is resumable: every finished evaluation is one flushed, fsynced line of
``RUN/results.jsonl`` (with its per-item results), and a rerun skips what is there. The config is
stored in ``RUN/config.yaml`` with its hash; resuming with another config is refused.

Both models are loaded once; each grid point is an in-memory transplant and restore, never a reload.
For scoring tasks (choice, perplexity — the retention set too) the activations below a point's lowest
transplanted layer are recorded once per item set and replayed (:mod:`analysis.eval.replay`): they cannot
change, and the results are bit-identical to full forwards; generation replays its prompts the same
way (keys and values included) wherever it decodes without drafts. For generation tasks each dev point
verifies the previous point's outputs as drafts in one forward (speculative decoding with a
neighbour as the draft model) and decodes step by step only where they part — as long as
neighbouring points agree on most items (a row that parts runs its prompt again, so drafts that mostly
fail cost more than they save: measured on SmolLM2-135M, 30% slower before this rule).
Selection never sees test items: localization reads the probe split, K and α are chosen on dev, and
only the chosen points and the controls are evaluated on test.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from analysis.interp.methods import BUDGETED
from analysis.io.files import check_out, write_file
from analysis.plan import Plan
from analysis.study.config import RayOptions, SweepConfig, grow_limit, grown_k, ray_options, resolve_k
from analysis.study.points import Executor, Job, Local, Point, PointRunner, chosen_point, tokens
from analysis.study.progress import Progress
from analysis.study.runfolder import (
    INPUTS,
    Results,
    environment,
    grows,
    input_identity,
    length_suffix,
    open_run,
    plan_file,
    read_ranking,
    refuse_another_config,
    refuse_other_inputs,
    run_lock,
    short_name,
)
from analysis.study.splits import Dropped, check_splits


def sweep(config: SweepConfig | str | Path, out: str | Path, *, progress: bool = True,
          on_point: Callable[[Point, dict[str, Any]], None] | None = None,
          ray: RayOptions | str | bool | None = None) -> Path:
    """Run (or resume) the study of ``config`` into folder ``out``; returns ``out``.

    ``ray``: None — as the config's ``ray:`` says; False — in this process; True — on Ray as the config
    says (a local Ray with 2 workers when it says nothing); an address — that cluster (``local``: start
    Ray here); :class:`RayOptions` — those. Per-item results are the same either way.
    """
    import torch

    from analysis.eval import tasks
    from analysis.io.checkpoint import fingerprint
    from analysis.io.models import check_device, load, require_same_shapes

    cfg = config if isinstance(config, SweepConfig) else SweepConfig.load(config)
    on_ray = ray_options(cfg, ray)
    run_dir = Path(out).expanduser()
    # Everything that can be wrong with the inputs is found before RUN is created or written.
    if on_ray is not None:
        from analysis.study.cluster import require_ray

        require_ray()
    check_out(run_dir, replace=False, sources=_sources(cfg, config))
    check_device(cfg.device)
    refuse_another_config(cfg, run_dir)
    growing = grows(cfg, run_dir)
    torch.manual_seed(cfg.seed)
    task = tasks.load(cfg.task)
    splits, task, dropped = check_splits(task, cfg)  # from here on, probe and dev without what test holds
    retention_task = tasks.load(cfg.retention) if cfg.retention else (task if task.retention is not None else None)
    retention_split = "retention" if cfg.retention is None else None
    with ThreadPoolExecutor(max_workers=2) as pool:  # the weights hash while the models load (cached: once)
        hashed = {who: pool.submit(fingerprint, ref) for who, ref in (("donor", cfg.donor), ("target", cfg.target))}

        def identity() -> dict[str, Any]:
            own = retention_task if cfg.retention else task.retention
            return input_identity(task, own, hashed["donor"].result(), hashed["target"].result())
        if (run_dir / INPUTS).is_file():  # a resumed run: changed inputs are refused before anything loads
            refuse_other_inputs(run_dir, identity(), cfg)
        # 'a' is the config's donor, 'b' its target, until auto_order says otherwise.
        models = {"a": load(cfg.donor, dtype=cfg.dtype, device=cfg.device, device_map=cfg.device_map),
                  "b": load(cfg.target, dtype=cfg.dtype, device=cfg.device, device_map=cfg.device_map)}
        require_same_shapes(models["a"], models["b"])
        inputs = identity()
    with run_lock(run_dir):
        results = open_run(cfg, run_dir, inputs)
        runner = PointRunner(models, task, retention_task, cfg.batch_size, int(cfg.reuse_memory_gb * 2**30))
        executor: Executor = Local(runner)
        if on_ray is not None:
            from analysis.study.cluster import RayExecutor, WorkerSpec

            executor = RayExecutor(on_ray, WorkerSpec(cfg, task, retention_task, inputs, torch.get_num_threads()))
        try:
            return _study(cfg, run_dir, results, task, splits, dropped, retention_task, retention_split, models,
                          runner, executor, progress, on_point, growing)
        finally:
            executor.close()


def _sources(cfg: SweepConfig, config: SweepConfig | str | Path) -> list[Path]:
    """What a study reads: a run folder may not be, or lie inside, any of them."""
    from analysis.io.refs import source_paths

    paths = [p for ref in (cfg.donor, cfg.target) for p in source_paths(ref)]
    paths += [Path(ref) for ref in (cfg.task, cfg.retention) if ref and Path(ref).exists()]
    if not isinstance(config, SweepConfig):
        paths.append(Path(config))
    return paths


def _study(cfg: SweepConfig, run_dir: Path, results: Results, task: Any, splits: dict[str, str], dropped: Dropped,
           retention_task: Any, retention_split: str | None, models: dict[str, Any], runner: PointRunner,
           executor: Executor, progress: bool, on_point: Callable[[Point, dict[str, Any]], None] | None,
           growing: bool) -> Path:
    """The study proper, in a run folder this process holds: grid, choices, controls. Baselines run here;
    the grid's and the controls' points run on ``executor`` (here, or on Ray actors), in batches of points
    that do not depend on each other. Only this process writes results.jsonl."""
    from analysis import units
    from analysis.interp import probe as probe_mod
    from analysis.interp.select import getter, outside, random_ids
    from analysis.study.race import Raced

    lay = runner.layout
    lengths = cfg.max_new_tokens if task.kind == "generate" else [None]
    all_ids = units.component_ids(lay, cfg.components)  # type: ignore[arg-type]
    k_grid = resolve_k(cfg.k, len(all_ids))
    ks = k_grid.resolved
    most = grow_limit(cfg.k_grow_to, len(all_ids)) if growing else 0  # the largest K a grid may grow to
    plan_total = _count_points(cfg, len(ks), lengths, retention_task is not None)
    bar = Progress(plan_total, progress, {who: short_name(models[who].name) for who in models})
    if dropped.said:
        bar.note(dropped.said)
    if k_grid.describe():
        bar.note(f"k: {k_grid.describe()}")

    wanted: set[int] = set()  # the lowest layers of the plans to come: one full evaluation records them all

    def grid_lows(ranking: dict[str, list[tuple[str, float]]]) -> set[int]:
        """The layers the grid's points start from (α does not move them)."""
        return {runner.low(_plan(ranking[m], k, 1.0, m, cfg.task)) for m in cfg.methods for k in ks}

    def resumed(job: Job) -> dict[str, Any] | None:
        return results[job.point.key] if job.point.key in results else None

    def evaluate_all(jobs: list[Job], here: bool = False, via: Executor | None = None) -> list[dict[str, Any]]:
        """Each job's row, in the order given: read back, or evaluated (``here``: in this process; ``via``:
        by that executor) and written."""
        rows: dict[str, dict[str, Any]] = {}
        for job, row, seconds in (via or (Local(runner) if here else executor)).run(jobs, resumed):
            if seconds is not None:
                results.add(row)
            bar.advance(job.point, row, seconds)
            if seconds is not None and on_point is not None:
                on_point(job.point, row)
            rows[job.point.key] = row
        return [rows[job.point.key] for job in jobs]

    def job(point: Point, model: str, items_split: str | None, **kw: Any) -> Job:
        on_retention = point.split == "retention"
        limit = cfg.retention_limit if on_retention else {"dev": cfg.dev_limit, "test": cfg.test_limit}[point.split]
        return Job(point, model, items_split, limit, on_retention=on_retention, **kw)

    try:
        for mnt in lengths:
            ranking: dict[str, list[tuple[str, float]]] = {}
            wanted.clear()
            suffix = length_suffix(mnt, len(lengths) > 1)

            def _probe_of(donor: Any, mnt: int | None = mnt) -> Callable[[], Any]:
                """The probe with the answers localization forces, built once for all methods (the donor's
                outputs depend on it and on the decoding length)."""
                built: list[Any] = []

                def get() -> Any:
                    if not built:
                        built.append(probe_mod.build(task, donor, split=splits["probe"], limit=cfg.probe_limit,
                                                     answers=cfg.answers, batch_size=cfg.batch_size,
                                                     max_new_tokens=mnt))
                    return built[0]
                return get
            needed = [*cfg.methods, *(["weight"] if cfg.controls.weight and "weight" not in cfg.methods else [])]
            if not cfg.auto_order:
                # The target is known: localize first, so that its baselines record what the grid replays.
                probe = _probe_of(models["a"])
                ranking = {m: _ranking(run_dir, m, models["a"], models["b"], task, cfg, top=ks[-1], probe=probe,
                                       suffix=suffix, say=bar.note) for m in needed}
                wanted.update(grid_lows(ranking))
            # Baselines on dev and test for both models, here; 'auto' orders donor and target by dev accuracy.
            base = {}
            for name in ("a", "b"):
                for split in ("dev", "test"):
                    (base[name, split],) = evaluate_all([job(
                        Point("baseline", split, name, max_new_tokens=mnt), name, splits[split],
                        record=frozenset(wanted), record_baseline=name == "b" and bool(wanted))], here=True)
            donor_name, target_name = _order(cfg, base)
            if donor_name == "b":
                dev = {w: (base[w, "dev"]["k"], base[w, "dev"]["n"]) for w in ("a", "b")}
                bar.note(swapped(short_name(models["b"].name), dev["b"], dev["a"]))
            order_key = f"order|{mnt}"
            if order_key not in results:
                # the study's header: who is the donor, and what a reader must know about its K and splits
                results.add({"key": order_key, "phase": "order", "max_new_tokens": mnt, "donor": donor_name,
                             "target": target_name, "donor_ref": models[donor_name].name,
                             "target_ref": models[target_name].name, "k_grid": k_grid.__dict__,
                             "k_grow_to": most or None, "overlap_dropped": dropped.__dict__ if dropped.counts else None,
                             "unshared": sorted(lay.unshared) or None,  # a vocabulary one tokenizer extends
                             "tied_in_one": lay.tied_in_one or None,  # ... or an LM head one model ties
                             "heads_share_a_norm": lay.heads_share_a_norm or None,  # check.SHARED_NORM
                             # what copy-all cannot move: a ceiling on every selection, said when it binds
                             "outside": outside(getter(models[donor_name]), getter(models[target_name]), lay,
                                                all_ids, units.language_model_names(lay))})
            donor, target = models[donor_name], models[target_name]
            if retention_task is not None:
                for name in (donor_name, target_name):
                    evaluate_all([job(Point("baseline", "retention", name, max_new_tokens=mnt), name, retention_split,
                                      record=frozenset(wanted), record_baseline=name == target_name and bool(wanted))],
                                 here=True)
            if not ranking:
                probe = _probe_of(donor)
                ranking = {m: _ranking(run_dir, m, donor, target, task, cfg, top=ks[-1], probe=probe,
                                       reverse=donor_name == "b", suffix=suffix, say=bar.note) for m in needed}
                wanted.update(grid_lows(ranking))
            # The grid on dev. Along each method's grid a point verifies the previous point's generations as
            # drafts, which spares sequential decoding steps where neighbouring points generate the same
            # tokens; elsewhere drafts cost more than they save, so a point drafts only while the previous
            # one agreed with the point before it on at least DRAFT_AGREEMENT of the items.
            base_tokens = tokens(base[target_name, "dev"])
            grid = [job(Point("grid", "dev", "transplant", method, k, alpha, mnt), target_name, splits["dev"],
                        plan=_plan(ranking[method], k, alpha, method, cfg.task), donor=donor_name,
                        record=frozenset(wanted), chain=f"{method}|{mnt}", drafts_base=base_tokens)
                    for method in cfg.methods for k in ks for alpha in cfg.alpha]
            raced = Raced(runner, cfg.race) if cfg.race is not None else None
            evaluate_all(grid, via=raced)
            # Where the top K still holds a method's best and the donor lies above it, the grid grows
            # (config.grown_k): a grid too small for a regression spread over many components would
            # otherwise report the grid's limit as the method's. Greedy and mask rank anew per budget.
            method_ks = {m: list(ks) for m in cfg.methods}
            by_budget = {m: {ks[-1]: ranking[m]} for m in cfg.methods}  # greedy's and mask's: one per budget
            donor_dev, target_dev = base[donor_name, "dev"]["accuracy"], base[target_name, "dev"]["accuracy"]
            while True:
                more = []
                for method in cfg.methods:
                    grid_rows = {k: [results[Point("grid", "dev", "transplant", method, k, a, mnt).key]
                                     for a in cfg.alpha] for k in method_ks[method]}
                    k = grown_k(grid_rows, donor_dev, target_dev, most)
                    if k is None:
                        continue
                    bar.note(f"{method}: K={method_ks[method][-1]}, the top of its grid, is its best on dev (or "
                             f"nothing is clearly above the target yet) and well below the donor: K={k} added")
                    method_ks[method].append(k)
                    if method in BUDGETED:
                        by_budget[method][k] = _ranking(run_dir, method, donor, target, task, cfg, top=k,
                                                        probe=probe, reverse=donor_name == "b", suffix=suffix,
                                                        say=bar.note, budget=k)
                    more += [job(Point("grid", "dev", "transplant", method, k, alpha, mnt), target_name,
                                 splits["dev"], plan=_plan(_for_k(by_budget[method], k), k, alpha, method, cfg.task),
                                 donor=donor_name, record=frozenset(wanted), chain=f"{method}|{mnt}",
                                 drafts_base=base_tokens) for alpha in cfg.alpha]
                if not more:
                    break
                bar.fewer(-len(more))
                evaluate_all(more, via=raced)
            # The chosen point per method on test, with retention (never a point its race stopped).
            chosen = {m: chosen_point([results[Point("grid", "dev", "transplant", m, k, a, mnt).key]
                                       for k in method_ks[m] for a in cfg.alpha]) for m in cfg.methods}
            budgets = sorted(set(chosen.values()))
            bar.fewer((len(chosen) - len(budgets)) * _controls_per_budget(cfg))  # methods that chose the same budget
            wanted.clear()
            wanted.update(runner.low(_plan(_for_k(by_budget[m], k), k, a, m, cfg.task)) for m, (k, a) in chosen.items())
            wanted.update(runner.low(Plan.of(random_ids(all_ids, k, seed)))
                          for k, _ in budgets for seed in cfg.controls.random_seeds)
            record = frozenset(wanted)
            final: list[Job] = []
            for method, (k, alpha) in chosen.items():
                plan = _plan(_for_k(by_budget[method], k), k, alpha, method, cfg.task)
                plan.save(run_dir / plan_file(method, mnt, lengths))
                final.append(job(Point("chosen", "test", "transplant", method, k, alpha, mnt), target_name,
                                 splits["test"], plan=plan, donor=donor_name, record=record))
                if retention_task is not None:
                    final.append(job(Point("chosen", "retention", "transplant", method, k, alpha, mnt), target_name,
                                     retention_split, plan=plan, donor=donor_name, record=record))
            # Controls at the budget of each chosen point.
            for k, alpha in budgets:
                for seed in cfg.controls.random_seeds:
                    plan = Plan.of(random_ids(all_ids, k, seed), alpha=alpha, method="random", task=cfg.task, seed=seed)
                    final.append(job(Point("control", "test", "transplant", "random", k, alpha, mnt, seed), target_name,
                                     splits["test"], plan=plan, donor=donor_name, record=record))
                if cfg.controls.weight and "weight" not in cfg.methods:
                    final.append(job(Point("control", "test", "transplant", "weight", k, alpha, mnt), target_name,
                                     splits["test"], plan=_plan(ranking["weight"], k, alpha, "weight", cfg.task),
                                     donor=donor_name, record=record))
            if cfg.controls.copy_all:
                plan = Plan.of(all_ids, alpha=1.0, method="copy-all", task=cfg.task)
                final.append(job(Point("control", "test", "transplant", "copy-all", len(all_ids), 1.0, mnt), target_name,
                                 splits["test"], plan=plan, donor=donor_name, record=record))
            evaluate_all(final)
    finally:
        bar.close()  # also when interrupted: a live bar left running would garble the next output
    env = environment()
    reuse = Counter(runner.reuse())
    reuse.update(executor.stats())
    env["reuse"] = dict(reuse)
    write_file(run_dir / "environment.json", json.dumps(env, indent=2))
    return run_dir


def _order(cfg: SweepConfig, base: dict[tuple[str, str], dict[str, Any]]) -> tuple[str, str]:
    """(donor, target) model names; with auto_order the better of the two on dev is the donor."""
    if not cfg.auto_order:
        return "a", "b"
    return ("a", "b") if base["a", "dev"]["accuracy"] >= base["b", "dev"]["accuracy"] else ("b", "a")


def swapped(name: str, better: tuple[int, int], other: tuple[int, int]) -> str:
    """The line that says auto_order made the config's target (``name``) the donor: its dev accuracy
    (k, n) beside the config's donor's."""
    def acc(k: int, n: int) -> str:
        return f"{k / n:.1%}, {k}/{n}" if n else "no items"
    return f"auto_order: {name} was better on dev ({acc(*better)} vs {acc(*other)}), so it is the donor here"


def _ranking(run_dir: Path, method: str, donor: Any, target: Any, task: Any, cfg: SweepConfig, *,
             top: int, probe: Callable[[], Any], reverse: bool = False, suffix: str = "",
             say: Callable[[str], None] = print, budget: int | None = None) -> list[tuple[str, float]]:
    """Component ids with scores, best first; cached with what localization forced and measured in
    RUN/rankings/METHOD[-topK][-reversed][-tokensN].json, so a resumed run reuses them (``reverse``: 'auto'
    made the config's target the donor; ``probe()``: the probe this donor and decoding length share;
    ``budget``: greedy's or mask's, where the grid grew past the ranking made for its top K)."""
    from analysis.interp.localize import localize
    from analysis.interp.methods import FORCED

    name = f"{method}{f'-top{budget}' if budget else ''}{'-reversed' if reverse else ''}"
    for cache in (run_dir / "rankings" / f"{name}{suffix}.json", run_dir / "rankings" / f"{name}.json"):
        if cache.is_file():
            data = read_ranking(cache)
            # runs written before rankings kept their metadata hold the list alone, for every length
            if isinstance(data, list) or cache.stem == f"{name}{suffix}":
                return [tuple(x) for x in (data if isinstance(data, list) else data["ranking"])]  # type: ignore[misc]
    cache = run_dir / "rankings" / f"{name}{suffix}.json"
    started = time.perf_counter()
    forced = method in FORCED
    result = localize(donor, target, task, method=method, components=cfg.components, seed=cfg.seed,
                      limit=cfg.probe_limit, split=cfg.splits["probe"], top=top, answers=cfg.answers,
                      metric=cfg.metric, batch_size=cfg.batch_size, probe=probe() if forced else None,
                      progress=False)
    ranked = [(cid, float(result.scores.loc[cid, "score"])) for cid in result.ranking]
    meta = {**result.meta, "wall_s": round(time.perf_counter() - started, 3)}
    write_file(cache, json.dumps({"method": method, "ranking": [[cid, score] for cid, score in ranked],
                                  "meta": meta}, default=str))
    say(f"localized by {method} on the probe split in {meta['wall_s']:.1f} s; "
        f"top 3: {', '.join(cid for cid, _ in ranked[:3])}")
    return ranked


def _for_k(by_budget: dict[int, list[tuple[str, float]]], k: int) -> list[tuple[str, float]]:
    """The ranking K's points take: the one made for the smallest budget ≥ K (greedy and mask rank anew
    where the grid grew), else the one ranking there is."""
    return by_budget[min((b for b in by_budget if b >= k), default=max(by_budget))]


def _plan(ranking: list[tuple[str, float]], k: int, alpha: float, method: str, task: str) -> Plan:
    """The top ``k`` of a cached ranking as a plan (:func:`analysis.interp.select.plan`)."""
    from analysis.interp.select import plan

    return plan([cid for cid, _ in ranking], k, alpha=alpha, method=method, task=task, scores=dict(ranking),
                stamped=False)


def _count_points(cfg: SweepConfig, n_k: int, lengths: list[int | None], retention: bool) -> int:
    per_length = 4 + (2 if retention else 0)
    per_length += len(cfg.methods) * n_k * len(cfg.alpha)
    per_length += len(cfg.methods) * (1 + int(retention))
    per_length += len(cfg.methods) * _controls_per_budget(cfg)  # at most one budget per method
    per_length += int(cfg.controls.copy_all)
    return per_length * len(lengths)


def _controls_per_budget(cfg: SweepConfig) -> int:
    return len(cfg.controls.random_seeds) + int(cfg.controls.weight and "weight" not in cfg.methods)


