"""analysis.interp.batching: the metric read from a batch's logits is the evaluator's log-likelihood of the forced answer."""

from __future__ import annotations

import pytest
import torch
from conftest import arith_task

from analysis.eval import tasks
from analysis.eval.scoring import loglikelihoods
from analysis.interp import batching, probe


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return tasks.load(arith_task(tmp_path_factory.mktemp("task"), n=8))


def test_metric_is_the_evaluators_loglikelihood(pair, task) -> None:
    _, target = pair
    items = task.items("probe")
    (batch,) = probe.reference_batches(task, target.tokenizer, batch_size=len(items))
    with torch.no_grad():
        values = batching.metric_values(batching.forward(target, batch), batch)
    ref = loglikelihoods(target.model, target.tokenizer,
                         [(task.render(it), [probe.reference(task, it)]) for it in items])
    got = dict(zip(batch.items, values.tolist(), strict=True))
    for i, (expected,) in enumerate(ref):
        assert got[i] == pytest.approx(expected, abs=1e-4)
