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


def write_run(folder: Path, method_correct: list[bool]) -> Path:
    n = 100
    donor = [i % 10 < 8 for i in range(n)]  # 80%
    target = [i % 10 < 2 for i in range(n)]  # 20%
    rows = [row("baseline", s, w, c) for s in ("dev", "test") for w, c in (("a", donor), ("b", target))]
    rows.append({"key": "order|None", "phase": "order", "max_new_tokens": None, "donor": "a", "target": "b",
                 "donor_ref": "demo:gen1", "target_ref": "demo:gen2"})
    for k in (1, 2):
        for a in (0.5, 1.0):
            rows.append(row("grid", "dev", "transplant", method_correct if (k, a) == (2, 1.0) else target,
                            "attribution", k, a, plan=["L1.mlp", "L0.H2"][:k]))
    rows.append(row("chosen", "test", "transplant", method_correct, "attribution", 2, 1.0, plan=["L1.mlp", "L0.H2"]))
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
    assert summary.verdict[0].startswith("attribution beats the random control")


def test_no_win_over_random_is_said_first(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", [i % 10 < 2 or i == 3 for i in range(100)])  # 21%: noise
    md = report.markdown(run)
    first = [line for line in md.splitlines() if line.startswith(">")][0]
    assert "No method beats the random control" in first


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
    from analysis import figures

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
