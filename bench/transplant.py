"""Benchmark: transplant 16 linear components at α = 0.5 on a synthetic ~1B-parameter Llama.

Runs, on the same donor/target pair (sharded bf16 safetensors) and in one go:
  - graftlm writing an HF folder, and writing a graft patch;
  - mergekit (`mergekit-yaml`, a `linear` merge whose per-tensor weights give the same tensors);
  - `cp -r` of the target, the disk's limit for writing a model folder.
Each runs in its own process; wall time and peak RSS (from wait4) are reported, graftlm's output is
checked equal to mergekit's, and the ratios are printed last.

    .venv/bin/python bench/transplant.py            # ~1B parameters (needs ~10 GB of disk)
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

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


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


def measure(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one command, measured by GNU time in its own process."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-o", report.name, "-f", "%M", *cmd],
                              env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"failed: {' '.join(cmd)}")
        return wall, int(report.read().split()[-1]) / 1024


def tensors(folder: Path, names: list[str]) -> dict[str, torch.Tensor]:
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())["weight_map"] if index_file.is_file() else {
        n: "model.safetensors" for n in names}
    out = {}
    for n in names:
        with safe_open(str(folder / index[n]), framework="pt") as fh:
            out[n] = fh.get_tensor(n)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a ~20M-parameter model instead of ~1B")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "graftlm-bench-transplant")
    args = parser.parse_args()
    cfg = llama_config(args.small)
    work = args.workdir / ("small" if args.small else "1b")
    donor, target = work / "donor", work / "target"
    print(f"building donor and target in {work} …", flush=True)
    build(donor, cfg, seed=1)
    build(target, cfg, seed=2)
    with open(target / "model.safetensors.index.json") as fh:
        n_params = json.load(fh)["metadata"]["total_size"] // 2
    layers = range(0, cfg["num_hidden_layers"])
    # 16 linear components spread over the layers: attention o and MLP down projections
    comps = [f"L{layer}.{'mlp.down' if k % 2 else 'attn.o'}" for k, layer in enumerate(list(layers)[:16])]
    hf_names = [f"model.layers.{c.split('.')[0][1:]}." + ("mlp.down_proj.weight" if "down" in c else
                                                          "self_attn.o_proj.weight") for c in comps]
    outs = work / "outs"
    shutil.rmtree(outs, ignore_errors=True)
    outs.mkdir()
    results: dict[str, tuple[float, float]] = {}
    py = sys.executable
    transplant_code = ("import sys; from analysis.transplant import transplant; "
                       "transplant(sys.argv[1], sys.argv[2], components=sys.argv[4:], strength=0.5, out=sys.argv[3]"
                       "{patch})")
    cold_cache = {"GRAFTLM_CACHE": str(outs / "hash-cache")}  # hashes computed, not taken from a cache
    results["cp -r target"] = measure(["cp", "-r", str(target), str(outs / "cp")])
    results["graftlm → folder"] = measure(
        [py, "-c", transplant_code.format(patch=""), str(donor), str(target), str(outs / "ours"), *comps], cold_cache)
    # The same again with the sources' sha256 remembered from the first run (as in a sweep, or any second
    # transplant from the same checkpoints): what remains is start-up, copy and arithmetic.
    results["graftlm → folder, hashes cached"] = measure(
        [py, "-c", transplant_code.format(patch=""), str(donor), str(target), str(outs / "ours2"), *comps], cold_cache)
    results["python -c 'import analysis'"] = measure([py, "-c", "import analysis"])
    results["graftlm → patch"] = measure(
        [py, "-c", transplant_code.format(patch=", patch=True"), str(donor), str(target), str(outs / "patch"), *comps],
        {"GRAFTLM_CACHE": str(outs / "hash-cache-2")})
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
    results["mergekit linear"] = measure([str(BIN / "mergekit-yaml"), str(work / "mergekit.yml"), str(outs / "mk"),
                                          "--quiet", "--out-shard-size", "1B"])
    # same tensors?
    probe = hf_names + ["model.layers.0.mlp.up_proj.weight", "lm_head.weight"]
    ours, theirs = tensors(outs / "ours", probe), tensors(outs / "mk", probe)
    equal = all(torch.equal(ours[n], theirs[n]) for n in probe)
    max_diff = max(float((ours[n].float() - theirs[n].float()).abs().max()) for n in probe)

    print(f"\n{n_params / 1e9:.2f}B parameters, bf16, {len(comps)} linear components at α = 0.5")
    print(f"graftlm folder == mergekit output on {len(probe)} checked tensors: {equal} (max |Δ| {max_diff:g})")
    print(f"{'tool':<34}{'wall s':>10}{'peak RSS MiB':>15}")
    for tool, (wall, rss) in results.items():
        print(f"{tool:<34}{wall:>10.2f}{rss:>15.0f}")
    cp, ours_f, ours_p, mk = (results[k] for k in ("cp -r target", "graftlm → folder", "graftlm → patch",
                                                  "mergekit linear"))
    warm = results["graftlm → folder, hashes cached"]
    print(f"\nfolder / cp -r          wall {ours_f[0] / cp[0]:.2f}×   (goal ≤ 1.5×); hashes cached {warm[0] / cp[0]:.2f}×")
    print(f"mergekit / folder       wall {mk[0] / ours_f[0]:.2f}×   (goal ≥ 2×), peak RSS folder/mergekit "
          f"{ours_f[1] / mk[1]:.2f}× (goal ≤ 1)")
    print(f"mergekit / patch        wall {mk[0] / ours_p[0]:.2f}×   (goal ≥ 20×)")


if __name__ == "__main__":
    main()
