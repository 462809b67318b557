"""Weight-space scores: the blend is the transplant, gradient shares add up, rankings are reproducible,
and nothing of the model is left changed."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import arith_task

from analysis import units
from analysis.eval import tasks
from analysis.interp import batching, probe, weightspace
from analysis.interp.shifts import layout_of
from analysis.io.models import load
from analysis.plan import Plan
from analysis.transplant import applied


def loaded_pair(tiny_pairs, family: str):
    donor, target = tiny_pairs(family)
    return load(donor, dtype="float32"), load(target, dtype="float32")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return tasks.load(arith_task(tmp_path_factory.mktemp("task"), n=8))


def setup(donor, target, task, kinds=("head", "mlp")):
    lay = layout_of(target)
    ids = units.component_ids(lay, kinds)
    batches = probe.reference_batches(task, target.tokenizer, batch_size=4)
    return weightspace.Blend(target, donor, ids, lay), batches, ids


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_one_component_at_full_strength_is_its_transplant(tiny_pairs, task, family: str) -> None:
    """m = e_c gives the logits of the in-memory transplant of c alone (GQA heads, Conv1D, fused q/k/v)."""
    donor, target = loaded_pair(tiny_pairs, family)
    blend, batches, ids = setup(donor, target, task, ("head", "group", "mlp") if family != "gpt2" else ("head", "mlp"))
    batch = batches[0]
    for cid in (ids[1], ids[-1], *(i for i in ids if ".G" in i)):
        m = torch.zeros(blend.n)
        m[ids.index(cid)] = 1.0
        with torch.no_grad():
            ours = blend.logits(m, batch)
            with applied(target, donor, Plan.of([cid])):
                theirs = batching.forward(target, batch, hooked=False, logits_to_keep=batch.keep)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["demo", "gpt2"])
def test_gradient_shares_sum_to_the_change_from_target_to_copy_all(tiny_pairs, task, family: str) -> None:
    """On the demo pair (a trained regression, GQA) and a random GPT-2 pair (Conv1D, fused q/k/v)."""
    if family == "demo":
        donor, target, task = load("demo:gen1"), load("demo:gen2"), replace(tasks.load("demo:arith"), limit=16)
    else:
        donor, target = loaded_pair(tiny_pairs, family)
    blend, batches, _ = setup(donor, target, task)
    scores, info = weightspace.gradient(blend, batches, progress=False)
    assert abs(info["metric_change"]) > 0.05  # a real change to account for
    assert scores.sum() == pytest.approx(info["metric_change"], rel=0.01)
    assert info["relative_error"] < 0.01


def test_gradient_doubles_its_nodes_until_the_shares_add_up(tiny_pairs, task) -> None:
    """One node is too coarse for a bent path: the quadrature is redone with 2, 4, … nodes until the
    scores sum to the measured change within the tolerance, and says how many it took."""
    donor, target = loaded_pair(tiny_pairs, "gpt2")
    blend, batches, _ = setup(donor, target, task)
    _, coarse = weightspace.gradient(blend, batches, steps=1, tolerance=None, progress=False)
    assert coarse["relative_error"] > 0.01 and coarse["nodes_tried"] == [1]
    scores, info = weightspace.gradient(blend, batches, steps=1, progress=False)
    assert info["nodes_tried"][0] == 1 and len(info["nodes_tried"]) > 1
    assert info["nodes_tried"] == [2 ** i for i in range(len(info["nodes_tried"]))] and info["steps"] <= 32
    assert info["relative_error"] <= 0.01 and scores.sum() == pytest.approx(info["metric_change"], rel=0.01)


def test_rankings_are_identical_across_runs_and_leave_the_model_as_it_was(tiny_pairs, task) -> None:
    donor, target = loaded_pair(tiny_pairs, "llama")
    before = {n: p.detach().clone() for n, p in target.parameters().items()}
    flags = {n: p.requires_grad for n, p in target.parameters().items()}
    runs = []
    for _ in range(2):
        blend, batches, _ = setup(donor, target, task)
        g, _ = weightspace.gradient(blend, batches, steps=4, progress=False)
        order, gains, info = weightspace.greedy(blend, batches, 3, progress=False)
        strength, _ = weightspace.mask(blend, batches, 3, steps=5, progress=False)
        runs.append((g.tolist(), order, gains.tolist(), strength.tolist()))
    assert runs[0] == runs[1]
    for n, p in target.parameters().items():
        assert torch.equal(p, before[n]) and p.requires_grad == flags[n] and p.grad is None


def test_greedy_chooses_in_order_and_each_choice_is_verified(tiny_pairs, task) -> None:
    donor, target = loaded_pair(tiny_pairs, "llama")
    blend, batches, ids = setup(donor, target, task)
    order, gains, info = weightspace.greedy(blend, batches, 3, progress=False)
    assert sorted(order) == list(range(blend.n)) and info["k"] == 3
    obj = weightspace._Objective(blend, batches, "logprob")
    m = torch.zeros(blend.n)
    value = obj.value(m)
    for c in order[:3]:  # each recorded gain is the real metric change of adding it to those before
        m[c] = 1.0
        new = obj.value(m)
        assert gains[c] == pytest.approx((new - value) / obj.n_items, rel=1e-4, abs=1e-6)
        value = new
    assert info["chosen_metric"] == pytest.approx(value / obj.n_items, rel=1e-5)


def test_mask_keeps_its_budget(tiny_pairs, task) -> None:
    donor, target = loaded_pair(tiny_pairs, "llama")
    blend, batches, _ = setup(donor, target, task)
    strength, info = weightspace.mask(blend, batches, 2, steps=30, progress=False)
    assert strength.shape == (blend.n,) and ((strength > 0) & (strength < 1)).all()
    assert strength.sum() <= 2 * 1.5  # held near the budget by the multiplier
    assert info["budget"] == 2


def test_greedy_past_sixteen_adds_verified_chunks(tiny_pairs, task) -> None:
    """K = 24 neurons: 16 single steps, then chunks of two, each chunk's gain verified as a whole."""
    donor, target = loaded_pair(tiny_pairs, "llama")
    blend, batches, _ = setup(donor, target, task, ("neuron",))
    order, gains, info = weightspace.greedy(blend, batches, 24, progress=False)
    assert info["steps"] == 16 + 4 and len(set(order[:24])) == 24
    obj = weightspace._Objective(blend, batches, "logprob")
    m = torch.zeros(blend.n)
    m[order[:16]] = 1.0
    before = obj.value(m)
    m[order[16:18]] = 1.0
    assert gains[order[16]] == gains[order[17]] == pytest.approx((obj.value(m) - before) / obj.n_items, rel=1e-4,
                                                                 abs=1e-6)
