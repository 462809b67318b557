"""The transplant guarantees users rely on (DESIGN.md), on every architecture."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAMILIES, build_model, logits, raw_bytes, tensors
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from analysis import units
from analysis.errors import GraftError
from analysis.io.checkpoint import Checkpoint
from analysis.io.models import load
from analysis.plan import Plan
from analysis.transplant import applied, blend, blend_f32, transplant

PLAN = ["L0.H1", "L1.N3", "L1.attn.q", "L0.mlp.down"]


@pytest.mark.parametrize("alpha", [0.0, 1.0, 0.5, 0.37, 1e-3, 0.999, -0.25, 1.7])
@pytest.mark.parametrize("src,out", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                     (torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                     (torch.bfloat16, torch.float32)])
def test_numpy_blend_is_bit_identical_to_torch(alpha: float, src: torch.dtype, out: torch.dtype) -> None:
    """The file path (numpy) and the in-memory path (torch) compute one formula to the same bits."""
    from analysis.io.safetensors import RAW_DTYPES, from_float32, st_dtype, to_float32

    gen = torch.Generator().manual_seed(0)
    scale = torch.logspace(-30, 30, 200_000, base=2.0)  # tiny to huge, subnormal bf16/f16 included
    t = (torch.randn(200_000, generator=gen) * scale).to(src)
    d = (torch.randn(200_000, generator=gen) * scale[torch.randperm(200_000, generator=gen)]).to(src)
    theirs = blend(t, d, alpha, out)
    tn, dn = (to_float32(np.frombuffer(raw_bytes(x), RAW_DTYPES[st_dtype(src)]), st_dtype(src)) for x in (t, d))
    ours = from_float32(np.ascontiguousarray(blend_f32(tn, dn, alpha)), st_dtype(out))
    their_bits = np.frombuffer(raw_bytes(theirs), ours.dtype)
    nan = torch.isnan(theirs).numpy()
    assert np.array_equal(ours[~nan], their_bits[~nan])  # Inf where float16 overflows included
    assert np.isnan(to_float32(ours[nan], st_dtype(out))).all()


def test_verbs_stay_functions_after_their_modules_are_imported() -> None:
    import analysis.check
    import analysis.transplant  # noqa: F401 (binds the submodule on the package, unless guarded)

    assert analysis.transplant is transplant and analysis.applied is applied and callable(analysis.check)
    assert sys.modules["analysis.transplant"].transplant is transplant


@pytest.mark.parametrize("family", FAMILIES)
def test_written_folder_matches_memory_and_leaves_the_rest_alone(family: str, tiny_pairs, tmp_path: Path) -> None:
    donor, target = tiny_pairs(family)
    out = transplant(donor, target, components=PLAN, strength=0.5, out=tmp_path / "out")  # alpha's old name
    before, after = tensors(target), tensors(out)
    lay = units.layout(AutoModelForCausalLM.from_pretrained(target).config, Checkpoint.open(target).shapes())
    touched = {s.param for c in units.select(lay, PLAN) for s in c.slices}
    assert set(after) == set(before)
    for name in before:
        if name not in touched:
            assert raw_bytes(after[name]) == raw_bytes(before[name]), name
    # a head touches only its rows and columns (where no other component of the plan shares the tensor)
    head = units.component(lay, "L0.H1")
    others = {x.param for c in units.select(lay, PLAN) if c.id != "L0.H1" for x in c.slices}
    for param in head.params - others:
        changed = after[param] != before[param]
        assert changed.any() and not (changed & ~_mask(head, param, changed)).any(), param
    # the folder loads with transformers and equals the in-memory transplant and the bridge
    ids = torch.tensor([[5, 9, 13, 20, 40, 7]])
    written = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    t, d = load(target), load(donor)
    with applied(t, d, Plan.of(PLAN, alpha=0.5)):
        mem = logits(t.model, ids)
        bridged = logits(t.bridge, ids)
    torch.testing.assert_close(logits(written, ids), mem, rtol=0, atol=0)
    # Fused q/k/v (GPT-2, NeoX, Phi-3) are split into separate matmuls by the bridge: same values,
    # other float rounding order. Unfused architectures are bit-identical.
    exact = family in ("llama", "qwen2", "gemma3")
    torch.testing.assert_close(bridged, mem, rtol=0, atol=0 if exact else 1e-5)
    # the folder's tensors are the in-memory transplant's, bit for bit
    t, d = load(target), load(donor)
    with applied(t, d, Plan.of(PLAN, alpha=0.5)) as changed:
        assert all(raw_bytes(after[n]) == raw_bytes(v) for n, v in changed.items())
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file() and (out / "graft.yaml").is_file()
    card = (out / "README.md").read_text()
    assert "L0.H1" in card and Checkpoint.open(target).sha256()["model.safetensors"] in card


def _mask(comp: units.Component, param: str, like: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros_like(like, dtype=torch.bool)
    for s in comp.slices:
        if s.param == param:
            mask[s.index(like.ndim)] = True
    return mask


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])
def test_alpha_zero_is_the_target_and_alpha_one_the_donor(family: str, tiny_pairs, tmp_path: Path) -> None:
    donor, target = tiny_pairs(family)
    zero = tensors(transplant(donor, target, components=["L*"], alpha=0.0, out=tmp_path / "a0"))
    base = tensors(target)
    assert all(raw_bytes(zero[n]) == raw_bytes(base[n]) for n in base)
    one = tensors(transplant(donor, target, components=["L*.mlp", "L1.H2"], alpha=1.0, out=tmp_path / "a1"))
    don = tensors(donor)
    lay = units.layout(AutoModelForCausalLM.from_pretrained(target).config, Checkpoint.open(target).shapes())
    for comp in units.select(lay, ["L*.mlp", "L1.H2"]):
        for s in comp.slices:
            idx = s.index(one[s.param].ndim)
            assert torch.equal(one[s.param][idx], don[s.param][idx]), s


def test_in_memory_restore_is_bit_exact(tiny_pairs) -> None:
    donor, target = tiny_pairs("phi3")
    t, d = load(target), load(donor)
    _ = t.bridge  # the fused-projection copies must be restored too
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    snapshot = {n: p.detach().clone() for n, p in t.parameters().items()}
    ref = logits(t.bridge, ids)
    with applied(t, d, Plan.of(["L*"], alpha=0.3)):
        assert not torch.equal(logits(t.bridge, ids), ref)
    assert all(torch.equal(p, snapshot[n]) for n, p in t.parameters().items())
    assert torch.equal(logits(t.bridge, ids), ref)
    with pytest.raises(RuntimeError), applied(t, d, Plan.of(["L0.mlp"])):
        raise RuntimeError("user code failed inside the block")
    assert all(torch.equal(p, snapshot[n]) for n, p in t.parameters().items())


@pytest.mark.parametrize("tdtype,ddtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                           (torch.bfloat16, torch.float32), (torch.float64, torch.float64)])
def test_storage_dtype_rounds_the_same_in_memory_and_on_disk(tmp_path: Path, tdtype: torch.dtype,
                                                             ddtype: torch.dtype) -> None:
    """bf16 / f16 (numpy), a float32 donor into a bf16 target, and f64 (torch's fallback) alike."""
    target = build_model(tmp_path / "t", "llama", seed=2, dtype=tdtype)
    donor = build_model(tmp_path / "d", "llama", seed=1, dtype=ddtype)
    out = transplant(donor, target, components=["L0.mlp", "L1.H0"], alpha=0.37, out=tmp_path / "o")
    ids = torch.tensor([[5, 6, 7, 8]])
    t = load(target, dtype="float32")
    written = load(out, dtype="float32")
    with applied(t, load(donor, dtype="float32"), Plan.of(["L0.mlp", "L1.H0"], alpha=0.37)):
        torch.testing.assert_close(logits(t.model, ids), logits(written.model, ids), rtol=0, atol=0)
    after = tensors(out)
    assert all(v.dtype == tdtype for v in after.values())
    with applied(load(target), load(donor), Plan.of(["L0.mlp", "L1.H0"], alpha=0.37)) as changed:
        assert all(raw_bytes(after[n]) == raw_bytes(v) for n, v in changed.items())


def test_sharded_target_keeps_its_shards(tmp_path: Path) -> None:
    target = build_model(tmp_path / "t", "llama", seed=2, shard="20KB")
    donor = build_model(tmp_path / "d", "llama", seed=1)  # the donor's layout need not match
    assert (target / "model.safetensors.index.json").is_file()
    out = transplant(donor, target, components=["L1"], out=tmp_path / "o")
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in target.glob("*.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.model.layers[1].mlp.up_proj.weight.shape == (64, 32)


def test_plan_file_drives_per_component_strengths(tiny_pairs, tmp_path: Path) -> None:
    donor, target = tiny_pairs("llama")
    plan = tmp_path / "plan.yaml"
    plan.write_text("alpha: 1.0\ncomponents:\n  - L0.mlp.up: 0.0\n  - L1.mlp.up\n")
    after = tensors(transplant(donor, target, plan, out=tmp_path / "o"))
    base, don = tensors(target), tensors(donor)
    assert torch.equal(after["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(after["model.layers.1.mlp.up_proj.weight"], don["model.layers.1.mlp.up_proj.weight"])
    written_plan = Plan.load(tmp_path / "o" / "graft.yaml")
    assert written_plan.strengths() == {"L0.mlp.up": 0.0, "L1.mlp.up": 1.0}
    assert written_plan.provenance.target_sha256


def test_sources_are_never_modified(tiny_pairs, tmp_path: Path) -> None:
    donor, target = tiny_pairs("gpt2")
    stamp = {p: (p.stat().st_mtime_ns, p.read_bytes()) for f in (donor, target) for p in Path(f).iterdir()}
    transplant(donor, target, components=["L*"], alpha=0.5, out=tmp_path / "o")
    transplant(donor, target, components=["L*"], alpha=0.5, out=tmp_path / "p", patch=True)
    assert stamp == {p: (p.stat().st_mtime_ns, p.read_bytes()) for f in (donor, target) for p in Path(f).iterdir()}


def test_nan_or_inf_in_a_sliced_target_tensor_names_it(tiny_pairs, tmp_path: Path) -> None:
    donor, target = tiny_pairs("llama")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in Path(target).iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    state = load_file(str(broken / "model.safetensors"))
    state["model.layers.1.self_attn.o_proj.weight"][0, 9] = float("inf")  # column 9: head 1 (head_dim 8)
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    for patch in (False, True):
        with pytest.raises(GraftError, match=r"target tensor model\.layers\.1\.self_attn\.o_proj\.weight holds NaN"):
            transplant(donor, broken, components=["L1.H1"], alpha=0.5, out=tmp_path / "o", patch=patch)
        assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.graftlm-*"))


def test_file_commands_do_not_import_torch(tiny_pairs, tmp_path: Path) -> None:
    """check, transplant (folder and patch) and apply-patch between safetensors folders: numpy only."""
    donor, target = tiny_pairs("qwen2")
    script = textwrap.dedent(f"""
        import sys
        from analysis.cli import main
        def run(*args):
            try:
                main(list(args))
            except SystemExit as stop:
                assert not stop.code, stop.code
        d, t, o = {str(donor)!r}, {str(target)!r}, {str(tmp_path)!r}
        run("check", "--donor", d, "--target", t)
        run("transplant", "-d", d, "-t", t, "-c", "L1.mlp", "-c", "L0.H2", "-a", "0.4", "--out", o + "/folder")
        run("transplant", "-d", d, "-t", t, "-c", "L1.mlp", "-c", "L0.H2", "-a", "0.4", "--out", o + "/patch", "--patch")
        run("apply-patch", "-t", t, "--patch", o + "/patch", "--out", o + "/rebuilt")
        print(sorted(m for m in ("torch", "transformers", "transformer_lens", "safetensors.torch") if m in sys.modules))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout
    a, b = tensors(tmp_path / "folder"), tensors(tmp_path / "rebuilt")
    assert all(raw_bytes(a[n]) == raw_bytes(b[n]) for n in a)


def test_killed_mid_write_leaves_nothing_at_out(tiny_pairs, tmp_path: Path) -> None:
    donor, target = tiny_pairs("llama")
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import sys, time
        import analysis.transplant
        tr = sys.modules["analysis.transplant"]
        real = tr.write_folder
        def slow(*a, **k):
            real(*a, **k)
            print("written", flush=True)
            time.sleep(60)
        tr.write_folder = slow
        tr.transplant({str(donor)!r}, {str(target)!r}, components=["L*"], out={str(out)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "written"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()


def test_gguf_target_is_written_as_safetensors_with_the_same_logits(tiny_pairs, tmp_path: Path) -> None:
    """A GGUF target (dequantized on load) becomes an HF safetensors folder; the GGUF file is untouched."""
    from conftest import write_gguf

    donor, target_folder = tiny_pairs("llama")
    target = write_gguf(Path(target_folder), tmp_path / "target.gguf")
    before = target.read_bytes()
    out = transplant(donor, target, components=["L1.mlp", "L0.H2"], alpha=0.5, out=tmp_path / "out")
    assert target.read_bytes() == before and sorted(p.suffix for p in out.glob("model*.safetensors")) == [".safetensors"]
    written = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    loaded, donor_loaded = load(target, dtype="float32"), load(donor, dtype="float32")
    ids = torch.tensor([[0, 40, 41, 42, 43, 44]])
    with torch.no_grad(), applied(loaded, donor_loaded, Plan.of(["L1.mlp", "L0.H2"], alpha=0.5)):
        torch.testing.assert_close(written(ids).logits, loaded.model(ids).logits, rtol=0, atol=0)
    with torch.no_grad():  # and it is the HF target plus the transplant, not the target alone
        plain = AutoModelForCausalLM.from_pretrained(target_folder).eval()(ids).logits
        assert not torch.allclose(written(ids).logits, plain)


@pytest.mark.parametrize("family", ["gpt2", "phi3"])
def test_applied_yields_a_bridge_whose_hooks_see_the_transplant(tiny_pairs, tmp_path: Path, family: str) -> None:
    """Fused q/k/v (GPT-2's c_attn, Phi-3's qkv_proj): inside the block, ``grafted.bridge.run_with_cache``
    gives at every hook what the written folder's own bridge gives; after it, the target's again."""
    donor, target = tiny_pairs(family)
    plan = Plan.of(["L0.H1", "L1.mlp"], alpha=0.5)
    written = load(transplant(donor, target, plan, out=tmp_path / "o"), dtype="float32")
    t = load(target, dtype="float32")
    names = ["blocks.0.attn.hook_z", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"]
    ids = torch.tensor([[3, 5, 7, 9, 11]])
    _, before = t.bridge.run_with_cache(ids, names_filter=names)
    _, want = written.bridge.run_with_cache(ids, names_filter=names)
    with applied(t, load(donor, dtype="float32"), plan) as grafted:
        assert set(grafted) >= {n for n in t.parameters() if ".0." in n and "attn" in n} & set(grafted)
        _, got = grafted.bridge.run_with_cache(ids, names_filter=names)
        for name in names:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got["blocks.0.attn.hook_z"], before["blocks.0.attn.hook_z"])
    _, after = t.bridge.run_with_cache(ids, names_filter=names)
    for name in names:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0)


def _bench_transplant():  # type: ignore[no-untyped-def]
    """bench/transplant.py: its builder writes a sharded bf16 Llama tensor by tensor (no model in memory)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_transplant",
                                                  Path(__file__).resolve().parents[1] / "bench" / "transplant.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CAPPED = textwrap.dedent("""
    import resource, sys
    cap = int(sys.argv[4])
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    try:  # the cap bites: as much as the cap cannot be allocated
        bytearray(cap)
        sys.exit("the memory cap does not hold")
    except MemoryError:
        pass
    from analysis.transplant import transplant
    transplant(sys.argv[1], sys.argv[2], components=["L*"], alpha=0.5, out=sys.argv[3])
    status = open("/proc/self/status").read()
    print(int(status.split("VmHWM:")[1].split()[0]) * 1024)  # this process's peak RSS, in bytes
""")


def test_a_transplant_streams_under_a_memory_cap_below_twice_the_model(tmp_path: Path) -> None:
    """Every layer blended at α = 0.5 (every tensor but the embeddings, LM head and final norm is
    rewritten) by a process whose address space is capped below twice the model's size, at three sizes:
    it completes, the bytes are the blend computed here, and its peak RSS stays flat as the model grows."""
    bench = _bench_transplant()
    cap = 640 << 20
    peaks, sizes = [], []
    for layers in (4, 8, 16):  # ≈ 117, 203 and 375 MB of bf16 weights
        cfg = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers, num_attention_heads=8,
                   num_key_value_heads=2, vocab_size=8000)
        donor, target, out = tmp_path / f"donor{layers}", tmp_path / f"target{layers}", tmp_path / f"out{layers}"
        bench.build(donor, cfg, seed=1, shard_bytes=64 << 20)
        bench.build(target, cfg, seed=2, shard_bytes=64 << 20)
        size = sum(p.stat().st_size for p in target.glob("*.safetensors"))
        proc = subprocess.run([sys.executable, "-c", CAPPED, str(donor), str(target), str(out), str(cap)],
                              capture_output=True, text=True, env={**os.environ, "MALLOC_ARENA_MAX": "2"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        peaks.append(int(proc.stdout.split()[-1]))
        sizes.append(size)
        got, t, d = tensors(out), tensors(target), tensors(donor)
        for name, tensor in t.items():
            want = blend(tensor, d[name], 0.5, torch.bfloat16) if name.startswith("model.layers.") else tensor
            assert raw_bytes(got[name]) == raw_bytes(want), name
        del got, t, d
        for folder in (donor, target, out):
            subprocess.run(["rm", "-rf", str(folder)], check=True)
    assert sizes[-1] * 2 > cap
    # flat: the peak grows by under a tenth of what the model grows by (it holds a few tensors at a time)
    assert peaks[-1] - peaks[0] < 0.1 * (sizes[-1] - sizes[0]), (peaks, sizes)


def test_hub_ids_in_the_cache_stream_like_folders(tiny_pairs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Models named by hub id (downloaded once) are streamed file to file like folders — the same bytes —
    and the card names their sha256, taken from the cache's blob names; their cache stays untouched."""
    from conftest import hub_cache_entry

    donor, target = tiny_pairs("qwen2")
    for folder, repo in ((donor, "org/donor"), (target, "org/target")):
        hub_cache_entry(folder, tmp_path / "hub", repo)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "hub").rglob("*")}
    by_id = transplant("org/donor", "org/target", components=PLAN, alpha=0.5, out=tmp_path / "by-id")
    by_folder = transplant(donor, target, components=PLAN, alpha=0.5, out=tmp_path / "by-folder")
    a, b = tensors(by_id), tensors(by_folder)
    assert set(a) == set(b) and all(raw_bytes(a[n]) == raw_bytes(b[n]) for n in a)
    card = (by_id / "README.md").read_text()
    assert Checkpoint.open(target).sha256(verify=True)["model.safetensors"] in card
    assert Checkpoint.open(donor).sha256(verify=True)["model.safetensors"] in card
    assert Checkpoint.open("org/target").streamable
    assert stamp == {p: p.stat().st_mtime_ns for p in (tmp_path / "hub").rglob("*")}
    # a blob damaged after the download: trusted by name, caught by --verify, nothing written
    blob = (tmp_path / "hub" / "models--org--donor" / "snapshots" / ("a" * 40) / "model.safetensors").resolve()
    blob.write_bytes(blob.read_bytes()[:-1] + b" ")
    with pytest.raises(GraftError, match="damaged"):
        transplant("org/donor", "org/target", components=PLAN, alpha=0.5, out=tmp_path / "checked", verify=True)
    assert not (tmp_path / "checked").exists()
