"""A study's config: the pair, the task, the grid (methods × K × α × decoding lengths), the controls and
where it runs — validated (pydantic) before anything loads, and hashed so a run folder resumes only the
config it was started with. ``SweepConfig.load(path)`` reads one; ``DEMO_CONFIG`` is the demo's."""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from analysis import demo
from analysis.errors import GraftError, validation_problem
from analysis.interp.methods import Method
from analysis.io.files import parse_yaml, read_text

DEFAULT_SPLITS = {"probe": "probe", "dev": "dev", "test": "test"}


# Keys added after runs were written: at these values they are left out of the hash, so those runs resume.
LATER_DEFAULTS: dict[str, Any] = {"splits": DEFAULT_SPLITS, "overlap": "error", "answers": "donor",
                                  "metric": "logprob", "device_map": None, "race": None, "k_grow_to": "50%"}


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
    """Where the grid's and the controls' points run when a study runs on Ray (:mod:`analysis.study.cluster`)."""

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
    k_grow_to: int | str | None = Field(
        "50%", description="grow a method's K grid, doubling its top K up to this many components (or share of "
                           "them), while that top K holds the method's best dev point (or no point is clearly "
                           "above the target yet), recovers less than 90% of the dev gap, and lies clearly "
                           "below the donor; null: the grid as given")
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

    @field_validator("k_grow_to")
    @classmethod
    def _positive_grow_to(cls, k: int | str | None) -> int | str | None:
        if isinstance(k, int) and k < 1:
            raise ValueError("k_grow_to must be a positive integer, a share such as 50%, or null")
        if isinstance(k, str):
            share_of(k)  # a share in (0%, 100%], else one line saying what is wrong
            return k.strip()
        return k

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


GROW_UNTIL = 0.9  # a grid stops growing once its top K recovers this share of the dev gap


def grown_k(grid: dict[int, list[dict[str, Any]]], donor_dev: float | None, target_dev: float | None,
            most: int) -> int | None:
    """The K to add above one method's dev grid (K → its rows, one per α), or None. The grid grows while
    its answer is bounded by the grid rather than by the method: the top K holds the method's best dev
    point (ties count: a flat grid says nothing yet) — or no point of the grid is clearly above the
    target yet (the target's dev accuracy inside the best point's 95% interval: a smaller K that wins by
    noise has found nothing) — that top point recovers less than GROW_UNTIL of the dev gap, and the
    donor's dev accuracy lies above its 95% interval. Each step doubles the top K, up to ``most``;
    points stopped by a race, and rows without an accuracy (a perplexity task), are left out."""
    live = {k: [r for r in rows if "raced" not in r and r.get("accuracy") is not None] for k, rows in grid.items()}
    top = max(live)
    if top >= most or not live[top] or donor_dev is None or target_dev is None or donor_dev <= target_dev:
        return None
    best = max(live[top], key=lambda r: r["accuracy"])
    lower = [r for k, rows in live.items() if k != top for r in rows]
    if any(r["accuracy"] > best["accuracy"] for r in lower):
        found = max(lower, key=lambda r: r["accuracy"]).get("ci_low")
        if found is None or found > target_dev:  # a smaller K is better, and clearly above the target
            return None
    recovered = (best["accuracy"] - target_dev) / (donor_dev - target_dev)
    return min(2 * top, most) if recovered < GROW_UNTIL and donor_dev > best["ci_high"] else None


def grow_limit(k_grow_to: int | str | None, n: int) -> int:
    """The largest K a grid may grow to over ``n`` candidate components (0: it does not grow)."""
    if k_grow_to is None:
        return 0
    return resolve_share(k_grow_to, n) if isinstance(k_grow_to, str) else min(k_grow_to, n)


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
DEMO_CONFIG = demo.CONFIG  # the embedded demo study (examples/demo.yaml links there)
