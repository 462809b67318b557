"""Benchmark: transplant 16 linear components at α = 0.5 on a synthetic ~1B-parameter Llama.

Runs, on the same donor/target pair (sharded bf16 safetensors) and in one go:
  - the `graftlm transplant` command writing an HF folder, and writing a graft patch, each with the
    sources' sha256 computed ("cold": an empty hash cache) and remembered from an earlier run ("warm");
  - mergekit (`mergekit-yaml`, a `linear` merge whose per-tensor weights give the same tensors);
  - the same, cold, with the pair named by hub id from a hub cache (as a user's downloaded models are): the
    weights' sha256 are their blobs' names there, so a first transplant reads no source just to hash it;
    and with the pair as folders that ``hf download --local-dir`` wrote (the same files, each weight
    file's sha256 in the download record beside it);
  - `cp -r` of the target, the disk's limit for writing a model folder.
Each runs in its own process; wall time and peak RSS (from GNU time) are reported, best of
``--repeat`` rounds (the machine's page cache and other users make single runs swing). graftlm's
folder is compared with mergekit's output on every tensor, and the ratios are printed last. The
tools run interleaved, every tool once per round; torch/OpenMP threads of every child are fixed
(``--threads``, default 1: mergekit's torch; graftlm's copy and blend workers are its own), and the
``graftlm`` command imports this checkout's ``analysis`` (PYTHONPATH), not whatever the virtualenv's
editable install points at. mergekit: ``mergekit-yaml`` beside this Python, else the ``mergekit``
module importable from it (e.g. ``pip install --target DIR --no-deps mergekit==0.1.5 immutables peft``
and ``PYTHONPATH=DIR``).

    .venv/bin/python bench/transplant.py            # ~1B parameters (needs ~14 GB of disk)
    .venv/bin/python bench/transplant.py --small    # a quick check of the script itself
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/timing.py, also when loaded from elsewhere
from timing import fix_threads, use_this_checkout  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def mergekit_yaml() -> list[str]:
    """The ``mergekit-yaml`` command: the console script beside this Python, else the module's entry point."""
    if (BIN / "mergekit-yaml").is_file():
        return [str(BIN / "mergekit-yaml")]
    import importlib.util

    if importlib.util.find_spec("mergekit") is None:
        raise SystemExit("needs mergekit: pip install --no-deps mergekit==0.1.5 immutables peft (or --target "
                         "DIR and PYTHONPATH=DIR)")
    return [sys.executable, "-c", "import sys; from mergekit.scripts.run_yaml import main; sys.argv[0] = "
            "'mergekit-yaml'; main()"]


HASH_BOTH = """import sys, hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from analysis.io.checkpoint import mapped_chunks
def digest(f):
    h = hashlib.sha256()
    for _, chunk in mapped_chunks(f):
        h.update(chunk)
    return h.hexdigest()
files = sorted(f for d in sys.argv[1:] for f in Path(d).glob('*.safetensors'))
with ThreadPoolExecutor(len(files)) as pool:
    list(pool.map(digest, files))
"""


def llama_config(small: bool) -> dict:
    if small:
        return dict(hidden_size=256, intermediate_size=704, num_hidden_layers=16, num_attention_heads=8,
                    num_key_value_heads=2, vocab_size=4096)
    # 20 layers × 45.1M + 2 × 65.5M (embeddings, LM head) ≈ 1.03B parameters
    return dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=20, num_attention_heads=16,
                num_key_value_heads=4, vocab_size=32000)


def build(folder: Path, cfg: dict, seed: int, shard_bytes: int = 1 << 30) -> None:
    """Write a random Llama as sharded bf16 safetensors + index, tensor by tensor (no model in memory)."""
    if (folder / "model.safetensors.index.json").is_file():
        return
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**cfg, max_position_embeddings=2048, dtype="bfloat16", tie_word_embeddings=False,
                         architectures=["LlamaForCausalLM"])
    config.save_pretrained(folder)
    h, i, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_key_value_heads"]
    hd = h // cfg["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes |= {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv * hd, h),
                   p + "self_attn.v_proj.weight": (kv * hd, h), p + "self_attn.o_proj.weight": (h, h),
                   p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                   p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                   p + "post_attention_layernorm.weight": (h,)}
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (cfg["vocab_size"], h)}
    gen = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    weight_map, files = {}, []

    def flush() -> None:
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shards[-1], str(folder / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update(dict.fromkeys(shards[-1], name))

    for name, shape in shapes.items():
        tensor = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        if size + tensor.numel() * 2 > shard_bytes and shards[-1]:
            flush()
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.numel() * 2
    flush()
    total = sum(torch.Size(s).numel() for s in shapes.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total * 2}, "weight_map": weight_map}, indent=2))


def measure(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one command, measured by GNU time in its own process."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-o", report.name, "-f", "%M", *cmd], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:  # (mergekit logs a harmless traceback: the synthetic pair has no tokenizer)
            raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr}")
        return wall, int(report.read().split()[-1]) / 1024


def hub_entry(folder: Path, hub: Path, repo_id: str) -> None:
    """``folder`` as huggingface_hub lays out a download of ``repo_id`` in ``hub``: weight files as blobs
    named by their sha256 (hard links here: the same bytes, hashed once while setting up, untimed), small
    files by a digest of their own, all linked from ``snapshots/COMMIT`` with ``refs/main`` naming it."""
    import hashlib

    repo = hub / ("models--" + repo_id.replace("/", "--"))
    if (repo / "refs" / "main").is_file():
        return
    snapshot = repo / "snapshots" / ("0" * 40)
    for sub in (repo / "blobs", repo / "refs", snapshot):
        sub.mkdir(parents=True, exist_ok=True)
    for f in sorted(folder.iterdir()):
        with open(f, "rb") as fh:
            digest = hashlib.file_digest(fh, "sha256" if f.suffix == ".safetensors" else "sha1").hexdigest()
        os.link(f, repo / "blobs" / digest)
        (snapshot / f.name).symlink_to(Path("../../blobs") / digest)
    (repo / "refs" / "main").write_text("0" * 40)


def local_dir_entry(hub: Path, repo_id: str, dest: Path) -> None:
    """The hub cache's copy of ``repo_id`` as ``hf download ID --local-dir DEST`` leaves it: the files
    (hard links to the blobs) and, per file, ``.cache/huggingface/download/NAME.metadata`` — commit, etag
    (a weight file's sha256, the blob's name) and the time of the download."""
    import time

    snapshot = hub / ("models--" + repo_id.replace("/", "--")) / "snapshots" / ("0" * 40)
    records = dest / ".cache" / "huggingface" / "download"
    if records.is_dir():
        return
    records.mkdir(parents=True)
    for link in sorted(snapshot.iterdir()):
        blob = link.resolve()
        os.link(blob, dest / link.name)
        (records / f"{link.name}.metadata").write_text(f"{'0' * 40}\n{blob.name}\n{time.time()}\n")


def tensor(folder: Path, name: str) -> torch.Tensor:
    index_file = folder / "model.safetensors.index.json"
    file = json.loads(index_file.read_text())["weight_map"][name] if index_file.is_file() else "model.safetensors"
    with safe_open(str(folder / file), framework="pt") as fh:
        return fh.get_tensor(name)


def compare(ours: Path, theirs: Path, names: list[str]) -> tuple[int, int, float]:
    """Elements whose bits differ, elements compared, and the largest |difference|, over ``names``."""
    differ = total = 0
    worst = 0.0
    for n in names:
        a, b = tensor(ours, n), tensor(theirs, n)
        assert a.shape == b.shape and a.dtype == b.dtype, n
        as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        neq = a.view(as_int) != b.view(as_int)
        differ += int(neq.sum())
        total += a.numel()
        if neq.any():
            worst = max(worst, float((a.float() - b.float()).abs().max()))
    return differ, total, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a ~20M-parameter model instead of ~1B")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "graftlm-bench-transplant")
    parser.add_argument("--repeat", "--rounds", type=int, default=3, help="rounds; each tool's best round is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads of every child process")
    args = parser.parse_args()
    use_this_checkout()  # the graftlm command and `python -c` import this checkout's analysis
    fix_threads(args.threads)
    cfg = llama_config(args.small)
    work = args.workdir / ("small" if args.small else "1b")
    donor, target = work / "donor", work / "target"
    print(f"building donor and target in {work} …", flush=True)
    build(donor, cfg, seed=1)
    build(target, cfg, seed=2)
    with open(target / "model.safetensors.index.json") as fh:
        n_params = json.load(fh)["metadata"]["total_size"] // 2
    hub = work / "hub"
    hub_entry(donor, hub, "bench/donor")
    hub_entry(target, hub, "bench/target")
    local = work / "local-dir"
    local_dir_entry(hub, "bench/donor", local / "donor")
    local_dir_entry(hub, "bench/target", local / "target")
    layers = range(0, cfg["num_hidden_layers"])
    # 16 linear components spread over the layers: attention o and MLP down projections
    comps = [f"L{layer}.{'mlp.down' if k % 2 else 'attn.o'}" for k, layer in enumerate(list(layers)[:16])]
    hf_names = [f"model.layers.{c.split('.')[0][1:]}." + ("mlp.down_proj.weight" if "down" in c else
                                                          "self_attn.o_proj.weight") for c in comps]
    outs = work / "outs"
    py, graftlm = sys.executable, str(BIN / "graftlm")
    blend_args = ["--strength", "0.5", *[arg for c in comps for arg in ("-c", c)]]
    cli = [graftlm, "transplant", "--donor", str(donor), "--target", str(target), *blend_args]
    cli_hub = [graftlm, "transplant", "--donor", "bench/donor", "--target", "bench/target", *blend_args]
    cli_local = [graftlm, "transplant", "--donor", str(local / "donor"), "--target", str(local / "target"), *blend_args]
    weight_rules = lambda on_plan, off_plan: [  # noqa: E731
        *[{"filter": n.removesuffix(".weight"), "value": on_plan} for n in hf_names], {"value": off_plan}]
    mk_config = {
        "merge_method": "linear",
        "parameters": {"normalize": False},
        "models": [{"model": str(target), "parameters": {"weight": weight_rules(0.5, 1.0)}},
                   {"model": str(donor), "parameters": {"weight": weight_rules(0.5, 0.0)}}],
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    (work / "mergekit.yml").write_text(json.dumps(mk_config))
    runs: dict[str, list[tuple[float, float]]] = {}
    load_before = os.getloadavg()
    # Python as after a first run: byte-code cached (a sandbox may set PYTHONDONTWRITEBYTECODE)
    env_all = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    cold = {"GRAFTLM_CACHE": str(outs / "hash-cache")}  # emptied before each run: the sources' sha256 computed
    warm = {"GRAFTLM_CACHE": str(work / "hash-cache")}  # remembered from an earlier run (as in any later one)
    shutil.rmtree(outs, ignore_errors=True)
    outs.mkdir()
    subprocess.run([*cli, "--patch", "--out", str(outs / "prime")], env={**env_all, **warm}, check=True,
                   stdout=subprocess.DEVNULL)  # fills the warm cache and the byte-code cache
    shutil.rmtree(outs / "prime")
    steps: dict[str, tuple[list[str], Path | None]] = {  # command, and the folder it writes
        "cp -r target": (["cp", "-r", str(target), str(outs / "cp")], outs / "cp"),
        "graftlm → folder, cold hashes": ([*cli, "--out", str(outs / "folder-cold")], outs / "folder-cold"),
        "graftlm → folder, warm hashes": ([*cli, "--out", str(outs / "folder")], outs / "folder"),
        "graftlm → folder, cold, hub ids": ([*cli_hub, "--out", str(outs / "folder-hub")], outs / "folder-hub"),
        "graftlm → folder, cold, local-dir": ([*cli_local, "--out", str(outs / "folder-local")], outs / "folder-local"),
        "graftlm → patch, cold hashes": ([*cli, "--patch", "--out", str(outs / "patch-cold")], outs / "patch-cold"),
        "graftlm → patch, warm hashes": ([*cli, "--patch", "--out", str(outs / "patch")], outs / "patch"),
        "graftlm start-up (import analysis.cli)": ([py, "-c", "import analysis.cli, analysis.transplant"], None),
        # the floor of a cold transplant of folders never hashed: both sources' sha256, every file at once
        "sha256 of both sources alone": ([py, "-c", HASH_BOTH, str(donor), str(target)], None),
        "mergekit linear": ([*mergekit_yaml(), str(work / "mergekit.yml"), str(outs / "mk"), "--quiet",
                             "--out-shard-size", "1B"], outs / "mk"),
    }
    for round_ in range(args.repeat):
        for tool, (cmd, written) in steps.items():
            shutil.rmtree(outs / "hash-cache", ignore_errors=True)
            env = {**env_all, **(cold if "cold" in tool else warm), "HF_HUB_CACHE": str(hub)}
            runs.setdefault(tool, []).append(measure(cmd, env))
            # Each output goes at once (but the last folder and mergekit's, compared below): gigabytes
            # of page cache left behind would push the sources out of memory, and every later tool
            # would read them from disk.
            if written is not None and not (round_ == args.repeat - 1 and written.name in ("folder", "folder-hub", "folder-local", "mk")):
                shutil.rmtree(written)
        print(f"round {round_ + 1}: " + "; ".join(f"{k} {v[-1][0]:.2f} s" for k, v in runs.items()), flush=True)
    results = {tool: min(r) for tool, r in runs.items()}  # the best round's wall time, with its peak RSS
    load = os.getloadavg()

    # same tensors? every tensor of graftlm's folder against mergekit's output
    names = sorted(json.loads((target / "model.safetensors.index.json").read_text())["weight_map"])
    differ, total, worst = compare(outs / "folder", outs / "mk", names)
    changed_differ, changed_total, _ = compare(outs / "folder", outs / "mk", hf_names)
    hub_differ, _, _ = compare(outs / "folder-hub", outs / "folder", names)
    local_differ, _, _ = compare(outs / "folder-local", outs / "folder", names)
    print(f"\n{n_params / 1e9:.2f}B parameters, bf16, {len(comps)} linear components at α = 0.5")
    print(f"graftlm folder vs mergekit output, all {len(names)} tensors: {differ} of {total} elements differ "
          f"({changed_differ} of the {changed_total} blended), max |Δ| {worst:g}; by hub id vs by folder: "
          f"{hub_differ} differ; from local-dir folders: {local_differ}")
    print(f"best of {args.repeat} interleaved rounds, {args.threads} torch/OpenMP thread(s) a child; load average (1, 5, 15 min) before "
          f"{' '.join(f'{x:.2f}' for x in load_before)}, after {' '.join(f'{x:.2f}' for x in load)}")
    print(f"{'tool':<40}{'wall s':>9}{'peak RSS MiB':>15}   all rounds")
    for tool, (wall, rss) in results.items():
        print(f"{tool:<40}{wall:>9.2f}{rss:>15.0f}   " + " ".join(f"{w:.2f}" for w, _ in runs[tool]))
    cp, mk = results["cp -r target"], results["mergekit linear"]
    fc, fw = results["graftlm → folder, cold hashes"], results["graftlm → folder, warm hashes"]
    pc, pw = results["graftlm → patch, cold hashes"], results["graftlm → patch, warm hashes"]
    fh = results["graftlm → folder, cold, hub ids"]
    floor = results["sha256 of both sources alone"]
    print(f"\ncold folder / the sha256 of both sources alone {fc[0] / floor[0]:.2f}× (what hashing never-hashed "
          f"folders leaves to win); the hashing alone / cp -r {floor[0] / cp[0]:.2f}×")
    print(f"folder / cp -r          wall {fw[0] / cp[0]:.2f}× warm, {fc[0] / cp[0]:.2f}× cold   (goal ≤ 1.5×)")
    print(f"mergekit / folder       wall {mk[0] / fw[0]:.2f}× warm, {mk[0] / fc[0]:.2f}× cold   (goal ≥ 2×); "
          f"peak RSS folder / mergekit {max(fw[1], fc[1]) / mk[1]:.2f}× (goal ≤ 1)")
    print(f"mergekit / patch        wall {mk[0] / pw[0]:.2f}× warm, {mk[0] / pc[0]:.2f}× cold   (goal ≥ 20×)")
    fl = results["graftlm → folder, cold, local-dir"]
    print(f"cold, from `hf download --local-dir` folders: folder / cp -r {fl[0] / cp[0]:.2f}× (goal ≤ 1.5×), "
          f"mergekit / folder {mk[0] / fl[0]:.2f}×")
    print(f"cold, by hub id: folder / cp -r {fh[0] / cp[0]:.2f}× (goal ≤ 1.5×), mergekit / folder {mk[0] / fh[0]:.2f}× "
          f"(goal ≥ 15×)")


if __name__ == "__main__":
    main()
