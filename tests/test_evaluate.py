"""analysis.eval.evaluate: hand-checked numbers on a bigram model, batch-size invariance, records, the CLI."""

from __future__ import annotations

import json
import math
import string
from pathlib import Path

import pytest
import torch
import transformers as T
from tokenizers import Tokenizer, decoders, models

from analysis.cli import main
from analysis.errors import GraftError
from analysis.eval import decoding, engine, evaluate, scoring, tasks

CHARS = sorted(set(string.printable) - set("\x0b\x0c\r"))


def fused_char_tokenizer(folder: Path) -> T.PreTrainedTokenizerBase:
    """Character tokenizer (newline included) whose decode concatenates; reloaded from disk."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {c: i + 4 for i, c in enumerate(CHARS)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.decoder = decoders.Fuse()
    T.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                              unk_token="<unk>").save_pretrained(folder)
    return T.AutoTokenizer.from_pretrained(folder)


def bigram_model(tok: T.PreTrainedTokenizerBase, table: torch.Tensor) -> T.LlamaForCausalLM:
    """A Llama whose next-token logits are ``table[last token]``: one-hot embeddings, a layer that adds
    nothing (zero o_proj and down_proj), and an LM head holding the table — numbers checkable by hand."""
    hidden = 128
    cfg = T.LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=8, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=0.0,
                        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = T.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, : len(tok)] = torch.eye(len(tok))
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        head = torch.zeros(len(tok), hidden)
        head[:, : len(tok)] = table.T / math.sqrt(hidden)  # the final norm scales one-hot by sqrt(hidden)
        model.lm_head.weight.copy_(head)
    return model


@pytest.fixture(scope="module")
def bigram(tmp_path_factory: pytest.TempPathFactory) -> tuple[T.LlamaForCausalLM, T.PreTrainedTokenizerBase]:
    tok = fused_char_tokenizer(tmp_path_factory.mktemp("bigram-tok"))
    table = torch.zeros(len(tok), len(tok))
    table[:, tok.convert_tokens_to_ids("x")] = 5.0  # every character's favourite next token is "x" ...
    table[tok.convert_tokens_to_ids("="), tok.convert_tokens_to_ids("4")] = 10.0  # ... but "=" → "4"
    table[tok.convert_tokens_to_ids("4"), tok.convert_tokens_to_ids("\n")] = 10.0  # and "4" → newline
    return bigram_model(tok, table), tok


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def log_norm(tok: T.PreTrainedTokenizerBase, *big: float) -> float:
    """log Σ exp(row): a bigram row with entries ``big`` and zeros elsewhere."""
    return math.log(sum(math.exp(b) for b in big) + len(tok) - len(big))


def test_generation_hand_checked(bigram, tmp_path: Path) -> None:
    model, tok = bigram
    rows = [{"id": str(i), "prompt": p, "answer": a}
            for i, (p, a) in enumerate([("2+2=", "4"), ("1+3=", "4"), ("3+3=", "6"), ("7-3=", "4"), ("2*3=", "6")])]
    result = evaluate.run(model, tok, write_jsonl(tmp_path / "arith.jsonl", rows), batch_size=2, progress=False)
    assert [r["output"] for r in result.records] == ["4"] * 5  # greedy "4", cut at the "\n" stop
    assert [r["correct"] for r in result.records] == [True, True, False, True, False]
    s = result.summary
    assert (s["k"], s["n"], s["accuracy"]) == (3, 5, 0.6)
    assert s["ci_low"] == pytest.approx(0.2307, abs=1e-4) and s["ci_high"] == pytest.approx(0.8824, abs=1e-4)
    # two generated tokens ("4", "\n"), each 10 − log(e^10 + e^5 + the rest at e^0)
    assert result.records[0]["n_tokens"] == 2
    assert result.records[0]["logprob"] == pytest.approx(2 * (10 - log_norm(tok, 10, 5)), abs=1e-4)


def test_choice_loglikelihood_hand_checked(bigram, tmp_path: Path) -> None:
    model, tok = bigram
    path = write_jsonl(tmp_path / "mc.jsonl", [{"id": "q", "prompt": "Q=", "choices": ["4", "xx4"], "answer": 1}])
    rec = evaluate.run(model, tok, path, batch_size=1, progress=False).records[0]
    eq, other = log_norm(tok, 10, 5), log_norm(tok, 5)  # the "=" row and every other row
    first = -eq - other  # " 4": "=" → " ", then " " → "4"
    second = -eq + 2 * (5 - other) - other  # " xx4": "=" → " ", " " → "x", "x" → "x", "x" → "4"
    assert rec["logprobs"] == pytest.approx([first, second], abs=1e-4)
    assert rec["pred"] == 0 and rec["correct"] is False
    # acc_norm divides by the choice's length in characters: "4" → 1, "xx4" → 3
    assert rec["pred_norm"] == (0 if first / 1 >= second / 3 else 1)


def test_perplexity_hand_checked(bigram, tmp_path: Path) -> None:
    model, tok = bigram
    path = write_jsonl(tmp_path / "ppl.jsonl", [{"id": "t", "text": "x4\n"}])
    result = evaluate.run(model, tok, path, progress=False)
    nll = log_norm(tok, 5) - (10 - log_norm(tok, 10, 5))  # "x" → "4", then "4" → "\n"
    rec = result.records[0]
    assert rec["n_tokens"] == 2 and rec["nll"] == pytest.approx(nll, abs=1e-4)
    assert result.summary["perplexity"] == pytest.approx(math.exp(nll / 2), rel=1e-4)
    assert result.summary["accuracy"] is None


def random_char_llama(folder: Path, seed: int) -> tuple[T.LlamaForCausalLM, T.PreTrainedTokenizerBase]:
    """A random 2-layer GQA Llama over the character tokenizer saved in ``folder``."""
    tok = fused_char_tokenizer(folder)
    torch.manual_seed(seed)
    cfg = T.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return T.LlamaForCausalLM(cfg).eval(), tok


@pytest.fixture(scope="module")
def random_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[T.LlamaForCausalLM, T.PreTrainedTokenizerBase, Path]:
    folder = tmp_path_factory.mktemp("rand-llama")
    model, tok = random_char_llama(folder, seed=0)
    model.save_pretrained(folder)
    return model, tok, folder


def _mixed_tasks(tmp_path: Path) -> dict[str, Path]:
    gen = [{"id": f"g{i}", "prompt": "Q" * (i % 4) + f"What is {i}*{i}?\nA:", "answer": str(i * i), "split": "test"}
           for i in range(11)]
    mc = [{"id": f"c{i}", "prompt": f"Question {i}:" + " and" * (i % 5), "choices": ["yes", "no way", "maybe" * (1 + i % 2)],
           "answer": i % 3, "split": "test"} for i in range(11)]
    ppl = [{"id": f"p{i}", "text": f"The number {i} is " + "very " * i + "small."} for i in range(7)]
    return {"generate": write_jsonl(tmp_path / "g.jsonl", gen), "choice": write_jsonl(tmp_path / "c.jsonl", mc),
            "perplexity": write_jsonl(tmp_path / "p.jsonl", ppl)}


FLOATS = ("logprob", "logprobs", "nll", "perplexity")


@pytest.mark.parametrize("kind", ["generate", "choice", "perplexity"])
def test_batch_size_never_changes_a_result(random_llama, tmp_path: Path, kind: str) -> None:
    model, tok, _ = random_llama
    path = _mixed_tasks(tmp_path)[kind]
    one = evaluate.run(model, tok, path, batch_size=1, max_new_tokens=6, progress=False).records
    eight = evaluate.run(model, tok, path, batch_size=8, max_new_tokens=6, progress=False).records
    assert [r["id"] for r in one] == [r["id"] for r in eight]  # item order, not batch order
    for a, b in zip(one, eight, strict=True):
        assert {k: v for k, v in a.items() if k not in FLOATS} == {k: v for k, v in b.items() if k not in FLOATS}
        for key in FLOATS:
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-5)
    again = evaluate.run(model, tok, path, batch_size=8, max_new_tokens=6, progress=False).records
    assert again == eight  # deterministic


def test_shared_prompt_scoring_equals_full_forward(random_llama) -> None:
    model, tok, _ = random_llama
    requests = [("Question: which?\nAnswer:", [" one", " twenty two", " x"]), ("Hi ", ["there", "you all"])]
    got = scoring.loglikelihoods(model, tok, requests, batch_size=2)
    for (context, conts), scores in zip(requests, got, strict=True):
        for cont, score in zip(conts, scores, strict=True):
            ctx_ids, cont_ids = engine.encode_pair(tok, context, cont)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ctx_ids + cont_ids])).logits[0], -1)
            full = sum(float(logp[len(ctx_ids) - 1 + j, t]) for j, t in enumerate(cont_ids))
            assert score == pytest.approx(full, abs=1e-4)


def test_records_written_and_splits(random_llama, tmp_path: Path) -> None:
    model, tok, _ = random_llama
    gen = [{"id": f"g{i}", "prompt": f"{i}+{i}=", "answer": str(2 * i), "split": "dev" if i < 3 else "test"}
           for i in range(6)] + [{"id": "r1", "text": "Some retention text.", "split": "retention"}]
    path = write_jsonl(tmp_path / "g.jsonl", gen)
    result = evaluate.run(model, tok, path, max_new_tokens=3, out=tmp_path / "out", progress=False)
    lines = (tmp_path / "out" / "records.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["g3", "g4", "g5"]  # default split: test
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["split"] == "test" and summary["n"] == 3 and {"k", "ci_low", "ci_high"} <= summary.keys()
    assert {"id", "output", "extracted", "correct", "logprob"} <= json.loads(lines[0]).keys()
    ret = evaluate.run(model, tok, path, split="retention", progress=False)
    assert ret.summary["kind"] == "perplexity" and ret.records[0]["id"] == "r1"
    assert result.summary["max_new_tokens"] == 3
    with pytest.raises(GraftError, match="batch size"):
        evaluate.run(model, tok, path, batch_size=0, progress=False)
    with pytest.raises(GraftError, match="no room for a prompt"):
        evaluate.run(model, tok, path, max_new_tokens=10_000, progress=False)


def test_bridge_wrapped_model_gives_the_same_records(random_llama, tmp_path: Path) -> None:
    from analysis.io import models

    _, _, folder = random_llama
    loaded = models.load(folder)
    paths = _mixed_tasks(tmp_path)
    before = {k: evaluate.run(loaded.model, loaded.tokenizer, p, max_new_tokens=4, progress=False).records
              for k, p in paths.items()}
    # Booting TransformerLens wraps the modules of a twin sharing the weights; the wrapped model's KV cache
    # stays empty, which evaluate detects (it recomputes whole sequences); the plain model is untouched.
    assert engine.Forward(loaded.hooked).caches is False and engine.Forward(loaded.model).caches
    for kind, path in paths.items():
        after = evaluate.run(loaded.hooked, loaded.tokenizer, path, max_new_tokens=4, progress=False).records
        for a, b in zip(before[kind], after, strict=True):
            assert {k: v for k, v in a.items() if k not in FLOATS} == {k: v for k, v in b.items() if k not in FLOATS}
            for key in FLOATS:
                if key in a:
                    assert a[key] == pytest.approx(b[key], abs=1e-4)


def test_cli_eval_json_and_bad_task_exit_2(random_llama, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, _, folder = random_llama
    path = _mixed_tasks(tmp_path)["choice"]
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", str(folder), "--task", str(path), "--out", str(tmp_path / "o"), "--json",
              "--batch-size", "4", "--limit", "5"])
    assert not exit_info.value.code
    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] == 5 and {"accuracy", "k", "n", "ci_low", "ci_high"} <= summary.keys()
    assert summary["k"] == sum(json.loads(x)["correct"] for x in (tmp_path / "o" / "records.jsonl").read_text().splitlines())

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": \n')
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", str(folder), "--task", str(bad), "--out", str(tmp_path / "o2")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert f"{bad}:2: malformed JSON" in err.replace("\n", "") and "Traceback" not in err


@pytest.mark.real
def test_real_smollm2_generation_batch_invariant() -> None:
    """SmolLM2-135M-Instruct, real basic_arithmetic items: batch 1 and batch 4 give the same records."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_evaluate", Path(__file__).resolve().parents[1] / "bench" / "evaluate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model, tok = bench.load_smollm2()
    task = tasks.load("basic_arithmetic", split="test", limit=6, fewshot=3)
    one = evaluate.run(model, tok, task, batch_size=1, progress=False).records
    four = evaluate.run(model, tok, task, batch_size=4, progress=False).records
    assert [r["output"] for r in one] == [r["output"] for r in four]
    assert [r["correct"] for r in one] == [r["correct"] for r in four]
    assert [r["logprob"] for r in one] == pytest.approx([r["logprob"] for r in four], abs=1e-4)


@pytest.mark.parametrize("draft_kind", ["own", "other", "empty", "long"])
def test_drafts_give_the_greedy_tokens(random_llama, draft_kind: str) -> None:
    """A draft, right or wrong, changes how many sequential steps run, never the tokens."""
    model, tok, _ = random_llama
    prompts = [f"{a}+{b}=" for a, b in zip("0123456789", "9876543210", strict=True)] + ["hello there", "x"]
    plain = decoding.generate(model, tok, prompts, stop=["\n"], max_new_tokens=6, batch_size=4)
    rng = torch.Generator().manual_seed(0)
    drafts = {
        "own": [g.tokens for g in plain],
        "other": [[int(x) for x in torch.randint(0, len(tok), (5,), generator=rng)] for _ in prompts],
        "empty": [[] for _ in prompts],
        "long": [g.tokens[:2] + [5] * 20 for g in plain],
    }[draft_kind]
    got = decoding.generate(model, tok, prompts, stop=["\n"], max_new_tokens=6, batch_size=4, drafts=drafts)
    assert [g.tokens for g in got] == [g.tokens for g in plain]
    assert [g.text for g in got] == [g.text for g in plain]
    assert [g.logprob for g in got] == pytest.approx([g.logprob for g in plain], abs=1e-4)


def test_drafts_that_do_not_pay_are_dropped_for_the_remaining_batches(random_llama, monkeypatch) -> None:
    """Once fewer than half the verified rows finished on their drafts, the other batches decode without
    verifying theirs (a failed draft costs a forward and a rerun prompt); the tokens stay the greedy ones."""
    model, tok, _ = random_llama
    prompts = [f"{a}+{b}=" for a, b in zip("0123456789", "9876543210", strict=True)] * 2
    plain = decoding.generate(model, tok, prompts, stop=["\n"], max_new_tokens=6, batch_size=4)
    verified: list[int] = []  # rows of each draft verification
    verify = decoding._verify

    def counting(fwd, heads, prompts_, *args, **kwargs):  # type: ignore[no-untyped-def]
        verified.append(len(prompts_))
        return verify(fwd, heads, prompts_, *args, **kwargs)

    monkeypatch.setattr(decoding, "_verify", counting)
    wrong = [[(g.tokens[0] + 1) % len(tok)] * 6 for g in plain]
    got = decoding.generate(model, tok, prompts, stop=["\n"], max_new_tokens=6, batch_size=4, drafts=wrong)
    assert [g.tokens for g in got] == [g.tokens for g in plain]
    assert verified == [4]  # the first batch only
    verified.clear()
    right = decoding.generate(model, tok, prompts, stop=["\n"], max_new_tokens=6, batch_size=4,
                              drafts=[g.tokens for g in plain])
    assert [g.tokens for g in right] == [g.tokens for g in plain] and verified == [4] * 5


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "neox"])
def test_shared_few_shot_head_is_run_once_with_the_same_results(tiny_pairs, family: str, monkeypatch) -> None:
    """Prompts that share a long head (few-shot examples): the head runs on its own, batch size 1, and the
    rows continue from its KV cache, padding between head and row. Same tokens, same choices."""
    from analysis.io.models import load

    loaded = load(tiny_pairs(family)[1], dtype="float32")
    model, tok = loaded.model, loaded.tokenizer
    shots = "Q: 1+2=\nA: 3\nQ: 4+4=\nA: 8\n"  # (the tiny models see 64 positions)
    prompts = [shots + f"Q: {a}+{b}=\nA:" + " " * (a % 3) for a, b in zip(range(3, 40, 4), range(10), strict=True)]
    requests = [(p, [" 1", " 12", " 123 and more"]) for p in prompts]
    calls: list[tuple[int, int]] = []  # (rows, positions) of every forward
    forward = engine.Forward.__call__

    def counting(self, ids, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(tuple(ids.shape))
        return forward(self, ids, *args, **kwargs)

    monkeypatch.setattr(engine.Forward, "__call__", counting)
    shared = (decoding.generate(model, tok, prompts, stop=["\n"], max_new_tokens=5, batch_size=4),
              scoring.loglikelihoods(model, tok, requests, batch_size=4))
    # the head, on its own, once per call (not per batch: every batch shares the run's head)
    assert sum(rows == 1 and width >= len(shots) for rows, width in calls) == 2
    assert not any(rows > 1 and width >= len(shots) for rows, width in calls)  # never again per row
    monkeypatch.setattr(engine, "SHARED_CONTEXT_MIN_TOKENS", 10**9)
    whole = (decoding.generate(model, tok, prompts, stop=["\n"], max_new_tokens=5, batch_size=4),
             scoring.loglikelihoods(model, tok, requests, batch_size=4))
    assert [g.tokens for g in shared[0]] == [g.tokens for g in whole[0]]
    assert [g.logprob for g in shared[0]] == pytest.approx([g.logprob for g in whole[0]], abs=1e-4)
    monkeypatch.setattr(engine, "SHARED_CONTEXT_MIN_TOKENS", 16)
    same = [prompts[0]] * 4  # identical prompts with identical drafts: the head must stop before the drafts
    drafted = decoding.generate(model, tok, same, stop=["\n"], max_new_tokens=5, batch_size=4,
                                drafts=[whole[0][0].tokens] * 4)
    assert [g.tokens for g in drafted] == [whole[0][0].tokens] * 4
    for a, b in zip(shared[1], whole[1], strict=True):
        assert a == pytest.approx(b, abs=1e-4)


def test_rows_are_grouped_by_length_within_the_batch_size() -> None:
    """Perplexity windows and contexts run in groups of similar length: each row once, no group above
    the batch size, and fewer padded positions than fixed batches of the longest-first order."""
    lengths = [100, 98, 97, 30, 29, 28, 27, 26, 10, 9]
    groups = engine.length_groups(range(len(lengths)), lengths, max_rows=4)
    assert sorted(r for g in groups for r in g) == list(range(len(lengths)))
    assert all(1 <= len(g) <= 4 for g in groups)

    def padded(batches: list[list[int]]) -> int:
        return sum(len(b) * max(lengths[r] for r in b) for b in batches)

    fixed = [list(range(i, min(i + 4, len(lengths)))) for i in range(0, len(lengths), 4)]
    assert padded(groups) + engine.CALL_COST_TOKENS * len(groups) < padded(fixed) + engine.CALL_COST_TOKENS * 3
    assert [100, 98, 97] == [lengths[r] for r in groups[0]]  # the long rows do not carry a short one


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "neox"])
def test_decoding_drops_finished_rows_without_changing_any_row(tiny_pairs, family: str, monkeypatch) -> None:
    """Rows that finish early leave the batch once half of it is done (the KV cache keeps the rest,
    sliding-window layers too); every row's tokens and logprob stay those it gets decoded alone."""
    from analysis.io.models import load

    loaded = load(tiny_pairs(family)[1], dtype="float32")
    model, tok = loaded.model, loaded.tokenizer
    prompts = [engine.encode(tok, f"What is {i}*{i}?\nA:") for i in range(8)]
    starts = [([5] * (i % 4), 0.0) for i in range(8)]  # rows 3 and 7 are 3 tokens ahead of rows 0 and 4

    def finished(new: list[int]) -> bool:
        return len(new) >= 7

    rows: list[int] = []
    forward = engine.Forward.__call__

    def counting(self, ids, *args, **kwargs):  # type: ignore[no-untyped-def]
        rows.append(ids.shape[0])
        return forward(self, ids, *args, **kwargs)

    fwd = engine.Forward(model)
    assert fwd.caches
    monkeypatch.setattr(engine.Forward, "__call__", counting)
    with torch.inference_mode():
        together = decoding._decode(fwd, engine.SharedContext(fwd), prompts, starts, 0, finished, 0)
        alone = [decoding._decode(fwd, engine.SharedContext(fwd), [p], [s], 0, finished, 0)[0]
                 for p, s in zip(prompts, starts, strict=True)]
    assert [t for t, _ in together] == [t for t, _ in alone]
    assert [lp for _, lp in together] == pytest.approx([lp for _, lp in alone], abs=1e-5)
    assert all(len(t) == 7 for t, _ in together)
    batch_steps = rows[: len(rows) - sum(7 - i % 4 for i in range(8))]
    assert batch_steps == [8, 8, 8, 8, 8, 4, 2]  # halved once rows 2, 3, 6, 7 and then 1, 5 were done


def test_an_observer_sees_every_forward_of_every_decoding_prompt(bigram) -> None:
    """generate(observe=...): each forward names its prompts; a prompt counts as decoding in exactly as many
    forwards as it generated tokens (activation statistics of generated tokens rely on this)."""
    model, tok = bigram
    prompts = ["2+2=", "a much longer prompt 1+3=", "7-3", "zz"]
    seen = torch.zeros(len(prompts))

    def observe(rows: list[int], going: list[bool]) -> None:
        assert len(rows) == len(going) and len(set(rows)) == len(rows)
        seen[torch.tensor(rows)] += torch.tensor(going, dtype=torch.float32)

    out = decoding.generate(model, tok, prompts, stop=["\n"], max_new_tokens=5, batch_size=3, observe=observe)
    assert seen.tolist() == [float(g.n_tokens) for g in out]
    assert [g.text for g in out] == [g.text for g in decoding.generate(model, tok, prompts, stop=["\n"],
                                                                       max_new_tokens=5, batch_size=3)]
    with pytest.raises(ValueError, match="drafts"):
        decoding.generate(model, tok, prompts, stop=["\n"], max_new_tokens=5, drafts=[None] * 4, observe=observe)
