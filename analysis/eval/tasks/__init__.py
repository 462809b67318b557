"""Tasks: items with disjoint splits (probe, dev, test, retention), a prompt format and a scorer.

``load(ref)`` accepts a task YAML, a JSONL file, a ``datasets`` folder, a built-in benchmark name or
``demo:NAME``; the formats are documented in docs/tasks.md.
"""

from analysis.eval.tasks.builtin import BUILTINS
from analysis.eval.tasks.core import KINDS, SPLITS, Example, Item, Task, TaskConfig
from analysis.eval.tasks.extract import Extraction, extract
from analysis.eval.tasks.loader import load

__all__ = ["BUILTINS", "KINDS", "SPLITS", "Example", "Extraction", "Item", "Task", "TaskConfig", "extract", "load"]
