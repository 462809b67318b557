"""Ranking: deterministic ties, seeded random, the dataless weight score, plans of the top K."""

from __future__ import annotations

import math
import shutil

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from analysis import units
from analysis.errors import GraftError
from analysis.interp import select
from analysis.io.checkpoint import Checkpoint
from analysis.io.refs import load_config
from analysis.plan import Plan


def test_order_breaks_ties_by_natural_order_and_puts_nan_last() -> None:
    s = pd.Series([1.0, 3.0, math.nan, 3.0, 1.0], index=["L0.H0", "L0.H1", "L0.H2", "L1.H0", "L1.mlp"])
    assert select.order(s) == ["L0.H1", "L1.H0", "L0.H0", "L1.mlp", "L0.H2"]


def test_random_is_seeded() -> None:
    ids = [f"L{i}.H{h}" for i in range(4) for h in range(4)]
    a, b, c = (select.random_scores(ids, seed) for seed in (3, 3, 4))
    assert (a == b).all() and not (a == c).all()
    assert sorted(a) == list(range(len(ids)))  # a permutation: no ties


def test_score_columns_per_method() -> None:
    df = pd.DataFrame({"rel_dist": [0.1, 0.5], "effect": [-3.0, 1.0], "shift": [-0.2, 0.1],
                       "attribution": [-1.0, 0.5]}, index=["a", "b"])
    assert select.order(select.score_of(df, "shifts")) == ["b", "a"]
    assert select.order(select.score_of(df, "shifts", mode="generate")) == ["a", "b"]  # |effect|
    assert select.order(select.score_of(df, "lae")) == ["a", "b"]  # |shift|
    assert select.order(select.score_of(df, "attribution")) == ["b", "a"]  # signed: helpful first
    with pytest.raises(GraftError, match="unknown method"):
        select.score_of(df, "magic")


def test_weight_score_sees_exactly_the_changed_head(tiny_pairs, tmp_path) -> None:
    _, target = tiny_pairs("llama")
    donor = tmp_path / "donor"
    shutil.copytree(target, donor)
    tck = Checkpoint.open(target)
    lay = units.layout(load_config(target), tck.shapes())
    head = units.component(lay, "L1.H1")
    sd = load_file(donor / "model.safetensors")
    num = den = 0.0
    for s in head.slices:
        part = sd[s.param][s.index(sd[s.param].ndim)]
        delta = 0.1 * torch.ones_like(part)
        num += float(delta.double().pow(2).sum())
        den += float(part.double().pow(2).sum())
        sd[s.param][s.index(sd[s.param].ndim)] = part + delta
    save_file(sd, str(donor / "model.safetensors"), metadata={"format": "pt"})
    ids = units.component_ids(lay, ("head", "mlp", "neuron"))
    scores = select.weight_scores(select.getter(Checkpoint.open(donor)), select.getter(tck), lay, ids)
    by_id = dict(zip(ids, scores, strict=True))
    assert by_id["L1.H1"] == pytest.approx(math.sqrt(num / den), rel=1e-5)
    assert all(v == 0 for cid, v in by_id.items() if cid != "L1.H1")


def test_outside_names_the_difference_no_candidate_holds(tiny_pairs, tmp_path) -> None:
    """A donor whose only change is in one head and the LM head: copy-all over heads and MLPs moves the head,
    and what it cannot move (the LM head) is the share and the largest untouched tensor."""
    _, target = tiny_pairs("llama")
    donor = tmp_path / "donor"
    shutil.copytree(target, donor)
    sd = load_file(donor / "model.safetensors")
    lay = units.layout(load_config(target), {n: tuple(t.shape) for n, t in sd.items()})
    head_delta = 0.0
    for s in units.component(lay, "L1.H1").slices:
        idx = s.index(sd[s.param].ndim)
        sd[s.param][idx] = sd[s.param][idx] + 0.1
        head_delta += float(sd[s.param][idx].numel()) * 0.01
    head_name = "lm_head.weight" if "lm_head.weight" in sd else "model.embed_tokens.weight"
    sd[head_name] = sd[head_name] * 1.5  # changed by 50% of its norm
    head_sq = float((0.5 * load_file(target / "model.safetensors")[head_name].double()).pow(2).sum())
    save_file(sd, str(donor / "model.safetensors"), metadata={"format": "pt"})
    ids = units.component_ids(lay, ("head", "kv", "mlp"))
    out = select.outside(select.getter(Checkpoint.open(donor)), select.getter(Checkpoint.open(target)), lay, ids,
                         list(sd))
    assert out["share"] == pytest.approx(head_sq / (head_sq + head_delta), rel=1e-3)
    assert out["largest"] == [[head_name, pytest.approx(0.5, abs=1e-4)]]  # unchanged tensors are not named
    inside = select.outside(select.getter(Checkpoint.open(donor)), select.getter(Checkpoint.open(target)), lay,
                            [*ids, head_name], list(sd))
    assert inside == {"share": pytest.approx(0.0), "largest": []}


def test_plan_of_the_top_k_round_trips() -> None:
    scores = pd.Series([0.5, 0.9, 0.1], index=["L0.mlp", "L1.H2", "L0.H0"])
    plan = select.plan(select.order(scores), 2, alpha=0.5, method="attribution", task="demo:arith", scores=scores)
    again = Plan.from_yaml(plan.to_yaml())
    assert [c.id for c in again.components] == ["L1.H2", "L0.mlp"]
    assert again.strengths() == {"L1.H2": 0.5, "L0.mlp": 0.5}
    assert again.components[0].score == pytest.approx(0.9)
    assert again.provenance.method == "attribution"
    with pytest.raises(GraftError):
        select.plan(["L0.mlp"], 0)


def test_outside_leaves_loaded_models_as_they_were(tiny_pairs) -> None:
    """Read from live float32 parameters (as the sweep does), the measure copies: neither model changes."""
    from analysis.io.models import load

    donor, target = (load(p, dtype="float32") for p in tiny_pairs("llama"))
    before = [{n: p.detach().clone() for n, p in m.parameters().items()} for m in (donor, target)]
    lay = units.layout(target.model.config, {n: tuple(p.shape) for n, p in target.parameters().items()})
    select.outside(select.getter(donor), select.getter(target), lay, units.component_ids(lay, ("head", "mlp")),
                   list(target.parameters()))
    for m, was in zip((donor, target), before, strict=True):
        assert all(torch.equal(p, was[n]) for n, p in m.parameters().items())
