"""Benchmark: streaming shifts vs TransformerLens caches; attribution vs activation patching.

On a synthetic Llama pair (random weights, char tokenizer, built here) and an arithmetic probe set:

1. activation statistics of donor and target over N ∈ {50, 500} prompts, each way in its own process
   (wall time and peak RSS above the loaded models, from wait4):
     - plain:     two forwards per batch (donor, target), no hooks — the floor;
     - streaming: ``analysis.interp.shifts.measure`` (heads + MLPs, answer positions): hooks reduce on the fly;
     - cache:     ``bridge.run_with_cache`` per batch, every cache kept, statistics at the end;
     - filtered:  the same with ``names_filter`` = the hook points the statistics need.
2. attribution patching (one backward) vs activation patching of every head: wall ratio and rank
   agreement (Spearman; top-5 overlap; sign agreement on patching's top 5).

    .venv/bin/python bench/localize.py            # the figures in docs/benchmarks.md
    .venv/bin/python bench/localize.py --small    # a quick check of the script itself

Ratios are printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPEATS = 3
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def build_pair(root: Path, small: bool) -> tuple[Path, Path, Path]:
    from conftest import build_model

    size = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4) if small else \
        dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8)
    size.update(num_key_value_heads=size["num_attention_heads"], max_position_embeddings=256)
    donor, target = root / "donor", root / "target"
    if not (target / "config.json").is_file():
        build_model(donor, "llama", seed=1, **size)
        build_model(target, "llama", seed=2, **size)
    task = root / "probe.jsonl"
    with task.open("w") as fh:
        for i in range(500):
            a, b = (37 * i) % 997, (91 * i + 11) % 991
            fh.write(json.dumps({"id": f"p{i}", "prompt": f"Q: {a} + {b} = ?\nA:", "answer": str(a + b),
                                 "split": "probe"}) + "\n")
    return donor, target, task


def variant(name: str, donor: str, target: str, task: str, n: int, batch: int) -> dict:
    """Run one variant in this process; print wall time and RSS growth."""
    import psutil
    import torch

    from analysis.eval import tasks
    from analysis.interp import batching, probe, shifts
    from analysis.io.models import load

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    t = tasks.load(task)
    d_model, t_model = load(donor, dtype="float32"), load(target, dtype="float32")
    built = probe.build(t, d_model, limit=n, batch_size=batch)  # the answers every variant reads
    batches = built.batches(batch)
    d_model.bridge, t_model.bridge  # boot both before timing  # noqa: B018
    with torch.no_grad():  # warm-up
        batching.forward(t_model, batches[0])
    base = psutil.Process().memory_info().rss
    lay = shifts.layout_of(t_model)

    def work() -> None:
        if name == "plain":
            with torch.no_grad():
                for b in batches:
                    batching.forward(d_model, b, logits_to_keep=1)
                    batching.forward(t_model, b, logits_to_keep=1)
        elif name == "streaming":
            shifts.measure(d_model, t_model, t, kinds=("head", "mlp"), batch_size=batch, limit=n, progress=False,
                           probe=built)
        else:
            hooks = {s.hook for s in shifts.sites(lay, ("head", "mlp"))}
            names_filter = (lambda h: h in hooks) if name == "filtered" else None
            kept: list = []
            with torch.no_grad():
                for b in batches:
                    for m in (d_model, t_model):
                        _, cache = m.bridge.run_with_cache(b.ids, attention_mask=b.mask, names_filter=names_filter)
                        kept.append((b, cache))
                # the statistic, from the kept caches: mean |a| over answer positions per head / MLP
                for b, cache in kept:
                    w = b.weights("answer")
                    for s in shifts.sites(lay, ("head", "mlp")):
                        a = cache[s.hook] if s.hook in cache else cache[s.hook.replace("hook_z", "o.hook_in")]
                        torch.einsum("bpgf,bp->bg", s.view(a).abs(), w)

    walls = []
    for _ in range(REPEATS):  # the machine is shared: the fastest of a few runs is the cost
        start = time.perf_counter()
        work()
        walls.append(time.perf_counter() - start)
    wall = min(walls)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": name, "prompts": n, "wall_s": wall, "peak_extra_mb": max(0, peak - base) / 2**20}


def attribution_vs_patching(donor: str, target: str, task: str, n: int, batch: int) -> dict:
    import torch
    from scipy.stats import spearmanr

    from analysis.eval import tasks
    from analysis.interp import patching, probe, shifts
    from analysis.io.models import load

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    t = tasks.load(task)
    d_model, t_model = load(donor, dtype="float32"), load(target, dtype="float32")
    batches = probe.build(t, d_model, limit=n, batch_size=batch).batches(batch)
    heads = shifts.sites(shifts.layout_of(t_model), ("head",))
    patching.attribute(t_model, d_model, batches[:1], heads, progress=False)  # warm-up (boots bridges)
    t_attr = t_patch = float("inf")
    for _ in range(REPEATS):  # fastest of a few: the machine is shared
        start = time.perf_counter()
        attr = patching.attribute(t_model, d_model, batches, heads, progress=False)["attribution"]
        t_attr = min(t_attr, time.perf_counter() - start)
        start = time.perf_counter()
        act = patching.patch(t_model, d_model, batches, heads, progress=False)["patching"]
        t_patch = min(t_patch, time.perf_counter() - start)
    top_p = list(act.sort_values(ascending=False).index[:5])
    top_a = list(attr.sort_values(ascending=False).index[:5])
    return {"heads": len(attr), "prompts": n, "attribution_s": t_attr, "patching_s": t_patch,
            "spearman": float(spearmanr(attr, act).statistic), "top5_overlap": len(set(top_p) & set(top_a)),
            "top5_sign_agree": int(sum((attr[c] > 0) == (act[c] > 0) for c in top_p))}


def child(args: list[str]) -> dict:
    """Run this script in a subprocess for one measurement; wall and peak RSS come back as JSON."""
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="a small model and 50/100 prompts")
    parser.add_argument("--child", nargs="+")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--work", type=Path, default=None)
    a = parser.parse_args()
    if a.child:
        kind, *rest = a.child
        if kind == "attr":
            donor, target, task, n = rest
            print(json.dumps(attribution_vs_patching(donor, target, task, int(n), a.batch)))
        else:
            donor, target, task, n = rest
            print(json.dumps(variant(kind, donor, target, task, int(n), a.batch)))
        return
    work = a.work or Path(tempfile.gettempdir()) / ("graftlm-bench-localize" + ("-small" if a.small else ""))
    donor, target, task = build_pair(work, a.small)
    counts = (50, 100) if a.small else (50, 500)
    rows = []
    for n in counts:
        for name in ("plain", "streaming", "filtered", "cache"):
            r = child([name, str(donor), str(target), str(task), str(n), "--batch", str(a.batch)])
            rows.append(r)
            print(f"{n:>4} prompts  {name:<10} {r['wall_s']:7.2f} s   peak +{r['peak_extra_mb']:7.1f} MB", flush=True)
    ap = child(["attr", str(donor), str(target), str(task), str(counts[0]), "--batch", str(a.batch)])
    print(f"attribution {ap['attribution_s']:.2f} s vs activation patching {ap['patching_s']:.2f} s "
          f"({ap['heads']} heads, {ap['prompts']} prompts); Spearman {ap['spearman']:.3f}, "
          f"top-5 overlap {ap['top5_overlap']}/5, sign agreement on patching's top 5: {ap['top5_sign_agree']}/5")
    get = {(r["variant"], r["prompts"]): r for r in rows}
    print("\nratios (wall vs plain forwards; memory growth from the first to the last prompt count):")
    lo, hi = counts
    for name in ("streaming", "filtered", "cache"):
        print(f"  {name:<10} wall {get[name, lo]['wall_s'] / get['plain', lo]['wall_s']:.2f}x @ {lo}, "
              f"{get[name, hi]['wall_s'] / get['plain', hi]['wall_s']:.2f}x @ {hi};  "
              f"peak +{get[name, lo]['peak_extra_mb']:.0f} MB → +{get[name, hi]['peak_extra_mb']:.0f} MB")
    print(f"  attribution / activation patching wall: {ap['attribution_s'] / ap['patching_s']:.3f}  "
          f"(Spearman {ap['spearman']:.3f})")


if __name__ == "__main__":
    main()
