"""graftlm: training-free model transplantation, built on TransformerLens.

The Python API has the same verbs as the CLI (``analysis.check``, ``analysis.transplant``, ...).
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from typing import Any

# The hub is unreachable on most of our users' compute nodes and on CI: stay offline unless asked.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

__version__ = "0.1.0"

# The API verbs, imported on first use: importing torch and transformers takes ~1.5 s, which
# `graftlm transplant` between safetensors folders never needs. `analysis.transplant` and
# `analysis.check` are the functions, not the modules of the same name (import those as
# `from analysis.transplant import ...`).
_VERBS = {
    "GraftError": "analysis.errors",
    "Plan": "analysis.plan",
    "applied": "analysis.transplant",
    "apply_patch": "analysis.graft_files",
    "check": "analysis.check",
    "load": "analysis.io.models",
    "localize": "analysis.interp.localize",
    "transplant": "analysis.transplant",
}


def __getattr__(name: str) -> Any:
    if name in _VERBS:
        value = getattr(importlib.import_module(_VERBS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:  # `import analysis; analysis.units.layout(...)` keeps working: submodules load on first use
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted({*globals(), *_VERBS})


class _Package(types.ModuleType):
    """Keeps a verb bound to its function when the submodule of the same name gets imported.

    The import system sets ``analysis.transplant = <module>`` whenever ``analysis.transplant`` (the
    module) is first imported; without this, ``analysis.transplant(...)`` would then be a module.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _VERBS and isinstance(value, types.ModuleType):
            return  # __getattr__ resolves the name to the function
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = ["GraftError", "Plan", "applied", "apply_patch", "check", "load", "localize", "transplant"]
