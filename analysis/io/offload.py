"""Weights that accelerate keeps off the devices (a ``device_map`` that offloads to disk or CPU): find them,
read them, and serve edited values in their place for a while.

An offloaded parameter is an empty ``meta`` tensor; accelerate's hook on its module loads the value from a
shared :class:`accelerate.utils.OffloadedWeightsLoader` before each forward. For safetensors checkpoints that
loader reads the *source model's own files* (transformers offloads by pointing at them), so an edit must
never be written there: the loader's in-memory ``state_dict`` takes priority over its files, and an edit
lives there until it is withdrawn — the stored copy is never touched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from analysis.errors import GraftError

if TYPE_CHECKING:
    import torch

_ABSENT = object()


@dataclass(frozen=True)
class Offloaded:
    """Where one offloaded parameter lives: accelerate's loader (shared by the model's hooks) and its key."""

    loader: Any
    key: str

    def read(self) -> torch.Tensor:
        return self.loader[self.key]


def find(model: torch.nn.Module) -> dict[str, Offloaded]:
    """Parameter name → where accelerate keeps it, for every parameter left on ``meta`` by offloading."""
    found: dict[str, Offloaded] = {}
    for module_name, module in model.named_modules():
        hook = getattr(module, "_hf_hook", None)
        weights = getattr(hook, "weights_map", None)
        for param_name, p in module.named_parameters(recurse=False):
            if p.device.type != "meta":
                continue
            loader = getattr(weights, "dataset", None)
            if weights is None or not isinstance(getattr(loader, "state_dict", None), dict):
                raise GraftError(f"{module_name}.{param_name} is on 'meta' with no offloaded copy accelerate can "
                                 "serve", "load the model with a device_map that places or offloads every module")
            found[f"{module_name}.{param_name}" if module_name else param_name] = Offloaded(
                loader, getattr(weights, "prefix", "") + param_name)
    return found


@contextlib.contextmanager
def served(edits: Mapping[str, tuple[Offloaded, torch.Tensor]]) -> Iterator[None]:
    """Serve each ``(where, value)`` in place of the stored weight for the block; withdrawn after (what
    was served before, if anything, comes back)."""
    before: list[tuple[Offloaded, Any]] = []
    try:
        for where, value in edits.values():
            before.append((where, where.loader.state_dict.get(where.key, _ABSENT)))
            where.loader.state_dict[where.key] = value
        yield
    finally:
        for where, old in reversed(before):
            if old is _ABSENT:
                where.loader.state_dict.pop(where.key, None)
            else:
                where.loader.state_dict[where.key] = old
