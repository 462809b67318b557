"""graftlm: training-free model transplantation, built on TransformerLens.

The Python API has the same verbs as the CLI (``analysis.check``, ``analysis.transplant``, ...).
"""

from __future__ import annotations

import os

# The hub is unreachable on most of our users' compute nodes and on CI: stay offline unless asked.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

__version__ = "0.1.0"

# The API verbs. Imported eagerly: `analysis.transplant` and `analysis.check` must be the functions,
# not the modules of the same name (import those as `from analysis.transplant import ...`).
from analysis.check import check  # noqa: E402
from analysis.errors import GraftError  # noqa: E402
from analysis.localize import localize  # noqa: E402
from analysis.models import load  # noqa: E402
from analysis.plan import Plan  # noqa: E402
from analysis.transplant import applied, apply_patch, transplant  # noqa: E402

__all__ = ["GraftError", "Plan", "applied", "apply_patch", "check", "load", "localize", "transplant"]
