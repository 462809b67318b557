"""Token rows in batches, and the metric read from their logits. A :class:`Row` is a prompt with a forced
continuation; a :class:`Batch` holds left-padded rows with masks of the positions that predict the forced
tokens; :func:`metric_values` turns a forward's logits into one number per item — the log-probability of
the forced answer, a logit difference against the best alternative, or a metric callable of one's own, as
``transformer_lens.patching`` users write them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from analysis.errors import GraftError
from analysis.eval.engine import input_device, left_pad, pad_id

if TYPE_CHECKING:
    from analysis.io.models import LoadedModel


@dataclass(frozen=True)
class Row:
    """One token sequence: prompt + forced continuation. ``item``: its probe item (a choice item has one
    row per choice, ``correct`` on the right one); ``scale`` multiplies its summed log-probability
    (1, or 1/characters for ``acc_norm``)."""

    ids: tuple[int, ...]
    n_prompt: int
    item: int
    correct: bool = True
    scale: float = 1.0


@dataclass
class Batch:
    """Left-padded token rows with the position masks the statistics and metrics need. Rows of one item
    share a ``group`` (0 … n_items − 1 within the batch); a metric gives one value per group."""

    ids: Int[Tensor, "b p"]
    mask: Int[Tensor, "b p"]
    pos: Int[Tensor, "b p"]
    answer: Bool[Tensor, "b p"]  # positions that predict an answer token
    target: Int[Tensor, "b p"]  # the answer token each answer position predicts (0 elsewhere)
    last: Bool[Tensor, "b p"]  # the last prompt token
    group: Int[Tensor, " b"]  # the item slot of each row
    correct: Bool[Tensor, " b"]  # the row whose answer the evaluation counts right
    scale: Float[Tensor, " b"]
    index: list[int] = field(default_factory=list)  # which probe item, per row

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.group.max()) + 1 if len(self) else 0

    @property
    def items(self) -> list[int]:
        """The probe item of each group, in group order."""
        out = [0] * self.n_items
        for g, i in zip(self.group.tolist(), self.index, strict=True):
            out[g] = i
        return out

    @property
    def single(self) -> bool:
        """One row per item (generation, perplexity): the metric needs no grouping."""
        return self.n_items == len(self)

    @property
    def keep(self) -> int:
        """How many trailing positions hold every answer position (left padding puts answers last):
        the logits a metric needs (``logits_to_keep``)."""
        cols = self.answer.any(0).nonzero()
        return int(self.ids.shape[1] - cols[0]) if len(cols) else 1

    def weights(self, positions: str) -> Float[Tensor, "b p"]:
        sel = {"answer": self.answer, "all": self.mask.bool(), "last": self.last}[positions]
        return sel.float()

    def repeat(self, n: int) -> Batch:
        """The batch stacked ``n`` times (copy c in rows c·b … c·b + b − 1, items c·m … c·m + m − 1)."""
        r = lambda t: t.repeat(n, 1)  # noqa: E731
        groups = torch.cat([self.group + c * self.n_items for c in range(n)])
        return Batch(r(self.ids), r(self.mask), r(self.pos), r(self.answer), r(self.target), r(self.last), groups,
                     self.correct.repeat(n), self.scale.repeat(n), self.index * n)


def make_batches(rows: Sequence[Row], pad: int, batch_size: int) -> list[Batch]:
    """Left-padded batches of at most ``batch_size`` rows (an item's rows are never split, so a choice item
    may exceed it alone), longest items first (less padding)."""
    by_item: dict[int, list[Row]] = {}
    for row in rows:
        by_item.setdefault(row.item, []).append(row)
    order = sorted(by_item, key=lambda i: (-max(len(r.ids) for r in by_item[i]), i))
    chunks: list[list[int]] = []
    for item in order:
        if chunks and sum(len(by_item[i]) for i in chunks[-1]) + len(by_item[item]) <= batch_size:
            chunks[-1].append(item)
        else:
            chunks.append([item])
    out = []
    for chunk in chunks:
        chunk_rows = [(slot, r) for slot, i in enumerate(chunk) for r in by_item[i]]
        ids, mask, pos = left_pad([r.ids for _, r in chunk_rows], pad)
        n, width = ids.shape
        answer = torch.zeros((n, width), dtype=torch.bool)
        target = torch.zeros((n, width), dtype=torch.long)
        last = torch.zeros((n, width), dtype=torch.bool)
        for b, (_, r) in enumerate(chunk_rows):
            off = width - len(r.ids)
            # position j predicts token j + 1: the answer tokens n_prompt.. are predicted from n_prompt − 1..
            answer[b, off + r.n_prompt - 1: width - 1] = True
            target[b, off + r.n_prompt - 1: width - 1] = torch.tensor(r.ids[r.n_prompt:])
            last[b, off + r.n_prompt - 1] = True
        out.append(Batch(ids, mask, pos, answer, target, last,
                         torch.tensor([slot for slot, _ in chunk_rows]),
                         torch.tensor([r.correct for _, r in chunk_rows]),
                         torch.tensor([r.scale for _, r in chunk_rows], dtype=torch.float32),
                         [r.item for _, r in chunk_rows]))
    return out


def prompt_pairs(tokenizer: Any, pairs: Sequence[tuple[str, str]], batch_size: int) -> tuple[list[Batch], list[Batch]]:
    """(clean, corrupted) prompts → the corrupted batches (what the receiver reads) and the clean ones (what
    the source reads), row for row alike. As in ``transformer_lens.patching``, the two prompts of a pair
    must be the same length in tokens (activations are swapped position by position)."""
    if not pairs:
        raise GraftError("no prompt pairs given", "pass prompts=[(clean, corrupted), ...]")
    clean, corrupted = [], []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, tuple | list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise GraftError(f"prompt pair {i} is not two strings: {pair!r}", "pass (clean, corrupted) text pairs")
        a, b = (list(tokenizer(t)["input_ids"]) for t in pair)
        if len(a) != len(b):
            raise GraftError(f"prompt pair {i}: the clean prompt is {len(a)} tokens and the corrupted {len(b)}",
                             "make both prompts of a pair the same length in tokens")
        clean.append(Row(tuple(a), len(a), i))
        corrupted.append(Row(tuple(b), len(b), i))
    pad = pad_id(tokenizer)
    return make_batches(corrupted, pad, batch_size), make_batches(clean, pad, batch_size)


def forward(loaded: LoadedModel, batch: Batch | tuple[Tensor, Tensor, Tensor], *, hooked: bool = True,
            **kwargs: Any) -> Tensor:
    """Logits of the HF model (``hooked``: the copy whose modules the bridge wraps, so bridge hooks fire)."""
    ids, mask, pos = (batch.ids, batch.mask, batch.pos) if isinstance(batch, Batch) else batch
    model = loaded.hooked if hooked else loaded.model
    dev = input_device(loaded.model)
    out = model(ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev), use_cache=False, **kwargs)
    return out.logits


Metric = Literal["logprob", "logit_diff"]


METRICS: tuple[str, ...] = ("logprob", "logit_diff")


# A metric of one's own, as transformer_lens.patching users write them: the logits at the batch's kept
# positions (the last one for prompt pairs) and the batch → one value per item (per prompt pair).
MetricFn = Callable[[Tensor, "Batch"], Tensor]


def _tail(t: Tensor, p: int) -> Tensor:
    return t[:, t.shape[1] - p:]


def alternatives(logits: Float[Tensor, "b p v"], batch: Batch) -> Tensor:
    """Per position, the model's best token other than the forced one (``logit_diff``, one row per item)."""
    masked = logits.detach().clone()
    masked.scatter_(-1, _tail(batch.target, logits.shape[1]).to(logits.device)[..., None], float("-inf"))
    return masked.argmax(-1)


def metric_values(logits: Float[Tensor, "b p v"], batch: Batch, metric: Metric | MetricFn = "logprob",
                  alt: Tensor | None = None) -> Float[Tensor, " items"]:
    """The metric per item (``logits`` may cover only the batch's last positions, see :attr:`Batch.keep`).

    One row per item: ``logprob`` sums the forced tokens' log-probabilities; ``logit_diff`` sums each
    forced token's logit minus the best other token's (``alt``, fixed from an unpatched run). Choice
    items: ``logprob`` is the correct choice's log-probability normalised over the item's choices;
    ``logit_diff`` the correct choice's score minus the best wrong one's.
    """
    if callable(metric):
        out = metric(logits, batch)
        if not isinstance(out, Tensor) or tuple(out.shape) != (batch.n_items,):
            raise GraftError(f"the metric callable returned {getattr(out, 'shape', type(out).__name__)} for a batch of "
                             f"{batch.n_items} items", "return one value per item: a tensor of shape (n_items,)")
        return out
    p = logits.shape[1]
    ans = _tail(batch.answer, p).to(logits.device)
    tgt = _tail(batch.target, p).to(logits.device)[..., None]
    if metric == "logit_diff" and batch.single:
        if alt is None:
            raise ValueError("logit_diff needs the alternative tokens of the unpatched run")
        per = (logits.gather(-1, tgt) - logits.gather(-1, alt.to(logits.device)[..., None]))[..., 0].float()
    elif metric in METRICS:
        per = torch.log_softmax(logits.float(), dim=-1).gather(-1, tgt)[..., 0]
    else:
        raise GraftError(f"unknown metric {metric!r}", f"use {', '.join(METRICS)}")
    score = (per * ans).sum(-1) * batch.scale.to(logits.device)
    if batch.single:
        return score
    group, correct = batch.group.to(logits.device), batch.correct.to(logits.device)
    n = batch.n_items
    right = torch.zeros(n, device=score.device, dtype=score.dtype).index_add(0, group[correct], score[correct])
    if metric == "logprob":  # log-softmax over each item's choices
        top = torch.full((n,), -torch.inf, device=score.device).scatter_reduce(0, group, score.detach(), "amax")
        total = torch.zeros(n, device=score.device, dtype=score.dtype).index_add(0, group, (score - top[group]).exp())
        return right - (top + total.log())
    wrong = ~correct
    best = torch.full((n,), -torch.inf, device=score.device, dtype=score.dtype).scatter_reduce(
        0, group[wrong], score[wrong], "amax")
    return right - best


def per_item(values: Float[Tensor, "b ..."], batch: Batch) -> Float[Tensor, "items ..."]:
    """Row values summed per item (an item's choices together)."""
    if batch.single:
        return values
    out = torch.zeros((batch.n_items, *values.shape[1:]), dtype=values.dtype, device=values.device)
    return out.index_add(0, batch.group.to(values.device), values)
