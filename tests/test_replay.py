"""Replaying the layers below a transplant gives exactly the results of full forwards, on twelve families."""

from __future__ import annotations

import pytest
import torch

from analysis.eval import decoding, scoring
from analysis.eval.replay import LayerReplay, decoder_layers, lowest_layer
from analysis.io.models import load
from analysis.plan import Plan
from analysis.transplant import applied
from tests.conftest import FAMILIES, build_model

REQUESTS = [
    ("The cat sat on the", [" mat", " chair and slept", " x"]),
    ("1 + 1 =", [" 2", " 11", " two"]),
    ("abc", [" d", " def"]),
    ("A longer context with many more characters in it,", [" yes", " no"]),
    ("q", [" r", " rs", " rst", " rstu"]),
]
SHOTS = "Q: 1+2=\nA: 3\nQ: 4+4=\nA: 8\n"  # a head every context shares: run once per batch, replayed too
REQUESTS += [(SHOTS + f"Q: {a}+1=\nA:", [f" {a + 1}", " 0", " 12"]) for a in range(5)]
TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world", "a", "zzzz yyyy xxxx wwww vvvv"]
# (component, alpha): the lowest touched layer goes 3, 3, 1, 2, 0, 3 — record, replay, record deeper,
# replay from a shallower record while recording, no reuse possible, replay after all that.
POINTS = [("L3.mlp", 0.5), ("L3.H1", 1.0), ("L1.mlp", 0.5), ("L2.H0", 0.75), ("L0.mlp", 1.0), ("L3.mlp", 0.25)]


@pytest.fixture(scope="module")
def deep_pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[object, object]]:
    root = tmp_path_factory.mktemp("replay")
    pairs = {}
    for family in FAMILIES:
        layers = {"n_layer": 4} if family == "gpt2" else {"num_hidden_layers": 4}
        donor = build_model(root / f"{family}-d", family, seed=1, **layers)
        target = build_model(root / f"{family}-t", family, seed=2, **layers)
        pairs[family] = (load(donor, dtype="float32"), load(target, dtype="float32"))
    return pairs


def _scores(target, replay: LayerReplay | None, batch_size: int = 2) -> tuple[list[list[float]], list[tuple[float, int]]]:
    lls = scoring.loglikelihoods(target.model, target.tokenizer, REQUESTS, batch_size=batch_size, replay=replay)
    nlls = scoring.token_nlls(target.model, target.tokenizer, TEXTS, batch_size=batch_size, replay=replay)
    return lls, nlls


# Blocks that return a tuple (BLOOM's, with its ALiBi) are not replayed: their output is not one hidden state.
NOT_REPLAYED = ("bloom",)


@pytest.mark.parametrize("family", FAMILIES)
def test_replayed_layers_are_bit_identical_to_full_forwards(deep_pairs, family: str) -> None:
    donor, target = deep_pairs[family]
    assert decoder_layers(target.model) is not None
    replay = LayerReplay(target.model)
    for component, alpha in POINTS:
        plan = Plan.of([component], alpha=alpha)
        lowest = int(component[1])
        with applied(target, donor, plan):
            expected = _scores(target, None)
            with replay.unchanged_below(lowest):
                got = _scores(target, replay)
        assert got == expected, f"{family} {component}: replayed scores differ"  # exact, not approximate
    if family in NOT_REPLAYED:  # nothing replayed, every layer ran: the same scores, no time saved
        assert replay.stats.replayed == 0
        return
    # records at layers 3, 1 and 2 for both item sets; layers were really skipped
    assert replay.stats.replayed > 0 and replay.stats.skipped_layers >= replay.stats.replayed
    assert sorted({layer for _, layer in replay.sets}) == [1, 2, 3]


PROMPTS = ["The cat sat on the", "1 + 1 =", "abc", SHOTS + "Q: 3+1=\nA:", SHOTS + "Q: 5+1=\nA:", "q"]


@pytest.mark.parametrize("family", FAMILIES)
def test_replayed_generation_is_bit_identical_to_decoding_in_full(deep_pairs, family: str) -> None:
    """Greedy decoding replays the prompts' layers below the transplant, keys and values included, and
    gives exactly the tokens and logprobs of full decoding — sliding windows (Mistral, Gemma-2/3, EXAONE 4)
    included, while the window holds every token of the prompt."""
    donor, target = deep_pairs[family]
    replay = LayerReplay(target.model)

    def generated(p: LayerReplay | None) -> list[tuple[list[int], float]]:
        out = decoding.generate(target.model, target.tokenizer, PROMPTS, stop=["\n"], max_new_tokens=5,
                                batch_size=2, replay=p)
        return [(g.tokens, g.logprob) for g in out]

    for component, alpha in POINTS:
        with applied(target, donor, Plan.of([component], alpha=alpha)):
            expected = generated(None)
            with replay.unchanged_below(int(component[1])):
                got = generated(replay)
        assert got == expected, f"{family} {component}: replayed generation differs"  # exact
    assert (replay.stats.replayed > 0) == (family not in NOT_REPLAYED), replay.stats


def test_a_window_shorter_than_the_prompt_is_not_replayed(deep_pairs, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sliding window shorter than a prompt keeps only its end: keys and values taken from it could not
    refill the cache, so nothing is recorded, every layer runs, and the tokens are the same."""
    donor, target = deep_pairs["mistral"]
    monkeypatch.setattr(target.model.config, "sliding_window", 3)  # the cache's window and the mask's
    replay = LayerReplay(target.model)

    def generated(p: LayerReplay | None) -> list[tuple[list[int], float]]:
        out = decoding.generate(target.model, target.tokenizer, PROMPTS, stop=["\n"], max_new_tokens=5,
                                batch_size=2, replay=p)
        return [(g.tokens, g.logprob) for g in out]

    with applied(target, donor, Plan.of(["L2.mlp"], alpha=0.5)):
        expected = generated(None)
        with replay.unchanged_below(2):
            assert generated(replay) == expected and generated(replay) == expected
    assert replay.stats.replayed == 0


def test_other_batching_or_items_never_replay_the_wrong_records(deep_pairs) -> None:
    donor, target = deep_pairs["llama"]
    replay = LayerReplay(target.model)
    plan = Plan.of(["L2.mlp"], alpha=0.5)
    with applied(target, donor, plan), replay.unchanged_below(2):
        _scores(target, replay, batch_size=2)
        for batch_size in (1, 3):  # another batching is another item set: recorded anew, same results
            expected = _scores(target, None, batch_size)
            assert _scores(target, replay, batch_size) == expected
        shorter = scoring.loglikelihoods(target.model, target.tokenizer, REQUESTS[:3], batch_size=2, replay=replay)
        assert shorter == scoring.loglikelihoods(target.model, target.tokenizer, REQUESTS[:3], batch_size=2)


def test_memory_budget_keeps_nothing_partial(deep_pairs) -> None:
    donor, target = deep_pairs["llama"]
    replay = LayerReplay(target.model, budget_bytes=4096)  # smaller than one session's hidden states
    with applied(target, donor, Plan.of(["L3.mlp"], alpha=0.5)), replay.unchanged_below(3):
        first = _scores(target, replay)
        second = _scores(target, replay)
    assert first == second
    assert replay.sets == {} and replay.bytes == 0 and replay.stats.replayed == 0


def test_skipped_blocks_are_restored(deep_pairs) -> None:
    donor, target = deep_pairs["qwen2"]
    replay = LayerReplay(target.model)
    with replay.unchanged_below(2):
        _scores(target, replay)
        _scores(target, replay)
    assert replay.stats.replayed > 0
    for block in decoder_layers(target.model):
        assert "forward" not in block.__dict__  # the class's forward again
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(target.model(ids).logits, target.model(ids).logits)


def test_lowest_layer() -> None:
    assert lowest_layer([3, 1, 2]) == 1
    assert lowest_layer([3, None]) == 0  # embeddings or another tensor outside the stack
    assert lowest_layer([]) == 0


def test_one_full_evaluation_records_every_wanted_layer(deep_pairs) -> None:
    """A sweep names the lowest layers of all its plans; the first full evaluation records them all, so
    every later point replays (here a point at layer 1 right after one at layer 3)."""
    donor, target = deep_pairs["llama"]
    replay = LayerReplay(target.model)
    with replay.unchanged_below(3, record=[1, 2, 0, 7]):  # 0 and 7 mean nothing to record
        first = _scores(target, replay)
    assert sorted({layer for _, layer in replay.sets}) == [1, 2, 3] and replay.stats.replayed == 0
    with applied(target, donor, Plan.of(["L1.mlp"], alpha=0.5)):
        expected = _scores(target, None)
        with replay.unchanged_below(1):
            assert _scores(target, replay) == expected
    assert replay.stats.replayed == replay.stats.full  # every call the first evaluation made, replayed
    with replay.unchanged_below(3):
        assert _scores(target, replay) == first
