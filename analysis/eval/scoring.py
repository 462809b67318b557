"""Scoring on the engine: the log-likelihood of continuations after their context (each context run once:
packed beside its choices in rows without padding, or its KV cache shared by them) and per-token negative
log-likelihoods for perplexity, in windows over long texts."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Hashable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from analysis.errors import GraftError
from analysis.eval.engine import (
    Forward,
    Packing,
    SharedContext,
    encode,
    encode_pair,
    length_groups,
    max_length,
    pad_id,
    right_pad,
)
from analysis.eval.replay import LayerReplay


@torch.inference_mode()
def loglikelihoods(model: Any, tokenizer: Any, requests: Sequence[tuple[str, Sequence[str]]], *,
                   batch_size: int = 8, progress: bool = False, replay: LayerReplay | None = None) -> list[list[float]]:
    """Sum of logprobs of each continuation after its context: ``[(context, [cont, ...]), ...]`` →
    ``[[logprob, ...], ...]``. Each context is run once: packed in a row beside its continuations where the
    model takes a 4D mask (:attr:`~analysis.eval.engine.Forward.packs`), else its KV cache shared by them.
    With a ``replay``, the layers it knows unchanged are replayed from its records (same results)."""
    fwd = Forward(model, replay)
    pad = pad_id(tokenizer)
    max_len = max_length(model)
    prepared: list[tuple[list[int], list[list[int]]]] = []
    for context, conts in requests:
        pairs = [encode_pair(tokenizer, context, c) for c in conts]
        ctx = pairs[0][0]  # identical for every continuation: the same context string is encoded
        cont_ids = [p[1] for p in pairs]
        if any(not c for c in cont_ids):
            raise GraftError(f"a continuation of {context[-40:]!r} encodes to no tokens", "check the choices")
        room = max_len - max(len(c) for c in cont_ids)
        prepared.append((ctx[-room:] if len(ctx) > room else ctx, cont_ids))
    results: list[list[float]] = [[] for _ in prepared]
    bar = tqdm(total=len(prepared), desc="loglikelihood", disable=not progress, leave=False)
    shared = SharedContext(fwd, [ctx for ctx, _ in prepared])
    packed = not shared.run_once and fwd.packs
    fingerprint = hash(("loglikelihood", batch_size, packed, tuple((tuple(c), tuple(map(tuple, cs))) for c, cs in prepared)))
    with fwd.replay.session(fingerprint) if fwd.replay is not None else contextlib.nullcontext():
        if packed:  # (few-shot prompts share their examples: those run once for all instead)
            _score_packed(fwd, prepared, min(PACK_TOKENS_PER_ROW * batch_size, PACK_TOKENS_MAX), results, bar)
        else:  # contexts of similar length together (padding costs as much as real tokens), batch_size at most
            batches = length_groups(range(len(prepared)), [len(ctx) for ctx, _ in prepared], max_rows=batch_size)
            _score_batches(fwd, shared, prepared, batches, pad, results, bar)
    bar.close()
    return results


# A packed row holds about this many positions per row of the batch size, and never more than
# PACK_TOKENS_MAX: its attention runs over the whole row, masked blocks included (256 was the fastest of
# 128…768 on SmolLM2 ARC-Easy, batch size 8).
PACK_TOKENS_PER_ROW = 32
PACK_TOKENS_MAX = 256


def _score_packed(fwd: Forward, prepared: list[tuple[list[int], list[list[int]]]], budget: int,
                  results: list[list[float]], bar: Any) -> None:
    """Requests packed into rows of about ``budget`` positions, one forward each, no padding: each
    context runs once and every continuation beside it (:class:`~analysis.eval.engine.Packing`)."""
    rows: list[Packing] = []
    for i in sorted(range(len(prepared)), key=lambda i: (-Packing.size(prepared[i]), i)):
        if not rows or len(rows[-1]) + Packing.size(prepared[i]) > budget:
            rows.append(Packing())
        rows[-1].add(i, prepared[i])
    for r_no, row in enumerate(rows):
        logp = torch.log_softmax(fwd.packed(row, tag=("pack", r_no)), dim=-1)
        for index, first, kept in row.requests:
            scores = []
            for at, cont in kept:  # cont[0] from the context's last position, cont[j + 1] from input j
                targets = torch.tensor(cont)
                where = torch.tensor([first] + list(range(at, at + len(cont) - 1)))
                scores.append(float(logp[where, targets].sum()))
            results[index] = scores
        bar.update(len(row.requests))


def _score_batches(fwd: Forward, shared: SharedContext, prepared: list[tuple[list[int], list[list[int]]]],
                   batches: list[list[int]], pad: int, results: list[list[float]], bar: Any) -> None:
    for b_no, batch in enumerate(batches):
        ids, mask, positions, past = shared.inputs([prepared[i][0] for i in batch], pad, ("shared-context", b_no))
        logits, past = fwd(ids, mask, positions, past=past, last_only=True, tag=("context", b_no))
        first = torch.log_softmax(logits[:, -1], dim=-1)  # predicts every continuation's first token
        rows = [(b, cont) for b, i in enumerate(batch) for cont in prepared[i][1]]
        scores = [float(first[b, cont[0]]) for b, cont in rows]
        # Continuations after their first token, right-padded, on the context cache repeated per choice;
        # rows of similar length go together (padding costs as much as real tokens).
        multi = [r for r, (_, cont) in enumerate(rows) if len(cont) > 1]
        groups = length_groups(multi, [len(rows[r][1]) - 1 for r in multi])
        for g_no, group in enumerate(groups):
            width = len(rows[group[0]][1]) - 1
            index = torch.tensor([rows[r][0] for r in group])
            ids2, mask2 = right_pad([rows[r][1][:-1] for r in group], pad)
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
               progress: bool = False, replay: LayerReplay | None = None) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, predicted tokens) per text; long texts in windows of the model's
    length overlapping by one token, so every token after the first is predicted exactly once."""
    fwd = Forward(model, replay)
    pad = pad_id(tokenizer)
    width = min(max_length(model), 2048)
    windows: list[tuple[int, list[int]]] = []
    for t, text in enumerate(texts):
        ids = encode(tokenizer, text)
        for start in range(0, max(len(ids) - 1, 1), width - 1):
            windows.append((t, ids[start:start + width]))
    # batches of similar length (padding costs as much as real tokens), at most batch_size rows each
    groups = length_groups(range(len(windows)), [len(w) for _, w in windows], max_rows=batch_size)
    nll = [0.0] * len(texts)
    count = [0] * len(texts)
    bar = tqdm(total=len(windows), desc="perplexity", disable=not progress, leave=False)
    fingerprint = hash(("perplexity", batch_size, tuple(tuple(w) for _, w in windows)))
    with fwd.replay.session(fingerprint) if fwd.replay is not None else contextlib.nullcontext():
        for b_no, batch in enumerate(groups):
            _window_batch(fwd, [windows[i] for i in batch], pad, ("window", b_no), nll, count)
            bar.update(len(batch))
    bar.close()
    return list(zip(nll, count, strict=True))


def _window_batch(fwd: Forward, batch: list[tuple[int, list[int]]], pad: int, tag: Hashable,
                  nll: list[float], count: list[int]) -> None:
    """Add each window's summed NLL and token count to its text's totals."""
    seqs = [window for _, window in batch]
    ids, mask = right_pad(seqs, pad)  # real tokens keep positions 0..len-1
    positions = torch.arange(ids.shape[1])[None, :].expand(len(seqs), ids.shape[1])
    logits, _ = fwd(ids, mask, positions, tag=tag)
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    for r, (text, s) in enumerate(batch):
        if len(s) < 2:
            continue
        target = torch.tensor(s[1:])
        nll[text] -= float(logp[r, torch.arange(len(s) - 1), target].sum())
        count[text] += len(s) - 1
