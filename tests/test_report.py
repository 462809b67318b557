"""Reports state the verdict first, carry k/n and intervals, and regenerate their figures from the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analysis import report
from analysis.cli import main


def row(phase: str, split: str, who: str, correct: list[bool], method: str | None = None, top_k: int | None = None,
        alpha: float | None = None, seed: int | None = None, plan: list[str] | None = None) -> dict:
    key = "|".join([phase, split, who, method or "-", str(top_k), str(alpha), "None", str(seed)])
    k, n = sum(correct), len(correct)
    return {"key": key, "phase": phase, "split": split, "who": who, "method": method, "top_k": top_k, "alpha": alpha,
            "max_new_tokens": None, "seed": seed, "k": k, "n": n, "accuracy": k / n, "ci_low": 0.0, "ci_high": 1.0,
            "plan": plan, "items": [{"id": f"i{i}", "correct": c} for i, c in enumerate(correct)]}


def write_run(folder: Path, method_correct: list[bool], method: str = "attribution", **order: object) -> Path:
    """A finished study: baselines, a 2 × 2 grid, the chosen point (K=2, α=1) and its controls; ``order``
    adds fields to the study's order row (k_grid, overlap_dropped, or a swapped donor)."""
    n = 100
    donor = [i % 10 < 8 for i in range(n)]  # 80%
    target = [i % 10 < 2 for i in range(n)]  # 20%
    d, t = str(order.get("donor", "a")), str(order.get("target", "b"))
    rows = [row("baseline", s, w, c) for s in ("dev", "test") for w, c in ((d, donor), (t, target))]
    rows.append({"key": "order|None", "phase": "order", "max_new_tokens": None, "donor": "a", "target": "b",
                 "donor_ref": "demo:gen1", "target_ref": "demo:gen2", **order})
    for k in (1, 2):
        for a in (0.5, 1.0):
            rows.append(row("grid", "dev", "transplant", method_correct if (k, a) == (2, 1.0) else target,
                            method, k, a, plan=["L1.mlp", "L0.H2"][:k]))
    rows.append(row("chosen", "test", "transplant", method_correct, method, 2, 1.0, plan=["L1.mlp", "L0.H2"]))
    for seed in (0, 1, 2):
        rows.append(row("control", "test", "transplant", target, "random", 2, 1.0, seed))
    rows.append(row("control", "test", "transplant", donor, "copy-all", 20, 1.0))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "config.yaml").write_text("donor: demo:gen1\ntarget: demo:gen2\ntask: demo:arith\n")
    return folder


def test_a_method_that_beats_random_is_named_with_its_numbers(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", [i % 10 < 6 for i in range(100)])  # 60% vs random 20%
    (summary,) = report.summarize(run)
    (finding,) = summary.methods
    assert finding.acc.k == 60 and finding.acc.n == 100 and finding.acc.ci_low > 0.5
    assert finding.recovery.value == pytest.approx(2 / 3) and finding.vs_target.p_value < 1e-6
    assert finding.recovery.ci_low < 2 / 3 < finding.recovery.ci_high  # paired bootstrap over the test items
    assert report.beats_random(finding, summary.random_pooled)
    assert summary.verdict[0].startswith("attribution (attribution patching, causal) beats the random control "
                                         "beyond its interval by +40.0 points (95% CI +")


def test_no_win_over_random_is_said_first(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", [i % 10 < 2 or i == 3 for i in range(100)])  # 21%: noise
    md = report.markdown(run)
    verdict = [line for line in md.splitlines() if line.startswith(">")]
    assert verdict[0] == ("> No method (attribution) beats the random control beyond its 95% interval: the localized "
                          "components are not shown to be better than chance on this pair.")
    assert verdict[1].startswith("> attribution (attribution patching, causal) is not distinguishable from random "
                                 "components at the same budget (margin +1.0 points, 95% CI ")


def test_a_positive_margin_is_said_when_the_strict_test_fails(tmp_path: Path) -> None:
    """27% against random's pooled 20% (300 items): the intervals overlap, but the transplant fixes 7 items
    and breaks none, so the paired margin over random components is above zero — and the verdict says so."""
    run = write_run(tmp_path / "run", [i % 10 < 2 or i % 10 == 9 and i < 70 for i in range(100)])
    (summary,) = report.summarize(run)
    (finding,) = summary.methods
    assert not report.beats_random(finding, summary.random_pooled)
    assert finding.vs_random is not None and finding.vs_random.ci_low > 0
    assert summary.verdict[0].startswith("No method (attribution) beats the random control beyond its 95% interval "
                                         "(the strict test); the margins")
    assert summary.verdict[1].startswith("attribution (attribution patching, causal) does not clear the random "
                                         "control's interval, but beats random components at the same budget by "
                                         "+7.0 points (95% CI +")
    assert "not shown to be better than chance" not in " ".join(summary.verdict)
    (run / "plan-attribution.yaml").write_text("components: [L1.mlp, L0.H2]\n")
    assert "beats random components by +7.0 points" in report.markdown(run)  # the ship section agrees


def test_a_dataless_method_is_not_called_activation_based(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", [i % 10 < 2 for i in range(100)], method="weight")
    (summary,) = report.summarize(run)
    text = " ".join(summary.verdict)
    assert "activation" not in text
    assert summary.verdict[0].startswith("No method (weight) beats the random control")
    assert summary.verdict[1].startswith("weight (weight difference, dataless) is not distinguishable from random")
    assert report.named("a-new-method") == "a-new-method"  # methods added later are named bare


def test_notes_state_the_grid_the_donor_and_dropped_items(tmp_path: Path) -> None:
    """After the verdict: a chosen K at the top of the grid, K values clipped to the components there are,
    shares resolved, the donor auto_order picked, and the items overlap: drop removed."""
    correct = [i % 10 < 6 for i in range(100)]
    plain = write_run(tmp_path / "plain", correct)
    (summary,) = report.summarize(plain)
    assert summary.notes == ["attribution: chosen K=2 is the top of the grid: a larger K might do better."]
    counted = write_run(tmp_path / "counted", correct,
                        k_grid={"requested": [1, 2], "resolved": [1, 2], "clipped": [], "n_components": 20})
    assert report.summarize(counted)[0].notes == [
        "attribution: chosen K=2 is the top of the grid (of 20 components): a larger K might do better."]
    k_grid = {"requested": [1, 50, "5%"], "resolved": [1, 2], "clipped": [50], "n_components": 2}
    dropped = {"counts": {"probe": 12, "dev": 3},
               "overlaps": ["12 items of probe also in test (a.jsonl:3 = a.jsonl:812, …)"]}
    run = write_run(tmp_path / "run", correct, donor="b", target="a", donor_ref="demo:gen2", target_ref="demo:gen1",
                    k_grid=k_grid, overlap_dropped=dropped)
    (summary,) = report.summarize(run)
    assert summary.notes == [
        "auto_order: demo:gen2 was better on dev (80.0%, 80/100 vs 20.0%, 20/100), so it is the donor here.",
        "overlap: drop removed 12 probe and 3 dev items also in a later split; test is whole "
        "(12 items of probe also in test (a.jsonl:3 = a.jsonl:812, …)).",
        "k: 5% → K=1 of 2 components; K=50 exceeds the 2 components and was clipped to K=2.",
    ]  # K=2 is every component: no larger K to try, so no top-of-grid note
    md = report.markdown(run)
    assert "Notes:\n\n- auto_order: demo:gen2 was better on dev" in md
    assert md.index("> ") < md.index("Notes:") < md.index("| model / point")


def test_a_weak_copy_all_names_the_weight_difference_outside_the_candidates(tmp_path: Path) -> None:
    """When copying every candidate recovers little, the note says how much of the weight difference lies
    outside the candidates and which tensors hold it; when copy-all recovers the gap, nothing is said."""
    outside = {"share": 0.62, "largest": [["lm_head.weight", 0.71], ["model.norm.weight", 0.05]]}
    run = write_run(tmp_path / "run", [i % 10 < 3 for i in range(100)], outside=outside)
    (summary,) = report.summarize(run)
    assert not any("outside" in note for note in summary.notes)  # copy-all recovers 100% here
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    for r in rows:
        if r.get("method") == "copy-all":  # 30%: a tenth of the gap
            r["items"] = [{"id": f"i{i}", "correct": i % 10 < 3} for i in range(100)]
            r["k"], r["accuracy"] = 30, 0.3
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (summary,) = report.summarize(run)
    assert summary.notes[-1] == (
        "copy-all recovers 17% of the gap, and 62% of the donor–target weight difference lies outside the candidate "
        "components, largest in lm_head.weight (changed 71%), model.norm.weight (changed 5%): no selection among "
        "the candidates can recover it; a plan takes such a tensor by name among its components (e.g. lm_head.weight).")


def test_figures_command_regenerates_every_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = write_run(tmp_path / "run", [i % 10 < 6 for i in range(100)])
    with pytest.raises(SystemExit) as exit_info:
        main(["figures", str(run)])
    assert exit_info.value.code in (0, None)
    names = {p.name for p in (run / "figures").iterdir()}
    for fig in ("accuracy_vs_k", "accuracy_vs_alpha", "recovery", "components"):
        assert {f"{fig}.png", f"{fig}.svg"} <= names
    html = (run / "report.html").read_text()
    assert "data:image/png;base64," in html and "60/100" in html
    md = (run / "report.md").read_text()
    assert "60/100" in md and "gap recovery 67% (95% CI" in md
    assert "fixed 40 items the target got wrong and broke 0 the target got right" in md
    assert "against random components at the same budget +40.0 points (95% CI +" in md


def test_retention_cost_is_a_paired_change_against_the_target(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", [i % 10 < 6 for i in range(100)])

    def retention(phase: str, who: str, nats: float, **point: object) -> dict:
        key = "|".join([phase, "retention", who, str(point.get("method") or "-"), str(point.get("top_k")),
                        str(point.get("alpha")), "None", "None"])
        items = [{"id": f"t{i}", "nll": nats * (10 + i), "n_tokens": 10 + i} for i in range(30)]
        return {"key": key, "phase": phase, "split": "retention", "who": who, "max_new_tokens": None, "seed": None,
                "perplexity": 2.718281828 ** nats, "items": items, **point}

    rows = [retention("baseline", "a", 1.0), retention("baseline", "b", 1.0),
            retention("chosen", "transplant", 1.1, method="attribution", top_k=2, alpha=1.0)]
    with (run / "results.jsonl").open("a") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
    (summary,) = report.summarize(run)
    change = summary.methods[0].retention_change
    assert change is not None and change.value == pytest.approx(2.718281828 ** 0.1 - 1, rel=1e-6)
    assert summary.donor_retention_change is not None and summary.donor_retention_change.value == pytest.approx(0)
    assert "retention perplexity +10.5%" in summary.verdict[0]
    assert "(+10.5% [+10.5, +10.5])" in report.markdown(run)


def test_each_decoding_length_gets_its_own_figures(tmp_path: Path) -> None:
    """A study of several max_new_tokens: one summary and one set of figures per length, never mixed."""
    from analysis.report import figures

    run = write_run(tmp_path / "run", [i % 10 < 6 for i in range(100)])
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    longer = []
    for r in rows:
        r = {**r, "max_new_tokens": 16}
        parts = r["key"].split("|")
        r["key"] = "order|16" if parts[0] == "order" else "|".join(parts[:6] + ["16"] + parts[7:])
        if r["phase"] == "grid":
            r["accuracy"] = 0.1  # a different curve: mixing the lengths would show it
        longer.append(r)
    with (run / "results.jsonl").open("a") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in longer))
    assert [s.max_new_tokens for s in report.summarize(run)] == [None, 16]
    assert set(figures.grid_frame(run, 16)["accuracy"]) == {0.1}
    names = {p.name for p in figures.make_all(run)}
    assert {"recovery-tokensdefault.png", "recovery-tokens16.png", "accuracy_vs_k-tokens16.svg"} <= names
    assert not any(n.startswith("recovery.") for n in names)
    # and the paper's figure: every length's curve on one set of axes
    assert "accuracy_vs_k_by_length.png" in names


def test_a_key_written_twice_counts_once(tmp_path: Path) -> None:
    """Two writers once doubled every line (and the pooled random control with them): a key counts once,
    its last line wins, and the verdict is the one the single run gives."""
    once = write_run(tmp_path / "once", [i % 10 < 6 for i in range(100)])
    twice = write_run(tmp_path / "twice", [i % 10 < 6 for i in range(100)])
    lines = (twice / "results.jsonl").read_text()
    (twice / "results.jsonl").write_text(lines + lines)
    (a,), (b,) = report.summarize(once), report.summarize(twice)
    assert a.random_pooled == b.random_pooled and a.verdict == b.verdict
    assert sum(1 for _ in report.read_rows(twice)[1]) == len(lines.splitlines())


def test_gradient_completeness_is_stated_and_a_miss_is_flagged() -> None:
    """The note gives the scores' sum against the measured change; past the tolerance it says the scores
    are approximate."""
    def note(error: float) -> str:
        info = {"sum_of_scores": 1.0, "metric_change": 1.0 + error, "relative_error": error, "steps": 32,
                "tolerance": 0.01}
        (said,) = report.localization_notes({"gradient": {"gradient": info}}, {"donor": "a"}, ["gradient"], False)
        return said
    assert note(0.004).endswith("(0.40% apart, 32 path nodes).")
    assert note(0.03).endswith("(3.00% apart, 32 path nodes; more than the 1% tolerance even at 32 nodes: "
                               "its scores are approximate).")


def test_a_probe_without_a_gap_is_in_the_notes() -> None:
    """localize's warning that the donor (copy-all) does not beat the target on the probe reaches the report."""
    from analysis.interp.probe import no_gap

    meta = {"method": "gradient", "metric": "logprob", "split": "probe",
            "gradient": {"target_metric": -2.0, "copy_all_metric": -2.5, "sum_of_scores": -0.5, "metric_change": -0.5,
                         "relative_error": 0.0, "steps": 8}}
    warning = no_gap(meta)
    assert warning and "-2.5" in warning and no_gap({**meta, "gradient": {"target_metric": -2.0,
                                                                         "copy_all_metric": -1.0}}) is None
    said = report.localization_notes({"gradient": {**meta, "warning": warning}}, {"donor": "a"}, ["gradient"], False)
    assert said[0] == f"gradient: {warning}." and said[1].startswith("gradient: its shares sum to")


def test_tensors_no_activation_method_can_score_are_named_beside_the_weight_space_ranks() -> None:
    """An activation method ranks the embeddings and LM head last (no hook point); when gradient or greedy
    put one of them first, the notes say so — why attribution lost to random components on such a pair."""
    outer = ["model.embed_tokens.weight", "model.norm.weight"]
    metas = {"attribution": {"unscored": outer}, "patching": {"unscored": outer},
             "gradient": {"outer_ranks": {"model.embed_tokens.weight": 1, "model.norm.weight": 9}},
             "greedy": {"outer_ranks": {"model.embed_tokens.weight": 2}}}
    said = report.localization_notes(metas, {"donor": "a"}, list(metas), False)
    assert said == ["attribution, patching: no hook point on the tensors outside the layers (model.embed_tokens.weight, "
                    "model.norm.weight), ranked last; the weight-space methods rank model.embed_tokens.weight "
                    "gradient #1, greedy #2."]
    alone = report.localization_notes({"attribution": {"unscored": outer}}, {"donor": "a"}, ["attribution"], False)
    assert alone[0].endswith("ranked last.")
    assert report.localization_notes({"gradient": metas["gradient"]}, {"donor": "a"}, ["gradient"], False) == []


def test_a_retention_benchmark_is_reported_as_accuracy_points(tmp_path: Path) -> None:
    """retention: a second benchmark (questions, not texts): its accuracy beside each point, and the change
    against the target in points, paired by question — what an arithmetic transplant did to ARC-Easy."""
    run = write_run(tmp_path / "run", [i % 10 < 6 for i in range(100)])

    def retention(phase: str, who: str, right: int, **point: object) -> dict:
        key = "|".join([phase, "retention", who, str(point.get("method") or "-"), str(point.get("top_k")),
                        str(point.get("alpha")), "None", "None"])
        items = [{"id": f"q{i}", "correct": i < right} for i in range(50)]
        return {"key": key, "phase": phase, "split": "retention", "who": who, "max_new_tokens": None, "seed": None,
                "accuracy": right / 50, "k": right, "n": 50, "items": items, **point}

    rows = [retention("baseline", "a", 40), retention("baseline", "b", 40),
            retention("chosen", "transplant", 35, method="attribution", top_k=2, alpha=1.0)]
    with (run / "results.jsonl").open("a") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
    (summary,) = report.summarize(run)
    assert summary.retention_metric == "accuracy" and summary.retention == {"donor": 0.8, "target": 0.8}
    change = summary.methods[0].retention_change
    assert change is not None and change.value == pytest.approx(-0.1)  # 5 of 50 questions lost
    assert "retention accuracy -10.0 points" in summary.verdict[0]
    md = report.markdown(run)
    assert "retention accuracy (Δ points, 95% CI)" in md and "0.700 (-10.0 points [" in md
    assert "Retention: accuracy on a second benchmark" in md and "perplexity on off-task text" not in md
