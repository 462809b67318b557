"""The localization methods, named once: the CLI, the API, the sweep config and the report read this list.

Kept free of torch, so that a sweep config can be checked before anything heavy is imported.
"""

from __future__ import annotations

from typing import Literal, get_args

Method = Literal["shifts", "lae", "attribution", "patching", "gradient", "greedy", "mask", "weight", "random"]
METHODS: tuple[str, ...] = get_args(Method)
# Methods that read the task (the rest are dataless), and those that read it through forced answers.
DATA_METHODS: tuple[str, ...] = ("shifts", "lae", "attribution", "patching", "gradient", "greedy", "mask")
WEIGHT_SPACE: tuple[str, ...] = ("gradient", "greedy", "mask")
# Causal methods on activations (signed scores: a component can hurt), and those that read a forced probe.
CAUSAL: tuple[str, ...] = ("attribution", "patching")
FORCED: tuple[str, ...] = (*CAUSAL, "shifts", *WEIGHT_SPACE)
# Methods whose ranking depends on the largest K asked for: greedy selects that many, mask learns under it.
BUDGETED: tuple[str, ...] = ("greedy", "mask")

# What each method measures, for sentences that name it (CLI help, report).
DESCRIPTIONS = {
    "shifts": "activation statistics",
    "lae": "activation statistics, the paper's LAE",
    "attribution": "attribution patching, causal",
    "patching": "activation patching, causal",
    "gradient": "weight-space attribution",
    "greedy": "greedy forward selection",
    "mask": "learned sparse mask",
    "weight": "weight difference, dataless",
    "random": "random ranking, the control",
}


def named(method: str) -> str:
    """A method's name with what it measures: ``weight (weight difference, dataless)``."""
    about = DESCRIPTIONS.get(method)
    return f"{method} ({about})" if about else method
