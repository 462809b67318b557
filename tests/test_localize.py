"""localize end to end: a known head is found by every method, files are written, no hook is left."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FAMILIES, HEADS_SHARE_A_NORM, build_model
from safetensors.torch import load_file, save_file

import analysis
from analysis import units
from analysis.cli import main
from analysis.demo import MODELS_DIR as DEMO_DIR
from analysis.errors import GraftError
from analysis.eval.decoding import generate
from analysis.interp.localize import localize, rank
from analysis.io.models import load

KNOWN = "L1.H2"


def write_donor_task(root: Path, donor: Path, extra: list[dict] | None = None) -> Path:
    """A probe task whose answers are the donor's own greedy 2-token outputs (what the evaluation counts
    right), plus ``extra`` items."""
    dl = load(donor)
    prompts = [f"{a}{b}+{c}=" for a, b, c in zip("abcdefghijkl", "mnopqrstuvwx", "0123456789ab", strict=True)]
    outs = generate(dl.model, dl.tokenizer, prompts, stop=[], max_new_tokens=2)
    rows = [{"id": f"c{i}", "prompt": p, "answer": o, "split": "probe"}
            for i, (p, (o, *_)) in enumerate(zip(prompts, outs, strict=True))] + (extra or [])
    (root / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "task.yaml").write_text('data: task.jsonl\ntarget: "{answer}"\nmax_new_tokens: 2\nstop: []\n')
    return root / "task.yaml"


def changed_copy(target: Path, donor: Path, component: str,
                 change: Callable[[str, torch.Tensor, torch.Generator], torch.Tensor]) -> Path:
    """A copy of ``target`` at ``donor`` in which each slice of ``component`` is ``change(tensor name, slice,
    generator)``: a pair that differs in one known component."""
    shutil.copytree(target, donor)
    tl = load(target)
    lay = units.layout(tl.model.config, {n: tuple(p.shape) for n, p in tl.parameters().items()})
    sd = load_file(donor / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    for s in units.component(lay, component).slices:
        w = sd[s.param]
        idx = s.index(w.ndim)
        w[idx] = change(s.param, w[idx], g)
    save_file(sd, str(donor / "model.safetensors"), metadata={"format": "pt"})
    return donor


@pytest.fixture(scope="module")
def constructed(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A target and a donor that differs from it only in head L1.H2 (q/k rows perturbed, v rows ×1.5);
    the task's reference answers are the donor's own greedy continuations (the donor is 'right')."""
    root = tmp_path_factory.mktemp("constructed")
    target = build_model(root / "target", "llama", seed=2, num_key_value_heads=4)  # no GQA: the head owns k/v

    def change(name: str, part: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if "o_proj" in name:
            return part
        return part * 1.5 if "v_proj" in name else part + 0.5 * part.std() * torch.randn(part.shape, generator=g)
    donor = changed_copy(target, root / "donor", KNOWN, change)
    write_donor_task(root, donor, extra=[{"id": "t0", "prompt": "zz+9=", "answer": "??", "split": "test"}])
    return donor, target, root / "task.yaml"


@pytest.fixture(scope="module")
def constructed_kv(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A GQA target and a donor that differs from it only in KV head L1.KV1 (its k and v rows); the task's
    answers are the donor's own greedy continuations."""
    root = tmp_path_factory.mktemp("constructed-kv")
    target = build_model(root / "target", "llama", seed=2)  # 4 query heads over 2 KV heads
    donor = changed_copy(target, root / "donor", "L1.KV1",
                         lambda _, part, g: part * 1.5 + 0.5 * part.std() * torch.randn(part.shape, generator=g))
    write_donor_task(root, donor)
    return donor, target, root / "task.yaml"


@pytest.mark.parametrize("method", ["shifts", "attribution", "patching", "gradient", "greedy", "mask", "weight"])
def test_every_method_sees_kv_heads_by_default(constructed_kv, method: str) -> None:
    """With GQA the default candidates include the KV heads (their keys and values). The methods that
    score the weight edit put the only changed one first; activation methods see its effect also in the
    query heads that read its keys and values (L1.H2, L1.H3): one of the three comes first, and the KV head
    is among the top three."""
    donor, target, task = constructed_kv
    result = localize(donor, target, task, method=method, progress=False)
    assert set(result.scores.loc[result.scores["ranked"], "kind"]) == {"head", "kv", "mlp", "outer"}
    outer = list(result.scores.index[result.scores["kind"] == "outer"])
    assert "model.embed_tokens.weight" in outer
    hooks = result.scores["hook"]  # where a follow-up study finds each one's activation
    assert hooks["L1.H2"] == "blocks.1.attn.hook_z" and hooks["L1.mlp"] == "blocks.1.hook_mlp_out"
    assert hooks["L1.KV1"] == "blocks.1.attn.hook_k,blocks.1.attn.hook_v" and hooks[outer].isna().all()
    if method in ("gradient", "greedy", "mask", "weight"):
        assert result.ranking[0] == "L1.KV1"
        if method != "greedy":  # greedy stops at K: what it did not pick has no score
            assert (result.scores.loc[outer, "score"] == 0).all()  # unchanged in this pair, and scored so
        if method != "weight":  # where each sits, for a study's notes beside an activation method's blind spot
            assert result.meta["outer_ranks"] == {cid: result.ranking.index(cid) + 1 for cid in outer}
    else:  # no hook point: unscored, ranked last, and said so in the metadata
        assert "L1.KV1" in result.ranking[:3] and result.ranking[0] in {"L1.KV1", "L1.H2", "L1.H3"}
        assert result.scores.loc[outer, "score"].isna().all() and set(result.ranking[-len(outer):]) == set(outer)
        assert result.meta["unscored"] == outer


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_scores_the_one_changed_head_and_no_other(tmp_path, family: str) -> None:
    """On every architecture the methods read the right rows of (fused) tensors and the right hook points: with
    a donor that differs from the target in head L1.H2 alone, the weight-space method gives it the only score
    that is not zero, and among the heads the activation methods see a change there only. (Tiny random
    models: whether the change helps, its sign, is chance; where it is, is not.)"""
    target = build_model(tmp_path / "target", family, seed=2)
    donor = changed_copy(target, tmp_path / "donor", KNOWN,
                         lambda _, part, g: part * 2 + part.std() * torch.randn(part.shape, generator=g))
    task = write_donor_task(tmp_path, donor)
    for method in ("gradient", "attribution", "patching", "shifts"):
        scores = localize(donor, target, task, method=method, progress=False).scores
        score = analysis.interp.select.score_of(scores, method, "teacher").abs()
        pool = score[scores["kind"] == "head"] if method != "gradient" else score[scores["ranked"]]
        if family in HEADS_SHARE_A_NORM and method != "gradient":  # the layer's other heads are rescaled too
            pool = pool[~pool.index.str.startswith(KNOWN.split(".")[0] + ".") | (pool.index == KNOWN)]
            assert score[KNOWN] == score[scores["kind"] == "head"].max(), (method, score.nlargest(3))
        assert pool[KNOWN] > 0 and (pool.drop(KNOWN) <= 1e-3 * pool[KNOWN]).all(), (method, pool.nlargest(3))


@pytest.fixture(scope="module")
def models(constructed):
    donor, target, _ = constructed
    return load(donor), load(target)


@pytest.mark.parametrize(("method", "options"), [
    ("shifts", {}), ("shifts", {"mode": "generate"}), ("lae", {"components": "head"}), ("attribution", {}),
    ("attribution", {"metric": "logit_diff"}), ("patching", {}), ("gradient", {}), ("gradient", {"metric": "logit_diff"}),
    ("greedy", {}), ("mask", {}), ("weight", {})])
def test_every_method_ranks_the_known_head_first(constructed, models, method: str, options: dict) -> None:
    _, _, task = constructed
    donor, target = models
    result = localize(donor, target, task, method=method, progress=False, **options)
    assert result.ranking[0] == KNOWN
    assert result.plans[8].components[0].id == KNOWN


@pytest.mark.parametrize("method", ["gradient", "greedy", "attribution"])
def test_a_probe_without_a_gap_is_said_so(constructed, models, method: str) -> None:
    """A donor no better than the target on the probe (here: the target itself) leaves the scores nothing to
    explain: the result says so (meta, CLI, report notes); a donor that is better does not get the warning."""
    _, _, task = constructed
    donor, target = models
    assert "warning" not in localize(donor, target, task, method=method, progress=False).meta
    same = localize(target, target, task, method=method, answers="donor", progress=False)
    assert "not above the target's" in same.meta["warning"] and "\n" not in same.meta["warning"]


def test_the_cli_warns_of_a_probe_without_a_gap(constructed, tmp_path, capsys) -> None:
    _, target, task = constructed
    with pytest.raises(SystemExit) as done:
        main(["localize", "--donor", str(target), "--target", str(target), "--task", str(task), "--method", "gradient",
              "--out", str(tmp_path / "loc")])
    assert done.value.code == 0  # a warning, not an error: the files are written
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "no better than chance" in warned[0]
    assert "not above" in json.loads((tmp_path / "loc" / "scores.json").read_text())["meta"]["warning"]


def test_cli_writes_scores_figures_and_plans(constructed, tmp_path, capsys) -> None:
    donor, target, task = constructed
    out = tmp_path / "loc"
    with pytest.raises(SystemExit) as done:
        main(["localize", "--donor", str(donor), "--target", str(target), "--task", str(task), "--method",
              "attribution", "--top", "1", "--top", "3", "--alpha", "0.5", "--converse", "--out", str(out)])
    assert done.value.code == 0
    assert KNOWN in capsys.readouterr().out
    for name in ("scores.csv", "scores.json", "plan-top1.yaml", "plan-top3.yaml", "heads.png", "blocks.png",
                 "top.png"):
        assert (out / name).is_file(), name
    data = json.loads((out / "scores.json").read_text())
    assert data["meta"]["n_prompts"] == 12  # the probe split only: the test item is never read
    row = next(r for r in data["components"] if r["id"] == KNOWN)
    assert {"attribution", "attribution_sd", "converse_attribution", "weight", "score", "rank"} <= set(row)
    plan = yaml.safe_load((out / "plan-top3.yaml").read_text())
    assert plan["alpha"] == 0.5 and plan["components"][0]["id"] == KNOWN
    assert analysis.Plan.load(out / "plan-top1.yaml").provenance.method == "attribution"


def test_cli_bad_input_is_one_line_and_exit_2(constructed, tmp_path, capsys) -> None:
    donor, target, task = constructed
    for extra in (["--method", "magic"], ["--method", "patching", "--mode", "generate"], ["--components", "wings"]):
        with pytest.raises(SystemExit) as err:
            main(["localize", "--donor", str(donor), "--target", str(target), "--task", str(task),
                  "--out", str(tmp_path / "x"), *extra])
        assert err.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_random_is_seeded_and_dataless(constructed) -> None:
    donor, target, _ = constructed
    a = localize(donor, target, None, method="random", seed=1, progress=False).ranking
    b = localize(donor, target, None, method="random", seed=1, progress=False).ranking
    c = localize(donor, target, None, method="random", seed=2, progress=False).ranking
    assert a == b and a != c
    assert sorted(a) == sorted(analysis.localize(donor, target, None, method="weight").ranking)


def test_a_task_without_probe_items_is_refused(constructed, tmp_path) -> None:
    donor, target, _ = constructed
    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps({"prompt": "1+1=", "answer": "2", "split": "test"}) + "\n")
    with pytest.raises(GraftError, match="probe"):
        localize(donor, target, bare, method="shifts", progress=False)


@pytest.mark.parametrize("method", ["shifts", "attribution"])
def test_another_split_can_serve_as_the_probe(constructed, models, tmp_path, method: str) -> None:
    """Items kept under `train` are localized with split='train' (the same ranking as under `probe`)."""
    _, _, task = constructed
    donor, target = models
    (tmp_path / "task.jsonl").write_text((task.parent / "task.jsonl").read_text().replace('"probe"', '"train"'))
    (tmp_path / "task.yaml").write_text(task.read_text())
    moved = localize(donor, target, tmp_path / "task.yaml", method=method, split="train", progress=False)
    assert moved.meta["split"] == "train" and moved.meta["n_prompts"] == 12
    assert moved.ranking == localize(donor, target, task, method=method, progress=False).ranking
    with pytest.raises(GraftError, match="no 'probe' split"):
        localize(donor, target, tmp_path / "task.yaml", method=method, progress=False)


def test_logits_equal_fresh_ones_after_localize_and_after_an_error(constructed, models, monkeypatch) -> None:
    donor_ref, target_ref, task = constructed
    donor, target = models
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        fresh = load(target_ref).model(ids).logits
    for method in ("shifts", "attribution", "patching"):
        localize(donor, target, task, method=method, progress=False)
    from analysis.interp import patching

    def broken(*args, **kwargs):
        raise RuntimeError("metric failed")

    monkeypatch.setattr(patching, "metric_values", broken)
    with pytest.raises(RuntimeError, match="metric failed"):
        localize(donor, target, task, method="attribution", progress=False)
    monkeypatch.undo()
    for loaded in (donor, target):
        assert not any(hp.fwd_hooks or hp.bwd_hooks for hp in loaded.bridge.hook_dict.values())
        assert all(p.grad is None for p in loaded.parameters().values())
    with torch.no_grad():
        assert torch.equal(target.model(ids).logits, fresh)
        assert torch.equal(target.bridge(ids), fresh)


def test_rank_for_the_sweep(constructed, models) -> None:
    _, _, task = constructed
    donor, target = models
    ranked = rank("attribution", donor=donor, target=target, task=task, kinds=["head"])
    assert ranked[0][0] == KNOWN and all(isinstance(s, float) for _, s in ranked)


@pytest.mark.skipif(not (DEMO_DIR / "gen1" / "config.json").is_file(), reason="demo models not built yet")
def test_demo_pair_attribution_agrees_in_sign_with_patching() -> None:
    donor, target = load("demo:gen1", dtype="float32"), load("demo:gen2", dtype="float32")
    attr = localize(donor, target, "demo:arith", method="attribution", limit=16, progress=False)
    act = localize(donor, target, "demo:arith", method="patching", limit=16, progress=False)
    top = attr.ranking[:5]
    signs_a = torch.sign(torch.tensor(attr.scores.loc[top, "attribution"].to_numpy()))
    signs_p = torch.sign(torch.tensor(act.scores.loc[top, "patching"].to_numpy()))
    assert (signs_a == signs_p).all()


def test_every_hook_name_in_the_scores_is_a_hook_of_the_bridge(constructed, models) -> None:
    """The hook column names real TransformerLens hook points: ``run_with_cache(names_filter=...)`` takes it."""
    donor, target = models
    result = localize(donor, target, constructed[2], method="attribution", components="head,mlp,layer,linear",
                      progress=False)
    names = {h for cell in result.scores["hook"].dropna() for h in cell.split(",")}
    assert names and names <= set(target.bridge.hook_dict)


def test_prompt_pairs_and_a_metric_callable_patch_as_transformer_lens_does() -> None:
    """One model, (clean, corrupted) prompts and a logit-difference callable: localize's head patching
    equals transformer_lens.patching's on the same tokens (clean activations into the corrupted run)."""
    from transformer_lens import patching as tl_patching

    model = load("demo:gen1", dtype="float32")
    pairs = [("12+34=", "12+35="), ("51+20=", "51+27=")]
    tok = model.tokenizer
    right, wrong = tok("4", add_special_tokens=False)["input_ids"][0], tok("5", add_special_tokens=False)["input_ids"][0]

    def logit_diff(logits: torch.Tensor, batch) -> torch.Tensor:  # one value per pair, at the last position
        return logits[:, -1, right] - logits[:, -1, wrong]

    result = localize(model, model, None, method="patching", components="head", metric=logit_diff, prompts=pairs,
                      progress=False)
    assert result.meta["metric"] == "logit_diff" and result.meta["prompt_pairs"] == 2
    clean = torch.tensor([tok(c)["input_ids"] for c, _ in pairs])
    corrupted = torch.tensor([tok(k)["input_ids"] for _, k in pairs])
    _, cache = model.bridge.run_with_cache(clean)
    with torch.no_grad():
        base = logit_diff(model.bridge(corrupted), None).mean()
    theirs = tl_patching.get_act_patch_attn_head_out_all_pos(
        model.bridge, corrupted, cache, lambda logits: logit_diff(logits, None).mean()) - base
    heads = result.scores[result.scores["kind"] == "head"].sort_values(["layer", "index"])
    torch.testing.assert_close(torch.tensor(heads["patching"].to_numpy()).reshape(theirs.shape), theirs.double(),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(GraftError, match="same length in tokens"):
        localize(model, model, None, method="patching", metric=logit_diff, prompts=[("1+2=", "10+2=")], progress=False)
    with pytest.raises(GraftError, match="no forced answer"):
        localize(model, model, None, method="attribution", prompts=pairs, progress=False)
    with pytest.raises(GraftError, match="one value per item"):
        localize(model, model, None, method="attribution", metric=lambda logits, batch: logits.sum(), prompts=pairs,
                 progress=False)
