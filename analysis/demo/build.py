"""Build the embedded demo models: ``python -m analysis.demo.build [--steps N] [--out DIR]``.

Three generations of one tiny Llama (GQA), trained from a fixed seed on CPU on synthetic data
(``analysis.demo.data``):

- ``gen1``: skills A (arith), B (reverse) and filler text, from scratch.
- ``gen2``: gen1 trained further on a shifted mix without A (B, the new skill C = upper, filler): it
  forgets A and keeps or improves B — the "new version underperforms the previous one" setting.
- ``gen1-chat``: gen1 trained further on the instruction format of A and B — base vs instruction-tuned.

Writes ``OUT/models/{gen1,gen2,gen1-chat}/`` (HF folders, bf16 safetensors), ``OUT/models/MANIFEST.json``
(sha256 of every file), the demo tasks in ``OUT/tasks/`` and ``OUT/build-report.json`` (accuracies with
95% intervals on every test split, and the layer / MLP / attention copy probe). ``--steps N`` sets
gen1's steps and scales the later phases with it; the default is the shipped recipe. Without ``--out`` it
overwrites the shipped package files.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import platform
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from analysis.demo import MODEL_NAMES, data

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Phase:
    """One training phase: the data mixture, its length and its learning-rate schedule."""

    name: str
    parent: str | None  # None: from scratch
    mix: dict[str, float]
    steps: int
    lr: float
    warmup: int
    seed: int
    schedule: str = "cosine"  # after warmup: "cosine" (down to 10% of lr) or "constant"


@dataclass(frozen=True)
class Recipe:
    """Everything the build depends on besides the code."""

    seed: int = 0
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 512
    seq_len: int = 96  # training rows: <bos> + packed lines, cut at this length (tokens)
    batch: int = 32
    weight_decay: float = 0.1
    threads: int = 2
    phases: tuple[Phase, ...] = field(default_factory=tuple)


def default_phases(gen1_steps: int = 800) -> tuple[Phase, ...]:
    """The shipped recipe; the later phases' lengths scale with gen1's.

    gen2's length and learning rate were chosen on dev with checkpoints every 50 steps: arith falls
    from ~100% to ~40% after 200 steps and to ~5-10% after 250-300, while a single copied layer of gen1
    still recovers a good part of it (docs/demo-models.md) — forgotten, but not rebuilt from scratch.
    gen1-chat's were chosen the same way: the chat formats reach ~100% on dev by step 150.
    """
    s2 = max(1, round(gen1_steps * 0.375))
    s3 = max(1, round(gen1_steps * 0.375))
    return (
        Phase("gen1", None, {"arith:plain": 0.5, "reverse:plain": 0.3, "text": 0.2},
              gen1_steps, 3e-3, min(100, gen1_steps // 8 + 1), 1),
        # Continued training at a constant rate, as a newer release's extra pretraining would be.
        Phase("gen2", "gen1", {"reverse:plain": 0.4, "upper:plain": 0.35, "text": 0.25},
              s2, 1e-3, min(50, s2 // 6 + 1), 2, schedule="constant"),
        Phase("gen1-chat", "gen1", {"arith:chat": 0.45, "reverse:chat": 0.35, "text": 0.2},
              s3, 2e-3, min(50, s3 // 6 + 1), 3),
    )


# ---------------------------------------------------------------- model and data


def new_model(recipe: Recipe, tok):  # -> LlamaForCausalLM
    """A fresh Llama with GQA, initialised from the recipe's seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=recipe.hidden, intermediate_size=recipe.intermediate,
        num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.kv_heads, max_position_embeddings=128, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(recipe.seed)
    return LlamaForCausalLM(config)


def batches(stream: data.Stream, vocab: dict[str, int], recipe: Recipe):
    """Endless (ids, labels) pairs of shape (batch, seq_len): <bos> then whole training lines, cut at
    the row length; labels are -100 on <bos> and on every line's context (see ``data.Stream.line``)."""
    bos = vocab[data.BOS]
    while True:
        ids_rows, label_rows = [], []
        for _ in range(recipe.batch):
            ids, labels = [bos], [-100]
            while len(ids) < recipe.seq_len:
                context, target = stream.line()
                c, t = [vocab[ch] for ch in context], [vocab[ch] for ch in target]
                ids += c + t
                labels += [-100] * len(c) + t
            ids_rows.append(ids[:recipe.seq_len])
            label_rows.append(labels[:recipe.seq_len])
        yield torch.tensor(ids_rows), torch.tensor(label_rows)


def train(model, phase: Phase, recipe: Recipe, held: data.HeldOut, vocab: dict[str, int],
          log: bool = True) -> list[tuple[int, float]]:
    """Train ``model`` in place for one phase (AdamW, linear warmup, then the phase's schedule); returns
    the loss curve."""
    torch.manual_seed(phase.seed)
    stream = data.Stream(phase.mix, held, seed=recipe.seed * 1000 + phase.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=phase.lr, betas=(0.9, 0.95),
                            weight_decay=recipe.weight_decay)

    def lr_at(step: int) -> float:
        if step < phase.warmup:
            return phase.lr * (step + 1) / phase.warmup
        if phase.schedule == "constant":
            return phase.lr
        t = (step - phase.warmup) / max(1, phase.steps - phase.warmup)
        return phase.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    model.train()
    curve: list[tuple[int, float]] = []
    running = None
    t0 = time.time()
    for step, (ids, labels) in zip(range(phase.steps), batches(stream, vocab, recipe), strict=False):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=ids, labels=labels).loss  # HF shifts the labels itself
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % 100 == 0 or step + 1 == phase.steps:
            curve.append((step + 1, round(running, 4)))
            if log:
                print(f"  {phase.name} step {step + 1}/{phase.steps} loss {running:.3f} "
                      f"({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    return curve


# ---------------------------------------------------------------- writing


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(model, tok, folder: Path) -> None:
    """An HF folder: bf16 safetensors, config (float32 compute), generation config (greedy, stop at a
    newline), tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    out = copy.deepcopy(model).to(torch.bfloat16)
    gc = out.generation_config
    gc.do_sample = False
    gc.max_new_tokens = 16
    gc.eos_token_id = [tok.convert_tokens_to_ids("\n"), tok.eos_token_id]  # answers end at a newline
    gc.pad_token_id = tok.pad_token_id
    gc.bos_token_id = tok.bos_token_id
    out.save_pretrained(folder)
    tok.save_pretrained(folder)
    # Stored in bf16 to stay small, computed in float32: dtype "auto" (the loader's default) reads this
    # key. Full precision keeps activation shifts and attribution gradients clean; accuracy barely
    # cares (measured: bf16 compute changes at most one answer in 400).
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = "float32"
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


TASK_NOTES = {
    "arith": "Skill A: two-digit addition. gen1 learned it; gen2 was trained on without it and forgot it.",
    "reverse": "Skill B: reverse a lowercase word. Every generation trained on it; gen2 kept improving.",
    "upper": "Skill C: uppercase a lowercase word. New in gen2; gen1 and gen1-chat never saw it.",
    "text": "Retention: perplexity on held-out filler sentences of the demo's language.",
}


def task_specs() -> dict[str, dict]:
    """The YAML of every demo task (docs/tasks.md). Chat variants reuse the plain task's items."""
    specs: dict[str, dict] = {}
    for skill in data.SKILLS:
        common = {
            "kind": "generate",
            "data": f"{skill}.jsonl",
            # Exact match of the stripped output: "flexible" would also accept "cat" for "CAT".
            "filter": "numeric" if skill == "arith" else "exact",
            "metric": "strict",
            "stop": ["\n"],
            "max_new_tokens": 8,
            "retention": "text.yaml",
        }
        # Few-shot examples, if asked for, look like the training data: one item per line.
        specs[skill] = {"name": skill, **common, "prompt": "{prompt}", "target": "{answer}",
                        "fewshot_separator": "\n"}
        if skill in data.CHAT_TEMPLATES:
            specs[f"{skill}-chat"] = {"name": f"{skill}-chat", **common, "prompt": data.CHAT_TEMPLATES[skill],
                                      "target": "{answer}", "fewshot_separator": "\n"}
    specs["text"] = {"name": "text", "kind": "perplexity", "data": "text.jsonl"}
    return specs


def write_tasks(held: data.HeldOut, out: Path) -> None:
    """The demo tasks: one JSONL per skill (all splits), the retention texts, one YAML per task."""
    out.mkdir(parents=True, exist_ok=True)
    for skill in data.SKILLS:
        data.write_jsonl(out / f"{skill}.jsonl", data.records(held, skill))
    rows = [{"id": f"text-{split}-{i:03d}", "text": t, "split": split}
            for split, texts in held.retention.items() for i, t in enumerate(texts)]
    data.write_jsonl(out / "text.jsonl", rows)
    for name, spec in task_specs().items():
        skill = name.removesuffix("-chat")
        head = f"# demo:{name} - {TASK_NOTES[skill]}\n# Written by python -m analysis.demo.build; do not edit.\n"
        # JSON values are YAML too, and keep "\n" readable where YAML's block style would not.
        body = "".join(f"{key}: {json.dumps(value)}\n" for key, value in spec.items())
        (out / f"{name}.yaml").write_text(head + body)


# ---------------------------------------------------------------- measuring


def _summary(result) -> dict:
    """k, n, accuracy and its Wilson 95% interval from an ``analysis.eval.evaluate`` result."""
    s = result.summary
    return {"k": s["k"], "n": s["n"], "acc": round(s["accuracy"], 4),
            "ci95": [round(s["ci_low"], 4), round(s["ci_high"], 4)]}


def perplexity_ci(records: list[dict], resamples: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile-bootstrap interval of the pooled perplexity, resampling texts."""
    nll = torch.tensor([r["nll"] for r in records], dtype=torch.float64)
    n = torch.tensor([r["n_tokens"] for r in records], dtype=torch.float64)
    idx = torch.randint(len(records), (resamples, len(records)), generator=torch.Generator().manual_seed(seed))
    ppl = torch.exp(nll[idx].sum(1) / n[idx].sum(1))
    return [round(torch.quantile(ppl, q).item(), 4) for q in (0.025, 0.975)]


def measure(model, tok, tasks: Path, split: str = "test", limit: int | None = None) -> dict:
    """Accuracy on every demo task, and retention perplexity, through ``analysis.eval.evaluate`` as users do."""
    from analysis.eval import evaluate

    res: dict[str, dict | float | list[float]] = {}
    for name, spec in task_specs().items():
        r = evaluate.run(model, tok, tasks / f"{name}.yaml", split=split, limit=limit, batch_size=128,
                         progress=False)
        if spec["kind"] == "perplexity":
            res[name] = round(r.summary["perplexity"], 4)
            res[f"{name}_ci95"] = perplexity_ci(r.records)
        else:
            res[name] = _summary(r)
    return res


def copy_probe(donor, target, tok, tasks: Path, split: str = "test", limit: int | None = None) -> dict:
    """Arith accuracy of ``target`` with each whole layer, each MLP and each attention block of ``donor``
    copied in (α = 1): where the localization work starts from."""
    from analysis.eval import evaluate

    out: dict[str, dict] = {}
    dsd = donor.state_dict()
    for layer in range(len(target.model.layers)):
        for unit, prefix in (("layer", f"model.layers.{layer}."), ("mlp", f"model.layers.{layer}.mlp."),
                             ("attn", f"model.layers.{layer}.self_attn.")):
            graft = copy.deepcopy(target)
            with torch.no_grad():
                for name, tensor in graft.state_dict().items():
                    if name.startswith(prefix):
                        tensor.copy_(dsd[name])
            r = evaluate.run(graft, tok, tasks / "arith.yaml", split=split, limit=limit, batch_size=128,
                             progress=False)
            out[f"{unit}.{layer}"] = _summary(r)
    return out


# ---------------------------------------------------------------- main


def build(out: Path, steps: int | None = None, seed: int = 0, limit: int | None = None,
          log: bool = True) -> dict:
    """Train, save, measure; returns the build report (also written to ``out/build-report.json``).

    ``limit`` caps the items measured per task (for smoke tests); None measures whole test splits.
    """
    from analysis.io import models as loader

    t_start = time.time()
    recipe = Recipe(seed=seed, phases=default_phases(steps) if steps else default_phases())
    torch.set_num_threads(recipe.threads)
    random.seed(seed)
    tok = data.build_tokenizer()
    vocab = tok.get_vocab()
    held = data.held_out(seed)
    write_tasks(held, out / "tasks")

    trained: dict[str, object] = {}
    curves: dict[str, list] = {}
    times: dict[str, float] = {}
    for phase in recipe.phases:
        t0 = time.time()
        model = new_model(recipe, tok) if phase.parent is None else copy.deepcopy(trained[phase.parent])
        if log:
            print(f"{phase.name}: {phase.steps} steps, lr {phase.lr}, mix {phase.mix}", flush=True)
        curves[phase.name] = train(model, phase, recipe, held, vocab, log=log)
        trained[phase.name] = model
        save(model, tok, out / "models" / phase.name)
        times[phase.name] = round(time.time() - t0, 1)

    manifest = {}
    for name in MODEL_NAMES:
        folder = out / "models" / name
        manifest[name] = {p.name: sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}
    (out / "models" / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")

    # Measure what users get: the saved folders, through the suite's own loader and evaluator.
    t0 = time.time()
    loaded = {name: loader.load(out / "models" / name) for name in MODEL_NAMES}
    results = {name: measure(lm.model, lm.tokenizer, out / "tasks", limit=limit) for name, lm in loaded.items()}
    probe = copy_probe(loaded["gen1"].model, loaded["gen2"].model, tok, out / "tasks", limit=limit)
    t_measure = round(time.time() - t0, 1)

    report = {
        "recipe": asdict(recipe),
        "params": sum(p.numel() for p in loaded["gen1"].model.parameters()),
        "dtype_loaded": str(loaded["gen1"].model.dtype),
        "results_test": results,
        "copy_probe_gen1_into_gen2_arith_test": probe,
        "loss_curves": curves,
        "seconds": {**times, "measure": t_measure, "total": round(time.time() - t_start, 1)},
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": recipe.threads, "processor": platform.processor() or platform.machine()},
        "sha256": {name: manifest[name]["model.safetensors"] for name in MODEL_NAMES},
    }
    (out / "build-report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m analysis.demo.build", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="gen1's training steps (later phases scale)")
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: the package's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="items measured per task (default: all)")
    args = parser.parse_args(argv)
    report = build(args.out, steps=args.steps, seed=args.seed, limit=args.limit)
    for name, res in report["results_test"].items():
        line = "  ".join(f"{k} {v['k']}/{v['n']}" for k, v in res.items() if isinstance(v, dict))
        print(f"{name}: {line}  text ppl {res['text']}")
    probe = report["copy_probe_gen1_into_gen2_arith_test"]
    print("gen1 -> gen2 copies, arith:", "  ".join(f"{k} {v['k']}/{v['n']}" for k, v in probe.items()))
    print(f"built in {report['seconds']['total']} s into {args.out}")


if __name__ == "__main__":
    main()
