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
