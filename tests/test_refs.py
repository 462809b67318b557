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
    assert "--online" not in str(err.value) and "hf download some-org/some-model" in str(err.value)  # no such flag
    with pytest.raises(GraftError, match="hf download some-org/m --revision step1000"):
        load("some-org/m@step1000")


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


def test_a_cached_hub_id_reads_like_its_folder(tiny_pairs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An id in the hub cache resolves to its snapshot offline: it loads to the same logits as the folder,
    and what a command must never write into is the id's whole cache folder (its files link into blobs/)."""
    import torch

    from analysis.io.refs import source_paths
    from tests.conftest import hub_cache_entry, logits

    _, target = tiny_pairs("llama")
    snapshot = hub_cache_entry(target, tmp_path / "hub", "org/tiny")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    ref = resolve("org/tiny")
    assert (ref.kind, ref.path) == ("hub", snapshot)
    assert source_paths("org/tiny") == [tmp_path / "hub" / "models--org--tiny"]
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(logits(load("org/tiny").model, ids), logits(load(target).model, ids))
    assert resolve("org/other").path is None  # not cached: loading it says so (above)


def test_a_cached_hub_id_with_pickle_weights_is_refused(tiny_pairs, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from tests.conftest import hub_cache_entry

    _, target = tiny_pairs("llama")
    pickled = tmp_path / "pickled"
    shutil.copytree(target, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")  # only the name matters here
    hub_cache_entry(pickled, tmp_path / "hub", "org/pickled")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(GraftError, match="pickle weights"):
        load("org/pickled")


def test_a_revision_of_a_cached_hub_id_is_its_own_model(tiny_pairs, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """ID@REVISION: a branch or tag (Pythia's training steps), or a commit, of a cached repository — two
    revisions of one repository are a donor and a target; a revision not downloaded says how to get it."""
    import torch

    from analysis.io.refs import source_paths
    from tests.conftest import hub_cache_entry, logits

    donor, target = tiny_pairs("llama")
    hub = tmp_path / "hub"
    new = hub_cache_entry(target, hub, "org/tiny", commit="b" * 40)  # main
    old = hub_cache_entry(donor, hub, "org/tiny", commit="c" * 40, ref="step1000")
    by_commit = hub_cache_entry(donor, hub, "org/tiny", commit="d" * 40, ref=None)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    assert resolve("org/tiny").path == new and resolve("org/tiny@main").path == new
    ref = resolve("org/tiny@step1000")
    assert (ref.kind, ref.path, ref.revision, ref.repo_id) == ("hub", old, "step1000", "org/tiny")
    assert resolve(f"org/tiny@{'d' * 40}").path == by_commit
    assert source_paths("org/tiny@step1000") == [hub / "models--org--tiny"]
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(logits(load("org/tiny@step1000").model, ids), logits(load(donor).model, ids))
    assert resolve("org/tiny@step2000").path is None
    import analysis

    assert analysis.check("org/tiny@step1000", "org/tiny").ok  # two revisions: a donor and a target
    for bad in ("org/tiny@", "org/tiny@a b", "org/tiny@@x", "org/tiny@../../x"):
        with pytest.raises(GraftError, match="ID@REVISION"):
            resolve(bad)
