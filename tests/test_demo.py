"""The embedded demo pair: shipped files intact, loaded as users load them, showing the gap it is for;
the tasks' splits held out of training; and the build recipe runs end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from analysis.demo import data
from analysis.demo.build import HERE, MODEL_NAMES, sha256, task_specs
from analysis.io import models

ROOT = Path(__file__).resolve().parents[1]
MODELS = HERE / "models"
TASKS = HERE / "tasks"
MB = 1 << 20


def test_manifest_lists_every_file_and_hashes_match() -> None:
    manifest = json.loads((MODELS / "MANIFEST.json").read_text())
    assert sorted(manifest) == sorted(MODEL_NAMES)
    for name, files in manifest.items():
        folder = MODELS / name
        assert sorted(files) == sorted(p.name for p in folder.iterdir() if p.is_file()), name
        for fname, digest in files.items():
            assert sha256(folder / fname) == digest, f"{name}/{fname} differs from MANIFEST.json"


def test_shipped_models_are_small() -> None:
    sizes = [p.stat().st_size for p in MODELS.rglob("*") if p.is_file()]
    assert max(sizes) <= 5 * MB
    assert sum(sizes) <= 15 * MB


@pytest.fixture(scope="module")
def loaded() -> dict[str, models.LoadedModel]:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return {name: models.load(f"demo:{name}") for name in MODEL_NAMES}


def _correct(lm: models.LoadedModel, task: str, split: str = "probe") -> int:
    from analysis.eval import evaluate

    return evaluate.run(lm.model, lm.tokenizer, f"demo:{task}", split=split, batch_size=64, progress=False).summary["k"]


def test_loader_gives_the_manifest_weights(loaded: dict[str, models.LoadedModel]) -> None:
    manifest = json.loads((MODELS / "MANIFEST.json").read_text())
    for name, lm in loaded.items():
        assert lm.ref.path == MODELS / name
        assert sha256(lm.ref.path / "model.safetensors") == manifest[name]["model.safetensors"]
        assert lm.model.config.num_key_value_heads < lm.model.config.num_attention_heads  # GQA


def test_gen1_beats_gen2_on_arith_and_gen2_keeps_reverse(loaded: dict[str, models.LoadedModel]) -> None:
    # The probe split (64 items) is small enough for CI; the full measurements are in docs/demo-models.md.
    g1, g2 = _correct(loaded["gen1"], "arith"), _correct(loaded["gen2"], "arith")
    assert g1 >= 3 * g2 and g1 - g2 >= 20, (g1, g2)
    r1, r2 = _correct(loaded["gen1"], "reverse"), _correct(loaded["gen2"], "reverse")
    assert r2 >= r1 - 3, (r1, r2)


def test_bridge_boots_on_the_demo_model(loaded: dict[str, models.LoadedModel]) -> None:
    lm = loaded["gen1"]
    ids = lm.tokenizer("37+58=", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hf = lm.model(ids).logits
        tl = lm.bridge(ids)
    torch.testing.assert_close(tl, hf, atol=1e-4, rtol=1e-4)


def test_tokenizer_is_character_level_with_bos() -> None:
    tok = data.build_tokenizer()
    text = "User: What is 37+58?\nBot: 95"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok) == len(data.SPECIALS) + len(data.CHARS)


def test_splits_are_disjoint_and_never_trained_on() -> None:
    held = data.held_out(0)
    for skill in data.SKILLS:
        splits = held.problems[skill]
        assert {k: len(v) for k, v in splits.items()} == data.SPLITS
        union = [p for v in splits.values() for p in v]
        assert len(set(union)) == len(union), skill
    assert not set(held.retention["dev"]) & set(held.retention["test"])
    prompts = {data.plain(s, p)[0] for s in data.SKILLS for v in held.problems[s].values() for p in v}
    prompts |= {data.chat(s, p)[0] for s in data.CHAT_TEMPLATES for v in held.problems[s].values() for p in v}
    mix = {"arith:plain": 1, "reverse:plain": 1, "upper:plain": 1, "arith:chat": 1, "reverse:chat": 1, "text": 1}
    stream = data.Stream(mix, held, seed=0)
    for _ in range(20000):
        context, target = stream.line()
        assert context not in prompts
        assert target.rstrip("\n") not in held.retention_texts


def test_shipped_tasks_are_the_recipes_and_load() -> None:
    from analysis.eval import tasks

    held = data.held_out(0)
    for skill in data.SKILLS:
        shipped = [json.loads(line) for line in (TASKS / f"{skill}.jsonl").read_text().splitlines()]
        assert shipped == data.records(held, skill)
    assert set(task_specs()) == {p.stem for p in TASKS.glob("*.yaml")}
    arith = tasks.load("demo:arith")
    assert [len(arith.items(s)) for s in ("probe", "dev", "test")] == [64, 200, 400]
    assert len(arith.items("retention")) == 100
    chat = tasks.load("demo:arith-chat")
    item = chat.items("test")[0]
    assert chat.render(item) == data.chat("arith", (item.fields["a"], item.fields["b"]))[0]
    assert len(tasks.load("demo:text").items("test")) == 100


def test_build_runs_end_to_end(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "analysis.demo.build", "--steps", "3", "--out", str(tmp_path), "--limit", "16"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "build-report.json").read_text())
    assert set(report["results_test"]) == set(MODEL_NAMES)
    manifest = json.loads((tmp_path / "models" / "MANIFEST.json").read_text())
    for name in MODEL_NAMES:
        lm = models.load(tmp_path / "models" / name)
        assert sha256(tmp_path / "models" / name / "model.safetensors") == manifest[name]["model.safetensors"]
        assert lm.model.config.num_hidden_layers == report["recipe"]["layers"]
    assert (tmp_path / "tasks" / "arith.yaml").is_file()


@pytest.mark.real
def test_full_rebuild_reproduces_the_shipped_accuracies(tmp_path: Path) -> None:
    # About 5 minutes on 2 CPU cores: the whole recipe, then every test-split accuracy must fall inside
    # the shipped 95% interval (on the same torch and thread count the weights come out bit-identical).
    cmd = [sys.executable, "-m", "analysis.demo.build", "--out", str(tmp_path)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=3600)
    shipped = json.loads((HERE / "build-report.json").read_text())["results_test"]
    rebuilt = json.loads((tmp_path / "build-report.json").read_text())["results_test"]
    for name, tasks_ in shipped.items():
        for task, ref in tasks_.items():
            if isinstance(ref, dict):
                lo, hi = ref["ci95"]
                assert lo <= rebuilt[name][task]["acc"] <= hi, (name, task, ref, rebuilt[name][task])
