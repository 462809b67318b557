"""Greedy decoding on the engine: batched, longest prompts first, stopping at stop strings or EOS; drafts
(what a neighbouring sweep point generated) verified in one forward as in speculative decoding. The tokens
are the greedy ones either way — a draft only saves sequential steps."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from analysis.errors import GraftError
from analysis.eval.engine import (
    Forward,
    SharedContext,
    batches,
    encode,
    eos_ids,
    max_length,
    pad_id,
)
from analysis.eval.replay import LayerReplay


class Generation(NamedTuple):
    """One greedy continuation: ``text`` cut at the first stop string, the summed logprob and number of
    the generated tokens, and their ids (the stopping token included)."""

    text: str
    logprob: float
    n_tokens: int
    tokens: list[int]


@torch.inference_mode()
def generate(model: Any, tokenizer: Any, prompts: Sequence[str], *, stop: Sequence[str], max_new_tokens: int,
             batch_size: int = 8, progress: bool = False,
             drafts: Sequence[Sequence[int] | None] | None = None,
             replay: LayerReplay | None = None, observe: Observer | None = None) -> list[Generation]:
    """Greedy continuations of ``prompts``. Left padding, longest prompts first.

    ``observe(rows, decoding)`` is called before every forward with the prompts (indices into ``prompts``)
    whose rows the forward runs, in the batch's order, and which of them are still decoding: the newest
    position of those is the token being predicted (activation statistics of generated tokens hook in
    here; not with drafts, whose forwards predict many tokens at once). Empty lists announce the forward
    of an opening every prompt shares (few-shot examples), run once: a row of no prompt.

    ``drafts`` (token ids per prompt, e.g. what a neighbouring point of a sweep generated) are verified
    in one forward per batch, as in speculative decoding: the greedy tokens agree with a draft up to
    its first wrong token, which the same forward corrects; only the rows that go on after that decode
    step by step (once fewer than ``DRAFT_MIN_ACCEPTED`` of the verified rows finished on their drafts,
    the remaining batches skip them). The tokens are the greedy ones either way; a draft only saves
    sequential steps. Without drafts, a ``replay`` replays the prompts' layers below a transplant (their
    hidden states and keys and values, recorded at an earlier evaluation of the same prompts): the
    decoding steps then run every layer on an identical KV cache.
    """
    if observe is not None and drafts is not None:
        raise ValueError("observe sees one new token per forward: decode without drafts")
    fwd = Forward(model, replay if drafts is None else None)
    pad, eos = pad_id(tokenizer), eos_ids(model, tokenizer)
    encoded = [encode(tokenizer, p) for p in prompts]
    limit = max_length(model) - max_new_tokens
    if limit < 1:
        raise GraftError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's "
                         f"{max_length(model)}-token context", "lower --max-new-tokens")
    encoded = [e[-limit:] if len(e) > limit else e for e in encoded]  # keep the end: the question
    stops = [s for s in stop if s]

    def finished(new: list[int]) -> bool:
        return len(new) >= max_new_tokens or new[-1] in eos or (
            bool(stops) and any(s in tokenizer.decode(new, skip_special_tokens=True) for s in stops))

    shared = SharedContext(fwd, encoded, before_opening=None if observe is None else lambda: observe([], []))
    rows: list[tuple[list[int], float]] = [([], 0.0)] * len(encoded)
    bar = tqdm(total=len(encoded), desc="generate", disable=not progress, leave=False)
    todo = list(range(len(encoded)))
    if drafts is not None:
        todo = []
        verified = accepted = 0
        order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]) - len(drafts[i] or ()), i))
        for b_no, batch in enumerate(batches(order, batch_size)):
            if verified and accepted < DRAFT_MIN_ACCEPTED * verified:
                todo.extend(batch)  # the drafts are not paying for their forward: decode the rest plainly
                continue
            for i, (new, logprob) in zip(batch, _verify(fwd, shared, [encoded[i] for i in batch],
                                                         [list(drafts[i] or ())[:max_new_tokens] for i in batch],
                                                         pad, finished, b_no), strict=True):
                rows[i] = (new, logprob)
                if finished(new):
                    bar.update(1)
                    accepted += 1
                else:
                    todo.append(i)
            verified += len(batch)
    order = sorted(todo, key=lambda i: (-len(encoded[i]) - len(rows[i][0]), i))
    replaying = fwd.replay is not None and bool(order) and fwd.caches
    fingerprint = hash(("generate", batch_size, tuple(tuple(encoded[i] + rows[i][0]) for i in order)))
    with fwd.replay.session(fingerprint, kv=True) if replaying else contextlib.nullcontext():  # type: ignore[union-attr]
        for b_no, batch in enumerate(batches(order, batch_size)):
            seen = None if observe is None else (
                lambda local, going, batch=batch: observe([batch[j] for j in local], going))
            outs = _decode(fwd, shared, [encoded[i] for i in batch], [rows[i] for i in batch], pad, finished, b_no,
                           seen)
            for i, out in zip(batch, outs, strict=True):
                rows[i] = out
            bar.update(len(batch))
    bar.close()
    results = []
    for new, logprob in rows:
        text = tokenizer.decode([t for t in new if t not in eos], skip_special_tokens=True)
        cuts = [text.find(s) for s in stops if s in text]
        results.append(Generation(text[: min(cuts)] if cuts else text, logprob, len(new), new))
    return results


# Called before a forward with the rows it runs (their indices) and which of them are still decoding.
Observer = Callable[[list[int], list[bool]], None]
# A row that parts from its draft runs its prompt again to decode on: when fewer than this share of the
# rows verified so far finished on their drafts, the rest of the rows decode without them.
DRAFT_MIN_ACCEPTED = 0.5


def _verify(fwd: Forward, shared: SharedContext, prompts: list[list[int]], drafts: list[list[int]], pad: int,
            finished: Callable[[list[int]], bool], b_no: int) -> list[tuple[list[int], float]]:
    """One forward over prompt + draft per row: the greedy tokens up to and including the first one that
    differs from the draft (or follows its end), with their summed logprob."""
    keep = max(len(d) for d in drafts) + 1
    # the logits read are the last `keep` positions: each row's draft and the prompt token before it
    ids, mask, positions, past = shared.inputs([p + d for p, d in zip(prompts, drafts, strict=True)], pad,
                                              ("verify-shared", b_no), own=keep)
    logits, _ = fwd(ids, mask, positions, past=past, keep=keep)
    logp = torch.log_softmax(logits, dim=-1)
    greedy = logp.argmax(-1)
    out = []
    for r, draft in enumerate(drafts):
        new: list[int] = []
        logprob = 0.0
        first = keep - 1 - len(draft)  # the position that predicts the first new token
        for j in range(len(draft) + 1):
            t = int(greedy[r, first + j])
            new.append(t)
            logprob += float(logp[r, first + j, t])
            if finished(new) or j == len(draft) or t != draft[j]:
                break
        out.append((new, logprob))
    return out


def _decode(fwd: Forward, shared: SharedContext, prompts: list[list[int]], starts: list[tuple[list[int], float]],
            pad: int, finished: Callable[[list[int]], bool], b_no: int, observe: Observer | None = None
            ) -> list[tuple[list[int], float]]:
    """Greedy decoding of a batch, step by step on the KV cache; each row continues after its ``start``
    tokens (already generated) until ``finished``."""
    ids, mask, positions, past = shared.inputs([p + s for p, (s, _) in zip(prompts, starts, strict=True)], pad,
                                              ("decode-shared", b_no))
    new = [list(s) for s, _ in starts]
    logprob = [lp for _, lp in starts]
    live = list(range(len(prompts)))  # the rows in the batch's tensors, in their order
    done = [False] * len(prompts)
    if observe is not None:
        observe(live, [True] * len(live))
    logits, past = fwd(ids, mask, positions, past=past, last_only=True, tag=("decode", b_no))
    cached = fwd.caches
    while True:
        logp = torch.log_softmax(logits[:, -1], dim=-1)
        token = logp.argmax(-1, keepdim=True)
        chosen = logp.gather(-1, token)[:, 0].tolist()
        for j, (r, t) in enumerate(zip(live, token[:, 0].tolist(), strict=True)):
            if not done[r]:
                new[r].append(t)
                logprob[r] += chosen[j]
                done[r] = finished(new[r])
        going = [j for j, r in enumerate(live) if not done[r]]
        if not going:
            break
        if len(going) <= len(live) // 2:
            # Half the rows or more are done: drop them (their outputs are fixed) rather than decode
            # padding for them; halving at most log2(batch) times keeps the cache copies cheap.
            keep = torch.tensor(going)
            live = [live[j] for j in going]
            mask, positions = mask[keep], positions[keep]
            if cached:
                past.batch_select_indices(keep.to(fwd.device))
            else:
                ids = ids[keep]
        # rows done but not dropped yet decode padding; their outputs are fixed
        step = torch.tensor([[pad if done[r] else new[r][-1]] for r in live])
        mask = torch.cat([mask, torch.ones((len(live), 1), dtype=torch.long)], dim=1)
        positions = positions[:, -1:] + 1
        if observe is not None:
            observe(live, [not done[r] for r in live])
        if cached:
            logits, past = fwd(step, mask, positions, past=past, last_only=True)
        else:  # no usable cache: run the whole sequence again
            ids = torch.cat([ids, step], dim=1)
            logits, _ = fwd(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), last_only=True)
    return list(zip(new, logprob, strict=True))
