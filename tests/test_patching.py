"""Patching: agrees with TransformerLens, padding-safe, attribution ≈ activation patching, metric = evaluator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import arith_task
from transformer_lens import patching as tl_patching

from analysis.eval import tasks
from analysis.interp import batching, patching, probe, shifts
from analysis.io.models import load


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return tasks.load(arith_task(tmp_path_factory.mktemp("task"), n=8))


@pytest.fixture(scope="module")
def near_pair(tiny_pairs):
    """Donor = target + small noise: the regime where a first-order estimate should hold."""
    _, target = tiny_pairs("llama")
    donor, tgt = load(target, dtype="float32"), load(target, dtype="float32")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in donor.parameters().values():
            p.add_(0.05 * p.std() * torch.randn(p.shape, generator=g))
    return donor, tgt


def test_head_patching_equals_transformer_lens(pair) -> None:
    donor, target = pair
    lay = shifts.layout_of(target)
    (batch,) = batching.make_batches([batching.Row((5, 6, 7, 8, 9, 10), 3, 0), batching.Row((11, 12, 13, 14, 15, 16), 4, 1)],
                                  pad=2, batch_size=2)
    _, cache = donor.bridge.run_with_cache(batch.ids)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return patching.metric_values(logits, batch).sum()

    with torch.no_grad():
        base = metric(target.bridge(batch.ids))
    theirs = tl_patching.get_act_patch_attn_head_out_all_pos(target.bridge, batch.ids, cache, metric) - base
    ours = patching.patch(target, donor, [batch], shifts.sites(lay, ("head",)), progress=False)
    # ours is the mean over the 2 prompts, theirs the sum
    torch.testing.assert_close(torch.tensor(ours["patching"].to_numpy()).reshape(theirs.shape) * 2,
                               theirs.double(), rtol=1e-4, atol=1e-5)


def test_padding_does_not_change_patching(pair, task) -> None:
    donor, target = pair
    lay = shifts.layout_of(target)
    site_list = shifts.sites(lay, ("head", "mlp"))
    one = patching.patch(target, donor, probe.reference_batches(task, target.tokenizer, 1), site_list, progress=False)
    many = patching.patch(target, donor, probe.reference_batches(task, target.tokenizer, 8), site_list, max_rows=24,
                          progress=False)
    torch.testing.assert_close(torch.tensor(one["patching"].to_numpy()), torch.tensor(many["patching"].to_numpy()),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("metric", ["logprob", "logit_diff"])
def test_attribution_tracks_activation_patching(near_pair, task, metric: str) -> None:
    donor, target = near_pair
    lay = shifts.layout_of(target)
    site_list = shifts.sites(lay, ("head", "mlp", "attn"))
    batches = probe.reference_batches(task, target.tokenizer, 4)
    attr = patching.attribute(target, donor, batches, site_list, metric=metric, progress=False)["attribution"]
    act = patching.patch(target, donor, batches, site_list, metric=metric, progress=False)["patching"]
    big = act.abs() > 0.2 * act.abs().max()
    assert big.sum() >= 3
    assert (torch.sign(torch.tensor(attr[big].to_numpy())) == torch.sign(torch.tensor(act[big].to_numpy()))).all()
    assert float(np.corrcoef(attr.to_numpy(), act.to_numpy())[0, 1]) > 0.9


def test_converse_and_neurons_in_one_backward(pair, task) -> None:
    """Neurons come from the same backward; per layer they sum to the MLP's attribution (linear in a)."""
    donor, target = pair
    lay = shifts.layout_of(target)
    site_list = shifts.sites(lay, ("neuron", "mlp"))
    batches = probe.reference_batches(task, target.tokenizer, 4)
    df = patching.attribute(target, donor, batches, site_list, progress=False)
    conv = patching.attribute(donor, target, batches, site_list, column="converse", progress=False)
    assert df.attrs["receiver_metric"] == pytest.approx(conv.attrs["source_metric"], abs=1e-4)
    assert len(df[df["kind"] == "neuron"]) == lay.n_layers * lay.d_mlp
    assert df["attribution"].abs().sum() > 0 and conv["converse"].abs().sum() > 0


def test_patch_positions_last_token_has_no_effect(pair, task) -> None:
    donor, target = pair
    lay = shifts.layout_of(target)
    batches = probe.reference_batches(task, target.tokenizer, 8)[:1]
    table = patching.patch_positions(target, donor, batches, shifts.sites(lay, ("mlp",)), progress=False)
    assert list(table.columns)[-1] == "-1"
    assert (table["-1"].abs() < 1e-6).all()  # the last token predicts nothing of the answer


def test_capture_is_an_activation_cache_equal_to_run_with_cache(pair) -> None:
    """What attribution and patching read from the donor is a TransformerLens ActivationCache, the same
    tensors ``bridge.run_with_cache`` gives on the unpadded ids (and its methods work on it)."""
    from transformer_lens import ActivationCache

    donor, _ = pair
    (batch,) = batching.make_batches([batching.Row((5, 6, 7, 8, 9, 10), 3, 0)], pad=2, batch_size=1)
    names = ["blocks.0.attn.hook_z", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"]
    cache, logits = patching.capture(donor, batch, names)
    _, theirs = donor.bridge.run_with_cache(batch.ids, names_filter=names)
    assert isinstance(cache, ActivationCache) and sorted(cache.keys()) == sorted(names)
    for name in names:
        torch.testing.assert_close(cache[name], theirs[name], rtol=1e-5, atol=1e-6)
    assert cache.remove_batch_dim()["blocks.1.hook_mlp_out"].shape == theirs[names[1]].shape[1:]
    assert logits.shape[-1] == donor.model.config.vocab_size

