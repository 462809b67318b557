"""Evaluate a Hugging Face causal LM on a task: batched greedy generation, batched log-likelihood
scoring (a shared prompt is encoded once for all its choices) and perplexity; per-item records.

Works on any model called as ``model(input_ids, attention_mask=..., position_ids=..., past_key_values=...)``
— a plain ``PreTrainedModel``, or one whose modules a TransformerLens ``TransformerBridge`` wraps.
Batches are sorted by length; the batch size changes speed, not results (tested).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
import os
import time
import weakref
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from analysis.errors import GraftError
from analysis.eval import metrics
from analysis.eval.prefix import Prefix
from analysis.eval.tasks import Item, Task
from analysis.eval.tasks import load as load_task


@dataclass
class EvalResult:
    """Per-item ``records`` (in item order) and a ``summary`` (k, n, accuracy, ci_low, ci_high, ...)."""

    records: list[dict[str, Any]]
    summary: dict[str, Any]
    paths: dict[str, str] = field(default_factory=dict)

    @property
    def correct(self) -> list[bool]:
        return [bool(r["correct"]) for r in self.records]

    @property
    def accuracy(self) -> metrics.Accuracy:
        return metrics.accuracy_of(self.correct)

    def save(self, out: str | Path, *, force: bool = False, sources: Sequence[str | Path] = ()) -> dict[str, str]:
        """Write ``records.jsonl`` and ``summary.json`` as folder ``out`` (staged: whole or not at all; an
        existing ``out`` is replaced only with ``force``; ``out`` may not be, or lie inside, a source)."""
        from analysis.io.files import staged

        folder = Path(out).expanduser()
        with staged(folder, force=force, sources=sources) as tmp:
            with (tmp / "records.jsonl").open("w", encoding="utf-8") as fh:
                for r in self.records:
                    fh.write(json.dumps(r, ensure_ascii=False) + "\n")
            (tmp / "summary.json").write_text(json.dumps(self.summary, indent=2, ensure_ascii=False) + "\n",
                                              encoding="utf-8")
        self.paths = {"records": str(folder / "records.jsonl"), "summary": str(folder / "summary.json")}
        return self.paths


# -- tokenisation -----------------------------------------------------------------------------------

def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids as lm-evaluation-harness encodes them: the tokenizer's default special tokens, except
    no second BOS when the text already starts with it (a rendered chat template)."""
    bos = getattr(tokenizer, "bos_token", None)
    add = not (bos and text.startswith(bos))
    return list(tokenizer.encode(text, add_special_tokens=add))


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) split as lm-evaluation-harness does: trailing spaces of the
    context move to the continuation; the continuation is the whole encoding after the context's."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = encode(tokenizer, context + continuation)
    ctx = encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                getattr(tokenizer, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, list | tuple):
            ids.update(int(x) for x in src)
    return ids


def _max_length(model: Any) -> int:
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else 2048


def _batches(order: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), size):
        yield list(order[start:start + size])


# model → (its modules' identities, does its KV cache work): probed once per model and wiring
_CACHE_WORKS: weakref.WeakKeyDictionary[Any, tuple[int, bool]] = weakref.WeakKeyDictionary()


class _Forward:
    """Calls the model; asks for logits only where needed when the model supports ``logits_to_keep``
    (the LM head is a large share of a small model's FLOPs)."""

    def __init__(self, model: Any, prefix: Prefix | None = None) -> None:
        self.model = model
        self.prefix = prefix if prefix is not None and prefix.model is model else None
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}  # type: ignore[assignment]
        self.keep = "logits_to_keep" in params
        # transformers >= 5.2x renamed past_key_values to cache (the old name warns).
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.device = next(model.parameters()).device
        self._caches: bool | None = None

    @property
    def caches(self) -> bool:
        """Does the KV cache give the full forward's logits? A TransformerLens bridge booted over the
        model leaves the cache empty (seen with TL 4.3), so we probe once per model (its wiring, not its
        weights, decides) and otherwise recompute."""
        if self._caches is not None:
            return self._caches
        wiring = hash(tuple(map(id, self.model.modules()))) if isinstance(self.model, torch.nn.Module) else 0
        known = _CACHE_WORKS.get(self.model)
        if known is not None and known[0] == wiring:
            self._caches = known[1]
        else:
            vocab = self.model.get_input_embeddings().num_embeddings
            ids = (torch.arange(1, 7) % vocab)[None, :]
            ones = torch.ones_like(ids)
            full, _ = self(ids, ones, torch.arange(6)[None, :], last_only=True)
            _, past = self(ids[:, :-1], ones[:, :-1], torch.arange(5)[None, :], last_only=True)
            if past is None or not hasattr(past, "batch_select_indices") or past.get_seq_length() != 5:
                self._caches = False
            else:
                last, _ = self(ids[:, -1:], ones, torch.tensor([[5]]), past=past, last_only=True)
                # half precision: cached and full attention round differently
                tol = 1e-3 if next(self.model.parameters()).dtype == torch.float32 else 1e-1
                self._caches = bool(torch.allclose(full, last, atol=tol, rtol=tol))
            _CACHE_WORKS[self.model] = (wiring, self._caches)
        return self._caches

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 past: Any = None, last_only: bool = False, tag: Hashable = None,
                 keep: int | None = None) -> tuple[torch.Tensor, Any]:
        """One forward. A ``tag`` names a call that repeats identically at every point of a sweep: with a
        :class:`~analysis.eval.prefix.Prefix`, the layers below the transplant are then replayed, not run."""
        kwargs: dict[str, Any] = {"attention_mask": mask.to(self.device), "position_ids": positions.to(self.device),
                                  "use_cache": True}
        if past is not None:
            kwargs[self.cache_kw] = past
        keep = 1 if last_only else keep  # logits for the last ``keep`` positions only
        if keep is not None and self.keep:
            kwargs["logits_to_keep"] = keep
        if self.prefix is not None and tag is not None:
            with self.prefix.call(tag, ids, mask, positions):
                out = self.model(ids.to(self.device), **kwargs)
        else:
            out = self.model(ids.to(self.device), **kwargs)
        logits = out.logits[:, -keep:] if keep is not None else out.logits
        cache = getattr(out, "cache", None)
        return logits.float(), cache if cache is not None else getattr(out, "past_key_values", None)


def _left_pad(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


SHARED_HEAD_MIN_TOKENS = 16  # a common head shorter than this is not worth its own forward


class _Heads:
    """The token head that every row of a batch shares (few-shot examples, a system prompt) is run once,
    batch size 1, and its KV cache repeated for the rows; the next batch with the same head reuses it.
    Given ``every`` row of the run, the head they all share is used for each batch (one head forward
    for the run, however the rows are grouped); otherwise each batch's own common head."""

    def __init__(self, fwd: _Forward, every: Sequence[Sequence[int]] = ()) -> None:
        self.fwd = fwd
        self.last: tuple[tuple[int, ...], Any] | None = None
        self.common: list[int] = os.path.commonprefix([list(x) for x in every]) if len(every) > 1 else []

    def inputs(self, seqs: Sequence[Sequence[int]], pad: int, tag: Hashable, own: int = 1
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        """Left-padded (ids, mask, positions) of ``seqs`` after their shared head, and a KV cache holding
        the head (None when there is no head worth sharing: then ids are the whole rows). Every row keeps
        at least its last ``own`` tokens out of the head (the positions whose logits the caller reads)."""
        head: list[int] = self.common if len(self.common) >= SHARED_HEAD_MIN_TOKENS else (
            os.path.commonprefix([list(x) for x in seqs]) if len(seqs) > 1 else [])
        head = head[: max(min(len(x) for x in seqs) - own, 0)]
        if len(head) < SHARED_HEAD_MIN_TOKENS or not self.fwd.caches:
            return (*_left_pad(seqs, pad), None)
        ids, mask, positions = _left_pad([x[len(head):] for x in seqs], pad)
        if self.last is None or self.last[0] != tuple(head):
            one = torch.tensor([head])
            _, cache = self.fwd(one, torch.ones_like(one), torch.arange(len(head))[None], last_only=True, tag=tag)
            self.last = (tuple(head), cache)
        past = copy.deepcopy(self.last[1])
        past.batch_repeat_interleave(len(seqs))
        # padding sits between the head and each row's own tokens: masked, and positions say where each is
        mask = torch.cat([torch.ones((len(seqs), len(head)), dtype=torch.long), mask], dim=1)
        return ids, mask, positions + len(head), past


# -- generation -------------------------------------------------------------------------------------

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
             prefix: Prefix | None = None) -> list[Generation]:
    """Greedy continuations of ``prompts``. Left padding, longest prompts first.

    ``drafts`` (token ids per prompt, e.g. what a neighbouring point of a sweep generated) are verified
    in one forward per batch, as in speculative decoding: the greedy tokens agree with a draft up to
    its first wrong token, which the same forward corrects; only the rows that go on after that decode
    step by step (once fewer than ``DRAFT_MIN_ACCEPTED`` of the verified rows finished on their drafts,
    the remaining batches skip them). The tokens are the greedy ones either way; a draft only saves
    sequential steps. Without drafts, a ``prefix`` replays the prompts' layers below a transplant (their
    hidden states and keys and values, recorded at an earlier evaluation of the same prompts): the
    decoding steps then run every layer on an identical KV cache.
    """
    fwd = _Forward(model, prefix if drafts is None else None)
    pad, eos = _pad_id(tokenizer), _eos_ids(model, tokenizer)
    encoded = [encode(tokenizer, p) for p in prompts]
    limit = _max_length(model) - max_new_tokens
    if limit < 1:
        raise GraftError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's "
                         f"{_max_length(model)}-token context", "lower --max-new-tokens")
    encoded = [e[-limit:] if len(e) > limit else e for e in encoded]  # keep the end: the question
    stops = [s for s in stop if s]

    def finished(new: list[int]) -> bool:
        return len(new) >= max_new_tokens or new[-1] in eos or (
            bool(stops) and any(s in tokenizer.decode(new, skip_special_tokens=True) for s in stops))

    heads = _Heads(fwd, encoded)
    rows: list[tuple[list[int], float]] = [([], 0.0)] * len(encoded)
    bar = tqdm(total=len(encoded), desc="generate", disable=not progress, leave=False)
    todo = list(range(len(encoded)))
    if drafts is not None:
        todo = []
        verified = accepted = 0
        order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]) - len(drafts[i] or ()), i))
        for b_no, batch in enumerate(_batches(order, batch_size)):
            if verified and accepted < DRAFT_MIN_ACCEPTED * verified:
                todo.extend(batch)  # the drafts are not paying for their forward: decode the rest plainly
                continue
            for i, (new, logprob) in zip(batch, _verify(fwd, heads, [encoded[i] for i in batch],
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
    replay = fwd.prefix is not None and bool(order) and fwd.caches
    fingerprint = hash(("generate", batch_size, tuple(tuple(encoded[i] + rows[i][0]) for i in order)))
    with fwd.prefix.session(fingerprint, kv=True) if replay else contextlib.nullcontext():  # type: ignore[union-attr]
        for b_no, batch in enumerate(_batches(order, batch_size)):
            outs = _decode(fwd, heads, [encoded[i] for i in batch], [rows[i] for i in batch], pad, finished, b_no)
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


# A row that parts from its draft runs its prompt again to decode on: when fewer than this share of the
# rows verified so far finished on their drafts, the rest of the rows decode without them.
DRAFT_MIN_ACCEPTED = 0.5


def _verify(fwd: _Forward, heads: _Heads, prompts: list[list[int]], drafts: list[list[int]], pad: int,
            finished: Callable[[list[int]], bool], b_no: int) -> list[tuple[list[int], float]]:
    """One forward over prompt + draft per row: the greedy tokens up to and including the first one that
    differs from the draft (or follows its end), with their summed logprob."""
    keep = max(len(d) for d in drafts) + 1
    # the logits read are the last `keep` positions: each row's draft and the prompt token before it
    ids, mask, positions, past = heads.inputs([p + d for p, d in zip(prompts, drafts, strict=True)], pad,
                                              ("verify-head", b_no), own=keep)
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


def _decode(fwd: _Forward, heads: _Heads, prompts: list[list[int]], starts: list[tuple[list[int], float]],
            pad: int, finished: Callable[[list[int]], bool], b_no: int) -> list[tuple[list[int], float]]:
    """Greedy decoding of a batch, step by step on the KV cache; each row continues after its ``start``
    tokens (already generated) until ``finished``."""
    ids, mask, positions, past = heads.inputs([p + s for p, (s, _) in zip(prompts, starts, strict=True)], pad,
                                              ("decode-head", b_no))
    new = [list(s) for s, _ in starts]
    logprob = [lp for _, lp in starts]
    live = list(range(len(prompts)))  # the rows in the batch's tensors, in their order
    done = [False] * len(prompts)
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
        if cached:
            logits, past = fwd(step, mask, positions, past=past, last_only=True)
        else:  # no usable cache: run the whole sequence again
            ids = torch.cat([ids, step], dim=1)
            logits, _ = fwd(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), last_only=True)
    return list(zip(new, logprob, strict=True))


# -- log-likelihood ---------------------------------------------------------------------------------

CALL_COST_TOKENS = 16  # a forward call's fixed cost, in token positions (measured on CPU, 30 layers)


def _length_groups(rows: Sequence[int], lengths: Sequence[int], max_rows: int | None = None) -> list[list[int]]:
    """Split rows, longest first, into runs of at most ``max_rows`` minimising
    Σ (call cost + rows × longest length)."""
    order = sorted(range(len(rows)), key=lambda i: (-lengths[i], i))
    n = len(order)
    best = [0.0] + [math.inf] * n  # best[j]: cost of the first j rows of `order`
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - max_rows) if max_rows else 0, j):  # group order[i:j]; its longest row is order[i]
            cost = best[i] + CALL_COST_TOKENS + (j - i) * lengths[order[i]]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups: list[list[int]] = []
    j = n
    while j > 0:
        groups.append([rows[order[k]] for k in range(cut[j], j)])
        j = cut[j]
    return groups[::-1]

@torch.inference_mode()
def loglikelihoods(model: Any, tokenizer: Any, requests: Sequence[tuple[str, Sequence[str]]], *,
                   batch_size: int = 8, progress: bool = False, prefix: Prefix | None = None) -> list[list[float]]:
    """Sum of logprobs of each continuation after its context: ``[(context, [cont, ...]), ...]`` →
    ``[[logprob, ...], ...]``. Each context is run once; its KV cache is shared by all its continuations.
    With a ``prefix``, the layers it knows unchanged are replayed from its records (same results)."""
    fwd = _Forward(model, prefix)
    pad = _pad_id(tokenizer)
    max_len = _max_length(model)
    prepared: list[tuple[list[int], list[list[int]]]] = []
    for context, conts in requests:
        pairs = [encode_pair(tokenizer, context, c) for c in conts]
        ctx = pairs[0][0]  # identical for every continuation: the same context string is encoded
        cont_ids = [p[1] for p in pairs]
        if any(not c for c in cont_ids):
            raise GraftError(f"a continuation of {context[-40:]!r} encodes to no tokens", "check the choices")
        room = max_len - max(len(c) for c in cont_ids)
        prepared.append((ctx[-room:] if len(ctx) > room else ctx, cont_ids))
    # contexts of similar length together (padding costs as much as real tokens), batch_size at most
    batches = _length_groups(range(len(prepared)), [len(ctx) for ctx, _ in prepared], max_rows=batch_size)
    results: list[list[float]] = [[] for _ in prepared]
    bar = tqdm(total=len(prepared), desc="loglikelihood", disable=not progress, leave=False)
    fingerprint = hash(("loglikelihood", batch_size, tuple((tuple(c), tuple(map(tuple, cs))) for c, cs in prepared)))
    with fwd.prefix.session(fingerprint) if fwd.prefix is not None else contextlib.nullcontext():
        _score_batches(fwd, prepared, batches, pad, results, bar)
    bar.close()
    return results


def _score_batches(fwd: _Forward, prepared: list[tuple[list[int], list[list[int]]]], batches: list[list[int]],
                   pad: int, results: list[list[float]], bar: Any) -> None:
    heads = _Heads(fwd, [ctx for ctx, _ in prepared])
    for b_no, batch in enumerate(batches):
        ids, mask, positions, past = heads.inputs([prepared[i][0] for i in batch], pad, ("head", b_no))
        logits, past = fwd(ids, mask, positions, past=past, last_only=True, tag=("context", b_no))
        first = torch.log_softmax(logits[:, -1], dim=-1)  # predicts every continuation's first token
        rows = [(b, cont) for b, i in enumerate(batch) for cont in prepared[i][1]]
        scores = [float(first[b, cont[0]]) for b, cont in rows]
        # Continuations after their first token, right-padded, on the context cache repeated per choice;
        # rows of similar length go together (padding costs as much as real tokens).
        multi = [r for r, (_, cont) in enumerate(rows) if len(cont) > 1]
        groups = _length_groups(multi, [len(rows[r][1]) - 1 for r in multi])
        for g_no, group in enumerate(groups):
            width = len(rows[group[0]][1]) - 1
            index = torch.tensor([rows[r][0] for r in group])
            ids2 = torch.full((len(group), width), pad, dtype=torch.long)
            mask2 = torch.zeros((len(group), width), dtype=torch.long)
            for g, r in enumerate(group):
                cont = rows[r][1]
                ids2[g, : len(cont) - 1] = torch.tensor(cont[:-1])
                mask2[g, : len(cont) - 1] = 1
            positions2 = mask.sum(-1)[index][:, None] + torch.arange(width)[None, :]
            mask_all = torch.cat([mask[index], mask2], dim=1)
            if fwd.caches:
                cache = copy.deepcopy(past) if len(groups) > 1 else past
                cache.batch_select_indices(index)
                logits2, _ = fwd(ids2, mask_all, positions2, past=cache, tag=("continuation", b_no, g_no))
            else:  # no usable cache: run context + continuation again
                whole = torch.cat([ids[index], ids2], dim=1)
                logits2, _ = fwd(whole, mask_all, torch.cat([positions[index], positions2], dim=1),
                                 tag=("whole", b_no, g_no))
                logits2 = logits2[:, -width:]
            # Input cont[:-1]: logits2[:, j] predicts cont[j + 1].
            logp2 = torch.log_softmax(logits2, dim=-1)
            for g, r in enumerate(group):
                cont = rows[r][1]
                scores[r] += float(logp2[g, torch.arange(len(cont) - 1), torch.tensor(cont[1:])].sum())
        k = 0
        for i in batch:
            m = len(prepared[i][1])
            results[i] = scores[k:k + m]
            k += m
        bar.update(len(batch))


@torch.inference_mode()
def token_nlls(model: Any, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 8,
               progress: bool = False, prefix: Prefix | None = None) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, predicted tokens) per text; long texts in windows of the model's
    length overlapping by one token, so every token after the first is predicted exactly once."""
    fwd = _Forward(model, prefix)
    pad = _pad_id(tokenizer)
    width = min(_max_length(model), 2048)
    windows: list[tuple[int, list[int]]] = []
    for t, text in enumerate(texts):
        ids = encode(tokenizer, text)
        for start in range(0, max(len(ids) - 1, 1), width - 1):
            windows.append((t, ids[start:start + width]))
    # batches of similar length (padding costs as much as real tokens), at most batch_size rows each
    groups = _length_groups(range(len(windows)), [len(w) for _, w in windows], max_rows=batch_size)
    nll = [0.0] * len(texts)
    count = [0] * len(texts)
    bar = tqdm(total=len(windows), desc="perplexity", disable=not progress, leave=False)
    fingerprint = hash(("perplexity", batch_size, tuple(tuple(w) for _, w in windows)))
    with fwd.prefix.session(fingerprint) if fwd.prefix is not None else contextlib.nullcontext():
        for b_no, batch in enumerate(groups):
            _window_batch(fwd, [windows[i] for i in batch], pad, ("window", b_no), nll, count)
            bar.update(len(batch))
    bar.close()
    return list(zip(nll, count, strict=True))


def _window_batch(fwd: _Forward, batch: list[tuple[int, list[int]]], pad: int, tag: Hashable,
                  nll: list[float], count: list[int]) -> None:
    """Add each window's summed NLL and token count to its text's totals."""
    seqs = [window for _, window in batch]
    w = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), w), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), w), dtype=torch.long)
    for r, s in enumerate(seqs):  # right padding: real tokens keep positions 0..len-1
        ids[r, : len(s)] = torch.tensor(s)
        mask[r, : len(s)] = 1
    positions = torch.arange(w)[None, :].expand(len(seqs), w)
    logits, _ = fwd(ids, mask, positions, tag=tag)
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    for r, (text, s) in enumerate(batch):
        if len(s) < 2:
            continue
        target = torch.tensor(s[1:])
        nll[text] -= float(logp[r, torch.arange(len(s) - 1), target].sum())
        count[text] += len(s) - 1


# -- the task-level entry point ---------------------------------------------------------------------

def check_options(*, batch_size: int = 8, limit: int | None = None, max_new_tokens: int | None = None) -> None:
    """The evaluation's numbers, checked before any work (one line each, naming the value)."""
    if batch_size < 1:
        raise GraftError(f"batch size must be at least 1, got {batch_size}", "pass a batch size of 1 or more")
    if limit is not None and limit < 1:
        raise GraftError(f"limit must be at least 1, got {limit}", "pass a limit of 1 or more (or none: every item)")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise GraftError(f"max_new_tokens must be at least 1, got {max_new_tokens}",
                         "pass 1 or more (or none: the task's own)")


def sources_of(model: Any, task: Any) -> list[Path]:
    """The folders and files an evaluation reads (a model's folder, a task's file), where known."""
    found = [getattr(getattr(model, "config", None), "_name_or_path", None), getattr(task, "source", task)]
    return [Path(p) for p in found if isinstance(p, str | Path) and str(p) and Path(p).exists()]


def run(model: Any, tokenizer: Any, task: Task | str | Path, *, split: str | None = None, limit: int | None = None,
        batch_size: int = 8, max_new_tokens: int | None = None, out: str | Path | None = None,
        progress: bool = True, prefix: Prefix | None = None,
        drafts: Mapping[str, Sequence[int]] | None = None, force: bool = False) -> EvalResult:
    """Evaluate ``model`` on ``task``'s ``split`` (None: ``test`` when the task has splits, else every
    item; ``"retention"``: the retention set, as perplexity). Writes records.jsonl + summary.json into
    ``out`` when given. A ``prefix`` (:class:`~analysis.eval.prefix.Prefix` over ``model``) replays the
    layers it knows unchanged since an earlier evaluation of the same items (for generation, the
    prompts; not with drafts);
    ``drafts`` (item id → token ids a similar model generated) save generation tasks sequential steps
    (see :func:`generate`). ``out`` is written whole or not at all, and an existing one is replaced only
    with ``force``."""
    check_options(batch_size=batch_size, limit=limit, max_new_tokens=max_new_tokens)
    sources = sources_of(model, task)
    if out is not None:
        from analysis.io.files import check_out

        check_out(out, force=force, sources=sources)
    task = task if isinstance(task, Task) else load_task(task)
    split_name = task.resolve_split(split)
    items = task.items(split_name, limit)
    scored = task.retention if split_name == "retention" and task.retention is not None else task
    if not items:
        raise GraftError(f"{task.source}: split {split_name!r} has no items", "choose another split or a larger limit")
    was_training = getattr(model, "training", False)
    model.eval()
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            if scored.kind == "generate":
                records = _run_generate(model, tokenizer, scored, items, batch_size, max_new_tokens, progress, drafts,
                                        prefix)
            elif scored.kind == "choice":
                records = _run_choice(model, tokenizer, scored, items, batch_size, progress, prefix)
            else:
                records = _run_perplexity(model, tokenizer, items, batch_size, progress, prefix)
    finally:
        if was_training:
            model.train()
    wall = time.perf_counter() - start
    summary = summarise(scored, records)
    summary.update({
        "task": task.name, "source": task.source, "kind": scored.kind, "split": split_name or "all",
        "model": str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__),
        "batch_size": batch_size, "wall_s": round(wall, 3),
    })
    if scored.kind == "generate":
        summary["max_new_tokens"] = max_new_tokens or scored.max_new_tokens
    result = EvalResult(records, summary)
    if out is not None:
        result.save(out, force=force, sources=sources)
    return result


def _run_generate(model: Any, tokenizer: Any, task: Task, items: list[Item], batch_size: int,
                  max_new_tokens: int | None, progress: bool,
                  drafts: Mapping[str, Sequence[int]] | None, prefix: Prefix | None) -> list[dict[str, Any]]:
    prompts = [task.render(it, tokenizer) for it in items]
    outs = generate(model, tokenizer, prompts, stop=task.stop, max_new_tokens=max_new_tokens or task.max_new_tokens,
                    batch_size=batch_size, progress=progress,
                    drafts=None if drafts is None else [drafts.get(it.id) for it in items], prefix=prefix)
    strict = task.metric == "strict"
    records = []
    for it, (text, logprob, n_tok, tokens) in zip(items, outs, strict=True):
        ex = task.score(it, text)
        records.append({
            "id": it.id, "split": it.split, "prompt": task.prompt_text(it), "output": text,
            "extracted": ex.strict if strict else ex.flexible, "gold": ex.gold,
            "correct": ex.correct_strict if strict else ex.correct_flexible,
            "extracted_strict": ex.strict, "extracted_flexible": ex.flexible,
            "correct_strict": ex.correct_strict, "correct_flexible": ex.correct_flexible,
            "logprob": logprob, "n_tokens": n_tok, "tokens": tokens,
        })
    return records


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first maximum, as numpy's argmax


def _run_choice(model: Any, tokenizer: Any, task: Task, items: list[Item], batch_size: int,
                progress: bool, prefix: Prefix | None) -> list[dict[str, Any]]:
    requests = [(task.render(it, tokenizer), task.continuations(it)) for it in items]
    lls = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, progress=progress, prefix=prefix)
    norm = task.metric == "acc_norm"
    records = []
    for it, ll in zip(items, lls, strict=True):
        pred = _argmax(ll)
        # acc_norm divides by the choice's length in characters, as lm-evaluation-harness does.
        pred_norm = _argmax([v / max(len(c), 1) for v, c in zip(ll, it.choices, strict=True)])
        gold = int(it.answer)
        records.append({
            "id": it.id, "split": it.split, "prompt": task.prompt_text(it), "answer": gold,
            "extracted": pred_norm if norm else pred,
            "correct": (pred_norm if norm else pred) == gold,
            "pred": pred, "pred_norm": pred_norm, "correct_acc": pred == gold, "correct_acc_norm": pred_norm == gold,
            "logprobs": ll,
        })
    return records


def _run_perplexity(model: Any, tokenizer: Any, items: list[Item], batch_size: int,
                    progress: bool, prefix: Prefix | None) -> list[dict[str, Any]]:
    nlls = token_nlls(model, tokenizer, [it.text for it in items], batch_size=batch_size, progress=progress,
                      prefix=prefix)
    return [{"id": it.id, "split": it.split, "nll": nll, "n_tokens": n,
             "perplexity": math.exp(nll / n) if n else math.nan} for it, (nll, n) in zip(items, nlls, strict=True)]


def summarise(task: Task, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Summary of per-item records: k, n, accuracy, Wilson interval, both readings (or perplexity)."""
    if task.kind == "perplexity":
        total = sum(r["nll"] for r in records)
        tokens = sum(r["n_tokens"] for r in records)
        mean = total / tokens if tokens else math.nan
        return {"metric": "perplexity", "n": len(records), "k": None, "accuracy": None, "ci_low": None,
                "ci_high": None, "n_tokens": tokens, "mean_nll": mean, "perplexity": math.exp(mean) if tokens else None}
    acc = metrics.accuracy_of([r["correct"] for r in records])
    summary: dict[str, Any] = {"metric": task.metric, **acc.as_dict()}
    names = ("strict", "flexible") if task.kind == "generate" else ("acc", "acc_norm")
    for name in names:
        key = f"correct_{name}"
        other = metrics.accuracy_of([r[key] for r in records])
        summary[name] = {"k": other.k, "accuracy": other.accuracy, "ci_low": other.ci_low, "ci_high": other.ci_high}
    if task.kind == "generate":
        summary["filter"] = task.filter
    return summary


def describe(summary: dict[str, Any]) -> str:
    """One human line for a summary: accuracy with k/n and interval, or perplexity."""
    head = f"{summary.get('task')} ({summary.get('split')})"
    if summary.get("kind") == "perplexity":
        return f"{head}: perplexity {summary['perplexity']:.3f} (mean NLL {summary['mean_nll']:.4f} over " \
               f"{summary['n_tokens']} tokens, {summary['n']} texts)"
    acc = metrics.Accuracy(summary["k"], summary["n"], summary["accuracy"], summary["ci_low"], summary["ci_high"])
    return f"{head} {summary['metric']}: {acc}"
