"""Reuse of the layers below a transplant: their activations cannot change, so compute them once.

A transplant that touches only layers ≥ L leaves the residual stream entering layer L unchanged for
every input. Scoring evaluations (choices, perplexity) make forward calls that do not depend on the
model's outputs, so the same calls repeat at every point of a sweep. :class:`LayerReplay` records, per
forward call, the hidden state entering layer L the first time and replays it afterwards: layers
below L are skipped (each writes a one-element placeholder into the KV cache so that cache lengths
and attention masks stay exactly as in a full forward), layer L onward runs as usual. The results
are bit-identical to full forwards (tested on Llama, Qwen2, Gemma-3, Phi-3, GPT-2 and GPT-NeoX).

Generation replays its prompts: the prefill of each batch repeats at every point (without drafts,
the batches are the same), so the layers below L are skipped there too, and their keys and values
recorded with the hidden state are written into the KV cache instead of placeholders (a session with
``kv=True``): the decoding steps, which depend on the tokens the transplanted model chose, run every
layer over an identical cache. Bit-identical to full decoding on Llama, Qwen2, Phi-3, GPT-2 and
GPT-NeoX; a cache that is not a plain one (quantized, or a sliding window shorter than a call's tokens) records
nothing, so every layer runs.

    replay = LayerReplay(target.model)
    lowest = lowest_layer([c.layer for c in units.select(layout, [c.id for c in plan.components])])
    with applied(target, donor, plan), replay.unchanged_below(lowest):
        evaluate.run(target.model, target.tokenizer, task, replay=replay)
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float

DEFAULT_BUDGET_BYTES = 2 * 2**30


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The model's stack of decoder blocks (``model.layers``, ``transformer.h``, ``gpt_neox.layers``...):
    the first ModuleList as long as ``config.num_hidden_layers``; None when there is no such list."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        return None
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    return None


@dataclass
class ReplayStats:
    replayed: int = 0  # forward calls that skipped the layers below a recorded one
    recorded: int = 0  # forward calls whose hidden state was stored
    full: int = 0  # forward calls that ran every layer
    skipped_layers: int = 0  # layer forwards not run, summed over calls

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


KV = tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per layer below: the keys and values a call added
Calls = dict[Hashable, tuple[tuple[torch.Tensor, ...], Float[torch.Tensor, "batch pos d_model"], KV | None]]


class LayerReplay:
    """Records and replays the inputs of decoder layers across evaluations of fixed item sets.

    The caller states, with :meth:`unchanged_below`, from which layer on the model may differ from the
    model that made the records; it is the caller's promise (a sweep knows its plan's lowest layer, and
    :func:`analysis.transplant.applied` restores bit-exactly). It may also name layers worth recording
    for later evaluations (a sweep knows every plan of its grid). An evaluator opens a :meth:`session`
    per evaluation, named by a fingerprint of everything it will feed the model, and wraps each forward
    call in :meth:`call`. A session replays from one layer for all its calls — the KV cache a later
    call reuses then holds real entries exactly where it runs layers — and a recording is kept only
    when every call of the session was recorded within the memory budget.
    """

    def __init__(self, model: torch.nn.Module, *, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        self.model = model
        self.layers = decoder_layers(model)
        self.budget_bytes = budget_bytes
        self.sets: dict[tuple[Hashable, int], Calls] = {}  # (fingerprint, layer) → every call's hidden state
        self.bytes = 0
        self.stats = ReplayStats()
        self._start = 0  # layers below this one are unchanged since the records were made
        self._wanted: frozenset[int] = frozenset()
        self._replay: Calls | None = None
        self._replay_at = 0
        self._pending: dict[int, Calls] = {}  # layer → this session's recording
        self._pending_bytes = 0
        self._kv = False  # this session records and replays the skipped layers' keys and values
        self._captured: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}  # layer → this call's K, V
        self._counted: KV = ()  # the K, V of this call already counted against the budget

    @property
    def depth(self) -> int:
        """The number of decoder layers (0 when the model's stack was not found)."""
        return len(self.layers) if self.layers is not None else 0

    @property
    def enabled(self) -> bool:
        return self.layers is not None and self.budget_bytes > 0

    @contextlib.contextmanager
    def unchanged_below(self, layer: int, *, record: Iterable[int] = ()) -> Iterator[LayerReplay]:
        """For the block: layers ``0 .. layer-1`` (and the embeddings) hold the recorded weights.
        Evaluations in it record the input of ``layer`` and of the ``record`` layers at or below it."""
        saved = self._start, self._wanted
        self._start = min(max(int(layer), 0), self.depth)
        # (the input of the first layer is the embedding, that of layer `depth` the last layer's output:
        # neither is worth keeping)
        self._wanted = frozenset(x for x in (self._start, *record) if 0 < x <= self._start and x < self.depth)
        try:
            yield self
        finally:
            self._start, self._wanted = saved

    @contextlib.contextmanager
    def session(self, fingerprint: Hashable, *, kv: bool = False) -> Iterator[None]:
        """One evaluation of one item set (``fingerprint`` names it: inputs, batching). With ``kv``, the
        skipped layers' keys and values are recorded and replayed into the KV cache too (not
        placeholders): later calls that run every layer (decoding steps) attend to them."""
        fingerprint = (fingerprint, kv)
        self._kv = kv
        start = self._start if self.enabled else 0
        have = {layer for (fp, layer) in self.sets if fp == fingerprint}
        self._replay_at = max((x for x in have if x <= start), default=0)
        self._replay = self.sets[fingerprint, self._replay_at] if self._replay_at else None
        self._pending = {x: {} for x in self._wanted if x > self._replay_at and x not in have} if start else {}
        self._pending_bytes = 0
        try:
            yield
            if self._pending and self.bytes + self._pending_bytes <= self.budget_bytes:
                for layer, calls in self._pending.items():
                    self.sets[fingerprint, layer] = calls
                self.bytes += self._pending_bytes
        finally:
            self._replay, self._replay_at, self._pending = None, 0, {}

    @contextlib.contextmanager
    def call(self, tag: Hashable, *inputs: torch.Tensor) -> Iterator[None]:
        """Around one forward call inside a :meth:`session`; ``tag`` names the call (the same call at
        every evaluation of the item set has the same tag), ``inputs`` are what it feeds the model."""
        if self._replay is None and not self._pending:
            self.stats.full += 1
            yield
            return
        assert self.layers is not None
        with contextlib.ExitStack() as stack:
            self._captured, self._counted = {}, ()
            if self._kv and self._pending:  # first: a layer's K, V are taken before its output is recorded
                for i in range(max(self._pending)):
                    hook = self.layers[i].register_forward_hook(self._kv_taker(i), with_kwargs=True)
                    stack.callback(hook.remove)
            for layer in self._pending:
                hook = self.layers[layer - 1].register_forward_hook(self._recorder(tag, layer, inputs))
                stack.callback(hook.remove)
            if self._pending:
                self.stats.recorded += 1
            if self._replay is not None:
                if tag not in self._replay or not _same(self._replay[tag][0], inputs):
                    raise RuntimeError(f"layer replay: call {tag!r} was not recorded with these inputs")
                _, hidden, kv = self._replay[tag]
                for i in range(self._replay_at):
                    stack.enter_context(_skipped(self.layers[i], i, hidden if i == self._replay_at - 1 else None,
                                                 kv[i] if kv is not None else None))
                self.stats.replayed += 1
                self.stats.skipped_layers += self._replay_at
            else:
                self.stats.full += 1
            yield

    def _recorder(self, tag: Hashable, layer: int, inputs: tuple[torch.Tensor, ...]) -> Any:
        def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
            if layer not in self._pending:
                return
            if not isinstance(output, torch.Tensor):  # a block returning a tuple: not replayable
                self._pending.clear()
                return
            hidden = output.detach().clone()
            self._pending_bytes += hidden.numel() * hidden.element_size()
            kv = None
            if self._kv:
                kv = tuple(self._captured.get(i) for i in range(layer))
                if any(x is None for x in kv):  # a cache this does not know how to refill
                    self._pending.clear()
                    return
                # (layers below share their K, V tensors across recorded layers: counted once, here)
                self._pending_bytes += sum(t.numel() * t.element_size() for x in kv[len(self._counted):] for t in x)
                self._counted = kv
            if self.bytes + self._pending_bytes > self.budget_bytes:
                self._pending.clear()  # over budget: this session keeps nothing
                return
            self._pending[layer][tag] = (tuple(t.detach().clone() for t in inputs), hidden, kv)

        return hook

    def _kv_taker(self, index: int) -> Any:
        """A hook keeping the keys and values layer ``index`` added to a plain KV cache in this call — or to a
        sliding window's, when the window still holds every one of them (given to the cache again, they are
        then kept and cut exactly as the first time)."""
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

        def hook(_module: torch.nn.Module, args: Any, kwargs: Any, _output: Any) -> None:
            cache = _find_cache(args, kwargs)
            hidden = args[0] if args else kwargs.get("hidden_states")
            layers = getattr(cache, "layers", None)
            layer = layers[index] if layers is not None and index < len(layers) else None
            t = hidden.shape[1] if isinstance(hidden, torch.Tensor) else 0
            window = type(layer) is DynamicSlidingWindowLayer and not layer.record_past and \
                t <= layer.sliding_window - 1  # type: ignore[union-attr]
            if not t or (type(layer) is not DynamicLayer and not window):
                self._captured[index] = None  # a window shorter than the tokens, quantized caches: not refilled
                return
            self._captured[index] = (layer.keys[..., -t:, :].detach().clone(), layer.values[..., -t:, :].detach().clone())

        return hook

    def clear(self) -> None:
        self.sets.clear()
        self.bytes = 0


def _same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y.to(x.device)) for x, y in zip(a, b,
                                                                                                         strict=True))


def _find_cache(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    from transformers.cache_utils import Cache

    for value in (*args, *kwargs.values()):
        if isinstance(value, Cache):
            return value
    return None


@contextlib.contextmanager
def _skipped(block: torch.nn.Module, index: int, output: torch.Tensor | None,
             kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> Iterator[None]:
    """Replace ``block``'s forward for the block: it passes its input through (or returns ``output``),
    and gives the KV cache the recorded keys and values ``kv``, or else a placeholder entry of the right
    length (batch × 1 × positions × 1)."""

    def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        cache = _find_cache(args, kwargs)
        if cache is not None:
            if kv is not None:
                cache.update(kv[0], kv[1], index)
            else:
                b, t = hidden_states.shape[:2]
                placeholder = hidden_states.new_zeros((b, 1, t, 1))
                cache.update(placeholder, placeholder, index)
        return output if output is not None else hidden_states

    previous = block.__dict__.get("forward")  # accelerate's hooks, for one, live there
    block.forward = forward  # instance attribute: nn.Module.__call__ dispatches to it
    try:
        yield
    finally:
        if previous is None:
            del block.forward
        else:
            block.forward = previous


def lowest_layer(component_layers: list[int | None]) -> int:
    """The layer from which a transplant of components in these layers can change activations
    (a component outside the decoder stack, e.g. the embeddings, means layer 0)."""
    if not component_layers or any(layer is None for layer in component_layers):
        return 0
    return min(layer for layer in component_layers if layer is not None)


__all__ = ["LayerReplay", "ReplayStats", "decoder_layers", "lowest_layer"]
