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
