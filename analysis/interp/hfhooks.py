"""The bridge's hook points, read on the plain Hugging Face model: the same tensors without the bridge.

A TransformerLens bridge hook point (``blocks.3.attn.hook_z``) is the input or the output of a module the
bridge wraps (``blocks.3.attn.o.hook_in``: the input of the HF ``o_proj``), reshaped by the hook point's
conversion ([b, p, h·d] → [b, p, h, d]). Registered as PyTorch hooks on that module of the HF model
itself, a hook sees what the bridge's hook sees while the model runs as HF runs it — with its KV cache,
which a booted bridge leaves empty (TL 4.3), so a decoding step runs the new token only instead of the
whole sequence again, and without the bridge's wrapper modules. A hook point with no HF module of its
own (the q/k/v a bridge splits out of a fused projection) has no such reading: :func:`points` returns
None and callers keep the bridge.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from analysis.io.models import BRIDGE_WRAPPER

if TYPE_CHECKING:
    import torch

    from analysis.io.models import LoadedModel

Hook = Callable[..., None]


@dataclass(frozen=True)
class Point:
    """Where a bridge hook point reads on the HF model: a module's input or output, then the bridge's
    reshaping (None: the tensor as it is)."""

    module: torch.nn.Module
    side: str  # "in" | "out"
    convert: Callable[[torch.Tensor], torch.Tensor] | None


# Resolved once per model and set of hook points: a statistics pass asks for every batch of both models.
_RESOLVED: weakref.WeakKeyDictionary[Any, dict[tuple[str, ...], dict[str, Point] | None]] = weakref.WeakKeyDictionary()


def points(loaded: LoadedModel, names: Sequence[str]) -> dict[str, Point] | None:
    """Each bridge hook point of ``names`` on :attr:`LoadedModel.model`, or None if any has no HF module."""
    known = _RESOLVED.setdefault(loaded.model, {})
    key = tuple(names)
    if key not in known:
        known[key] = _resolve(loaded, names)
    return known[key]


def _resolve(loaded: LoadedModel, names: Sequence[str]) -> dict[str, Point] | None:
    bridge = loaded.bridge
    twin = {id(m): n for n, m in loaded.hooked.named_modules()}
    own = dict(loaded.model.named_modules())
    found: dict[str, Point] = {}
    for name in names:
        hook_point = bridge.hook_dict.get(name)
        if hook_point is None or "." not in hook_point.name:
            return None
        path, side = hook_point.name.rsplit(".", 1)
        if side not in ("hook_in", "hook_out"):
            return None
        wrapped = getattr(bridge.get_submodule(path), "original_component", None)
        module = own.get(twin[id(wrapped)].replace(BRIDGE_WRAPPER, "")) if id(wrapped) in twin else None
        if module is None:  # a module the bridge made (a split of a fused projection)
            return None
        conversion = hook_point.hook_conversion
        if hasattr(conversion, "batch_seq"):  # reads the shape the bridge's block stamps as it runs (OPT's
            return None                       # flattened MLP): no such stamp when the HF model runs alone
        found[name] = Point(module, side.removeprefix("hook_"), conversion.convert if conversion is not None else None)
    return found


@contextlib.contextmanager
def attached(where: dict[str, Point], hooks: Sequence[tuple[str, Hook]]) -> Iterator[None]:
    """``hooks`` (bridge hook point name, fn(tensor)) on the HF modules of ``where`` for the block; removed
    on exit, also when the block raises."""
    handles = []

    def reader(point: Point, fn: Hook) -> Callable[[Any], None]:
        def read(value: Any) -> None:
            value = value[0] if isinstance(value, tuple) else value  # attention: (output, weights)
            fn(point.convert(value) if point.convert is not None else value)
        return read

    try:
        for name, fn in hooks:
            point, read = where[name], reader(where[name], fn)
            if point.side == "in":  # the module's first argument, positional or not
                handles.append(point.module.register_forward_pre_hook(
                    lambda _m, args, kwargs, read=read: read(args[0] if args else next(iter(kwargs.values()))),
                    with_kwargs=True))
            else:
                handles.append(point.module.register_forward_hook(lambda _m, _args, out, read=read: read(out)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def sdpa(model: Any) -> Iterator[None]:
    """PyTorch's fused attention for the block where the model was loaded with eager attention and can
    switch: the same attention (to float rounding), without materialising the score matrix; eager again
    after. Models that cannot switch keep their own."""
    was = getattr(model.config, "_attn_implementation", None)
    can = getattr(model, "_can_set_attn_implementation", None)
    if was != "eager" or can is None or not can():
        yield
        return
    try:
        model.set_attn_implementation("sdpa")
    except (ValueError, ImportError):  # no sdpa for this architecture
        yield
        return
    try:
        yield
    finally:
        model.set_attn_implementation(was)

