"""The probe forces what the evaluation counts right: the donor's own outputs, the choices as scored,
and a check that stops a template the models do not write."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from analysis.errors import GraftError
from analysis.eval import tasks
from analysis.eval.engine import pad_id
from analysis.eval.evaluate import run as evaluate
from analysis.eval.scoring import loglikelihoods
from analysis.interp import batching, probe
from analysis.io.models import load

DEMO_ITEMS = Path(__file__).parent.parent / "analysis" / "demo" / "tasks" / "arith.jsonl"


@pytest.fixture(scope="module")
def gen1():
    return load("demo:gen1")


@pytest.fixture(scope="module")
def gen2():
    return load("demo:gen2")


@pytest.fixture(scope="module")
def plain_jsonl(tmp_path_factory) -> Path:
    """The demo's addition items as a user would hand them over: a JSONL file, every default left as is
    (so the target template is ``" {answer}"``, with a space the models never write)."""
    path = tmp_path_factory.mktemp("plain") / "arith.jsonl"
    path.write_text(DEMO_ITEMS.read_text())
    return path


@pytest.fixture(scope="module")
def choice_task(tmp_path_factory) -> Path:
    """Addition as a four-way choice (the true sum among near misses), no leading space."""
    rng = random.Random(0)
    lines = []
    for line in DEMO_ITEMS.read_text().splitlines()[:24]:
        rec = json.loads(line)
        s = int(rec["answer"])
        wrong = rng.sample([s + 1, s - 1, s + 10, s - 10, s + 2], 3)
        choices = [str(x) for x in [s, *wrong]]
        rng.shuffle(choices)
        lines.append({"id": rec["id"], "prompt": rec["prompt"], "choices": choices,
                      "answer": choices.index(str(s)), "split": "probe"})
    folder = tmp_path_factory.mktemp("choice")
    (folder / "items.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (folder / "task.yaml").write_text('data: items.jsonl\nchoice_prefix: ""\n')
    return folder / "task.yaml"


def test_the_donors_own_outputs_are_forced_and_its_wrong_items_counted(gen2, plain_jsonl) -> None:
    task = tasks.load(plain_jsonl)
    built = probe.build(task, gen2, limit=32)
    records = evaluate(gen2.model, gen2.tokenizer, task, split="probe", limit=32, progress=False).records
    right = [r for r in records if r["correct"]]
    assert 0 < len(right) < 32  # gen2 forgot most of addition: some items are dropped
    assert built.dropped == {"donor wrong": 32 - len(right)}
    assert [it.id for it in built.items] == [r["id"] for r in right]
    for row, rec in zip(built.rows, right, strict=True):
        forced = gen2.tokenizer.decode(list(row.ids[row.n_prompt:]))
        assert forced == rec["output"]  # "74": no leading space, no newline after it
    assert built.meta["answers"] == "donor" and built.meta["n_probe_read"] == 32
    assert built.check["agreement"] == 1.0


def test_a_template_the_models_do_not_write_is_stopped_with_one_line(gen1, plain_jsonl) -> None:
    task = tasks.load(plain_jsonl)
    with pytest.raises(GraftError) as err:
        probe.build(task, gen1, limit=16, answers="reference")
    message = str(err.value)
    assert "' {answer}'" in message and "answers" in message and "\n" not in message
    fixed = task.with_options(target="{answer}")
    assert probe.build(fixed, gen1, limit=16, answers="reference").check["agreement"] == 1.0


def test_a_donor_that_answers_nothing_is_refused(tiny_pairs, plain_jsonl) -> None:
    donor, _ = tiny_pairs("llama")  # random weights: no sum is right
    with pytest.raises(GraftError, match="none of them correctly"):
        probe.build(tasks.load(plain_jsonl), load(donor), limit=4)


@pytest.mark.parametrize("norm", [False, True])
def test_the_choice_metric_is_the_evaluators_choice(gen2, choice_task, norm: bool) -> None:
    """Per item: the right choice's log-likelihood normalised over the item's choices, from the same
    numbers the evaluator compares (per character with acc_norm)."""
    task = tasks.load(choice_task).with_options(metric="acc_norm" if norm else "acc")
    rows = [r for i, it in enumerate(task.items("probe")) for r in probe.item_rows_of(task, gen2.tokenizer, it, i)]
    batches = batching.make_batches(rows, pad_id(gen2.tokenizer), batch_size=10)
    assert all(len(b) <= 12 and len(b) % 4 == 0 for b in batches)  # an item's four choices stay together
    got: dict[int, float] = {}
    with torch.no_grad():
        for b in batches:
            values = batching.metric_values(batching.forward(gen2, b, logits_to_keep=b.keep), b)
            got.update(zip(b.items, values.tolist(), strict=True))
    items = task.items("probe")
    expected = loglikelihoods(gen2.model, gen2.tokenizer, [(task.render(it), task.continuations(it)) for it in items])
    for i, (it, lls) in enumerate(zip(items, expected, strict=True)):
        scores = torch.tensor(lls, dtype=torch.float64)
        if norm:
            scores = scores / torch.tensor([len(c) for c in task.continuations(it)], dtype=torch.float64)
        assert got[i] == pytest.approx(float(torch.log_softmax(scores, 0)[int(it.answer)]), abs=1e-4)


def test_choice_items_the_donor_gets_wrong_are_left_out(gen2, choice_task) -> None:
    task = tasks.load(choice_task)
    built = probe.build(task, gen2)
    records = evaluate(gen2.model, gen2.tokenizer, task, split="probe", progress=False).records
    assert len(built.items) == sum(r["correct"] for r in records)
    assert sum(r.correct for r in built.rows) == len(built.items) and len(built.rows) == 4 * len(built.items)
    assert built.check["agreement"] == 1.0
    assert all(b.n_items * 4 == len(b) for b in built.batches(8, choices=True))
    assert all(b.single for b in built.batches(8, choices=False))


def test_items_forcing_tokens_one_model_lacks_are_left_out() -> None:
    """Within a vocabulary both models share: an item whose rows hold a token only the donor's tokenizer
    adds is left out and counted; slots are renumbered; a pad id past it becomes one both have."""
    from analysis.interp.batching import Row
    from analysis.interp.probe import Probe

    rows = [Row((5, 6, 7), 2, 0), Row((5, 120, 7), 2, 1, correct=False), Row((5, 8, 9), 2, 1), Row((4, 4), 1, 2)]
    probe = Probe("t", "choice", "probe", "donor", ["a", "b", "c"], rows, 3, pad=101, dropped={"donor wrong": 1})
    kept = probe.within(100)
    assert kept.items == ["a", "c"] and [r.item for r in kept.rows] == [0, 1] and kept.pad == 0
    assert kept.dropped == {"donor wrong": 1, "with tokens one model lacks": 1}
    assert probe.within(200) is probe  # nothing past the vocabulary: the same probe
    with pytest.raises(GraftError, match="tokens only one of the models has"):
        Probe("t", "choice", "probe", "donor", ["b"], [Row((5, 120, 7), 2, 0)], 1, pad=0).within(100)
