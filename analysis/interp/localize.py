"""``localize``: which heads and MLPs carry the task difference between a donor and a target.

Ties :mod:`analysis.interp.shifts`, :mod:`analysis.interp.patching` and :mod:`analysis.interp.select` together on the task's
probe split (never dev or test), and writes::

    OUT/scores.csv  scores.json      every statistic per component (and per model where there is one)
    OUT/plan-top{K}.yaml            the top K at strength α, one file per K
    OUT/heads.png  blocks.png       heatmaps: layer × head, layer × {attn, mlp} (linears.png for linears)
    OUT/top.png                     the top components by the method's score
    OUT/positions.png               with per_position: patching per layer block and position

Besides the asked-for kinds, the attention and MLP blocks are measured too (for the layer × {attn,
mlp} view); only the asked-for kinds are ranked into plans. The dataless ``weight`` score is computed
for every component whatever the method, as a reference column.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analysis import units
from analysis.errors import GraftError
from analysis.interp import probe as probe_mod
from analysis.interp import select, shifts
from analysis.interp.batching import MetricFn
from analysis.interp.methods import CAUSAL, WEIGHT_SPACE
from analysis.plan import Plan, now

if TYPE_CHECKING:
    import pandas as pd

    from analysis.eval.tasks import Task
    from analysis.interp.probe import Probe
    from analysis.io.models import LoadedModel

KIND_ALIASES = {"heads": "head", "mlps": "mlp", "neurons": "neuron", "linears": "linear", "groups": "group",
                "kvs": "kv",
                "layers": "layer"}


@dataclass
class Localization:
    """The outcome: a scores table (one row per component), the ranking, and a plan per K."""

    method: str
    scores: pd.DataFrame
    ranking: list[str]
    plans: dict[int, Plan]
    meta: dict[str, Any]
    positions: pd.DataFrame | None = None
    paths: dict[str, str] = field(default_factory=dict)

    def top(self, k: int) -> list[str]:
        return self.ranking[:k]


def parse_kinds(components: str | Sequence[str] | None, method: str) -> list[str]:
    """``head,mlp`` (or a list) → kinds; the default is the method's natural unit."""
    if components is None:
        return ["linear"] if method == "lae" else list(units.DEFAULT_KINDS)
    raw = components.split(",") if isinstance(components, str) else [p for c in components for p in c.split(",")]
    kinds = [KIND_ALIASES.get(k.strip(), k.strip()) for k in raw if k.strip()]
    for k in kinds:
        if k not in shifts.MEASURABLE and k not in shifts.UNHOOKED:
            raise GraftError(f"unknown component kind {k!r}",
                             f"use a comma list of {', '.join(shifts.MEASURABLE + shifts.UNHOOKED)}")
    kinds = list(dict.fromkeys(kinds))
    if method not in WEIGHT_SPACE and method not in ("weight", "random") and not set(kinds) - set(shifts.UNHOOKED):
        raise GraftError(f"{method} sees components through their activations, and {', '.join(kinds)} have no hook "
                         "point", "add head,kv,mlp or use gradient, greedy, mask or weight")
    return kinds


def _load(ref: str | os.PathLike[str] | LoadedModel, dtype: str, allow_pickle: bool,
          trust_remote_code: bool) -> LoadedModel:
    from analysis.io.models import LoadedModel, load

    if isinstance(ref, LoadedModel):
        return ref
    return load(ref, dtype=dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)  # type: ignore[arg-type]


def localize(
    donor: str | os.PathLike[str] | LoadedModel,
    target: str | os.PathLike[str] | LoadedModel,
    task: str | os.PathLike[str] | Task | None,
    *,
    method: str = "gradient",
    components: str | Sequence[str] | None = None,
    mode: str | None = None,
    positions: str = "answer",
    metric: str | MetricFn = "logprob",
    answers: str = "donor",
    top: int | Sequence[int] = 8,
    alpha: float = 1.0,
    seed: int = 0,
    limit: int | None = None,
    split: str = "probe",
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    converse: bool = False,
    per_position: bool = False,
    out: str | os.PathLike[str] | None = None,
    figures: bool = True,
    dtype: str = "float32",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
    probe: Probe | None = None,
    force: bool = False,
    prompts: Sequence[tuple[str, str]] | None = None,
) -> Localization:
    """Score every component of the asked kinds by ``method`` on the task's probe split, rank them,
    and make a plan of the top K (for each K in ``top``) at strength ``alpha``.

    What the causal methods and teacher-mode shifts force as "the answer" is the evaluation's
    (:mod:`analysis.interp.probe`): ``answers="donor"`` (default) the donor's own outputs on the probe items it
    gets right, ``"reference"`` the gold answer through the task's ``target`` template; either way a check
    that the donor produces the forced answers where it is counted right runs first.
    ``mode`` (shifts and lae only): ``teacher`` (both models read prompt + forced answer; default
    for shifts) or ``generate`` (each decodes greedily; default for lae). ``positions`` (teacher mode):
    ``answer``, ``all`` or ``last``. ``metric`` (attribution, patching, gradient, greedy, mask):
    ``logprob`` of the forced answer or ``logit_diff``. ``greedy`` selects max(``top``) components and
    ``mask`` learns strengths under a budget of max(``top``). ``converse`` adds the target → donor study
    (necessity) beside donor → target; ``per_position`` adds block patching per position. Models may be
    passed already loaded, and a probe already built. ``split``: the task split read as the probe
    (``probe``; e.g. ``train`` for a task that has one) — never the split a study chooses or reports on.
    ``out`` is written whole or not at all; an existing one is replaced only with ``force``.

    As ``transformer_lens.patching`` users do: ``metric`` may be a callable ``metric(logits, batch)`` → one
    value per item (``logits``: the batch's kept positions; ``batch``: :class:`analysis.interp.batching.Batch`), and
    attribution and patching accept ``prompts=[(clean, corrupted), ...]`` instead of a task — the target
    reads the corrupted prompts, the donor the clean ones (the same model twice is classic activation
    patching); the metric callable then says what is measured, at the last position.
    """
    from analysis.interp import patching, weightspace

    method = select.check_method(method)
    kinds = parse_kinds(components, method)
    tops = [top] if isinstance(top, int) else list(top)
    if not tops or any(k < 1 for k in tops):
        raise GraftError(f"--top must be at least 1, got {tops}", "pass --top 8 (repeatable)")
    if mode is None:
        mode = "generate" if method == "lae" else "teacher"
    if mode not in ("teacher", "generate"):
        raise GraftError(f"unknown mode {mode!r}", "use teacher or generate")
    if mode == "generate" and method not in ("shifts", "lae"):
        raise GraftError(f"{method} needs both models on the same tokens", "use --mode teacher")
    if positions not in ("answer", "all", "last"):
        raise GraftError(f"unknown positions {positions!r}", "use answer, all or last")
    metric_name = metric if isinstance(metric, str) else getattr(metric, "__name__", "a metric callable")
    if not callable(metric) and metric not in patching.METRICS:
        raise GraftError(f"unknown metric {metric!r}", f"use {', '.join(patching.METRICS)} or pass a callable")
    if prompts is not None:
        if method not in CAUSAL:
            raise GraftError(f"prompt pairs are for attribution and patching, not {method}",
                             "use method='attribution' or 'patching'")
        if not callable(metric):
            raise GraftError("prompt pairs have no forced answer to score",
                             "pass metric=fn, fn(logits, batch) → one value per pair (e.g. a logit difference)")
        if converse or per_position:
            raise GraftError("converse and per_position read a task's probe, not prompt pairs", "leave them off")
    if answers not in probe_mod.ANSWER_SOURCES:
        raise GraftError(f"unknown answer source {answers!r}", f"use {' or '.join(probe_mod.ANSWER_SOURCES)}")
    if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise GraftError(f"strength α={alpha} for the plans is outside [0, 1]", "pass --alpha between 0 and 1")
    if batch_size < 1 or (limit is not None and limit < 1):
        raise GraftError(f"batch size and limit must be at least 1, got {batch_size} and {limit}",
                         "pass 1 or more")
    sources = _sources(donor, target, task)
    if out is not None:
        from analysis.io.files import check_out

        check_out(out, force=force, sources=sources)
    dataless = method in ("weight", "random")
    start = time.perf_counter()

    loaded_task = None
    if not dataless and prompts is None:
        from analysis.eval import tasks as tasks_mod
        from analysis.eval.tasks import Task

        if task is None:
            raise GraftError(f"method {method} needs a task", "pass --task")
        loaded_task = task if isinstance(task, Task) else tasks_mod.load(task)
        probe_mod.probe_items(loaded_task, limit, split)  # fails early on a task without probe items

    # Measured kinds: the asked ones, plus (activation methods) attn/mlp blocks for the layer × {attn, mlp}
    # view; the weight-space methods score exactly the candidates, whose shares add up.
    context = [k for k in ("attn", "mlp") if k not in kinds and ({"head", "kv", "group", "mlp", "attn"} & set(kinds))]
    measured = kinds + (context if method not in WEIGHT_SPACE else [])
    if not dataless or not isinstance(donor, str | os.PathLike):
        d_model = _load(donor, dtype, allow_pickle, trust_remote_code)
        t_model = _load(target, dtype, allow_pickle, trust_remote_code)
        from analysis.io.models import require_same_shapes

        require_same_shapes(d_model, t_model)
        lay = shifts.layout_of(t_model, d_model)
        get_d, get_t = select.getter(d_model), select.getter(t_model)
        names = (d_model.name, t_model.name)
    else:  # weight / random from files: no model is loaded
        from analysis.check import check, require_compatible
        from analysis.io.checkpoint import Checkpoint
        from analysis.io.refs import load_config

        require_compatible(check(donor, target, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code))
        tck = Checkpoint.open(target, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        dck = Checkpoint.open(donor, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        lay = units.layout(load_config(target, trust_remote_code=trust_remote_code), tck.shapes(), dck.shapes())
        get_d, get_t = select.getter(dck), select.getter(tck)
        names = (str(donor), str(target))
    site_list = shifts.sites(lay, [k for k in measured if k not in shifts.UNHOOKED])
    # Tensors outside the layers have no hook point: activation methods leave them unscored (ranked last);
    # weight-space methods, weight and random score them like any other component.
    outer = units.outer_ids(lay) if "outer" in kinds else []
    table = _frame(shifts.describe_ids(site_list) + [{"id": n, "kind": "outer", "layer": None, "index": None}
                                                     for n in outer])
    # Where a follow-up study finds each component's activation: its TransformerLens hook names (a head is
    # `index` along hook_z's head axis; a KV head is seen at hook_k and hook_v); none for outer tensors.
    table.insert(3, "hook", [",".join(units.component(lay, cid).hooks) or None for cid in table.index])
    meta: dict[str, Any] = {"method": method, "donor": names[0], "target": names[1], "components": kinds,
                            "created": now(), **({} if dataless else {"split": split})}
    position_table = None
    explicit: list[str] | None = None  # a ranking given as an order (greedy), not by sorting a score

    if not dataless and mode == "teacher" and prompts is None:
        if probe is None:
            probe = probe_mod.build(loaded_task, d_model, split=split, limit=limit, answers=answers,  # type: ignore[arg-type]
                                    batch_size=batch_size, max_new_tokens=max_new_tokens)
        if lay.unshared:  # vocabularies of two sizes: both models must have every forced token
            probe = probe.within(min(m.model.get_input_embeddings().num_embeddings for m in (d_model, t_model)))  # type: ignore[union-attr]
        meta.update(probe.meta)
    if method in ("shifts", "lae"):
        df = shifts.measure(d_model, t_model, loaded_task, kinds=measured, mode=mode,  # type: ignore[arg-type]
                            positions=positions, batch_size=batch_size, limit=limit,  # type: ignore[arg-type]
                            max_new_tokens=max_new_tokens, progress=progress, split=split, probe=probe)
        table = table.join(df.drop(columns=["kind", "layer", "index"]))
        meta.update(mode=mode, positions=positions if mode == "teacher" else "last generated",
                    n_prompts=int(df["n_prompts"].iloc[0]))
    elif method in WEIGHT_SPACE:
        batches = probe.batches(batch_size)  # type: ignore[union-attr]
        ids = [cid for s in shifts.unique(site_list) for cid in s.ids] + outer
        blend = weightspace.Blend(t_model, d_model, ids, lay)
        if method == "gradient":
            values, info = weightspace.gradient(blend, batches, metric=metric, progress=progress)  # type: ignore[arg-type]
        elif method == "greedy":
            order, values, info = weightspace.greedy(blend, batches, max(tops), metric=metric,  # type: ignore[arg-type]
                                                     progress=progress)
            explicit = [ids[i] for i in order]
            table["greedy_step"] = math.nan
            table.loc[explicit[:info["k"]], "greedy_step"] = range(1, info["k"] + 1)
        else:
            values, info = weightspace.mask(blend, batches, max(tops), metric=metric, progress=progress)  # type: ignore[arg-type]
        table[method] = math.nan
        table.loc[ids, method] = values
        meta.update(mode="teacher", metric=metric_name, n_prompts=sum(b.n_items for b in batches), **{method: info})
    elif method in CAUSAL:
        source_batches = None
        if prompts is not None:  # the target on the corrupted prompts, the donor on the clean ones
            from analysis.interp.batching import prompt_pairs

            batches, source_batches = prompt_pairs(t_model.tokenizer, prompts, batch_size)
            meta.update(prompt_pairs=len(prompts))
        else:
            batches = probe.batches(batch_size)  # type: ignore[union-attr]
        run = patching.attribute if method == "attribution" else patching.patch
        df = run(t_model, d_model, batches, site_list, metric=metric, column=method, progress=progress,  # type: ignore[operator]
                 source_batches=source_batches)
        table = table.join(df[[method, f"{method}_sd"]])
        meta.update(mode="teacher", metric=metric_name, n_prompts=sum(b.n_items for b in batches))
        if method == "attribution":
            meta.update(target_metric=df.attrs["receiver_metric"], donor_metric=df.attrs["source_metric"])
        if converse:
            col = f"converse_{method}"
            cdf = run(d_model, t_model, batches, site_list, metric=metric, column=col, progress=progress)  # type: ignore[arg-type]
            table = table.join(cdf[[col, f"{col}_sd"]])
        if per_position:
            blocks = shifts.sites(lay, ("attn", "mlp"))
            position_table = patching.patch_positions(t_model, d_model, batches, blocks, metric=metric,  # type: ignore[arg-type]
                                                      progress=progress)
    elif method == "random":
        meta.update(seed=seed)

    if outer and not dataless and method not in WEIGHT_SPACE:
        meta["unscored"] = outer  # no hook point: ranked last, whatever they carry (the report says so)
    warning = probe_mod.no_gap({"method": method, **meta})
    if warning:
        meta["warning"] = warning
    ids = list(table.index)
    table["weight"] = select.weight_scores(get_d, get_t, lay, ids)
    ranked_kinds = set(kinds)
    table["ranked"] = [k in ranked_kinds for k in table["kind"]]
    candidates = table[table["ranked"]]
    if method == "random":
        table["random"] = math.nan
        table.loc[candidates.index, "random"] = select.random_scores(list(candidates.index), seed)
        candidates = table[table["ranked"]]
    score = select.score_of(candidates, method, mode)
    ranking = explicit if explicit is not None else select.order(score)
    table["score"] = select.score_of(table, method, mode)
    table["rank"] = math.nan
    table.loc[ranking, "rank"] = range(1, len(ranking) + 1)
    if outer and method in WEIGHT_SPACE:  # beside an activation method's "unscored", in a study's notes
        meta["outer_ranks"] = {cid: ranking.index(cid) + 1 for cid in outer if cid in ranking}
    task_name = None if loaded_task is None else loaded_task.name
    if task_name is None and task is not None:
        task_name = str(task)
    meta["task"] = task_name
    plans = {k: select.plan(ranking, k, alpha=alpha, method=method, task=task_name, scores=score,
                            donor=names[0], target=names[1]) for k in tops}
    meta["wall_s"] = round(time.perf_counter() - start, 3)
    result = Localization(method, table, ranking, plans, meta, position_table)
    if out is not None:
        from analysis.io.files import staged

        final = Path(out).expanduser()
        with staged(final, force=force, sources=sources) as tmp:
            paths = write(result, tmp, figures=figures)
        result.paths = {name: str(final / Path(path).name) for name, path in paths.items()}
    return result


def _sources(*refs: Any) -> list[Path]:
    """The files and folders behind model and task references (an output may not go there)."""
    from analysis.eval.tasks import Task
    from analysis.io.models import LoadedModel
    from analysis.io.refs import source_paths

    paths: list[Path] = []
    for ref in refs:
        if isinstance(ref, LoadedModel):
            paths += source_paths(ref.ref)
            continue
        if isinstance(ref, Task):
            ref = ref.source
        if ref is None:
            continue
        if Path(ref).exists():  # a model folder, a .gguf or a task file
            paths.append(Path(ref))
            continue
        with contextlib.suppress(GraftError):  # demo:NAME, a hub id
            paths += source_paths(ref)
    return paths


def rank(method: str, *, donor: Any, target: Any, task: Any = None, kinds: Sequence[str] | None = None,
         seed: int = 0, limit: int | None = None, **options: Any) -> list[tuple[str, float]]:
    """(component id, score) of every component of ``kinds``, best first, by ``method`` on the task's
    probe split — :func:`localize` without files. ``donor``/``target`` are refs or
    loaded models; ``options`` go to localize (mode, positions, metric, batch_size, ...)."""
    options.setdefault("progress", False)
    result = localize(donor, target, task, method=method, components=kinds, seed=seed, limit=limit, top=1,
                      out=None, **options)
    score = result.scores["score"]
    return [(cid, float(score[cid])) for cid in result.ranking]


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    import pandas as pd

    df = pd.DataFrame(rows).set_index("id")
    df["index"] = df["index"].astype("Int64")
    return df


def write(result: Localization, out: Path, *, figures: bool = True) -> dict[str, str]:
    """scores.csv/json, plan-top{K}.yaml and (unless ``figures=False``) the figures, into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {}
    table = result.scores
    table.to_csv(out / "scores.csv")
    paths["scores.csv"] = str(out / "scores.csv")
    rows = json.loads(table.reset_index().to_json(orient="records"))
    (out / "scores.json").write_text(json.dumps({"meta": result.meta, "ranking": result.ranking, "components": rows},
                                                indent=1, allow_nan=False) + "\n")
    paths["scores.json"] = str(out / "scores.json")
    for k, plan in result.plans.items():
        paths[f"plan-top{k}"] = str(plan.save(out / f"plan-top{k}.yaml"))
    if result.positions is not None:
        result.positions.to_csv(out / "positions.csv")
        paths["positions.csv"] = str(out / "positions.csv")
    if figures:
        from analysis.report.localization import plot_all

        paths.update(plot_all(result, out))
    result.paths = paths
    return paths




