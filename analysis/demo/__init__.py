"""The embedded demo models and tasks: a donor/target pair that exists without downloads.

``demo:gen1``, ``demo:gen2`` and ``demo:gen1-chat`` (``analysis.io.models.load``) are three generations of
one tiny character-level Llama trained here on synthetic skills; ``demo:arith``, ``demo:reverse``,
``demo:upper`` (and their ``-chat`` variants) and ``demo:text`` (``analysis.eval.tasks.load``) are their tasks.
``python -m analysis.demo.build`` rebuilds everything; docs/demo-models.md records what was shipped.
"""

from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent / "models"
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
MODEL_NAMES = ("gen1", "gen2", "gen1-chat")
CONFIG = Path(__file__).resolve().parent / "demo.yaml"  # examples/demo.yaml links here
