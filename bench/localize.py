"""Benchmark: streaming shifts vs TransformerLens caches vs raw HF forwards; attribution vs activation patching.

On a synthetic Llama pair (random weights, char tokenizer, built here) and an arithmetic probe set:

1. activation statistics of donor and target over N ∈ {50, 500} prompts (``--small``: 50, 100):
     - raw HF:    the baseline: ``AutoModelForCausalLM.from_pretrained`` loaded directly (its default
                  attention), ``model(input_ids, attention_mask=...)`` per batch for donor and target;
     - bridge copy: the same two forwards through the modules the TransformerLens bridge wraps, no
                  hooks attached (``batching.forward``, eager attention) — what the hooks ride on;
     - streaming: ``analysis.interp.shifts.measure`` (heads + MLPs, answer positions): hooks reduce on the fly;
     - filtered:  ``bridge.run_with_cache(..., names_filter=...)`` per batch with the hook points the
                  statistics need — what a TransformerLens user writes — caches kept, statistics at the end;
     - cache:     the same without ``names_filter``.
   Walls: one process, the variants interleaved round by round, each the best of ``--rounds``. Peak
   memory: each variant once more in its own process (peak RSS above the loaded models: VmHWM, reset
   after loading).
2. attribution patching (one backward) vs activation patching of every head, interleaved, best of
   ``--rounds``: wall ratio and rank agreement (Spearman; top-5 overlap; sign agreement on patching's top 5).

    .venv/bin/python bench/localize.py            # default size (6 layers × 8 heads, hidden 256)
    .venv/bin/python bench/localize.py --small    # 4 layers × 4 heads, hidden 128: a quick check

Torch threads are fixed (``--threads``, default 1). Ratios are printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/timing.py, also when loaded from elsewhere
from timing import fix_threads, interleaved, load_average, use_this_checkout  # noqa: E402

VARIANTS = ("raw HF", "bridge copy", "streaming", "filtered", "cache")


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


class Setup:
    """Both models loaded twice — through graftlm (HF model + bridge) and as plain HF models — and the probe."""

    def __init__(self, donor: str, target: str, task: str, raw_hf: bool = True) -> None:
        from transformers import AutoModelForCausalLM

        from analysis.eval import tasks
        from analysis.interp import shifts
        from analysis.io.models import load

        self.task = tasks.load(task)
        self.d_model, self.t_model = load(donor, dtype="float32"), load(target, dtype="float32")
        self.d_model.bridge, self.t_model.bridge  # boot both before timing  # noqa: B018
        self.raw = [AutoModelForCausalLM.from_pretrained(p, dtype="float32").eval() for p in (donor, target)] \
            if raw_hf else []
        self.lay = shifts.layout_of(self.t_model)
        self.hooks = {s.hook for s in shifts.sites(self.lay, ("head", "mlp"))}
        self._probes: dict = {}

    def probe(self, n: int, batch: int):  # -> probe.Probe
        """The answers every way reads, built once per size: the task's own (random-weight models answer
        none right, so the donor's own correct answers, the probe's default, would leave none)."""
        from analysis.interp import probe

        if (n, batch) not in self._probes:
            self._probes[n, batch] = probe.build(self.task, self.d_model, limit=n, batch_size=batch,
                                                 answers="reference", check=False)
        return self._probes[n, batch]

    def work(self, name: str, n: int, batch: int, warm: bool = False) -> Callable[[], None]:
        """One way of getting the statistics over ``n`` prompts (``warm``: the first batch only)."""
        import torch

        from analysis.interp import batching, shifts

        n = batch if warm else n
        built = self.probe(n, batch)
        batches = built.batches(batch)
        d_model, t_model, lay = self.d_model, self.t_model, self.lay

        def raw_hf() -> None:
            with torch.no_grad():
                for b in batches:
                    for m in self.raw:
                        m(b.ids, attention_mask=b.mask)

        def bridge_copy() -> None:
            with torch.no_grad():
                for b in batches:
                    batching.forward(d_model, b, logits_to_keep=1)
                    batching.forward(t_model, b, logits_to_keep=1)

        def streaming() -> None:
            shifts.measure(d_model, t_model, self.task, kinds=("head", "mlp"), batch_size=batch,
                           limit=n, progress=False, answers="reference", probe=built)

        def caches(filtered: bool) -> None:
            names_filter = (lambda h: h in self.hooks) if filtered else None
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

        return {"raw HF": raw_hf, "bridge copy": bridge_copy, "streaming": streaming,
                "filtered": lambda: caches(True), "cache": lambda: caches(False)}[name]


def peak_child(name: str, donor: str, target: str, task: str, n: int, batch: int) -> dict:
    """In a process of its own: RSS growth above the loaded models while ``name`` runs once over ``n`` prompts."""
    import psutil

    setup = Setup(donor, target, task, raw_hf=name == "raw HF")
    setup.work(name, n, batch, warm=True)()
    work = setup.work(name, n, batch)
    base = psutil.Process().memory_info().rss
    # The high-water mark, reset here: loading (from_pretrained, the bridge's boot) peaks above what
    # the loaded models then hold, and that transient would hide the way's own peak.
    Path("/proc/self/clear_refs").write_text("5")
    work()
    peak = int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
    return {"variant": name, "prompts": n, "peak_extra_mb": max(0, peak - base) / 2**20}


def attribution_vs_patching(setup: Setup, n: int, batch: int, rounds: int) -> dict:
    from scipy.stats import spearmanr

    from analysis.interp import patching, shifts

    d_model, t_model = setup.d_model, setup.t_model
    batches = setup.probe(n, batch).batches(batch)
    heads = shifts.sites(shifts.layout_of(t_model), ("head",))
    patching.attribute(t_model, d_model, batches[:1], heads, progress=False)  # warm-up
    t = interleaved({
        "attribution": lambda: patching.attribute(t_model, d_model, batches, heads, progress=False)["attribution"],
        "patching": lambda: patching.patch(t_model, d_model, batches, heads, progress=False)["patching"],
    }, rounds, log=lambda s: print("  attribution vs patching " + s, flush=True))
    attr, act = t.values["attribution"][-1], t.values["patching"][-1]
    top_p = list(act.sort_values(ascending=False).index[:5])
    top_a = list(attr.sort_values(ascending=False).index[:5])
    return {"heads": len(attr), "prompts": n, "attribution_s": t.best["attribution"], "patching_s": t.best["patching"],
            "spearman": float(spearmanr(attr, act).statistic), "top5_overlap": len(set(top_p) & set(top_a)),
            "top5_sign_agree": int(sum((attr[c] > 0) == (act[c] > 0) for c in top_p)),
            "top5_patching": top_p, "top5_attribution": top_a}


def child(args: list[str]) -> dict:
    """Run this script in a subprocess (threads and import path from the environment); JSON back."""
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="a small model and 50/100 prompts")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each way's best counts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, here and in the child processes")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    a = parser.parse_args()
    use_this_checkout()
    threads = fix_threads(a.threads)
    if a.child:
        name, donor, target, task, n = a.child
        print(json.dumps(peak_child(name, donor, target, task, int(n), a.batch)))
        return
    work = a.work or Path(tempfile.gettempdir()) / ("graftlm-bench-localize" + ("-small" if a.small else ""))
    donor, target, task = build_pair(work, a.small)
    counts = (50, 100) if a.small else (50, 500)
    load_before = load_average()
    setup = Setup(str(donor), str(target), str(task))
    attn = setup.raw[1].config._attn_implementation
    walls = {}
    for n in counts:
        for name in VARIANTS:  # warm-up: first calls allocate
            setup.work(name, n, a.batch, warm=True)()
        ways = {name: setup.work(name, n, a.batch) for name in VARIANTS}
        walls[n] = interleaved(ways, a.rounds, log=lambda s, n=n: print(f"{n:>4} prompts {s}", flush=True))
    ap = attribution_vs_patching(setup, counts[0], a.batch, a.rounds)
    peaks = {}
    if not a.no_memory:
        for n in counts:
            for name in VARIANTS:
                r = child([name, str(donor), str(target), str(task), str(n), "--batch", str(a.batch)])
                peaks[name, n] = r["peak_extra_mb"]
    cfg = setup.raw[1].config
    lo, hi = counts
    print(f"\n{'small' if a.small else 'default'} pair: {cfg.num_hidden_layers} layers × {cfg.num_attention_heads} "
          f"heads, hidden {cfg.hidden_size}; batch {a.batch}; {threads} torch thread(s); best of {a.rounds} "
          f"interleaved rounds; raw HF attention: {attn}, bridge: eager; load average before {load_before}, "
          f"after {load_average()}")
    print(f"{'way':<12}" + "".join(f"{f'wall @ {n}':>12}" for n in counts) +
          ("".join(f"{f'peak @ {n}':>14}" for n in counts) if peaks else "") + "   all rounds")
    for name in VARIANTS:
        print(f"{name:<12}" + "".join(f"{walls[n].best[name]:>10.3f} s" for n in counts) +
              ("".join(f"{f'+{peaks[name, n]:.1f} MB':>14}" for n in counts) if peaks else "") +
              "   " + " | ".join(walls[n].spread(name) for n in counts))
    print(f"attribution {ap['attribution_s']:.3f} s vs activation patching {ap['patching_s']:.3f} s "
          f"({ap['heads']} heads, {ap['prompts']} prompts); Spearman {ap['spearman']:.3f}, "
          f"top-5 overlap {ap['top5_overlap']}/5, sign agreement on patching's top 5: {ap['top5_sign_agree']}/5")
    print(f"  patching's top 5: {', '.join(ap['top5_patching'])}; attribution's: {', '.join(ap['top5_attribution'])}")
    print(f"\nratios (best wall / best wall, {lo} and {hi} prompts):")
    for name in VARIANTS[1:]:
        print(f"  {name:<12} / raw HF forwards     {walls[lo].ratio(name, 'raw HF'):.2f}x @ {lo}, "
              f"{walls[hi].ratio(name, 'raw HF'):.2f}x @ {hi}")
    print(f"  streaming    / filtered run_with_cache  {walls[lo].ratio('streaming', 'filtered'):.2f}x @ {lo}, "
          f"{walls[hi].ratio('streaming', 'filtered'):.2f}x @ {hi}")
    if peaks:
        print("  peak memory from the first to the last prompt count: " + ", ".join(
            f"{name} +{peaks[name, lo]:.0f} → +{peaks[name, hi]:.0f} MB" for name in VARIANTS))
    print(f"  attribution / activation patching wall: {ap['attribution_s'] / ap['patching_s']:.3f}  "
          f"(Spearman {ap['spearman']:.3f}, top-5 overlap {ap['top5_overlap']}/5)")


if __name__ == "__main__":
    main()
