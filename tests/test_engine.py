"""analysis.eval.engine: a shared few-shot context runs once with the same results; rows grouped by
length within the batch size."""

from __future__ import annotations

import pytest

from analysis.eval import decoding, engine, scoring


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "neox"])
def test_a_shared_few_shot_context_runs_once_with_the_same_results(tiny_pairs, family: str, monkeypatch) -> None:
    """Prompts that share a long context (few-shot examples): the context runs on its own, batch size 1, and the
    rows continue from its KV cache, padding between context and row. Same tokens, same choices."""
    from analysis.io.models import load

    loaded = load(tiny_pairs(family)[1], dtype="float32")
    model, tok = loaded.model, loaded.tokenizer
    shots = "Q: 1+2=\nA: 3\nQ: 4+4=\nA: 8\n"  # (the tiny models see 64 positions)
    prompts = [shots + f"Q: {a}+{b}=\nA:" + " " * (a % 3) for a, b in zip(range(3, 40, 4), range(10), strict=True)]
    requests = [(p, [" 1", " 12", " 123 and more"]) for p in prompts]
    calls: list[tuple[int, int]] = []  # (rows, positions) of every forward
    forward = engine.Forward.__call__

    def counting(self, ids, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(tuple(ids.shape))
        return forward(self, ids, *args, **kwargs)

    monkeypatch.setattr(engine.Forward, "__call__", counting)
    shared = (decoding.generate(model, tok, prompts, stop=["\n"], max_new_tokens=5, batch_size=4),
              scoring.loglikelihoods(model, tok, requests, batch_size=4))
    # the context, on its own, once per call (not per batch: every batch shares the run's context)
    assert sum(rows == 1 and width >= len(shots) for rows, width in calls) == 2
    assert not any(rows > 1 and width >= len(shots) for rows, width in calls)  # never again per row
    monkeypatch.setattr(engine, "SHARED_CONTEXT_MIN_TOKENS", 10**9)
    whole = (decoding.generate(model, tok, prompts, stop=["\n"], max_new_tokens=5, batch_size=4),
             scoring.loglikelihoods(model, tok, requests, batch_size=4))
    assert [g.tokens for g in shared[0]] == [g.tokens for g in whole[0]]
    assert [g.logprob for g in shared[0]] == pytest.approx([g.logprob for g in whole[0]], abs=1e-4)
    monkeypatch.setattr(engine, "SHARED_CONTEXT_MIN_TOKENS", 16)
    same = [prompts[0]] * 4  # identical prompts with identical drafts: the shared context must stop before the drafts
    drafted = decoding.generate(model, tok, same, stop=["\n"], max_new_tokens=5, batch_size=4,
                                drafts=[whole[0][0].tokens] * 4)
    assert [g.tokens for g in drafted] == [whole[0][0].tokens] * 4
    for a, b in zip(shared[1], whole[1], strict=True):
        assert a == pytest.approx(b, abs=1e-4)


def test_rows_are_grouped_by_length_within_the_batch_size() -> None:
    """Perplexity windows and contexts run in groups of similar length: each row once, no group above
    the batch size, and fewer padded positions than fixed batches of the longest-first order."""
    lengths = [100, 98, 97, 30, 29, 28, 27, 26, 10, 9]
    groups = engine.length_groups(range(len(lengths)), lengths, max_rows=4)
    assert sorted(r for g in groups for r in g) == list(range(len(lengths)))
    assert all(1 <= len(g) <= 4 for g in groups)

    def padded(batches: list[list[int]]) -> int:
        return sum(len(b) * max(lengths[r] for r in b) for b in batches)

    fixed = [list(range(i, min(i + 4, len(lengths)))) for i in range(0, len(lengths), 4)]
    assert padded(groups) + engine.CALL_COST_TOKENS * len(groups) < padded(fixed) + engine.CALL_COST_TOKENS * 3
    assert [100, 98, 97] == [lengths[r] for r in groups[0]]  # the long rows do not carry a short one
