"""Streaming shifts: the numbers a full cache would give, padding ignored, hooks always removed."""

from __future__ import annotations

import pytest
import torch
from conftest import arith_task

from analysis.eval import tasks
from analysis.interp import probe, shifts


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return tasks.load(arith_task(tmp_path_factory.mktemp("task")))


def by_hand(donor, target, task, positions: str = "answer") -> dict[str, tuple[float, float, float]]:
    """(donor mean|z|, target mean|z|, rel_dist) per head of layer 1 and L1.mlp, one unpadded prompt at a
    time through TransformerLens run_with_cache — the reference the streaming hooks must equal."""
    items = task.items("probe")
    seqs = [row for i, it in enumerate(items) for row in probe.item_rows_of(task, target.tokenizer, it, i)]
    per: dict[str, list[tuple[float, float, float]]] = {}
    for row in seqs:
        toks, n_prompt = row.ids, row.n_prompt
        ids = torch.tensor([toks])
        _, cd = donor.bridge.run_with_cache(ids)
        _, ct = target.bridge.run_with_cache(ids)
        sel = slice(n_prompt - 1, len(toks) - 1) if positions == "answer" else slice(None)
        for hook, heads in (("blocks.1.attn.hook_z", True), ("blocks.1.hook_mlp_out", False)):
            ad, at = cd[hook][0, sel], ct[hook][0, sel]
            if not heads:
                ad, at = ad[:, None], at[:, None]
            for g in range(ad.shape[1]):
                cid = f"L1.H{g}" if heads else "L1.mlp"
                rms = lambda t: t.pow(2).mean(-1).sqrt()  # noqa: E731
                rel = rms(ad[:, g] - at[:, g]).sum() / ((rms(ad[:, g]) + rms(at[:, g])) / 2).sum()
                per.setdefault(cid, []).append((float(ad[:, g].abs().mean()), float(at[:, g].abs().mean()), float(rel)))
    return {cid: tuple(sum(v[i] for v in vals) / len(vals) for i in range(3)) for cid, vals in per.items()}


@pytest.mark.parametrize("positions", ["answer", "all"])
def test_streaming_statistics_equal_a_full_cache(pair, task, positions: str) -> None:
    donor, target = pair
    df = shifts.measure(donor, target, task, answers="reference", kinds=("head", "mlp"), positions=positions, batch_size=4,
                        progress=False)
    expected = by_hand(donor, target, task, positions)
    for cid, (d, t, rel) in expected.items():
        assert df.loc[cid, "donor"] == pytest.approx(d, rel=1e-4)
        assert df.loc[cid, "target"] == pytest.approx(t, rel=1e-4)
        assert df.loc[cid, "shift"] == pytest.approx(d - t, rel=1e-3, abs=1e-6)
        assert df.loc[cid, "rel_dist"] == pytest.approx(rel, rel=1e-4)
    assert (df["n_prompts"] == len(task.items("probe"))).all()  # the probe split only


def test_batch_size_and_padding_do_not_change_the_numbers(pair, task) -> None:
    donor, target = pair
    one = shifts.measure(donor, target, task, answers="reference", kinds=("head", "neuron"), batch_size=1, progress=False)
    many = shifts.measure(donor, target, task, answers="reference", kinds=("head", "neuron"), batch_size=6, progress=False)
    cols = ["donor", "target", "shift", "shift_sd", "rel_dist", "rel_dist_sd"]
    torch.testing.assert_close(torch.tensor(one[cols].to_numpy()), torch.tensor(many[cols].to_numpy()),
                               rtol=1e-4, atol=1e-6)


def test_one_model_as_donor_and_target_shows_no_shift(pair, task) -> None:
    """A sanity run (the same model both sides) reads each side's activations, not both at once."""
    donor, _ = pair
    df = shifts.measure(donor, donor, task, answers="reference", kinds=("head", "mlp"), batch_size=4, progress=False)
    assert (df["shift"] == 0).all() and (df["rel_dist"] == 0).all() and (df["donor"] > 0).all()
    assert df["donor"].to_dict() == shifts.measure(donor, pair[1], task, answers="reference", kinds=("head", "mlp"),
                                                   batch_size=4, progress=False)["donor"].to_dict()


def test_first_generated_token_is_the_last_prompt_token(pair, task) -> None:
    """generate mode, one step: the statistic sits at the last prompt token, as teacher mode 'last'."""
    donor, target = pair
    gen = shifts.measure(donor, target, task, answers="reference", kinds=("linear",), mode="generate", max_new_tokens=1, progress=False)
    last = shifts.measure(donor, target, task, answers="reference", kinds=("linear",), positions="last", progress=False)
    torch.testing.assert_close(torch.tensor(gen["shift"].to_numpy()), torch.tensor(last["shift"].to_numpy()),
                               rtol=1e-4, atol=1e-7)
    assert "rel_dist" not in gen.columns  # different tokens: no position-by-position pairing


def test_hooks_are_removed_also_on_error(pair, task, monkeypatch) -> None:
    donor, target = pair
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        fresh = target.model(ids).logits.clone()

    def boom(self, act):
        raise RuntimeError("inside a hook")

    monkeypatch.setattr(shifts.Site, "view", boom)
    with pytest.raises(RuntimeError, match="inside a hook"):
        shifts.measure(donor, target, task, answers="reference", progress=False)
    monkeypatch.undo()
    for loaded in (donor, target):
        assert not any(hp.fwd_hooks for hp in loaded.bridge.hook_dict.values())
    with torch.no_grad():
        assert torch.equal(target.model(ids).logits, fresh)


def test_sites_cover_component_ids(pair) -> None:
    _, target = pair
    lay = shifts.layout_of(target)
    from analysis import units

    for kinds in (("head",), ("mlp", "attn"), ("neuron",), ("linear",), ("group",), ("layer",)):
        got = [r["id"] for r in shifts.describe_ids(shifts.sites(lay, kinds))]
        assert sorted(got) == sorted(units.component_ids(lay, kinds))  # type: ignore[arg-type]


def test_generate_mode_runs_a_shared_opening_once_with_the_same_statistics(pair, tmp_path, monkeypatch) -> None:
    """Few-shot prompts share their opening: in generate mode (lae) it runs once per batch, not once per
    row, and the statistics are those of decoding every row whole — the opening's own forward is read by
    no statistic."""
    import yaml
    from conftest import arith_task

    from analysis.eval import engine

    data = arith_task(tmp_path, n=6)
    opening = "Add the numbers, then say the sum. "  # the tiny model reads 64 positions
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"data": data.name, "kind": "generate", "description": opening}))
    task = tasks.load(tmp_path / "t.yaml")
    donor, target = pair
    widths: list[tuple[int, int]] = []
    forward = engine.Forward.__call__

    def counting(self, ids, *args, **kwargs):  # type: ignore[no-untyped-def]
        widths.append(tuple(ids.shape))
        return forward(self, ids, *args, **kwargs)

    monkeypatch.setattr(engine.Forward, "__call__", counting)
    kw = dict(answers="reference", kinds=("head", "mlp"), mode="generate", max_new_tokens=3, progress=False)
    shared = shifts.measure(donor, target, task, **kw)
    opening_tokens = len(opening) - 4
    assert sum(rows == 1 and width >= opening_tokens for rows, width in widths) == 2  # once per model
    assert not any(rows > 1 and width >= opening_tokens for rows, width in widths)
    monkeypatch.setattr(engine, "SHARED_CONTEXT_MIN_TOKENS", 10**9)
    whole = shifts.measure(donor, target, task, **kw)
    cols = ["donor", "target", "shift", "shift_sd"]
    torch.testing.assert_close(torch.tensor(shared[cols].to_numpy()), torch.tensor(whole[cols].to_numpy()),
                               rtol=1e-4, atol=1e-6)
