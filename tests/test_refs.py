"""analysis.io.refs: the kinds of reference resolved without loading; bad references and an unreachable hub in one line."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from analysis.errors import GraftError
from analysis.io.models import load
from analysis.io.refs import resolve


def test_hub_id_offline_fails_at_once() -> None:
    start = time.perf_counter()
    with pytest.raises(GraftError, match="not in the hub cache") as err:
        load("some-org/some-model-that-is-not-cached")
    assert time.perf_counter() - start < 20  # no retry storm against an unreachable hub
    assert "--online" not in str(err.value) and "huggingface-cli download" in str(err.value)  # no such flag


@pytest.mark.parametrize("ref,kind", [("demo:gen1", "demo"), ("org/name", "hub"), ("name", "hub")])
def test_reference_kinds(ref: str, kind: str) -> None:
    if kind == "demo" and not (Path(__file__).parents[1] / "analysis/demo/models/gen1/config.json").is_file():
        pytest.skip("demo models not built yet")
    assert resolve(ref).kind == kind


def test_bad_references(tmp_path: Path) -> None:
    with pytest.raises(GraftError, match="unknown demo model"):
        resolve("demo:nope")
    with pytest.raises(GraftError, match="no such GGUF"):
        resolve(str(tmp_path / "x.gguf"))
    with pytest.raises(GraftError, match="no such model folder"):
        resolve("./missing/model")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(GraftError, match="not a model folder"):
        resolve(str(tmp_path / "file.txt"))
