"""analysis.eval.scoring: a prompt shared by all its choices scores as full forwards do."""

from __future__ import annotations

import pytest
import torch

from analysis.eval import engine, scoring


def test_shared_prompt_scoring_equals_full_forward(random_llama) -> None:
    model, tok, _ = random_llama
    requests = [("Question: which?\nAnswer:", [" one", " twenty two", " x"]), ("Hi ", ["there", "you all"])]
    got = scoring.loglikelihoods(model, tok, requests, batch_size=2)
    for (context, conts), scores in zip(requests, got, strict=True):
        for cont, score in zip(conts, scores, strict=True):
            ctx_ids, cont_ids = engine.encode_pair(tok, context, cont)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ctx_ids + cont_ids])).logits[0], -1)
            full = sum(float(logp[len(ctx_ids) - 1 + j, t]) for j, t in enumerate(cont_ids))
            assert score == pytest.approx(full, abs=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "gpt2", "neox", "gemma3"])
def test_packed_rows_score_as_full_forwards(tiny_pairs, family: str, monkeypatch) -> None:
    """Requests packed into one row (each context once, its continuations beside it behind a 4D mask) give
    every continuation the log-likelihood of its own full forward; a continuation of one token, and one
    request after another in the same row, included. Sliding-window models are scored unpacked."""
    from analysis.io.models import load

    loaded = load(tiny_pairs(family)[1], dtype="float32")
    model, tok = loaded.model, loaded.tokenizer
    requests = [("Q: 2+2=", ["4", " 22", "x y z"]), ("A", ["b", "cd"]), ("What is 7*3?", [" 21", " 12"])]
    fwd = engine.Forward(model)
    assert fwd.packs == (family != "gemma3")
    rows = []
    monkeypatch.setattr(engine.Forward, "packed", lambda self, row, tag=None, f=engine.Forward.packed:
                        rows.append(len(row.requests)) or f(self, row, tag))
    got = scoring.loglikelihoods(model, tok, requests, batch_size=8)
    assert sum(rows) == (0 if family == "gemma3" else len(requests)) and len(rows) <= 1
    for (context, conts), scores in zip(requests, got, strict=True):
        for cont, score in zip(conts, scores, strict=True):
            ctx_ids, cont_ids = engine.encode_pair(tok, context, cont)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ctx_ids + cont_ids])).logits[0], -1)
            assert score == pytest.approx(sum(float(logp[len(ctx_ids) - 1 + j, t]) for j, t in enumerate(cont_ids)),
                                          abs=1e-4)


@pytest.mark.real
def test_real_smollm2_packed_rows_pick_the_same_choices(monkeypatch) -> None:
    """SmolLM2-135M-Instruct on 40 real ARC-Easy items: packed rows and the context + per-choice passes pick
    the same choice on every item (acc and acc_norm), log-likelihoods within 1e-4."""
    import importlib.util
    from pathlib import Path

    from analysis.eval import evaluate, tasks

    spec = importlib.util.spec_from_file_location("bench_evaluate", Path(__file__).resolve().parents[1] / "bench" / "evaluate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model, tok = bench.load_smollm2()
    task = tasks.load("arc_easy", split="test", limit=40)
    assert engine.Forward(model).packs
    packed = evaluate.run(model, tok, task, batch_size=8, progress=False).records
    monkeypatch.setattr(engine.Forward, "packs", property(lambda self: False))
    unpacked = evaluate.run(model, tok, task, batch_size=8, progress=False).records
    for a, b in zip(packed, unpacked, strict=True):
        assert (a["correct_acc"], a["correct_acc_norm"]) == (b["correct_acc"], b["correct_acc_norm"])
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-4)
