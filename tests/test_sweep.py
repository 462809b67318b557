"""The sweep: resumable after kills, refuses a changed config, keeps probe/dev/test apart."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from conftest import build_model, per_item, small

from analysis.errors import GraftError
from analysis.study.config import Controls, SweepConfig
from analysis.study.sweep import sweep


def test_retention_keeps_per_text_results_for_the_cost_interval(study: tuple[Path, SweepConfig],
                                                                 tmp_path: Path) -> None:
    from analysis import report

    _, cfg = study
    run = sweep(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    retention = [r for r in rows if r.get("split") == "retention"]
    assert len(retention) == 3  # donor, target, the chosen point
    for r in retention:
        nll, tokens = sum(i["nll"] for i in r["items"]), sum(i["n_tokens"] for i in r["items"])
        assert math.exp(nll / tokens) == pytest.approx(r["perplexity"], rel=1e-9)
    (summary,) = report.summarize(run)
    change = summary.methods[0].retention_change
    assert change is not None and change.ci_low <= change.value <= change.ci_high


def test_auto_order_says_when_the_target_became_the_donor(study: tuple[Path, SweepConfig], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from analysis import report
    from analysis.study import sweep as sweep_module

    _, cfg = study
    monkeypatch.setattr(sweep_module, "_order", lambda cfg, base: ("b", "a"))  # as if the target did better
    swapped = cfg.model_copy(update={"auto_order": True, "k": [1], "alpha": [1.0],
                                     "controls": Controls(random_seeds=[0], copy_all=False, weight=False)})
    run = sweep(swapped, tmp_path / "run", progress=True)
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("auto_order:"))
    assert line.startswith("auto_order: target was better on dev (") and line.endswith("so it is the donor here")
    (summary,) = report.summarize(run)
    assert summary.donor_ref == cfg.target and line + "." in summary.notes


def test_a_pair_of_other_shapes_is_refused_before_any_work(study: tuple[Path, SweepConfig], tmp_path: Path) -> None:
    _, cfg = study
    other = build_model(tmp_path / "other", "llama", seed=3, intermediate_size=48)
    with pytest.raises(GraftError, match="must share architecture"):
        sweep(cfg.model_copy(update={"target": str(other), "auto_order": True}), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_donor_whose_tokenizer_adds_tokens_is_studied_without_its_vocabulary(study: tuple[Path, SweepConfig],
                                                                              tmp_path: Path) -> None:
    """A twin with a longer vocabulary (its tokenizer adds tokens, its pad token among them): the study runs,
    every candidate — copy-all included — leaves the embeddings and the LM head out, and the report says so."""
    from analysis import report

    _, cfg = study
    donor = build_model(tmp_path / "donor", "llama", seed=1, extra_vocab=6)
    tok = json.loads((donor / "tokenizer_config.json").read_text())
    tok["pad_token"] = "<x5>"  # a pad token added with the vocabulary: an id the target has no embedding for
    (donor / "tokenizer_config.json").write_text(json.dumps(tok))
    run = tmp_path / "run"
    sweep(small(cfg, donor=str(donor), methods=["gradient"], components=["head", "mlp", "outer"], answers="reference",
                controls={"random_seeds": [0], "copy_all": True, "weight": False}), run, progress=False)
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    order = next(r for r in rows if r["key"].startswith("order"))
    assert order["unshared"] == ["lm_head.weight", "model.embed_tokens.weight"]
    ranked = [cid for cid, _ in json.loads((run / "rankings" / "gradient.json").read_text())["ranking"]]
    assert "model.norm.weight" in ranked and not set(order["unshared"]) & set(ranked)
    copy_all = next(r["key"] for r in rows if r["key"].startswith("control") and "|copy-all|" in r["key"])
    assert int(copy_all.split("|")[4]) == len(ranked) == 2 * (4 + 1) + 1  # heads, MLPs; the final norm
    # (the probe's batches were padded with the donor's pad id, 104: the target has 99 embeddings, so they
    # were padded with an id both have — else the gradient's forwards would have stopped with an IndexError)
    assert "differ in size, and are no candidate." in report.write(run).read_text()


def test_a_donor_that_ties_its_lm_head_is_studied_without_its_vocabulary(study: tuple[Path, SweepConfig],
                                                                          tmp_path: Path) -> None:
    """A twin that ties its LM head to its embeddings (saved without an lm_head tensor) beside one that does
    not: the layers are studied; the embeddings — the tying model's LM head too — and the head are no
    candidate, copy-all included, and the report says why."""
    from analysis import report

    _, cfg = study
    donor = build_model(tmp_path / "donor", "llama", seed=1, tie_word_embeddings=True)
    run = tmp_path / "run"
    sweep(small(cfg, donor=str(donor), methods=["gradient"], components=["head", "mlp", "outer"], answers="reference",
                controls={"random_seeds": [0], "copy_all": True, "weight": False}), run, progress=False)
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    order = next(r for r in rows if r["key"].startswith("order"))
    assert order["unshared"] == ["lm_head.weight", "model.embed_tokens.weight"] and order["tied_in_one"]
    ranked = [cid for cid, _ in json.loads((run / "rankings" / "gradient.json").read_text())["ranking"]]
    assert "model.norm.weight" in ranked and not set(order["unshared"]) & set(ranked)
    assert "One model ties its LM head to its input embeddings" in report.write(run).read_text()


def test_the_report_says_how_to_ship_the_chosen_point(study: tuple[Path, SweepConfig], tmp_path: Path) -> None:
    """The report's transplant command, run as printed, writes a model that transformers loads."""
    import shlex

    from transformers import AutoModelForCausalLM

    from analysis import report
    from analysis.cli import main

    _, cfg = study
    run = sweep(cfg, tmp_path / "run", progress=False)
    md = report.write(run).read_text()
    assert "## Ship or roll back" in md
    command = next(line.strip() for line in md.splitlines() if line.strip().startswith("graftlm transplant"))
    args = shlex.split(command)[1:]
    args[args.index("--out") + 1] = str(tmp_path / "shipped")
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code in (0, None)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "shipped").config.model_type == "llama"
    assert "<pre><code>graftlm transplant" in (run / "report.html").read_text()


def test_each_decoding_length_is_a_study_of_its_own(study: tuple[Path, SweepConfig], tmp_path: Path) -> None:
    from analysis import report

    _, cfg = study
    two = SweepConfig.model_validate({**cfg.model_dump(), "max_new_tokens": [2, 3], "k": [1, 2], "alpha": [1.0],
                                      "controls": {"random_seeds": [0], "copy_all": False, "weight": False}})
    run = sweep(two, tmp_path / "run", progress=False)
    assert [s.max_new_tokens for s in report.summarize(run)] == [2, 3]
    assert {p.name for p in run.glob("plan-*.yaml")} == {"plan-weight-tokens2.yaml", "plan-weight-tokens3.yaml"}
    report.write(run)
    assert {"recovery-tokens2.png", "recovery-tokens3.png"} <= {p.name for p in (run / "figures").iterdir()}


def test_reused_activations_give_the_same_study(study: tuple[Path, SweepConfig], tmp_path: Path) -> None:
    """A choice task: the grid replays the layers below each transplant, with results identical to full
    forwards (per item, and the retention perplexities to the last bit)."""
    root, cfg = study
    rng = random.Random(1)
    rows = []
    for i, split in enumerate(["probe"] * 4 + ["dev"] * 10 + ["test"] * 12):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        choices = [str(a + b), str(a + b + 1), str(a * b)]
        rows.append({"id": f"c{i}", "prompt": f"{a}+{b}=", "choices": choices, "answer": i % 3, "split": split})
    (tmp_path / "choice.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "choice.yaml").write_text(f"kind: choice\ndata: choice.jsonl\nretention: {root / 'ret.jsonl'}\n")
    with_reuse = cfg.model_copy(update={"task": str(tmp_path / "choice.yaml"), "k": [1, 2, 3], "alpha": [0.5, 1.0]})
    without = with_reuse.model_copy(update={"reuse_memory_gb": 0.0})
    ranking = [["L1.H1", 3.0], ["L1.mlp", 2.0], ["L0.H2", 1.0]]  # stored as a resumed run would find it
    for name in ("reuse", "full"):
        (tmp_path / name / "rankings").mkdir(parents=True)
        (tmp_path / name / "rankings" / "weight.json").write_text(json.dumps(ranking))
    fast = sweep(with_reuse, tmp_path / "reuse", progress=False)
    slow = sweep(without, tmp_path / "full", progress=False)
    assert per_item(fast) == per_item(slow)
    reuse = json.loads((fast / "environment.json").read_text())["reuse"]
    assert reuse["forward_calls_replayed"] > 0 and reuse["layer_forwards_skipped"] > 0
    assert json.loads((slow / "environment.json").read_text())["reuse"]["forward_calls_replayed"] == 0


def test_a_grid_point_drafts_only_while_neighbours_agree(study: tuple[Path, SweepConfig], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Drafts pay only when most rows keep their outputs: a grid point verifies the previous point's
    generations when that point agreed with the one before it on at least half of the items."""
    from analysis.eval import evaluate
    from analysis.study import points

    _, cfg = study
    agreements = iter([0.2, 0.9, 0.1, 0.5])  # after points 1, 2, 3 and 4
    monkeypatch.setattr(points, "agreement", lambda mine, theirs: next(agreements))
    drafted: list[bool] = []
    run = evaluate.run

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        drafted.append(kwargs.get("drafts") is not None)
        return run(*args, **kwargs)

    monkeypatch.setattr(evaluate, "run", recording)
    sweep(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    calls = [r["phase"] for r in rows if r["key"] != "order|None"]
    grid = [d for d, phase in zip(drafted, calls, strict=True) if phase == "grid"]
    assert grid == [True, False, True, False]  # the first drafts from the target's baseline


def test_grid_with_drafts_equals_plain_evaluation(study: tuple[Path, SweepConfig], tmp_path: Path) -> None:
    """Each dev point verifies the previous point's generations as drafts; what it reports is exactly what
    evaluating the transplanted model from scratch gives."""
    from analysis.eval import evaluate
    from analysis.io.models import load
    from analysis.plan import Plan
    from analysis.transplant import applied

    _, cfg = study
    run = sweep(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    grid = [r for r in rows if r.get("phase") == "grid"]
    assert grid and all("tokens" in it for r in grid for it in r["items"])
    donor, target = load(cfg.donor, dtype="float32"), load(cfg.target, dtype="float32")
    for row in grid:
        with applied(target, donor, Plan.of(row["plan"], alpha=row["alpha"])):
            plain = evaluate.run(target.model, target.tokenizer, cfg.task, split="dev", batch_size=cfg.batch_size,
                                 progress=False)
        assert [(it["id"], it["correct"], it["tokens"]) for it in row["items"]] == \
            [(r["id"], r["correct"], r["tokens"]) for r in plain.records]


@pytest.mark.real
def test_a_study_of_a_real_pair(tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct and a copy whose MLPs in layers 20–29 got noise, on real ARC-Easy items:
    the whole study runs, the dataless weight ranking finds exactly the changed MLPs, copy-all is the
    donor item for item, and the chosen point ships as a folder `from_pretrained` loads."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    from analysis import report
    from analysis.cli import main

    spec = importlib.util.spec_from_file_location("bench_sweep", Path(__file__).resolve().parents[1] / "bench" / "sweep.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = bench.scoring_config(dev=16, test=30).model_copy(update={
        "methods": ["weight", "attribution"], "k": [1, 4], "alpha": [1.0], "probe_limit": 8,
        "controls": Controls(random_seeds=[0], copy_all=True, weight=True)})
    run = sweep(cfg, tmp_path / "run", progress=False)
    weight = json.loads((run / "rankings" / "weight.json").read_text())["ranking"]
    assert {cid for cid, _ in weight[:10]} == {f"L{layer}.mlp" for layer in range(20, 30)}
    assert all(score == 0 for _, score in weight[10:])
    (summary,) = report.summarize(run)
    copy_all = next(f for f in summary.controls if f.method == "copy-all")
    assert copy_all.acc == summary.donor["test"]
    report.write(run)
    assert (run / "report.md").read_text().startswith("# graftlm sweep report")
    out = tmp_path / "shipped"
    with pytest.raises(SystemExit) as exit_info:
        main(["transplant", "-d", cfg.donor, "-t", cfg.target, "--plan", str(run / "plan-weight.yaml"), "--out", str(out)])
    assert exit_info.value.code in (0, None)
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 30


def test_device_map_runs_the_study_with_the_same_results(study: tuple[Path, SweepConfig], tmp_path: Path) -> None:
    """device_map: auto (here every module lands on the CPU), and a map that offloads a layer to disk (a
    model that does not fit the devices), run localization, the grid and the controls through the placed
    models with the per-item results of a plain load, and leave both sources' files as they were; the map
    is part of the config hash."""
    cfg = small(study[1], methods=["weight", "shifts"], answers="reference",
                controls={"random_seeds": [0], "copy_all": True, "weight": False})
    sources = {f: f.read_bytes() for ref in (cfg.donor, cfg.target) for f in Path(ref).glob("*.safetensors")}
    plain = per_item(sweep(cfg, tmp_path / "plain", progress=False))
    offload = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
               "model.rotary_emb": "cpu", "lm_head": "cpu"}
    for name, device_map in (("auto", "auto"), ("offloaded", offload)):
        mapped = cfg.model_copy(update={"device_map": device_map})
        assert mapped.digest() != cfg.digest()
        assert per_item(sweep(mapped, tmp_path / name, progress=False)) == plain, name
    assert {f: f.read_bytes() for f in sources} == sources


def test_a_second_benchmark_as_retention_is_scored_by_accuracy(study, tmp_path: Path) -> None:
    """retention: a choice task instead of texts: every model and chosen point is evaluated on it, and the
    report gives accuracies and their paired change in points."""
    from analysis import report

    _, cfg = study
    questions = tmp_path / "second.jsonl"
    questions.write_text("".join(json.dumps({"id": f"s{i}", "prompt": f"Is {i} even?", "choices": [" yes", " no"],
                                             "answer": i % 2}) + "\n" for i in range(12)))
    run = sweep(small(cfg, retention=str(questions), retention_limit=12), tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    on_retention = [r for r in rows if r.get("split") == "retention"]
    assert on_retention and all(r["n"] == 12 and r.get("perplexity") is None for r in on_retention)
    (summary,) = report.summarize(run)
    assert summary.retention_metric == "accuracy" and summary.methods[0].retention_change is not None
    assert "retention accuracy (Δ points, 95% CI)" in report.markdown(run)


def test_the_grid_grows_where_its_top_k_is_still_the_best(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """On the demo pair (a regression that needs several components) a grid of K=1 alone grows by doubling
    while its top K is the method's best on dev and far below the donor, up to k_grow_to; greedy ranks
    anew for each budget, the chosen point's plan is that budget's ranking, a rerun adds nothing, and a
    raced grid grows and chooses the same."""
    from analysis.study.config import DEMO_CONFIG

    cfg = SweepConfig.load(DEMO_CONFIG).model_copy(update={
        "methods": ["greedy"], "k": [1], "alpha": [1.0], "k_grow_to": 4, "probe_limit": 16, "dev_limit": 60,
        "test_limit": 20, "retention": None, "controls": Controls(random_seeds=[0], copy_all=False, weight=False)})
    run = sweep(cfg, tmp_path / "run", progress=True)
    assert "greedy: K=1, the top of its grid, is its best on dev (or nothing is clearly above the target yet) and " \
        "well below the donor: K=2 added" in \
        capsys.readouterr().err
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    grid = {r["top_k"]: r["accuracy"] for r in rows if r.get("phase") == "grid"}
    assert sorted(grid) == [1, 2, 4] and grid[1] < grid[2] < grid[4]  # each step was the best so far
    assert {p.name for p in (run / "rankings").iterdir()} == {"greedy.json", "greedy-top2.json", "greedy-top4.json"}
    (chosen,) = [r for r in rows if r.get("phase") == "chosen" and r["split"] == "test"]
    top4 = json.loads((run / "rankings" / "greedy-top4.json").read_text())["ranking"]
    assert chosen["top_k"] == 4 and chosen["plan"] == [cid for cid, _ in top4[:4]]
    (control,) = [r for r in rows if r.get("phase") == "control"]
    assert control["top_k"] == 4  # random components at the grown budget
    from analysis import report

    (summary,) = report.summarize(run)
    assert "greedy: the grid grew past K=1 to K=2, 4 (k_grow_to): its top K was its best on dev (or nothing was " \
        "clearly above the target yet) and well short of the donor." in summary.notes
    assert any(note.startswith("greedy: chosen K=4 is the top of the grid (of ") and "as far as k_grow_to lets it "
               "grow" in note for note in summary.notes)  # the limit, not the method, stopped it
    before = (run / "results.jsonl").read_bytes()
    sweep(cfg, run, progress=False)
    assert (run / "results.jsonl").read_bytes() == before
    # A study resumed by a graftlm whose grid grows further keeps the test row of the point chosen before it
    # grew: the report reads the one its dev grid chooses now (seen on the bank: two rows for one method)
    stale = {**chosen, "top_k": 2, "key": chosen["key"].replace("|4|", "|2|")}
    (run / "results.jsonl").write_bytes(before + (json.dumps(stale) + "\n").encode())
    (summary,) = report.summarize(run)
    assert [(f.method, f.k) for f in summary.methods] == [("greedy", 4)]
    (run / "results.jsonl").write_bytes(before)
    raced = sweep(cfg.model_copy(update={"race": 0.05}), tmp_path / "raced", progress=False)
    raced_rows = [json.loads(line) for line in (raced / "results.jsonl").read_text().splitlines()]
    assert sorted(r["top_k"] for r in raced_rows if r.get("phase") == "grid") == [1, 2, 4]  # grown the same
    assert [(r["top_k"], r["plan"]) for r in raced_rows if r.get("phase") == "chosen" and r["split"] == "test"] == \
        [(4, chosen["plan"])]
    fixed = sweep(cfg.model_copy(update={"k_grow_to": None}), tmp_path / "fixed", progress=False)
    assert [json.loads(x)["top_k"] for x in (fixed / "results.jsonl").read_text().splitlines()
            if json.loads(x).get("phase") == "grid"] == [1]
