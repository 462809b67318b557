"""The inference engine every evaluation runs on: token ids as lm-evaluation-harness makes them, left
padding, and one :class:`Forward` call that asks for logits only where they are read, reuses the layers
below a transplant (:class:`~analysis.eval.replay.LayerReplay`) and runs a context that every row of a
batch shares once (:class:`SharedContext`). Decoding (:mod:`.decoding`) and scoring (:mod:`.scoring`)
go through it; interpretability code calls it too (:mod:`analysis.interp.probe`, :mod:`analysis.interp.shifts`).

Works on any model called as ``model(input_ids, attention_mask=..., position_ids=..., past_key_values=...)``
— a plain ``PreTrainedModel``, or one whose modules a TransformerLens ``TransformerBridge`` wraps.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import weakref
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import torch

from analysis.eval.replay import LayerReplay


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


def pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                getattr(tokenizer, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, list | tuple):
            ids.update(int(x) for x in src)
    return ids


def max_length(model: Any) -> int:
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else 2048


def batches(order: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), size):
        yield list(order[start:start + size])


# model → (its modules' identities, does its KV cache work): probed once per model and wiring
_CACHE_WORKS: weakref.WeakKeyDictionary[Any, tuple[int, bool]] = weakref.WeakKeyDictionary()
_PACK_WORKS: weakref.WeakKeyDictionary[Any, tuple[int, bool]] = weakref.WeakKeyDictionary()


def input_device(model: Any) -> torch.device:
    """Where a model's inputs go: its embedding's device (with a device_map, where accelerate runs it — an
    offloaded embedding is an empty 'meta' tensor), else its first parameter's."""
    hook = getattr(model.get_input_embeddings(), "_hf_hook", None) if hasattr(model, "get_input_embeddings") else None
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


class Forward:
    """Calls the model; asks for logits only where needed when the model supports ``logits_to_keep``
    (the LM head is a large share of a small model's FLOPs)."""

    def __init__(self, model: Any, replay: LayerReplay | None = None) -> None:
        self.model = model
        self.replay = replay if replay is not None and replay.model is model else None
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}  # type: ignore[assignment]
        self.keep = "logits_to_keep" in params
        # transformers >= 5.2x renamed past_key_values to cache (the old name warns).
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.device = input_device(model)
        self._caches: bool | None = None
        self._packs: bool | None = None

    def _probed(self, known: weakref.WeakKeyDictionary[Any, tuple[int, bool]], probe: Callable[[], bool]) -> bool:
        """A fact that the model's wiring decides, not its weights: probed once per model and wiring."""
        wiring = hash(tuple(map(id, self.model.modules()))) if isinstance(self.model, torch.nn.Module) else 0
        seen = known.get(self.model)
        if seen is not None and seen[0] == wiring:
            return seen[1]
        answer = probe()
        known[self.model] = (wiring, answer)
        return answer

    def _tolerance(self) -> float:
        """Half precision: cached, packed and full attention round differently."""
        return 1e-3 if next(self.model.parameters()).dtype == torch.float32 else 1e-1

    @property
    def caches(self) -> bool:
        """Does the KV cache give the full forward's logits? A TransformerLens bridge booted over the
        model leaves the cache empty (seen with TL 4.3), so we probe once per model and otherwise recompute."""
        if self._caches is None:
            self._caches = self._probed(_CACHE_WORKS, self._cache_reproduces)
        return self._caches

    def _cache_reproduces(self) -> bool:
        vocab = self.model.get_input_embeddings().num_embeddings
        ids = (torch.arange(1, 7) % vocab)[None, :]
        ones = torch.ones_like(ids)
        full, _ = self(ids, ones, torch.arange(6)[None, :], last_only=True)
        _, past = self(ids[:, :-1], ones[:, :-1], torch.arange(5)[None, :], last_only=True)
        if past is None or not hasattr(past, "batch_select_indices") or past.get_seq_length() != 5:
            return False
        last, _ = self(ids[:, -1:], ones, torch.tensor([[5]]), past=past, last_only=True)
        return bool(torch.allclose(full, last, atol=self._tolerance(), rtol=self._tolerance()))

    @property
    def packs(self) -> bool:
        """Does a packed row (a context followed by several continuations, each seeing the context and
        itself through a 4D mask) give the logits of separate full forwards? Probed once per model
        (as :attr:`caches`); a model that ignores custom masks, or a bridge that does, is scored unpacked."""
        if self._packs is None:
            self._packs = self.keep and not self.window_limited and self._probed(_PACK_WORKS, self._packing_reproduces)
        return self._packs

    def _packing_reproduces(self) -> bool:
        ctx, a, b = [5, 9, 2, 7], [3, 8], [6, 1, 4]
        row = Packing()
        row.add(0, (ctx, [a + [0], b + [0]]))  # the continuations' last tokens are never inputs
        try:
            packed = self.packed(row, tag=None)
            full = [self(torch.tensor([ctx + c]), torch.ones(1, len(ctx) + len(c), dtype=torch.long),
                         torch.arange(len(ctx) + len(c))[None])[0][0] for c in (a, b)]
        except (TypeError, ValueError, RuntimeError, IndexError):  # a model that takes no 4D mask
            return False
        expected = torch.cat([full[0][len(ctx) - 1:], full[1][len(ctx):]])
        return packed.shape == expected.shape and bool(torch.allclose(packed, expected, atol=self._tolerance(),
                                                                      rtol=self._tolerance()))

    @property
    def window_limited(self) -> bool:
        """Sliding-window attention (Gemma-3, Mistral): a custom mask would override the window."""
        cfg = getattr(self.model, "config", None)
        return bool(getattr(cfg, "sliding_window", None)) and any(
            t != "full_attention" for t in (getattr(cfg, "layer_types", None) or ["sliding_attention"]))

    def packed(self, row: Packing, tag: Hashable = None) -> torch.Tensor:
        """Logits at the row's kept positions (``row.keep``), one forward with its 4D mask; float32."""
        ids, mask, positions, keep = row.tensors()
        floor = torch.finfo(next(self.model.parameters()).dtype).min
        additive = torch.zeros(mask.shape, dtype=next(self.model.parameters()).dtype).masked_fill_(~mask, floor)
        kwargs: dict[str, Any] = {"attention_mask": additive.to(self.device), "position_ids": positions.to(self.device),
                                  "use_cache": False, "logits_to_keep": keep.to(self.device)}
        if self.replay is not None and tag is not None:
            with self.replay.call(tag, ids, additive, positions):
                out = self.model(ids.to(self.device), **kwargs)
        else:
            out = self.model(ids.to(self.device), **kwargs)
        return out.logits[0].float()

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 past: Any = None, last_only: bool = False, tag: Hashable = None,
                 keep: int | None = None) -> tuple[torch.Tensor, Any]:
        """One forward. A ``tag`` names a call that repeats identically at every point of a sweep: with a
        :class:`~analysis.eval.replay.LayerReplay`, the layers below the transplant are then replayed, not run."""
        kwargs: dict[str, Any] = {"attention_mask": mask.to(self.device), "position_ids": positions.to(self.device),
                                  "use_cache": True}
        if past is not None:
            kwargs[self.cache_kw] = past
        keep = 1 if last_only else keep  # logits for the last ``keep`` positions only
        if keep is not None and self.keep:
            kwargs["logits_to_keep"] = keep
        if self.replay is not None and tag is not None:
            with self.replay.call(tag, ids, mask, positions):
                out = self.model(ids.to(self.device), **kwargs)
        else:
            out = self.model(ids.to(self.device), **kwargs)
        logits = out.logits[:, -keep:] if keep is not None else out.logits
        cache = getattr(out, "cache", None)
        return logits.float(), cache if cache is not None else getattr(out, "past_key_values", None)


def left_pad(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, positions) with every row's tokens last; positions count real tokens from 0."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def right_pad(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) with every row's tokens first: each keeps positions 0..len-1 after whatever precedes it."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
    return ids, mask


class Packing:
    """Several scoring requests in one row: each context once, then each of its continuations (all but the
    last token: they are only predicted) seeing the context and itself, never another request or another
    continuation. Positions restart per request; the logits kept are the context's last position (it
    predicts every continuation's first token) and each continuation's inputs (they predict the rest)."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.positions: list[int] = []
        self.segments: list[tuple[int, int, int, int]] = []  # (start, length, its context's start, length)
        self.keep: list[int] = []
        self.requests: list[tuple[int, int, list[tuple[int, list[int]]]]] = []  # (request, first kept, [(kept, cont)])

    def __len__(self) -> int:
        return len(self.ids)

    @staticmethod
    def size(request: tuple[Sequence[int], Sequence[Sequence[int]]]) -> int:
        ctx, conts = request
        return len(ctx) + sum(len(c) - 1 for c in conts)

    def add(self, index: int, request: tuple[Sequence[int], Sequence[Sequence[int]]]) -> None:
        ctx, conts = request
        start = len(self.ids)
        self.ids += list(ctx)
        self.positions += list(range(len(ctx)))
        self.segments.append((start, len(ctx), start, 0))
        first = len(self.keep)
        self.keep.append(start + len(ctx) - 1)
        kept = []
        for cont in conts:
            at = len(self.ids)
            self.ids += list(cont[:-1])
            self.positions += list(range(len(ctx), len(ctx) + len(cont) - 1))
            self.segments.append((at, len(cont) - 1, start, len(ctx)))
            kept.append((len(self.keep), list(cont)))
            self.keep += list(range(at, at + len(cont) - 1))
        self.requests.append((index, first, kept))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids [1, L], the boolean mask [1, 1, L, L] (True: may attend), positions [1, L], kept positions."""
        n = len(self.ids)
        mask = torch.zeros((n, n), dtype=torch.bool)
        for start, length, context, ctx_len in self.segments:
            rows = slice(start, start + length)
            mask[rows, start:start + length] = torch.ones((length, length), dtype=torch.bool).tril_()
            mask[rows, context:context + ctx_len] = True  # a continuation sees its whole context
        return (torch.tensor([self.ids]), mask[None, None], torch.tensor([self.positions]),
                torch.tensor(self.keep))


SHARED_CONTEXT_MIN_TOKENS = 16  # a shared context shorter than this is not worth its own forward


class SharedContext:
    """The opening tokens that every row of a batch shares (few-shot examples, a system prompt) are run
    once, batch size 1, and their KV cache repeated for the rows; the next batch with the same opening
    reuses it. Given ``every`` row of the run, the opening they all share is used for each batch (one
    forward for the run, however the rows are grouped); otherwise each batch's own common opening."""

    def __init__(self, fwd: Forward, every: Sequence[Sequence[int]] = (),
                 before_opening: Callable[[], None] | None = None) -> None:
        self.fwd = fwd
        self.before_opening = before_opening  # told before the opening's own forward (a row of no prompt)
        self.last: tuple[tuple[int, ...], Any] | None = None
        self.common: list[int] = os.path.commonprefix([list(x) for x in every]) if len(every) > 1 else []

    @property
    def run_once(self) -> bool:
        """Every row of the run shares an opening worth a forward of its own."""
        return len(self.common) >= SHARED_CONTEXT_MIN_TOKENS

    def inputs(self, seqs: Sequence[Sequence[int]], pad: int, tag: Hashable, own: int = 1
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        """Left-padded (ids, mask, positions) of ``seqs`` after their shared opening, and a KV cache holding
        it (None when no opening is worth sharing: then ids are the whole rows). Every row keeps at least
        its last ``own`` tokens out of the opening (the positions whose logits the caller reads)."""
        opening: list[int] = self.common if self.run_once else (
            os.path.commonprefix([list(x) for x in seqs]) if len(seqs) > 1 else [])
        opening = opening[: max(min(len(x) for x in seqs) - own, 0)]
        if len(opening) < SHARED_CONTEXT_MIN_TOKENS or not self.fwd.caches:
            return (*left_pad(seqs, pad), None)
        ids, mask, positions = left_pad([x[len(opening):] for x in seqs], pad)
        if self.last is None or self.last[0] != tuple(opening):
            one = torch.tensor([opening])
            if self.before_opening is not None:
                self.before_opening()
            _, cache = self.fwd(one, torch.ones_like(one), torch.arange(len(opening))[None], last_only=True, tag=tag)
            self.last = (tuple(opening), cache)
        past = copy.deepcopy(self.last[1])
        past.batch_repeat_interleave(len(seqs))
        # padding sits between the opening and each row's own tokens: masked, and positions say where each is
        mask = torch.cat([torch.ones((len(seqs), len(opening)), dtype=torch.long), mask], dim=1)
        return ids, mask, positions + len(opening), past


CALL_COST_TOKENS = 16  # a forward call's fixed cost, in token positions (measured on CPU, 30 layers)


def length_groups(rows: Sequence[int], lengths: Sequence[int], max_rows: int | None = None) -> list[list[int]]:
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
