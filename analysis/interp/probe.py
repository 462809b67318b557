"""What a localization forces: the probe items, the answer each counts as right, as batches of token rows.

A causal score (attribution, patching, the weight-space methods) measures how much a change moves the
target towards "the answer". That answer must be what the *evaluation* counts as right, tokenized as the
model generates it — a template that renders ``" 74"`` where the models write ``"74"`` turns every score
into noise, silently. So, by default (``answers="donor"``):

- generation tasks force the donor's own greedy output (its token ids, cut where the evaluation cuts the
  text) on the probe items the donor gets right; the items it gets wrong are left out and counted;
- choice tasks force the correct choice among all of an item's choices, on the items the donor gets
  right; the metric is the choice's log-probability normalised over the item's choices (lengths
  normalised as ``acc_norm`` does when that is the task's metric) — what the evaluation's argmax reads;
- perplexity tasks force the text itself.

``answers="reference"`` renders the gold answer through the task's ``target`` template instead (every
item kept). Either way :func:`build` checks before anything is ranked that the forced answers are what
the donor produces: per probe item, "every forced token is the donor's argmax" must agree with "the
evaluation counts the donor right" on at least :data:`MIN_AGREEMENT` of the items, or localization stops
with one line naming the template and the fix. The counts and the check go into the rankings' metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import torch

from analysis.errors import GraftError
from analysis.eval.engine import encode, encode_pair, pad_id
from analysis.interp.batching import Batch, Row, _tail, forward, make_batches, metric_values

if TYPE_CHECKING:
    from analysis.eval.tasks import Item, Task
    from analysis.io.models import LoadedModel

AnswerSource = Literal["donor", "reference"]
ANSWER_SOURCES: tuple[str, ...] = ("donor", "reference")
# Below this share of probe items on which "the forced answer is the donor's greedy one" and "the
# evaluation counts the donor right" agree, the forced answers are not the evaluation's: stop.
MIN_AGREEMENT = 0.8


# --- token rows and batches -----------------------------------------------------------------------


# --- the metric -----------------------------------------------------------------------------------


# --- the probe ------------------------------------------------------------------------------------

@dataclass
class Probe:
    """The probe items a localization reads, the rows that force their answers, and what was checked."""

    task: str
    kind: str
    split: str
    answers: str  # "donor", "reference" or "text" (perplexity)
    items: list[Item]
    rows: list[Row]
    n_read: int
    pad: int  # the tokenizer's padding id
    dropped: dict[str, int] = field(default_factory=dict)  # why → how many items were left out
    check: dict[str, Any] = field(default_factory=dict)

    def batches(self, batch_size: int, *, choices: bool = True) -> list[Batch]:
        """Batches of the rows; ``choices=False`` keeps only each item's correct row (activation statistics
        read the text that follows a right answer)."""
        rows = self.rows if choices else [r for r in self.rows if r.correct]
        return make_batches(rows, self.pad, batch_size)

    def within(self, vocab: int) -> Probe:
        """The probe without the items whose rows hold token ids at or past ``vocab``: tokens one tokenizer
        of a pair adds (an instruction-tuned twin's chat tokens), which the other model has no embedding for."""
        beyond = {r.item for r in self.rows if max(r.ids) >= vocab}
        if self.pad >= vocab:  # a pad token added with the larger vocabulary: any id the mask hides will do
            return replace(self, pad=0).within(vocab)
        if not beyond:
            return self
        slot = {old: new for new, old in enumerate(i for i in range(len(self.items)) if i not in beyond)}
        if not slot:
            raise GraftError(f"{self.task}: every {self.split} item forces tokens only one of the models has",
                             "give the probe items whose answers both tokenizers write alike")
        return replace(self, items=[it for i, it in enumerate(self.items) if i in slot],
                       rows=[replace(r, item=slot[r.item]) for r in self.rows if r.item in slot],
                       dropped={**self.dropped, "with tokens one model lacks": len(beyond)})

    @property
    def meta(self) -> dict[str, Any]:
        """What the rankings record: where the forced answers came from, how many items, the check."""
        return {"answers": self.answers, "n_probe_read": self.n_read, "n_probe_used": len(self.items),
                "dropped": dict(self.dropped), "check": dict(self.check)}


def probe_items(task: Task, limit: int | None = None, split: str = "probe") -> list[Item]:
    if task.has_splits and split not in task.splits:
        raise GraftError(f"{task.source}: no {split!r} split (splits: {', '.join(task.splits) or 'none'})",
                         f"give the task items with \"split\": \"{split}\", or name the split to probe on "
                         "(--split, or splits: in a sweep config)")
    items = task.items(split if task.has_splits else None, limit)
    if not items:
        raise GraftError(f"{task.source}: the {split} split is empty", "add probe items")
    return items


def reference(task: Task, item: Item) -> str:
    """The text the task's templates say follows the prompt when the answer is right."""
    if task.kind == "choice":
        return task.continuations(item)[int(item.answer)]
    return task.config.target.format(**item.fields)


def build(task: Task, donor: LoadedModel, *, split: str = "probe", limit: int | None = None,
          answers: str = "donor", batch_size: int = 8, max_new_tokens: int | None = None,
          check: bool = True) -> Probe:
    """The probe of ``task``'s ``split`` with the answers to force (see the module doc); the donor is
    evaluated on it once, as the evaluation would, to know which items it gets right."""

    if answers not in ANSWER_SOURCES:
        raise GraftError(f"unknown answer source {answers!r}", f"use {' or '.join(ANSWER_SOURCES)}")
    items = probe_items(task, limit, split)
    tok = donor.tokenizer
    if task.kind == "perplexity":
        rows = [r for i, it in enumerate(items) for r in item_rows_of(task, tok, it, i)]
        return Probe(task.name, task.kind, split, "text", items, rows, len(items), pad_id(tok))
    evaluation = _evaluate(task, donor, items, split, limit, batch_size, max_new_tokens)
    right = [bool(r["correct"]) for r in evaluation]
    kept: list[int] = []
    rows: list[Row] = []
    dropped: dict[str, int] = {}
    for i, (it, rec) in enumerate(zip(items, evaluation, strict=True)):
        if answers == "donor" and not rec["correct"]:
            dropped["donor wrong"] = dropped.get("donor wrong", 0) + 1
            continue
        if answers == "donor" and task.kind == "generate":
            ctx = encode(tok, task.render(it, tok))
            own = _answer_tokens(tok, rec["tokens"], rec["output"])
            item_rows = [Row(tuple(ctx + own), len(ctx), len(kept))] if own else []
        else:
            item_rows = item_rows_of(task, tok, it, len(kept))
        if not item_rows:
            dropped["empty answer"] = dropped.get("empty answer", 0) + 1
            continue
        rows += item_rows
        kept.append(i)
    probe = Probe(task.name, task.kind, split, answers, [items[i] for i in kept], rows, len(items), pad_id(tok),
                  dropped)
    if not kept:
        why = "the donor answers none of them correctly" if answers == "donor" else "no answer has tokens"
        raise GraftError(f"{task.source}: nothing to localize on the {split} split ({len(items)} items): {why}",
                         "check that the donor is the better model on this task (auto_order), or its prompts")
    if check:
        probe.check = _check(task, donor, probe, [right[i] for i in kept], evaluation, kept, batch_size)
    return probe


def item_rows_of(task: Task, tokenizer: Any, item: Item, slot: int) -> list[Row]:
    """The rows of one item with the task's own answers: its choices (choice), the ``target`` template's
    rendering of the gold answer (generate), the text (perplexity); tokenized as the evaluator does."""

    if task.kind == "perplexity":
        return [Row(tuple(encode(tokenizer, item.text)), 1, slot)]  # every token after the first is "answer"
    prompt = task.render(item, tokenizer)
    if task.kind == "choice":
        norm = task.metric == "acc_norm"
        rows = []
        for j, cont in enumerate(task.continuations(item)):
            ctx, ids = encode_pair(tokenizer, prompt, cont)
            rows.append(Row(tuple(ctx + ids), len(ctx), slot, j == int(item.answer),
                            1.0 / max(1, len(cont)) if norm else 1.0))
        return rows if all(len(r.ids) > r.n_prompt for r in rows) else []
    ctx, ids = encode_pair(tokenizer, prompt, reference(task, item))
    return [Row(tuple(ctx + ids), len(ctx), slot)] if ids else []


def reference_batches(task: Task, tokenizer: Any, batch_size: int, limit: int | None = None,
                      split: str = "probe") -> list[Batch]:
    """The probe items with the task's own answers (``answers="reference"``), without the donor's check:
    for studies that bring their own prompts and answers."""

    rows = [r for i, it in enumerate(probe_items(task, limit, split)) for r in item_rows_of(task, tokenizer, it, i)]
    return make_batches(rows, pad_id(tokenizer), batch_size)


def _evaluate(task: Task, donor: LoadedModel, items: list[Item], split: str, limit: int | None, batch_size: int,
              max_new_tokens: int | None) -> list[dict[str, Any]]:
    """The donor's per-item results on the probe items, exactly as ``graftlm eval`` computes them."""
    from analysis.eval.evaluate import run

    records = run(donor.model, donor.tokenizer, task, split=split if task.has_splits else "all", limit=limit,
                  batch_size=batch_size, max_new_tokens=max_new_tokens, progress=False).records
    assert [r["id"] for r in records] == [it.id for it in items]
    return records


def _answer_tokens(tokenizer: Any, tokens: Sequence[int], output: str) -> list[int]:
    """The fewest generated tokens whose text covers ``output`` (the generation cut at its stop string):
    what the donor wrote, without the stop string or end-of-sequence token that followed."""
    if not output:
        return []
    for n in range(1, len(tokens) + 1):
        if len(tokenizer.decode(list(tokens[:n]), skip_special_tokens=True)) >= len(output):
            return list(tokens[:n])
    return list(tokens)


@torch.no_grad()
def _check(task: Task, donor: LoadedModel, probe: Probe, right: list[bool], evaluation: list[dict[str, Any]],
           kept: list[int], batch_size: int) -> dict[str, Any]:
    """Does the donor, teacher-forced on the probe rows, produce the forced answers exactly where the
    evaluation counts it right? (See the module doc.) Raises when it does not."""
    greedy = torch.zeros(len(probe.items), dtype=torch.bool)
    forced_lp = torch.zeros(len(probe.items), dtype=torch.float64)
    for batch in probe.batches(batch_size):
        logits = forward(donor, batch, hooked=False, logits_to_keep=batch.keep)
        p = logits.shape[1]
        ans, tgt = _tail(batch.answer, p), _tail(batch.target, p)
        top = logits.argmax(-1) == tgt
        if batch.single:
            hits = (top | ~ans).all(-1)
        else:  # the correct choice scores highest among the item's choices
            hits = metric_values(logits, batch, "logit_diff") > 0
        idx = torch.tensor(batch.items)
        greedy[idx] = hits.cpu()
        forced_lp[idx] = metric_values(logits, batch, "logprob").double().cpu()
    agree = sum(bool(g) == r for g, r in zip(greedy.tolist(), right, strict=True))
    result = {"agreement": round(agree / len(right), 4), "donor_right": sum(right), "n": len(right),
              "forced_greedy": int(greedy.sum()), "forced_logprob_mean": round(float(forced_lp.mean()), 4),
              "min_agreement": MIN_AGREEMENT}
    if agree / len(right) >= MIN_AGREEMENT:
        return result
    bad = next(i for i, (g, r) in enumerate(zip(greedy.tolist(), right, strict=True)) if bool(g) != r)
    item, rec = probe.items[bad], evaluation[kept[bad]]
    forced = reference(task, item) if probe.answers == "reference" else rec.get("output")
    seen = f"; item {item.id}: forced {forced!r}, donor wrote {rec.get('output', rec.get('extracted'))!r}"
    if probe.answers == "reference":
        fix = ("leave answers at donor (the default: the donor's own correct outputs are forced), or fix the task's "
               f"target template {task.config.target!r} (e.g. no leading space) so it renders what the model writes")
    else:
        fix = "check the tokenizer: its encoding of prompt + output does not round-trip what the donor generated"
    raise GraftError(f"{task.source}: the forced answers are not the evaluation's — the donor is right on "
                     f"{sum(right)}/{len(right)} probe items but its greedy continuation is the forced answer on "
                     f"{int(greedy.sum())}, agreeing on {agree / len(right):.0%} (< {MIN_AGREEMENT:.0%}){seen}", fix)


def no_gap(meta: dict[str, Any]) -> str | None:
    """A warning when, on the probe, the donor (for the weight-space methods: copy-all) does not score above
    the target on the metric the methods rank by: their scores then measure a change that does not help,
    and a ranking by them is no better than chance (seen on pairs whose donor is right on the probe items
    but barely more sure of those answers than the target). None when there is a gap, or no measure of it."""
    info = meta.get(str(meta.get("method")))
    info = info if isinstance(info, dict) else {}
    start = meta.get("target_metric", info.get("target_metric"))
    end = meta.get("donor_metric", info.get("copy_all_metric"))
    if start is None or end is None or end > start:
        return None
    who = "the donor" if "donor_metric" in meta else "copy-all (every candidate from the donor)"
    return (f"on the {meta.get('split', 'probe')} split {who} scores {end:.4g} on {meta.get('metric', 'the metric')}, "
            f"not above the target's {start:.4g}: these scores have no gap to explain and rank no better than chance "
            "— check which model is the better one on this task, or give the probe more items where they differ")
