"""analysis.eval.evaluate: hand-checked numbers on a bigram model, batch-size invariance, records, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import transformers as T
from conftest import write_jsonl

from analysis.cli import main
from analysis.errors import GraftError
from analysis.eval import engine, evaluate, tasks


def log_norm(tok: T.PreTrainedTokenizerBase, *big: float) -> float:
    """log Σ exp(row): a bigram row with entries ``big`` and zeros elsewhere."""
    return math.log(sum(math.exp(b) for b in big) + len(tok) - len(big))


def test_generation_hand_checked(bigram, tmp_path: Path) -> None:
    model, tok = bigram
    rows = [{"id": str(i), "prompt": p, "answer": a}
            for i, (p, a) in enumerate([("2+2=", "4"), ("1+3=", "4"), ("3+3=", "6"), ("7-3=", "4"), ("2*3=", "6")])]
    result = evaluate.run(model, tok, write_jsonl(tmp_path / "arith.jsonl", rows), batch_size=2, progress=False)
    assert [r["output"] for r in result.records] == ["4"] * 5  # greedy "4", cut at the "\n" stop
    assert [r["correct"] for r in result.records] == [True, True, False, True, False]
    s = result.summary
    assert (s["k"], s["n"], s["accuracy"]) == (3, 5, 0.6)
    assert s["ci_low"] == pytest.approx(0.2307, abs=1e-4) and s["ci_high"] == pytest.approx(0.8824, abs=1e-4)
    # two generated tokens ("4", "\n"), each 10 − log(e^10 + e^5 + the rest at e^0)
    assert result.records[0]["n_tokens"] == 2
    assert result.records[0]["logprob"] == pytest.approx(2 * (10 - log_norm(tok, 10, 5)), abs=1e-4)


def test_choice_loglikelihood_hand_checked(bigram, tmp_path: Path) -> None:
    model, tok = bigram
    path = write_jsonl(tmp_path / "mc.jsonl", [{"id": "q", "prompt": "Q=", "choices": ["4", "xx4"], "answer": 1}])
    rec = evaluate.run(model, tok, path, batch_size=1, progress=False).records[0]
    eq, other = log_norm(tok, 10, 5), log_norm(tok, 5)  # the "=" row and every other row
    first = -eq - other  # " 4": "=" → " ", then " " → "4"
    second = -eq + 2 * (5 - other) - other  # " xx4": "=" → " ", " " → "x", "x" → "x", "x" → "4"
    assert rec["logprobs"] == pytest.approx([first, second], abs=1e-4)
    assert rec["pred"] == 0 and rec["correct"] is False
    # acc_norm divides by the choice's length in characters: "4" → 1, "xx4" → 3
    assert rec["pred_norm"] == (0 if first / 1 >= second / 3 else 1)


def test_perplexity_hand_checked(bigram, tmp_path: Path) -> None:
    model, tok = bigram
    path = write_jsonl(tmp_path / "ppl.jsonl", [{"id": "t", "text": "x4\n"}])
    result = evaluate.run(model, tok, path, progress=False)
    nll = log_norm(tok, 5) - (10 - log_norm(tok, 10, 5))  # "x" → "4", then "4" → "\n"
    rec = result.records[0]
    assert rec["n_tokens"] == 2 and rec["nll"] == pytest.approx(nll, abs=1e-4)
    assert result.summary["perplexity"] == pytest.approx(math.exp(nll / 2), rel=1e-4)
    assert result.summary["accuracy"] is None


def _mixed_tasks(tmp_path: Path) -> dict[str, Path]:
    gen = [{"id": f"g{i}", "prompt": "Q" * (i % 4) + f"What is {i}*{i}?\nA:", "answer": str(i * i), "split": "test"}
           for i in range(11)]
    mc = [{"id": f"c{i}", "prompt": f"Question {i}:" + " and" * (i % 5), "choices": ["yes", "no way", "maybe" * (1 + i % 2)],
           "answer": i % 3, "split": "test"} for i in range(11)]
    ppl = [{"id": f"p{i}", "text": f"The number {i} is " + "very " * i + "small."} for i in range(7)]
    return {"generate": write_jsonl(tmp_path / "g.jsonl", gen), "choice": write_jsonl(tmp_path / "c.jsonl", mc),
            "perplexity": write_jsonl(tmp_path / "p.jsonl", ppl)}


FLOATS = ("logprob", "logprobs", "nll", "perplexity")


@pytest.mark.parametrize("kind", ["generate", "choice", "perplexity"])
def test_batch_size_never_changes_a_result(random_llama, tmp_path: Path, kind: str) -> None:
    model, tok, _ = random_llama
    path = _mixed_tasks(tmp_path)[kind]
    one = evaluate.run(model, tok, path, batch_size=1, max_new_tokens=6, progress=False).records
    eight = evaluate.run(model, tok, path, batch_size=8, max_new_tokens=6, progress=False).records
    assert [r["id"] for r in one] == [r["id"] for r in eight]  # item order, not batch order
    for a, b in zip(one, eight, strict=True):
        assert {k: v for k, v in a.items() if k not in FLOATS} == {k: v for k, v in b.items() if k not in FLOATS}
        for key in FLOATS:
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-5)
    again = evaluate.run(model, tok, path, batch_size=8, max_new_tokens=6, progress=False).records
    assert again == eight  # deterministic


def test_records_written_and_splits(random_llama, tmp_path: Path) -> None:
    model, tok, _ = random_llama
    gen = [{"id": f"g{i}", "prompt": f"{i}+{i}=", "answer": str(2 * i), "split": "dev" if i < 3 else "test"}
           for i in range(6)] + [{"id": "r1", "text": "Some retention text.", "split": "retention"}]
    path = write_jsonl(tmp_path / "g.jsonl", gen)
    result = evaluate.run(model, tok, path, max_new_tokens=3, out=tmp_path / "out", progress=False)
    lines = (tmp_path / "out" / "records.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["g3", "g4", "g5"]  # default split: test
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["split"] == "test" and summary["n"] == 3 and {"k", "ci_low", "ci_high"} <= summary.keys()
    assert {"id", "output", "extracted", "correct", "logprob"} <= json.loads(lines[0]).keys()
    ret = evaluate.run(model, tok, path, split="retention", progress=False)
    assert ret.summary["kind"] == "perplexity" and ret.records[0]["id"] == "r1"
    assert result.summary["max_new_tokens"] == 3
    with pytest.raises(GraftError, match="batch size"):
        evaluate.run(model, tok, path, batch_size=0, progress=False)
    with pytest.raises(GraftError, match="no room for a prompt"):
        evaluate.run(model, tok, path, max_new_tokens=10_000, progress=False)


def test_bridge_wrapped_model_gives_the_same_records(random_llama, tmp_path: Path) -> None:
    from analysis.io import models

    _, _, folder = random_llama
    loaded = models.load(folder)
    paths = _mixed_tasks(tmp_path)
    before = {k: evaluate.run(loaded.model, loaded.tokenizer, p, max_new_tokens=4, progress=False).records
              for k, p in paths.items()}
    # Booting TransformerLens wraps the modules of a twin sharing the weights; the wrapped model's KV cache
    # stays empty, which evaluate detects (it recomputes whole sequences); the plain model is untouched.
    assert engine.Forward(loaded.hooked).caches is False and engine.Forward(loaded.model).caches
    for kind, path in paths.items():
        after = evaluate.run(loaded.hooked, loaded.tokenizer, path, max_new_tokens=4, progress=False).records
        for a, b in zip(before[kind], after, strict=True):
            assert {k: v for k, v in a.items() if k not in FLOATS} == {k: v for k, v in b.items() if k not in FLOATS}
            for key in FLOATS:
                if key in a:
                    assert a[key] == pytest.approx(b[key], abs=1e-4)


def test_cli_eval_json_and_bad_task_exit_2(random_llama, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, _, folder = random_llama
    path = _mixed_tasks(tmp_path)["choice"]
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", str(folder), "--task", str(path), "--out", str(tmp_path / "o"), "--json",
              "--batch-size", "4", "--limit", "5"])
    assert not exit_info.value.code
    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] == 5 and {"accuracy", "k", "n", "ci_low", "ci_high"} <= summary.keys()
    assert summary["k"] == sum(json.loads(x)["correct"] for x in (tmp_path / "o" / "records.jsonl").read_text().splitlines())

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": \n')
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", str(folder), "--task", str(bad), "--out", str(tmp_path / "o2")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert f"{bad}:2: malformed JSON" in err.replace("\n", "") and "Traceback" not in err


@pytest.mark.real
def test_real_smollm2_generation_batch_invariant() -> None:
    """SmolLM2-135M-Instruct, real basic_arithmetic items: batch 1 and batch 4 give the same records."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_evaluate", Path(__file__).resolve().parents[1] / "bench" / "evaluate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model, tok = bench.load_smollm2()
    task = tasks.load("basic_arithmetic", split="test", limit=6, fewshot=3)
    one = evaluate.run(model, tok, task, batch_size=1, progress=False).records
    four = evaluate.run(model, tok, task, batch_size=4, progress=False).records
    assert [r["output"] for r in one] == [r["output"] for r in four]
    assert [r["correct"] for r in one] == [r["correct"] for r in four]
    assert [r["logprob"] for r in one] == pytest.approx([r["logprob"] for r in four], abs=1e-4)


