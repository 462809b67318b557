"""The study: baselines, localization on probe, a K × α grid on dev, the chosen points and controls on test.

``sweep(config, out)`` is resumable: every finished evaluation is one flushed, fsynced line of
``RUN/results.jsonl`` (with its per-item results), and a rerun skips what is there. The config is
stored in ``RUN/config.yaml`` with its hash; resuming with another config is refused.

Both models are loaded once; each grid point is an in-memory transplant and restore, never a reload.
For scoring tasks (choice, perplexity — the retention set too) the activations below a point's lowest
transplanted layer are recorded once per item set and replayed (:mod:`analysis.prefix`): they cannot
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

import contextlib
import hashlib
import json
import math
import os
import platform
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from analysis.errors import GraftError, validation_problem
from analysis.files import check_out, parse_yaml, read_text, write_file
from analysis.methods import Method
from analysis.plan import Plan
from analysis.points import Executor, Job, Local, Point, PointRunner, tokens

DEMO_CONFIG = Path(__file__).parent / "demo" / "demo.yaml"  # examples/demo.yaml links here
DEFAULT_SPLITS = {"probe": "probe", "dev": "dev", "test": "test"}
# Keys added after runs were written: at these values they are left out of the hash, so those runs resume.
LATER_DEFAULTS: dict[str, Any] = {"splits": DEFAULT_SPLITS, "overlap": "error", "answers": "donor",
                                  "metric": "logprob", "device_map": None, "race": None}
# Keys that say how a study runs, not what it computes: never hashed, so a run begun locally resumes on Ray.
HOW_KEYS = ("ray",)
SHARE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*%\s*")  # a K given as a share of the components, e.g. "5%"


class Controls(BaseModel):
    """Controls evaluated on test beside every chosen point."""

    model_config = ConfigDict(extra="forbid")
    random_seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    copy_all: bool = True
    weight: bool = True


class RayOptions(BaseModel):
    """Where the grid's and the controls' points run when a study runs on Ray (:mod:`analysis.cluster`)."""

    model_config = ConfigDict(extra="forbid")
    address: str | None = Field(None, description="a running Ray cluster (auto, HOST:PORT, ray://HOST:PORT); "
                                                  "null: start Ray on this machine")
    workers: int = Field(2, ge=1, description="actors, each loading the pair once and taking points from a queue")


class SweepConfig(BaseModel):
    """What to study. Round-trips through YAML (see examples/demo.yaml)."""

    model_config = ConfigDict(extra="forbid")
    donor: str = Field(description="donor model reference (the stronger one)")
    target: str = Field(description="target model reference (the one to improve)")
    auto_order: bool = Field(False, description="measure both on dev and make the stronger the donor, "
                                                "per decoding length")
    task: str
    retention: str | None = Field(None, description="off-task set (perplexity); default: the task's own")
    # gradient and greedy: the two that beat random components on the most pairs of the bank (docs/localization.md)
    methods: list[Method] = Field(default_factory=lambda: ["gradient", "greedy"], min_length=1)
    answers: Literal["donor", "reference"] = Field(
        "donor", description="what localization forces as the answer: the donor's own outputs on the probe items "
                             "it gets right, or the task's target template rendered with the gold answer")
    metric: Literal["logprob", "logit_diff"] = Field(
        "logprob", description="the causal methods' metric on the forced answers")
    components: list[Literal["head", "kv", "group", "mlp", "attn", "neuron", "linear", "layer", "outer"]] = Field(
        default_factory=lambda: ["head", "kv", "mlp", "outer"], min_length=1,
        description="kinds ranked and transplanted; kv (GQA models' KV heads) has none without GQA; outer: "
                    "the tensors outside the layers (embeddings, LM head, final norm)")
    k: list[int | str] = Field(default_factory=lambda: [1, 2, 4, 8],
                               description="numbers of components, or shares of them such as 5%")
    alpha: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    race: float | None = Field(None, gt=0, lt=1, description="race the dev grid at this error rate: a point clearly "
                                                            "below its method's best so far stops early; null: "
                                                            "every point sees every dev item")
    max_new_tokens: list[int | None] = Field(default_factory=lambda: [None], min_length=1)
    controls: Controls = Field(default_factory=Controls)
    splits: dict[Literal["probe", "dev", "test"], str] = Field(
        default_factory=lambda: dict(DEFAULT_SPLITS),
        description="which of the task's splits plays each role, e.g. {probe: train}; unnamed roles keep "
                    "their own name")
    overlap: Literal["error", "drop"] = Field(
        "error", description="items shared by probe, dev and test: refuse the task, or drop them from probe "
                             "and dev (test stays whole); drop here wins over the task's own overlap")
    probe_limit: int | None = Field(None, ge=1)
    dev_limit: int | None = Field(None, ge=1)
    test_limit: int | None = Field(None, ge=1)
    retention_limit: int | None = Field(100, ge=1)
    batch_size: int = Field(32, ge=1)
    reuse_memory_gb: float = Field(2.0, ge=0, allow_inf_nan=False, description="memory (on the device) for the activations below the transplant, "
                                   "kept across points (scoring tasks; the prompts of generation tasks, with "
                                   "their keys and values); 0 turns reuse off")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    device: str = Field("cpu", description="where the models run: cpu, cuda, cuda:1, mps")
    device_map: str | dict[str, int | str] | None = Field(
        None, description="spread each model over devices (and CPU or disk offload) as transformers' device_map: "
                          "auto, balanced, sequential or a module → device mapping; null: all on `device`")
    seed: int = 0
    ray: RayOptions | None = Field(None, description="run the grid's and the controls' points on Ray actors; "
                                                     "null: in this process (graftlm sweep --ray overrides)")

    @field_validator("k")
    @classmethod
    def _positive_k(cls, ks: list[int | str]) -> list[int | str]:
        if not ks or any(isinstance(k, int) and k < 1 for k in ks):
            raise ValueError("k must be a non-empty list of positive integers (or shares such as 5%)")
        shares: dict[float, str] = {}
        for k in ks:
            if isinstance(k, str):
                shares.setdefault(share_of(k), k.strip())
        # integers first, in order (a list of integers alone keeps its old form and hash), then shares
        return [*sorted({k for k in ks if isinstance(k, int)}), *(shares[v] for v in sorted(shares))]

    @field_validator("max_new_tokens")
    @classmethod
    def _positive_lengths(cls, lengths: list[int | None]) -> list[int | None]:
        if any(n is not None and n < 1 for n in lengths):
            raise ValueError("max_new_tokens values must be at least 1 (or null: the task's own)")
        return lengths

    @field_validator("alpha")
    @classmethod
    def _unit_alpha(cls, alphas: list[float]) -> list[float]:
        if not alphas or any(not 0 <= a <= 1 for a in alphas):
            raise ValueError("alpha values must lie in [0, 1]")
        return sorted(set(alphas))

    @field_validator("splits")
    @classmethod
    def _three_roles(cls, splits: dict[str, str]) -> dict[str, str]:
        roles = {**DEFAULT_SPLITS, **splits}
        if len(set(roles.values())) != 3:
            raise ValueError(f"probe, dev and test need three different splits, got {roles}")
        if "retention" in roles.values():
            raise ValueError("the retention split is the off-task set, not probe, dev or test")
        return roles

    @classmethod
    def load(cls, path: str | Path) -> SweepConfig:
        path = Path(path)
        if not path.is_file():
            if path.is_dir():
                raise GraftError(f"{path} is a folder, not a sweep config", "pass a YAML file (see examples/demo.yaml)")
            raise GraftError(f"no such sweep config: {path}", "pass a YAML file (see examples/demo.yaml)")
        return cls.parse(read_text(path, "sweep config"), path)

    @classmethod
    def parse(cls, text: str, source: str | Path) -> SweepConfig:
        """A config from YAML text, or one line naming what is wrong (``source`` names the file)."""
        data = parse_yaml(text, source, "fix the config")
        if data is not None and not isinstance(data, dict):
            raise GraftError(f"{source}: a sweep config is a mapping of keys (see docs/sweep.md)", "fix the config")
        try:
            return cls.model_validate(data or {})
        except ValidationError as err:
            raise GraftError(f"{source}: {validation_problem(err, cls)}", "fix the config (keys: docs/sweep.md)") from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def digest(self) -> str:
        data = self.model_dump(mode="json")
        for key in HOW_KEYS:
            del data[key]
        for key, default in LATER_DEFAULTS.items():
            if data[key] == default:
                del data[key]  # runs written before the key existed keep their hash
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def share_of(text: str) -> float:
    """``"5%"`` → 0.05; a share must lie in (0, 100%]."""
    m = SHARE.fullmatch(text)
    if not m or not 0 < float(m.group(1)) <= 100:
        raise ValueError(f"k: {text!r} is neither a positive integer nor a share in (0%, 100%] such as 5%")
    return float(m.group(1)) / 100


@dataclass(frozen=True)
class KGrid:
    """The config's K values resolved against the number of components of the ranked kinds."""

    requested: list[int | str]
    resolved: list[int]  # sorted, duplicates merged
    clipped: list[int]  # integers above n_components, transplanted as all n_components
    n_components: int

    def describe(self) -> str | None:
        """What a reader should know about the grid's K (None when it is the config's integers as given)."""
        n = self.n_components
        said = []
        shares = [k for k in self.requested if isinstance(k, str)]
        if shares:
            said.append(", ".join(f"{k} → K={resolve_share(k, n)}" for k in shares) + f" of {n} components")
        if self.clipped:
            ks = ", ".join(str(k) for k in self.clipped)
            said.append(f"K={ks} {'exceeds' if len(self.clipped) == 1 else 'exceed'} the {n} components and "
                        f"{'was' if len(self.clipped) == 1 else 'were'} clipped to K={n}")
        return "; ".join(said) if said else None


def resolve_share(share: str, n: int) -> int:
    """K for a share of ``n`` components: rounded down (a share is a most: "K ≤ 20%"), at least 1."""
    return max(1, min(n, math.floor(share_of(share) * n + 1e-9)))


def resolve_k(ks: list[int | str], n: int) -> KGrid:
    """The grid's K values for ``n`` candidate components: shares resolved, integers above n clipped."""
    resolved = {resolve_share(k, n) if isinstance(k, str) else min(k, n) for k in ks}
    return KGrid(list(ks), sorted(resolved), [k for k in ks if isinstance(k, int) and k > n], n)


# --- the run folder ------------------------------------------------------------------------------

def read_results(path: Path, *, strict: bool = False) -> tuple[dict[str, dict[str, Any]], list[bytes], bool]:
    """RUN/results.jsonl → its rows by key (a key written twice counts once: the last line wins), the
    whole lines, and whether a torn line was left out. A kill can only cut the last line; ``strict``
    refuses a file that is broken before that (the report's reader), otherwise everything from the
    first broken line on is left out (and computed again by a resumed sweep)."""
    try:
        lines = [ln for ln in path.read_bytes().split(b"\n") if ln.strip()]
    except FileNotFoundError:
        return {}, [], False
    rows: dict[str, dict[str, Any]] = {}
    good: list[bytes] = []
    for n, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except ValueError:  # not JSON, or not UTF-8
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("key"), str):
            if strict and n < len(lines):
                raise GraftError(f"{path} line {n} is not a result line (a JSON object with a key)",
                                 "restore the file, or rerun the sweep into a new --out")
            break  # a line cut by a kill: everything after it is lost with it
        rows[row["key"]] = row
        good.append(line)
    return rows, good, len(good) != len(lines)


class Results:
    """RUN/results.jsonl: one line per finished evaluation, keyed; read back on resume."""

    def __init__(self, run: Path) -> None:
        self.path = run / "results.jsonl"
        self.rows, good, torn = read_results(self.path)
        if torn:  # rewrite without the torn tail so the next append starts on a clean line
            write_file(self.path, b"".join(g + b"\n" for g in good), fsync=True)

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def __getitem__(self, key: str) -> dict[str, Any]:
        return self.rows[key]

    def add(self, row: dict[str, Any]) -> dict[str, Any]:
        with open(self.path, "ab") as fh:
            fh.write(json.dumps(row, ensure_ascii=False).encode() + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.rows[row["key"]] = row
        return row

    def where(self, **match: Any) -> Iterator[dict[str, Any]]:
        for row in self.rows.values():
            if all(row.get(k) == v for k, v in match.items()):
                yield row


def _stored_config(out: Path) -> SweepConfig | None:
    stored = out / "config.yaml"
    if not stored.is_file():
        return None
    try:
        return SweepConfig.parse(read_text(stored, "config.yaml"), stored)
    except GraftError as err:
        raise GraftError(f"{out} is not a sweep's run folder ({err.problem})",
                         "use a new --out, or a folder written by `graftlm sweep`") from None


def _holds_results(out: Path) -> bool:
    """Has anything been computed in RUN (results or rankings)? Before that, its config may be replaced."""
    results = out / "results.jsonl"
    return (results.is_file() and results.stat().st_size > 0) or any((out / "rankings").glob("*.json"))


def _refuse_another_config(config: SweepConfig, out: Path) -> None:
    previous = _stored_config(out)
    if previous is not None and previous.digest() != config.digest() and _holds_results(out):
        raise GraftError(f"{out} holds a run of another config (hash {previous.digest()} ≠ {config.digest()})",
                         "use a new --out, or rerun with the config stored in it")


INPUTS = "inputs.json"  # what a run's results were computed from: content hashes, beside config.yaml


def input_identity(task: Any, retention: Any, donor: dict[str, str], target: dict[str, str]) -> dict[str, Any]:
    """What every result of a study depends on besides its config, by content: the task's items and
    settings (all splits), the retention set, and the sha256 of both models' weights, config and
    tokenizer files (``donor``, ``target``: :func:`analysis.checkpoint.fingerprint`)."""
    return {"task": task.fingerprint(with_retention=False),
            "retention": retention.fingerprint() if retention is not None else None, "donor": donor, "target": target}


def _changed_inputs(stored: dict[str, Any], now: dict[str, Any], cfg: SweepConfig) -> list[str]:
    said = []
    if stored.get("task") != now["task"]:
        said.append(f"the task's items or settings ({cfg.task})")
    if stored.get("retention") != now["retention"]:
        said.append(f"the retention set ({cfg.retention})" if cfg.retention else "the task's retention set")
    for who, ref in (("donor", cfg.donor), ("target", cfg.target)):
        before, after = stored.get(who) or {}, now[who]
        files = sorted(n for n in set(before) | set(after) if before.get(n) != after.get(n))
        if files:
            said.append(f"the {who}'s files ({', '.join(files)} of {ref})")
    return said


def _refuse_other_inputs(out: Path, identity: dict[str, Any], cfg: SweepConfig) -> bool:
    """Refuse a run folder whose results came from other inputs; True when RUN/inputs.json is there."""
    path = out / INPUTS
    if not path.is_file():
        return False
    try:
        stored = json.loads(read_text(path, INPUTS))
    except ValueError:
        stored = None
    if not isinstance(stored, dict):
        raise GraftError(f"{path} is damaged", "use a new --out (its results cannot be tied to their inputs)")
    changed = _changed_inputs(stored, identity, cfg)
    if changed and _holds_results(out):
        raise GraftError(f"{out} was computed from other inputs: {'; '.join(changed)} changed since",
                         "use a new --out (resuming would mix results of two studies), or restore those inputs")
    return not changed


def open_run(config: SweepConfig, out: Path, identity: dict[str, Any] | None = None) -> Results:
    """Create or resume RUN, under its lock (:func:`run_lock`): a different config or different inputs
    stored there are refused (checked once more, now that no other sweep can write)."""
    out.mkdir(parents=True, exist_ok=True)
    _refuse_another_config(config, out)
    same_inputs = identity is not None and _refuse_other_inputs(out, identity, config)
    previous = _stored_config(out)
    if previous is None or previous.digest() != config.digest():
        write_file(out / "config.yaml", f"# config hash {config.digest()}\n" + config.to_yaml())
    if identity is not None and not same_inputs:
        write_file(out / INPUTS, json.dumps(identity, indent=1) + "\n")
    return Results(out)


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold RUN/.lock (an exclusive ``flock``, with this process's pid in it) for as long as a sweep
    writes RUN; a second sweep on the same folder is refused, naming the first one's pid. A run folder
    this call created is removed again when the block fails before anything was computed in it."""
    import fcntl

    fresh = not out.exists()
    mine = False  # the lock, or (a fresh folder) nobody else's
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise GraftError(f"{out} is in use by another sweep (pid {_holder(fd)})",
                                 "wait for it to finish, or use another --out") from None
            mine = True
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the lock
    except BaseException:
        if fresh and (mine or not (out / ".lock").exists()) and not _holds_results(out):
            shutil.rmtree(out, ignore_errors=True)  # a study that computed nothing leaves no folder behind
        raise


def _holder(fd: int) -> str:
    """The pid in a lock file another sweep holds (it writes it just after taking the lock)."""
    for _ in range(50):
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if pid:
            return pid
        time.sleep(0.01)
    return "unknown"


# --- evaluation of one point ---------------------------------------------------------------------

# --- the whole study ------------------------------------------------------------------------------

RankFn = Callable[..., list[tuple[str, float]]]


def sweep(config: SweepConfig | str | Path, out: str | Path, *, progress: bool = True,
          on_point: Callable[[Point, dict[str, Any]], None] | None = None,
          ray: RayOptions | str | bool | None = None) -> Path:
    """Run (or resume) the study of ``config`` into folder ``out``; returns ``out``.

    ``ray``: None — as the config's ``ray:`` says; False — in this process; True — on Ray as the config
    says (a local Ray with 2 workers when it says nothing); an address — that cluster (``local``: start
    Ray here); :class:`RayOptions` — those. Per-item results are the same either way.
    """
    import torch

    from analysis import tasks
    from analysis.checkpoint import fingerprint
    from analysis.models import check_device, load, require_same_shapes

    cfg = config if isinstance(config, SweepConfig) else SweepConfig.load(config)
    on_ray = ray_options(cfg, ray)
    run_dir = Path(out).expanduser()
    # Everything that can be wrong with the inputs is found before RUN is created or written.
    if on_ray is not None:
        from analysis.cluster import require_ray

        if cfg.race is not None:  # a race is sequential: each point is judged against the best before it
            raise GraftError("race: runs the dev grid point after point in this process, not on Ray",
                             "drop race: from the config, or run without --ray / ray:")
        require_ray()
    check_out(run_dir, replace=False, sources=_sources(cfg, config))
    check_device(cfg.device)
    _refuse_another_config(cfg, run_dir)
    torch.manual_seed(cfg.seed)
    task = tasks.load(cfg.task)
    splits, task, dropped = _check_splits(task, cfg)  # from here on, probe and dev without what test holds
    retention_task = tasks.load(cfg.retention) if cfg.retention else (task if task.retention is not None else None)
    retention_split = "retention" if cfg.retention is None else None
    with ThreadPoolExecutor(max_workers=2) as pool:  # the weights hash while the models load (cached: once)
        hashed = {who: pool.submit(fingerprint, ref) for who, ref in (("donor", cfg.donor), ("target", cfg.target))}

        def identity() -> dict[str, Any]:
            own = retention_task if cfg.retention else task.retention
            return input_identity(task, own, hashed["donor"].result(), hashed["target"].result())
        if (run_dir / INPUTS).is_file():  # a resumed run: changed inputs are refused before anything loads
            _refuse_other_inputs(run_dir, identity(), cfg)
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
            from analysis.cluster import RayExecutor, WorkerSpec

            executor = RayExecutor(on_ray, WorkerSpec(cfg, task, retention_task, inputs, torch.get_num_threads()))
        try:
            return _study(cfg, run_dir, results, task, splits, dropped, retention_task, retention_split, models,
                          runner, executor, progress, on_point)
        finally:
            executor.close()


def ray_options(cfg: SweepConfig, ray: RayOptions | str | bool | None) -> RayOptions | None:
    """Where the study's points run (see :func:`sweep`): None is this process."""
    if ray is None:
        return cfg.ray
    if ray is False:
        return None
    if isinstance(ray, RayOptions):
        return ray
    options = cfg.ray or RayOptions()
    if isinstance(ray, str):
        options = options.model_copy(update={"address": None if ray == "local" else ray})
    return options


def _sources(cfg: SweepConfig, config: SweepConfig | str | Path) -> list[Path]:
    """What a study reads: a run folder may not be, or lie inside, any of them."""
    from analysis.models import source_paths

    paths = [p for ref in (cfg.donor, cfg.target) for p in source_paths(ref)]
    paths += [Path(ref) for ref in (cfg.task, cfg.retention) if ref and Path(ref).exists()]
    if not isinstance(config, SweepConfig):
        paths.append(Path(config))
    return paths


def _study(cfg: SweepConfig, run_dir: Path, results: Results, task: Any, splits: dict[str, str], dropped: Dropped,
           retention_task: Any, retention_split: str | None, models: dict[str, Any], runner: PointRunner,
           executor: Executor, progress: bool, on_point: Callable[[Point, dict[str, Any]], None] | None) -> Path:
    """The study proper, in a run folder this process holds: grid, choices, controls. Baselines run here;
    the grid's and the controls' points run on ``executor`` (here, or on Ray actors), in batches of points
    that do not depend on each other. Only this process writes results.jsonl."""
    from analysis import probe as probe_mod
    from analysis import units
    from analysis.race import Raced
    from analysis.select import getter, outside

    lay = runner.layout
    lengths = cfg.max_new_tokens if task.kind == "generate" else [None]
    all_ids = units.component_ids(lay, cfg.components)  # type: ignore[arg-type]
    k_grid = resolve_k(cfg.k, len(all_ids))
    ks = k_grid.resolved
    plan_total = _count_points(cfg, len(ks), lengths, retention_task is not None)
    bar = _Bar(plan_total, progress, {who: short_name(models[who].name) for who in models})
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
                             "overlap_dropped": dropped.__dict__ if dropped.counts else None,
                             # what copy-all cannot move: a ceiling on every selection, said when it binds
                             "outside": outside(getter(models[donor_name]), getter(models[target_name]), lay,
                                                all_ids, list(models[target_name].parameters()))})
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
            evaluate_all(grid, via=Raced(runner, cfg.race) if cfg.race is not None else None)
            # The chosen point per method on test, with retention (never a point its race stopped).
            chosen: dict[str, tuple[int, float]] = {}
            for method in cfg.methods:
                rows = [results[Point("grid", "dev", "transplant", method, k, a, mnt).key] for k in ks for a in cfg.alpha]
                best = max((r for r in rows if "raced" not in r),
                           key=lambda r: (r["accuracy"], -r["top_k"], -r["alpha"]))  # ties: the smaller change
                chosen[method] = (best["top_k"], best["alpha"])
            budgets = sorted(set(chosen.values()))
            bar.fewer((len(chosen) - len(budgets)) * _controls_per_budget(cfg))  # methods that chose the same budget
            wanted.clear()
            wanted.update(runner.low(_plan(ranking[m], k, a, m, cfg.task)) for m, (k, a) in chosen.items())
            wanted.update(runner.low(Plan.of(_random_ids(all_ids, k, seed)))
                          for k, _ in budgets for seed in cfg.controls.random_seeds)
            record = frozenset(wanted)
            final: list[Job] = []
            for method, (k, alpha) in chosen.items():
                plan = _plan(ranking[method], k, alpha, method, cfg.task)
                plan.save(run_dir / plan_file(method, mnt, lengths))
                final.append(job(Point("chosen", "test", "transplant", method, k, alpha, mnt), target_name,
                                 splits["test"], plan=plan, donor=donor_name, record=record))
                if retention_task is not None:
                    final.append(job(Point("chosen", "retention", "transplant", method, k, alpha, mnt), target_name,
                                     retention_split, plan=plan, donor=donor_name, record=record))
            # Controls at the budget of each chosen point.
            for k, alpha in budgets:
                for seed in cfg.controls.random_seeds:
                    plan = Plan.of(_random_ids(all_ids, k, seed), alpha=alpha, method="random", task=cfg.task, seed=seed)
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


def short_name(ref: str) -> str:
    """What a person calls a model in a table or a folder name: a path's or hub id's last part."""
    return ref.rstrip("/").split("/")[-1] or ref


def length_suffix(max_new_tokens: int | None, several: bool) -> str:
    """What names a decoding length's files (plans, figures) when a study has several: ``-tokensN``."""
    return f"-tokens{max_new_tokens or 'default'}" if several else ""


def plan_file(method: str, max_new_tokens: int | None, lengths: list[int | None]) -> str:
    """The name of a method's chosen plan in RUN: one per decoding length when the study has several."""
    return f"plan-{method}{length_suffix(max_new_tokens, len(lengths) > 1)}.yaml"


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


@dataclass(frozen=True)
class Dropped:
    """What ``overlap: drop`` removed: items per role (probe, dev) and the overlaps found."""

    counts: dict[str, int]
    overlaps: list[str]

    @property
    def said(self) -> str:
        """One line for the log and the report ('' when nothing was dropped)."""
        return dropped_line(self.counts, self.overlaps)


def dropped_line(counts: dict[str, int], overlaps: list[str]) -> str:
    """E.g. ``overlap: drop removed 12 probe and 3 dev items also in a later split; test is whole (…)``."""
    if not counts:
        return ""
    what = " and ".join(f"{n} {role}" for role, n in counts.items())
    return (f"overlap: drop removed {what} item{'s' if sum(counts.values()) > 1 else ''} also in a later split; "
            f"test is whole ({'; '.join(overlaps)})")


def _check_splits(task: Any, cfg: SweepConfig) -> tuple[dict[str, str], Any, Dropped]:
    """The task split of each role (probe, dev, test), the task to study and what was dropped from it.
    The roles must exist and share no item (id or prompt): asserted, not assumed. With ``overlap: drop``
    (sweep config or task) shared items leave probe and dev — never test — in the returned task, which
    localization and every evaluation then read."""
    missing = [s for s in cfg.splits.values() if s not in task.splits]
    if missing:
        raise GraftError(f"task {task.name} has no {', '.join(missing)} split (splits: {', '.join(task.splits) or 'none'})",
                         "a sweep needs disjoint probe, dev and test splits (a 'split' field in the items, or one "
                         "file per split); name others with splits: {probe: ..., dev: ..., test: ...}")
    roles = ("probe", "dev", "test")
    overlaps = task.overlaps([cfg.splits[r] for r in roles])
    if not overlaps:
        return dict(cfg.splits), task, Dropped({}, [])
    found = [o.describe() for o in overlaps]
    if "drop" not in (cfg.overlap, task.config.overlap):
        raise GraftError(f"task {task.name}: {', '.join(found)}",
                         "make probe, dev and test disjoint, or set overlap: drop (sweep config or task YAML) to "
                         "drop these items from probe and dev (test stays whole)")
    role_of = {cfg.splits[r]: r for r in roles}
    gone: dict[str, dict[str, Any]] = {}  # role → item id → item
    for o in overlaps:
        gone.setdefault(role_of[o.split], {}).update({it.id: it for it, _ in o.pairs})
    cleaned = task.without(it for items in gone.values() for it in items.values())
    for role in ("probe", "dev"):
        if not cleaned.items(cfg.splits[role], limit=None):
            raise GraftError(f"task {task.name}: every {role} item also occurs in a later split ({', '.join(found)})",
                             "give the task items of its own for each of probe, dev and test")
    return dict(cfg.splits), cleaned, Dropped({r: len(gone[r]) for r in roles if r in gone}, found)


def _ranking(run_dir: Path, method: str, donor: Any, target: Any, task: Any, cfg: SweepConfig, *,
             top: int, probe: Callable[[], Any], reverse: bool = False, suffix: str = "",
             say: Callable[[str], None] = print) -> list[tuple[str, float]]:
    """Component ids with scores, best first; cached with what localization forced and measured in
    RUN/rankings/METHOD[-reversed][-tokensN].json, so a resumed run reuses them (``reverse``: 'auto' made
    the config's target the donor; ``probe()``: the probe this donor and decoding length share)."""
    from analysis.localize import localize
    from analysis.methods import WEIGHT_SPACE

    name = f"{method}{'-reversed' if reverse else ''}"
    for cache in (run_dir / "rankings" / f"{name}{suffix}.json", run_dir / "rankings" / f"{name}.json"):
        if cache.is_file():
            data = read_ranking(cache)
            # runs written before rankings kept their metadata hold the list alone, for every length
            if isinstance(data, list) or cache.stem == f"{name}{suffix}":
                return [tuple(x) for x in (data if isinstance(data, list) else data["ranking"])]  # type: ignore[misc]
    cache = run_dir / "rankings" / f"{name}{suffix}.json"
    started = time.perf_counter()
    forced = method in ("attribution", "patching", "shifts", *WEIGHT_SPACE)
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


def read_ranking(path: Path) -> Any:
    """A ranking file of RUN/rankings as written: a dict (a list in runs before rankings kept metadata)."""
    try:
        data = json.loads(read_text(path, "ranking"))
    except ValueError:
        data = None
    if not isinstance(data, dict | list) or (isinstance(data, dict) and not isinstance(data.get("ranking"), list)):
        raise GraftError(f"{path} is not a ranking written by graftlm", "delete it (the sweep localizes again)")
    return data


def rankings_meta(run: str | Path) -> dict[str, dict[str, Any]]:
    """RUN/rankings/*.json → their metadata by file stem (``attribution``, ``gradient-tokens64``, ...):
    what each localization forced, on how many probe items, its metric and checks, its wall."""
    out = {}
    for path in sorted((Path(run) / "rankings").glob("*.json")):
        data = read_ranking(path)
        if isinstance(data, dict):
            out[path.stem] = data.get("meta", {})
    return out


def _plan(ranking: list[tuple[str, float]], k: int, alpha: float, method: str, task: str) -> Plan:
    top = ranking[:k]
    plan = Plan.of([cid for cid, _ in top], alpha=alpha, method=method, task=task)
    for item, (_, score) in zip(plan.components, top, strict=True):
        item.score = None if math.isnan(score) else float(score)
    return plan


def _random_ids(all_ids: list[str], k: int, seed: int) -> list[str]:
    import random

    return random.Random(seed).sample(all_ids, min(k, len(all_ids)))


def _count_points(cfg: SweepConfig, n_k: int, lengths: list[int | None], retention: bool) -> int:
    per_length = 4 + (2 if retention else 0)
    per_length += len(cfg.methods) * n_k * len(cfg.alpha)
    per_length += len(cfg.methods) * (1 + int(retention))
    per_length += len(cfg.methods) * _controls_per_budget(cfg)  # at most one budget per method
    per_length += int(cfg.controls.copy_all)
    return per_length * len(lengths)


def _controls_per_budget(cfg: SweepConfig) -> int:
    return len(cfg.controls.random_seeds) + int(cfg.controls.weight and "weight" not in cfg.methods)


class _Bar:
    """One progress bar with ETA over the whole study (rich). Where the output is no terminal (a log
    file, a batch job), where a bar would print nothing until the end, one line per finished evaluation
    instead: its result, its time and the time left."""

    def __init__(self, total: int, enabled: bool, names: dict[str, str]) -> None:
        self.names = names  # who → what a person calls the model
        self.progress: Any = None
        self.console: Any = None
        self.total, self.done, self.resumed, self.computed, self.seconds = total, 0, 0, 0, 0.0
        if not enabled:
            return
        from rich.console import Console

        console = Console(stderr=True)
        if not (console.is_terminal or console.is_jupyter):
            self.console = console
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), console=console, transient=False)
        self.progress.start()
        self.task = self.progress.add_task("sweep", total=total)

    def advance(self, point: Point, row: dict[str, Any], seconds: float | None) -> None:
        """``seconds``: how long the evaluation took; None when it was resumed from results.jsonl."""
        self.done += 1
        if point.who == "transplant":
            seed = f" seed {point.seed}" if point.seed is not None else ""
            label = f"{point.phase} {point.method} K={point.top_k} α={point.alpha}{seed} {point.split}"
        else:
            label = f"baseline {self.names.get(point.who, point.who)} {point.split}"
        if self.progress is not None:
            self.progress.update(self.task, advance=1, description=label[:48].ljust(48))
        if self.console is None:
            return
        if seconds is None:
            self.resumed += 1
            return
        self._say_resumed(self.done - 1)
        self.computed += 1
        self.seconds += seconds
        # resumed points cost nothing: the rate is that of the points computed in this process
        left = self.seconds / self.computed * (self.total - self.done)
        result = (f"perplexity {row['perplexity']:.3f}" if "perplexity" in row else
                  f"{row['accuracy']:.1%} ({row['k']}/{row['n']})" if "accuracy" in row else "done")
        self.console.print(f"[{self.done}/{self.total}] {label}: {result} in {seconds:.1f} s, "
                           f"~{_duration(left)} left", highlight=False, soft_wrap=True)

    def fewer(self, n: int) -> None:
        """``n`` of the counted evaluations will not happen (they were counted at most)."""
        self.total -= n
        if self.progress is not None:
            self.progress.update(self.task, total=self.total)

    def note(self, text: str) -> None:
        """A stage outside the count (localization): a line in logs, above the bar in a terminal."""
        if self.progress is not None:
            self.progress.console.print(text, highlight=False)
        elif self.console is not None:
            self.console.print(text, highlight=False, soft_wrap=True)

    def _say_resumed(self, upto: int) -> None:
        if self.resumed:
            self.console.print(f"[{upto}/{self.total}] {self.resumed} evaluations resumed from "
                               "results.jsonl", highlight=False, soft_wrap=True)
            self.resumed = 0

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        elif self.console is not None:
            self._say_resumed(self.done)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else \
        f"{seconds / 3600:.1f} h"


def environment() -> dict[str, Any]:
    """The exact command and package versions, for the report."""
    from importlib.metadata import PackageNotFoundError, version

    packages = {}
    for name in ("graftlm", "torch", "transformers", "transformer-lens", "safetensors", "numpy"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    return {"command": " ".join(["graftlm", *sys.argv[1:]]) if "graftlm" in sys.argv[0] else " ".join(sys.argv),
            "python": platform.python_version(), "platform": platform.platform(), "packages": packages}
