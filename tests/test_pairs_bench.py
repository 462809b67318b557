"""bench/pairs.py: a drastically shrunk pair builds into the layout the benchmark reads, and is reused."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "pairs.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_pairs", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_pairs"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_tiny_pair_layout_and_cache(tmp_path, monkeypatch):
    pairs = _load_bench()
    size = dict(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64, seq_len=32, batch=4)
    mix = {"arith:plain": 0.5, "reverse:plain": 0.3, "text": 0.2}
    recipe = pairs.Recipe(seed=5, threads=1, **size, phases=(pairs.Phase("tiny", None, mix, 3, 3e-3, 1, 6),))
    base = pairs.Base("tiny", "llama", recipe, held_seed=5)
    spec = pairs.PairSpec("tiny-forget", "a smoke test", base, "forget", pairs.TaskSpec("reverse", kind="choice"),
                          phase=pairs.Phase("tiny-forget", "tiny", {"arith:plain": 1.0}, 2, 1e-3, 1, 7))
    monkeypatch.setitem(pairs.PAIRS, spec.name, spec)
    monkeypatch.setattr(pairs, "SPLIT_SIZES", {"probe": 4, "dev": 6, "test": 8})

    folder = pairs.build(spec.name, cache=tmp_path, log=False)
    assert folder == tmp_path / spec.name
    info = json.loads((folder / "pair.json").read_text())
    assert {"name", "recipe", "recipe_hash", "arch", "kind", "task", "components", "sha256", "baseline",
            "build_s", "threads", "torch"} <= set(info)
    assert info["kind"] == "choice" and info["components"] == 2 * (2 + 1) and info["threads"] == 1
    for role in ("donor", "target"):
        assert (folder / role / "config.json").is_file()
        assert info["sha256"][role] == pairs.demo_build.sha256(folder / role / "model.safetensors")
        assert info["baseline"][role]["test"]["n"] == 8 and info["baseline"][role]["dev"]["n"] == 6
    rows = [json.loads(line) for line in (folder / "items.jsonl").read_text().splitlines()]
    assert sorted({r["split"] for r in rows}) == ["dev", "probe", "retention", "test"]
    assert all(len(r["choices"]) == 4 and r["choices"][r["answer"]] for r in rows if r["split"] != "retention")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    killed = tmp_path / f".{spec.name}.tmp-{2 ** 22 + 1}"  # a build killed midway (no such pid: above pid_max)
    (killed / "donor").mkdir(parents=True)
    assert pairs.build(spec.name, cache=tmp_path, log=False, force=True) == folder
    assert not killed.exists()  # cleared by the next build of that pair

    stamp = (folder / "pair.json").stat().st_mtime_ns
    assert pairs.build(spec.name, cache=tmp_path, log=False) == folder  # reused: the recipe hash matches
    assert (folder / "pair.json").stat().st_mtime_ns == stamp


def test_every_architecture_of_the_bank_builds_and_quantizes(tmp_path, monkeypatch):
    """The bank's architectures (fused projections too) train, save and have the named layers rounded."""
    from safetensors import safe_open

    pairs = _load_bench()
    monkeypatch.setattr(pairs, "SPLIT_SIZES", {"probe": 4, "dev": 6, "test": 8})
    archs = {base.arch for base in pairs.BASES.values()}
    assert {"llama", "gpt2", "neox", "phi3"} <= archs
    for arch in sorted(archs):
        size = dict(hidden=32, layers=2, heads=2, kv_heads=1 if arch in ("llama", "phi3") else 2, intermediate=64,
                    seq_len=32, batch=4)
        recipe = pairs.Recipe(seed=5, threads=1, **size,
                              phases=(pairs.Phase(f"tiny-{arch}", None, {"reverse:plain": 1.0}, 2, 3e-3, 1, 6),))
        base = pairs.Base(f"tiny-{arch}", arch, recipe, held_seed=5)
        spec = pairs.PairSpec(f"tiny-{arch}-quant", "a smoke test", base, "quantize", pairs.TaskSpec("reverse"),
                              quant=pairs.Quant(bits=2, layers=(1,)))
        monkeypatch.setitem(pairs.PAIRS, spec.name, spec)
        folder = pairs.build(spec.name, cache=tmp_path, log=False)
        chosen = pairs.linear_weights(arch, (1,))
        tensors = {}
        for role in ("donor", "target"):
            with safe_open(folder / role / "model.safetensors", "pt") as f:
                tensors[role] = {n: f.get_tensor(n) for n in f.keys()}
        assert chosen and set(chosen) <= set(tensors["target"])  # the names the recipe rounds exist
        changed = {n for n in tensors["target"] if not (tensors["target"][n] == tensors["donor"][n]).all()}
        assert changed == set(chosen), arch  # those weights, and nothing else
        for name, out_dim in chosen.items():  # a few levels per output row: 2 bits
            w = tensors["target"][name].float()
            rows = w if out_dim == 0 else w.T
            assert max(len(r.unique()) for r in rows) <= 3, name


def _tiny_pair(pairs, tmp_path, monkeypatch, arch: str, recipe: str, task, **spec) -> dict:
    """Both models' tensors (float32) of a two-layer pair of ``arch`` made by ``recipe``."""
    from safetensors import safe_open

    monkeypatch.setattr(pairs, "SPLIT_SIZES", {"probe": 4, "dev": 6, "test": 8})
    size = dict(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64, seq_len=32, batch=4)
    phase = pairs.Phase(f"tiny-{arch}", None, {"reverse:plain": 1.0}, 2, 3e-3, 1, 6)
    base = pairs.Base(f"tiny-{arch}", arch, pairs.Recipe(seed=5, threads=1, **size, phases=(phase,)), held_seed=5)
    pair = pairs.PairSpec(f"tiny-{recipe}", "a smoke test", base, recipe, task, **spec)
    monkeypatch.setitem(pairs.PAIRS, pair.name, pair)
    folder = pairs.build(pair.name, cache=tmp_path, log=False)
    tensors = {}
    for role in ("donor", "target"):
        with safe_open(folder / role / "model.safetensors", "pt") as f:
            tensors[role] = {n: f.get_tensor(n).float() for n in f.keys()}
    return tensors


def _changed(tensors: dict) -> set[str]:
    return {n for n in tensors["target"] if not torch.equal(tensors["target"][n], tensors["donor"][n])}


def test_a_pruned_pair_zeroes_the_smallest_weights_of_the_named_layers_only(tmp_path, monkeypatch):
    pairs = _load_bench()
    tensors = _tiny_pair(pairs, tmp_path, monkeypatch, "qwen2", "prune", pairs.TaskSpec("reverse", kind="choice"),
                         prune=pairs.Prune(sparsity=0.7, layers=(0,)))
    chosen = set(pairs.linear_weights("qwen2", (0,)))
    assert _changed(tensors) == chosen  # the q/k/v biases, the norms and layer 1 untouched
    for name in chosen:
        donor, target = tensors["donor"][name], tensors["target"][name]
        kept = target != 0
        assert int((target == 0).sum()) >= int(0.7 * target.numel())
        assert torch.equal(target[kept], donor[kept])  # what survives is the donor's value
        assert donor.abs()[kept].min() >= donor.abs()[~kept].max()  # the smallest went


def test_a_lora_specialist_changes_every_linear_weight_by_a_low_rank_delta_only(tmp_path, monkeypatch):
    pairs = _load_bench()
    tensors = _tiny_pair(pairs, tmp_path, monkeypatch, "llama", "specialist", pairs.TaskSpec("reverse"),
                         phase=pairs.Phase("tiny-lora", "tiny-llama", {"arith:plain": 1.0}, 3, 1e-2, 1, 7),
                         lora=pairs.Lora(rank=2, alpha=4.0))
    assert set(tensors["donor"]) == set(tensors["target"])  # merged: no adapter tensors left
    chosen = set(pairs.linear_weights("llama", (0, 1)))
    assert _changed(tensors) == chosen  # every linear weight; the norms and embeddings frozen
    for name in chosen:  # rank 2, up to the bf16 rounding of both models' weights
        s = torch.linalg.svdvals(tensors["donor"][name] - tensors["target"][name])
        assert s[2] < 0.05 * s[0], name
    assert "lora" not in pairs.recipe_dict(pairs.PAIRS["llama4-quant"])  # unset: old pairs keep their hash
