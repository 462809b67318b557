"""analysis.eval.decoding: drafts give the greedy tokens, finished rows leave the batch without changing
any row, an observer sees every forward of every decoding prompt."""

from __future__ import annotations

import pytest
import torch

from analysis.eval import decoding, engine


@pytest.mark.parametrize("draft_kind", ["own", "other", "empty", "long"])
def test_drafts_give_the_greedy_tokens(random_llama, draft_kind: str) -> None:
    """A draft, right or wrong, changes how many sequential steps run, never the tokens."""
    model, tok, _ = random_llama
    prompts = [f"{a}+{b}=" for a, b in zip("0123456789", "9876543210", strict=True)] + ["hello there", "x"]
    plain = decoding.generate(model, tok, prompts, stop=["\n"], max_new_tokens=6, batch_size=4)
    rng = torch.Generator().manual_seed(0)
    drafts = {
        "own": [g.tokens for g in plain],
        "other": [[int(x) for x in torch.randint(0, len(tok), (5,), generator=rng)] for _ in prompts],
        "empty": [[] for _ in prompts],
        "long": [g.tokens[:2] + [5] * 20 for g in plain],
    }[draft_kind]
    got = decoding.generate(model, tok, prompts, stop=["\n"], max_new_tokens=6, batch_size=4, drafts=drafts)
    assert [g.tokens for g in got] == [g.tokens for g in plain]
    assert [g.text for g in got] == [g.text for g in plain]
    assert [g.logprob for g in got] == pytest.approx([g.logprob for g in plain], abs=1e-4)


def test_drafts_that_do_not_pay_are_dropped_for_the_remaining_batches(random_llama, monkeypatch) -> None:
    """Once fewer than half the verified rows finished on their drafts, the other batches decode without
    verifying theirs (a failed draft costs a forward and a rerun prompt); the tokens stay the greedy ones."""
    model, tok, _ = random_llama
    prompts = [f"{a}+{b}=" for a, b in zip("0123456789", "9876543210", strict=True)] * 2
    plain = decoding.generate(model, tok, prompts, stop=["\n"], max_new_tokens=6, batch_size=4)
    verified: list[int] = []  # rows of each draft verification
    verify = decoding._verify

    def counting(fwd, heads, prompts_, *args, **kwargs):  # type: ignore[no-untyped-def]
        verified.append(len(prompts_))
        return verify(fwd, heads, prompts_, *args, **kwargs)

    monkeypatch.setattr(decoding, "_verify", counting)
    wrong = [[(g.tokens[0] + 1) % len(tok)] * 6 for g in plain]
    got = decoding.generate(model, tok, prompts, stop=["\n"], max_new_tokens=6, batch_size=4, drafts=wrong)
    assert [g.tokens for g in got] == [g.tokens for g in plain]
    assert verified == [4]  # the first batch only
    verified.clear()
    right = decoding.generate(model, tok, prompts, stop=["\n"], max_new_tokens=6, batch_size=4,
                              drafts=[g.tokens for g in plain])
    assert [g.tokens for g in right] == [g.tokens for g in plain] and verified == [4] * 5


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "neox"])
def test_decoding_drops_finished_rows_without_changing_any_row(tiny_pairs, family: str, monkeypatch) -> None:
    """Rows that finish early leave the batch once half of it is done (the KV cache keeps the rest,
    sliding-window layers too); every row's tokens and logprob stay those it gets decoded alone."""
    from analysis.io.models import load

    loaded = load(tiny_pairs(family)[1], dtype="float32")
    model, tok = loaded.model, loaded.tokenizer
    prompts = [engine.encode(tok, f"What is {i}*{i}?\nA:") for i in range(8)]
    starts = [([5] * (i % 4), 0.0) for i in range(8)]  # rows 3 and 7 are 3 tokens ahead of rows 0 and 4

    def finished(new: list[int]) -> bool:
        return len(new) >= 7

    rows: list[int] = []
    forward = engine.Forward.__call__

    def counting(self, ids, *args, **kwargs):  # type: ignore[no-untyped-def]
        rows.append(ids.shape[0])
        return forward(self, ids, *args, **kwargs)

    fwd = engine.Forward(model)
    assert fwd.caches
    monkeypatch.setattr(engine.Forward, "__call__", counting)
    with torch.inference_mode():
        together = decoding._decode(fwd, engine.SharedContext(fwd), prompts, starts, 0, finished, 0)
        alone = [decoding._decode(fwd, engine.SharedContext(fwd), [p], [s], 0, finished, 0)[0]
                 for p, s in zip(prompts, starts, strict=True)]
    assert [t for t, _ in together] == [t for t, _ in alone]
    assert [lp for _, lp in together] == pytest.approx([lp for _, lp in alone], abs=1e-5)
    assert all(len(t) == 7 for t, _ in together)
    batch_steps = rows[: len(rows) - sum(7 - i % 4 for i in range(8))]
    assert batch_steps == [8, 8, 8, 8, 8, 4, 2]  # halved once rows 2, 3, 6, 7 and then 1, 5 were done


def test_an_observer_sees_every_forward_of_every_decoding_prompt(bigram) -> None:
    """generate(observe=...): each forward names its prompts; a prompt counts as decoding in exactly as many
    forwards as it generated tokens (activation statistics of generated tokens rely on this)."""
    model, tok = bigram
    prompts = ["2+2=", "a much longer prompt 1+3=", "7-3", "zz"]
    seen = torch.zeros(len(prompts))

    def observe(rows: list[int], going: list[bool]) -> None:
        assert len(rows) == len(going) and len(set(rows)) == len(rows)
        seen[torch.tensor(rows)] += torch.tensor(going, dtype=torch.float32)

    out = decoding.generate(model, tok, prompts, stop=["\n"], max_new_tokens=5, batch_size=3, observe=observe)
    assert seen.tolist() == [float(g.n_tokens) for g in out]
    assert [g.text for g in out] == [g.text for g in decoding.generate(model, tok, prompts, stop=["\n"],
                                                                       max_new_tokens=5, batch_size=3)]
    with pytest.raises(ValueError, match="drafts"):
        decoding.generate(model, tok, prompts, stop=["\n"], max_new_tokens=5, drafts=[None] * 4, observe=observe)
