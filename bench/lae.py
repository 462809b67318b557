"""Benchmark: generate-mode activation statistics (the paper's ``lae``) on a real model and a few-shot task.

The paper's statistic is read at the newest token of every greedy decoding step, on both models. Ways,
interleaved round by round, each the best of ``--rounds``, on the same probe items:

- ``raw HF generate`` — the floor: ``model.generate`` (greedy, KV cache, left padding) of donor and
  target on the same prompts, no statistics at all;
- ``graftlm lae`` — ``shifts.measure(mode="generate")``: hooks on the HF modules (``interp/hfhooks.py``),
  the KV cache, the few-shot opening run once per batch;
- ``bridge hooks`` — the same statistics through TransformerLens bridge hooks (what graftlm did before:
  a booted bridge leaves the KV cache empty, so every step re-runs the whole sequence).

The pair is SmolLM2-135M-Instruct and a copy with noise in the MLPs of layers 20–29 (bench/sweep.py's
scoring pair); the task GSM8K, 8-shot (a ~740-token opening every prompt shares). The statistics of the two
graftlm ways are compared (they must agree to float rounding). Ratios are printed last.

    .venv/bin/python bench/lae.py                   # 8 probe items, 32 new tokens, 2 rounds
    .venv/bin/python bench/lae.py --n 4 --tokens 16 --rounds 1
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from timing import fix_threads, interleaved, load_average, use_this_checkout  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="probe items")
    parser.add_argument("--tokens", type=int, default=32, help="max_new_tokens")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    use_this_checkout()
    fix_threads(args.threads)
    import torch
    from sweep import scoring_config  # the bench's real pair, built once

    from analysis.eval import tasks
    from analysis.interp import hfhooks, shifts
    from analysis.io.models import load

    cfg = scoring_config(40, 60)
    donor, target = load(cfg.donor), load(cfg.target)
    task = tasks.load("gsm8k")
    items = task.items("probe", args.n)
    prompts = [task.render(it, target.tokenizer) for it in items]
    kw = dict(answers="reference", kinds=("head", "kv", "mlp"), mode="generate", max_new_tokens=args.tokens,
              limit=args.n, batch_size=args.n, progress=False)

    def raw_generate() -> None:
        tok = target.tokenizer
        tok.padding_side = "left"
        enc = tok(prompts, return_tensors="pt", padding=True)
        with torch.inference_mode():
            for loaded in (donor, target):
                loaded.model.generate(**enc, max_new_tokens=args.tokens, do_sample=False,
                                      pad_token_id=tok.pad_token_id)

    def ours() -> object:
        return shifts.measure(donor, target, task, **kw)

    def bridge() -> object:
        real = hfhooks.points
        hfhooks.points = lambda *_: None  # type: ignore[assignment]
        try:
            return shifts.measure(donor, target, task, **kw)
        finally:
            hfhooks.points = real

    ways = {"raw HF generate": raw_generate, "graftlm lae": ours, "bridge hooks": bridge}
    t = interleaved(ways, args.rounds, log=lambda line: print(line, flush=True))
    a, b = t.best_value("graftlm lae"), t.best_value("bridge hooks")
    cols = ["donor", "target", "shift"]
    diff = float((a[cols] - b[cols]).abs().max().max())
    print(f"\nGSM8K 8-shot, {args.n} probe items, {args.tokens} new tokens, donor and target "
          f"(SmolLM2-135M pair), {torch.get_num_threads()} thread(s); best of {args.rounds} interleaved rounds; "
          f"load average {load_average()}")
    for label, wall in t.best.items():
        print(f"{label:18s} {wall:8.2f} s   all rounds {t.spread(label)}")
    print(f"largest difference between the two ways' statistics: {diff:.2e}")
    print(f"\ngraftlm lae / bridge hooks: {t.ratio('graftlm lae', 'bridge hooks'):.3f}x; "
          f"graftlm lae / raw HF generate: {t.ratio('graftlm lae', 'raw HF generate'):.2f}x")


if __name__ == "__main__":
    main()
