"""The racing dev grid: a point clearly worse than its method's best so far stops early, says so, is never
chosen; points that run to the end keep the full grid's lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import build_model

from analysis.errors import GraftError
from analysis.study.config import SweepConfig
from analysis.study.race import better, worse_p
from analysis.study.sweep import sweep


def test_the_sign_test() -> None:
    assert worse_p([False] * 6, [True] * 6) == pytest.approx(1 / 64)  # 6 discordant, all against
    assert worse_p([True, False], [True, False]) == 1.0  # nothing discordant: no evidence
    assert worse_p([True] * 3 + [False] * 3, [False] * 3 + [True] * 3) == pytest.approx(42 / 64)
    row = {"accuracy": 0.5, "top_k": 2, "alpha": 1.0}
    assert better(row, None) and better(row, {**row, "top_k": 4}) and not better(row, {**row, "accuracy": 0.6})


def test_a_raced_grid_stops_the_clearly_worse_and_chooses_as_the_full_grid(tmp_path: Path) -> None:
    """The target is the donor with its MLPs zeroed, the answers are the donor's own outputs, so α = 0
    points (the target) are clearly worse than the donor-like α = 1 ones: racing stops them (the line says on
    how many items, against which point, at which p), the lines of the points it did not stop equal the
    full grid's, and the chosen points are the same."""
    import random

    from safetensors.torch import load_file, save_file

    from analysis.eval import evaluate
    from analysis.io.models import load

    donor = build_model(tmp_path / "donor", "llama", seed=1)
    target = build_model(tmp_path / "target", "llama", seed=1)
    weights = load_file(target / "model.safetensors")
    for layer in (0, 1):
        weights[f"model.layers.{layer}.mlp.down_proj.weight"].zero_()
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    rng = random.Random(3)
    rows = [{"id": f"q{i}", "prompt": f"{rng.randint(10, 99)}+{rng.randint(10, 99)}=", "answer": "0", "split": split}
            for i, split in enumerate(["probe"] * 4 + ["dev"] * 48 + ["test"] * 8)]
    task = _write(tmp_path, rows)
    loaded = load(donor)
    outputs = {r["id"]: r["output"] for r in evaluate.run(loaded.model, loaded.tokenizer, task, split="all",
                                                           progress=False).records}
    task = _write(tmp_path, [{**r, "answer": outputs[r["id"]]} for r in rows])
    cfg = SweepConfig(donor=str(donor), target=str(target), task=str(task), methods=["weight"], k=[1, 2],
                      alpha=[0.0, 1.0], components=["head", "mlp"], batch_size=8, retention_limit=2,
                      controls={"random_seeds": [0], "copy_all": False, "weight": False})
    full = sweep(cfg, tmp_path / "full", progress=False)
    race = sweep(cfg.model_copy(update={"race": 0.05}), tmp_path / "race", progress=False)

    def rows_of(run: Path, phase: str) -> dict[str, dict]:
        return {r["key"]: r for r in map(json.loads, (run / "results.jsonl").read_text().splitlines())
                if r.get("phase") == phase}

    whole, raced = rows_of(full, "grid"), rows_of(race, "grid")
    assert whole[next(k for k in whole if "|2|1.0|" in k)]["accuracy"] == 1.0  # K=2 (the zeroed MLPs), α=1
    stopped = [r for r in raced.values() if "raced" in r]
    assert stopped, "no point was stopped"
    for r in stopped:
        info = r["raced"]
        assert whole[r["key"]]["accuracy"] < whole[info["against"]]["accuracy"]  # truly worse on every dev item
        assert info["n_seen"] < info["n_items"] == 48 and info["p"] < 0.05 / 6
        assert r["n"] == info["n_seen"] and "raced" not in raced[info["against"]]
    for key, r in raced.items():
        if "raced" not in r:
            assert r["items"] == whole[key]["items"] and r["accuracy"] == whole[key]["accuracy"]
    assert {k: r["items"] for k, r in rows_of(race, "chosen").items()} == \
        {k: r["items"] for k, r in rows_of(full, "chosen").items()}
    assert sum(r["n"] for r in raced.values()) < sum(r["n"] for r in whole.values())


def _write(folder: Path, rows: list[dict]) -> Path:
    """A generation task of exact match on three new tokens, with the shared retention texts."""
    (folder / "race.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "ret.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "text": f"the cat sat {i}."}) + "\n"
                                              for i in range(3)))
    (folder / "race.yaml").write_text("kind: generate\ndata: race.jsonl\nfilter: exact\nmax_new_tokens: 3\n"
                                      "stop: []\nretention: ret.jsonl\n")
    return folder / "race.yaml"


def test_a_race_outside_zero_and_one_is_refused() -> None:
    with pytest.raises(GraftError, match="race"):
        SweepConfig.parse("donor: a\ntarget: b\ntask: t\nrace: 1.5\n", "c.yaml")
