"""Bridge hook points read on the plain HF model: the statistics the bridge's own hooks give."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, arith_task

from analysis.eval import tasks
from analysis.interp import hfhooks, shifts
from analysis.io.models import load

KINDS = {"default": ("head", "kv", "mlp"), "linear": ("linear",), "coarse": ("layer", "attn", "neuron", "group")}


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_hooks_give_the_bridges_statistics(tiny_pairs, tmp_path, monkeypatch, family: str) -> None:
    """Teacher and generate mode, every kind of component: where each hook point has an HF module, the
    statistics read on the HF model equal the bridge's (where one has none — a fused projection the bridge
    splits — the bridge is used, and the two paths are the same path)."""
    donor, target = (load(p) for p in tiny_pairs(family))
    task = tasks.load(arith_task(tmp_path, n=5))
    cols = ["donor", "target", "shift", "shift_sd"]
    for label, kinds in KINDS.items():
        try:
            names = [s.hook for s in shifts.sites(shifts.layout_of(target), kinds)]
        except Exception:  # noqa: BLE001 (a family without such components: gpt2 has no KV heads)
            continue
        native = hfhooks.points(target, names) is not None
        for mode, extra in (("teacher", ["rel_dist"]), ("generate", [])):
            kw = dict(answers="reference", kinds=kinds, mode=mode, max_new_tokens=3, progress=False)
            fast = shifts.measure(donor, target, task, **kw)
            with monkeypatch.context() as m:
                m.setattr(hfhooks, "points", lambda *_: None)
                bridge = shifts.measure(donor, target, task, **kw)
            torch.testing.assert_close(torch.tensor(fast[cols + extra].to_numpy()),
                                       torch.tensor(bridge[cols + extra].to_numpy()), rtol=1e-4, atol=1e-6,
                                       msg=lambda text, label=label, mode=mode: f"{label} {mode}: {text}")
        # (Granite's MLP output, scaled by its residual multiplier, is read inside the bridge's block)
        assert native or family in ("phi3", "gpt2", "neox", "bloom", "opt", "glm", "granite"), \
            f"{family} {label}: expected HF modules"


def test_hooks_are_removed_also_on_error(pair) -> None:
    _, target = pair
    where = hfhooks.points(target, ["blocks.0.hook_mlp_out"])
    assert where is not None
    seen: list[torch.Size] = []
    with pytest.raises(RuntimeError), hfhooks.attached(where, [("blocks.0.hook_mlp_out", lambda t: seen.append(t.shape))]):
        target.model(torch.tensor([[5, 6, 7]]))
        raise RuntimeError("boom")
    assert len(seen) == 1
    target.model(torch.tensor([[5, 6, 7]]))
    assert len(seen) == 1


def test_forced_tokens_run_fused_attention_and_eager_comes_back(pair) -> None:
    """Teacher-mode statistics run the HF model with sdpa (the same attention, no score matrix); the model
    is eager again afterwards, so evaluations keep the logits the bridge gives."""
    _, target = pair
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        eager = target.model(ids).logits
        with hfhooks.sdpa(target.model):
            assert target.model.config._attn_implementation == "sdpa"
            fused = target.model(ids).logits
        assert target.model.config._attn_implementation == "eager"
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(target.model(ids).logits, eager, rtol=0, atol=0)
