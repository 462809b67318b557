"""Plans round-trip through YAML, accept the short forms, and name what is wrong in a bad file."""

from __future__ import annotations

from pathlib import Path

import pytest

from analysis.errors import GraftError
from analysis.plan import Plan


def test_yaml_round_trip_and_shorthand(tmp_path: Path) -> None:
    text = "alpha: 0.5\ncomponents:\n  - L3.mlp\n  - L5.H2: 0.25\n  - {id: L7.attn.o, alpha: 1.0, score: 3.5}\n" \
           "provenance: {method: attribution, task: 'demo:arith'}\n"
    plan = Plan.from_yaml(text)
    assert plan.strengths() == {"L3.mlp": 0.5, "L5.H2": 0.25, "L7.attn.o": 1.0}
    assert plan.components[2].score == 3.5 and plan.provenance.method == "attribution"
    again = Plan.load(plan.save(tmp_path / "p.yaml"))
    assert again == plan
    assert "- L3.mlp" in plan.to_yaml()
    assert plan.with_alpha(0.1).strengths() == {"L3.mlp": 0.1, "L5.H2": 0.1, "L7.attn.o": 0.1}


@pytest.mark.parametrize("text,word", [
    ("components: [L1.mlp\n", "line"),
    ("- L1.mlp\n", "mapping"),
    ("components:\n  - {id: L1.mlp, alfa: 2}\n", "alfa"),
    ("alpha: high\ncomponents: [L1]\n", "alpha"),
])
def test_bad_plan_files(tmp_path: Path, text: str, word: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(GraftError, match=word) as err:
        Plan.load(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_plan_file(tmp_path: Path) -> None:
    with pytest.raises(GraftError, match="no such plan file"):
        Plan.load(tmp_path / "none.yaml")
