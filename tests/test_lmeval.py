"""The lm-evaluation-harness bridge, offline: lm-eval task YAMLs over local JSONL, on a live tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers as T

from analysis.errors import GraftError
from analysis.eval import evaluate, lmeval, tasks

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[T.PreTrainedModel, T.PreTrainedTokenizerBase]:
    from conftest import random_char_llama

    folder = tmp_path_factory.mktemp("lmeval-llama")
    model, tok = random_char_llama(folder, seed=3)
    model.config._name_or_path = str(folder)
    return model, tok


MC = [{"id": f"q{n}", "prompt": f"Question: what is {n} plus {n}?\nAnswer:",
       "choices": [str(2 * n), str(n), f"{n}{n}", "none of them"], "answer": 0} for n in range(8)]


def test_lm_eval_task_yaml_over_local_jsonl_matches_ours(tiny, tmp_path: Path) -> None:
    model, tok = tiny
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in MC))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {data}}}}}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{prompt}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list: [{metric: acc}, {metric: acc_norm}]\n")
    results = lmeval.evaluate(model, tok, "tiny_mc", include_path=tmp_path, batch_size=4, log_samples=True)
    ours = evaluate.run(model, tok, data, batch_size=4, progress=False)
    theirs = lmeval.accuracy(results, "tiny_mc")
    assert (theirs.k, theirs.n) == (ours.summary["k"], ours.summary["n"])
    assert lmeval.accuracy(results, "tiny_mc", "acc_norm").k == ours.summary["acc_norm"]["k"]
    by_doc = {s["doc"]["id"]: [r[0] for r in s["filtered_resps"]] for s in results["samples"]["tiny_mc"]}
    for rec in ours.records:
        assert rec["logprobs"] == pytest.approx(by_doc[rec["id"]], abs=1e-4)


def test_export_task_runs_generation_in_both_harnesses(tiny, tmp_path: Path) -> None:
    model, tok = tiny
    rows = [{"id": f"g{n}", "prompt": f"{n}+{n}=", "answer": str(2 * n)} for n in range(4)]
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "g.yaml").write_text("data: g.jsonl\nfilter: exact\nmetric: strict\nmax_new_tokens: 5\n")
    task = tasks.load(tmp_path / "g.yaml")
    name, _ = lmeval.export_task(task, tmp_path / "lm")
    results = lmeval.evaluate(model, tok, name, include_path=tmp_path / "lm", batch_size=2, log_samples=True)
    ours = evaluate.run(model, tok, task, progress=False)
    outputs = {s["doc"]["id"]: s["filtered_resps"][0] for s in results["samples"][name]}
    assert {r["id"]: r["output"] for r in ours.records} == outputs  # same greedy text, same stop handling
    assert lmeval.accuracy(results, name, "exact_match").k == ours.summary["k"]


def test_unknown_lm_eval_task(tiny, tmp_path: Path) -> None:
    model, tok = tiny
    with pytest.raises(GraftError, match="does not know task"):
        lmeval.evaluate(model, tok, "no_such_task_xyz", include_path=tmp_path)


@pytest.mark.real
def test_real_smollm2_arc_easy_same_predictions_as_lm_eval(tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct on 20 real ARC-Easy items: lm-eval's HF backend and ours agree item by item."""
    import importlib.util

    # bench/evaluate.py under its own name: "evaluate" is also a package lm-eval imports
    spec = importlib.util.spec_from_file_location("bench_evaluate", Path(__file__).resolve().parents[1] / "bench" / "evaluate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model, tok = bench.load_smollm2()
    task = tasks.load("arc_easy", split="test", limit=20)
    name, _ = lmeval.export_task(task, tmp_path)
    theirs = lmeval.evaluate(model, tok, name, include_path=tmp_path, batch_size=8, log_samples=True)
    ours = evaluate.run(model, tok, task, batch_size=8, progress=False)
    by_doc = {s["doc"]["id"]: [r[0] for r in s["filtered_resps"]] for s in theirs["samples"][name]}
    for rec in ours.records:
        assert rec["logprobs"] == pytest.approx(by_doc[rec["id"]], abs=1e-3)
    assert lmeval.accuracy(theirs, name).k == ours.summary["k"]
