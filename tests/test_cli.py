"""Bad input: one line naming the problem and the fix, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_model, write_task
from safetensors.torch import load_file, save_file

import analysis
from analysis.cli import main


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what fixtures printed while building models
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out, captured.err


def assert_refused(args: list[str], capsys: pytest.CaptureFixture[str], out: Path | None, *words: str) -> str:
    code, _, err = run(args, capsys)
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word.lower() in err.lower(), err
    if out is not None:
        assert not out.exists()
        assert not any(p.name.startswith(f".{out.name}.graftlm-") for p in out.parent.iterdir())
    return err


def transplant_args(donor: Path | str, target: Path | str, out: Path, *extra: str) -> list[str]:
    return ["transplant", "--donor", str(donor), "--target", str(target), "--out", str(out), *extra]


def test_missing_path(llama_pair, tmp_path: Path, capsys) -> None:
    donor, _ = llama_pair
    out = tmp_path / "o"
    assert_refused(transplant_args(donor, tmp_path / "nope", out, "-c", "L0.mlp"), capsys, out, "no such", "nope")


def test_not_a_model(llama_pair, tmp_path: Path, capsys) -> None:
    donor, _ = llama_pair
    (tmp_path / "empty").mkdir()
    out = tmp_path / "o"
    assert_refused(transplant_args(donor, tmp_path / "empty", out, "-c", "L0.mlp"), capsys, out, "not a model folder")


def test_different_architecture(tiny_pairs, tmp_path: Path, capsys) -> None:
    donor, _ = tiny_pairs("gpt2")
    _, target = tiny_pairs("llama")
    out = tmp_path / "o"
    assert_refused(transplant_args(donor, target, out, "-c", "L0.mlp"), capsys, out, "model_type")
    assert_refused(["check", "--donor", str(donor), "--target", str(target)], capsys, None, "not transplantable")


def test_shape_mismatch(tmp_path: Path, capsys) -> None:
    donor = build_model(tmp_path / "d", "llama", seed=1, intermediate_size=48)
    target = build_model(tmp_path / "t", "llama", seed=2)
    out = tmp_path / "o"
    err = assert_refused(transplant_args(donor, target, out, "-c", "L1.mlp"), capsys, out, "mlp")
    assert "48" in err and "64" in err
    # attention tensors still match: a head transplant is allowed
    code, _, _ = run(transplant_args(donor, target, out, "-c", "L1.H0"), capsys)
    assert code == 0 and out.is_dir()


def test_a_tokenizer_that_adds_tokens_leaves_the_layers_transplantable(tmp_path: Path, capsys) -> None:
    """A donor whose tokenizer adds 5 tokens (a twin's chat tokens, a pad token added before fine-tuning):
    every shared token has the same id, so the layers read the same text alike — they transplant; the
    vocabulary's tensors (embeddings, LM head) do not, and say why."""
    donor = build_model(tmp_path / "d", "llama", seed=1, extra_vocab=5)
    target = build_model(tmp_path / "t", "llama", seed=2)
    code, out_text, _ = run(["check", "--donor", str(donor), "--target", str(target)], capsys)
    assert code == 0 and "compatible" in out_text and "the vocabulary's" in out_text
    report = analysis.check(donor, target)
    assert report.ok and report.tokenizer == "compatible"
    assert sorted(report.unshared) == ["lm_head.weight", "model.embed_tokens.weight"]
    out = tmp_path / "o"
    code, _, _ = run(transplant_args(donor, target, out, "-c", "L0.mlp", "-c", "L1.H0"), capsys)
    assert code == 0 and out.is_dir()
    assert_refused(transplant_args(donor, target, tmp_path / "o2", "-c", "model.embed_tokens.weight"), capsys,
                   tmp_path / "o2", "shapes match")


def test_tokenizers_that_give_a_token_another_id_are_refused(tmp_path: Path, capsys) -> None:
    donor = build_model(tmp_path / "d", "llama", seed=1)
    target = build_model(tmp_path / "t", "llama", seed=2)
    data = json.loads((donor / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]  # same size, one pair of ids swapped
    (donor / "tokenizer.json").write_text(json.dumps(data))
    assert analysis.check(donor, target).tokenizer == "different"
    assert_refused(transplant_args(donor, target, tmp_path / "o", "-c", "L0.mlp"), capsys, tmp_path / "o",
                   "tokenizers differ")


@pytest.mark.parametrize("pattern,word", [("L7.mlp", "layers 0..1"), ("L0.H9", "out of range"),
                                          ("L*.foo", "matches no component"), ("", "no components")])
def test_unknown_or_empty_component_pattern(llama_pair, tmp_path: Path, capsys, pattern: str, word: str) -> None:
    donor, target = llama_pair
    out = tmp_path / "o"
    assert_refused(transplant_args(donor, target, out, "-c", pattern), capsys, out, word)


def test_nothing_to_transplant(llama_pair, tmp_path: Path, capsys) -> None:
    donor, target = llama_pair
    out = tmp_path / "o"
    assert_refused(transplant_args(donor, target, out), capsys, out, "--plan")


def test_alpha_outside_unit_interval(llama_pair, tmp_path: Path, capsys) -> None:
    donor, target = llama_pair
    out = tmp_path / "o"
    assert_refused(transplant_args(donor, target, out, "-c", "L0.mlp", "--strength", "1.5"), capsys, out,
                   "--allow-extrapolation")
    code, _, _ = run(transplant_args(donor, target, out, "-c", "L0.mlp", "-a", "1.5", "--allow-extrapolation"), capsys)
    assert code == 0 and out.is_dir()


def test_existing_out_needs_force(llama_pair, tmp_path: Path, capsys) -> None:
    donor, target = llama_pair
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    code, _, err = run(transplant_args(donor, target, out, "-c", "L0.mlp"), capsys)
    assert code == 2 and "--force" in err and (out / "keep.txt").read_text() == "user data"
    code, _, _ = run(transplant_args(donor, target, out, "-c", "L0.mlp", "--force"), capsys)
    assert code == 0 and (out / "config.json").is_file() and not (out / "keep.txt").exists()


def test_pickle_weights_refused_unless_allowed(llama_pair, tmp_path: Path, capsys) -> None:
    donor, target = llama_pair
    pickled = tmp_path / "pickled"
    shutil.copytree(target, pickled)
    state = load_file(str(pickled / "model.safetensors"))
    (pickled / "model.safetensors").unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    out = tmp_path / "o"
    assert_refused(transplant_args(donor, pickled, out, "-c", "L0.mlp"), capsys, out, "pickle", "--allow-pickle")
    code, _, err = run(transplant_args(donor, pickled, out, "-c", "L0.mlp", "--allow-pickle"), capsys)
    assert code == 0, err
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))


def test_nan_in_a_source_tensor(llama_pair, tmp_path: Path, capsys) -> None:
    donor, target = llama_pair
    broken = tmp_path / "broken"
    shutil.copytree(donor, broken)
    state = load_file(str(broken / "model.safetensors"))
    state["model.layers.0.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "o"
    assert_refused(transplant_args(broken, target, out, "-c", "L0.mlp"), capsys, out, "NaN", "up_proj")


def test_custom_code_needs_trust(llama_pair, tmp_path: Path, capsys) -> None:
    donor, target = llama_pair
    custom = tmp_path / "custom"
    shutil.copytree(target, custom)
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (custom / "config.json").write_text(json.dumps(config))
    from analysis.errors import GraftError
    from analysis.io.models import load

    with pytest.raises(GraftError, match="trust-remote-code"):
        load(custom)


def test_apply_patch_refuses_another_target(tiny_pairs, tmp_path: Path, capsys) -> None:
    donor, target = tiny_pairs("llama")
    patch = tmp_path / "patch"
    code, _, _ = run(transplant_args(donor, target, patch, "-c", "L0.mlp", "--patch"), capsys)
    assert code == 0
    out = tmp_path / "o"
    assert_refused(["apply-patch", "--target", str(donor), "--patch", str(patch), "--out", str(out)], capsys, out,
                   "another target")
    code, out_text, _ = run(["apply-patch", "--target", str(target), "--patch", str(patch), "--out", str(out)], capsys)
    assert code == 0 and (out / "model.safetensors").is_file()


def test_check_reports_matching_components(tiny_pairs, capsys) -> None:
    donor, target = tiny_pairs("qwen2")
    code, out, _ = run(["check", "--donor", str(donor), "--target", str(target), "--json"], capsys)
    report = json.loads(out)
    assert code == 0 and report["ok"] and report["tokenizer_equal"]
    assert report["matched"]["head"] == 8 and report["matched"]["group"] == 4 and report["matched"]["neuron"] == 128


def test_console_script_has_no_traceback(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "graftlm"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "analysis.cli"]
    proc = subprocess.run([*cmd, "check", "--donor", str(tmp_path / "a"), "--target", str(tmp_path / "b")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "no such model folder" in proc.stderr
    help_text = subprocess.run([*cmd, "transplant", "--help"], capture_output=True, text=True).stdout
    assert "--components" in help_text and "--patch" in help_text


def test_console_script_transplant_exits_cleanly(llama_pair, tmp_path: Path) -> None:
    """The script ends without tearing down its modules: its output must be complete all the same."""
    donor, target = llama_pair
    exe = Path(sys.executable).parent / "graftlm"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "analysis.cli"]
    out = tmp_path / "o"
    proc = subprocess.run([*cmd, *transplant_args(donor, target, out, "-c", "L1.mlp", "-a", "0.5")],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"wrote model {out}", proc.stderr
    assert load_file(str(out / "model.safetensors")).keys() == load_file(str(Path(target) / "model.safetensors")).keys()
    assert "target_sha256" in (out / "graft.yaml").read_text()


def test_an_interrupted_sweep_says_how_to_resume(tmp_path: Path) -> None:
    """Ctrl-C in a sweep: one line (no traceback), exit 130, only whole results lines; the same command
    then finishes the study."""
    import os
    import signal

    from analysis.study.config import SweepConfig

    donor, target = build_model(tmp_path / "donor", "llama", seed=1), build_model(tmp_path / "target", "llama", seed=2)
    # 200 more items, each decoded to 48 tokens: every evaluation lasts, so the signal lands mid-sweep even on
    # a loaded machine (a tiny model's 3-token evaluations took the whole sweep under a second)
    task = write_task(tmp_path)
    with (tmp_path / "task.jsonl").open("a") as fh:
        fh.write("".join(json.dumps({"id": f"x{i}", "prompt": f"{i}+1=", "answer": str(i + 1),
                                     "split": "dev" if i % 2 else "test"}) + "\n" for i in range(200)))
    task.write_text(task.read_text().replace("max_new_tokens: 3", "max_new_tokens: 48\nstop: []"))
    cfg = SweepConfig(donor=str(donor), target=str(target), task=str(task), methods=["weight"],
                      k=[1, 2], alpha=[0.5, 1.0], components=["head", "mlp"], batch_size=32)
    (tmp_path / "cfg.yaml").write_text(cfg.to_yaml())
    exe = Path(sys.executable).parent / "graftlm"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "analysis.cli"]
    cmd += ["sweep", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run")]
    results = tmp_path / "run" / "results.jsonl"
    # Ctrl-C as a terminal delivers it, also when these tests run as a background job (whose shell makes
    # them, and so their children, ignore SIGINT unless told otherwise)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []  # signalled as soon as the second evaluation is reported, not after a poll interval
    for line in proc.stderr:  # type: ignore[union-attr]
        seen.append(line)
        if line.lstrip().startswith("[2/"):
            break
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    err = "".join(seen) + rest
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("interrupted; a sweep resumes")
    done = [json.loads(line) for line in results.read_text().splitlines()]  # every line whole
    finished = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert finished.returncode == 0, finished.stderr
    assert f"{len(done) - ('order|None' in {r['key'] for r in done})} evaluations resumed" in finished.stderr
    assert (tmp_path / "run" / "report.md").is_file()


def test_embeddings_padded_to_another_size_leave_the_layers_transplantable(tmp_path: Path, capsys) -> None:
    """The same tokenizer over embeddings padded to another size (resize_token_embeddings to a multiple of
    64, say): only the padding rows differ, so the layers transplant."""
    donor = build_model(tmp_path / "d", "llama", seed=1, vocab_size=128)
    target = build_model(tmp_path / "t", "llama", seed=2)
    report = analysis.check(donor, target)
    assert report.ok and report.tokenizer == "same" and "vocab_size" in report.config_diffs
    code, _, _ = run(transplant_args(donor, target, tmp_path / "o", "-c", "L0.mlp"), capsys)
    assert code == 0


def test_a_pair_where_one_model_ties_its_lm_head_leaves_the_layers_transplantable(tmp_path: Path, capsys) -> None:
    """One twin ties its LM head to its embeddings, the other does not (a fine-tune that untied it): the
    layers transplant either way; the head and the embeddings (the tying model's head too) are named and
    refused in a plan."""
    import torch
    from transformers import AutoModelForCausalLM

    untied = build_model(tmp_path / "u", "llama", seed=1)
    tied = build_model(tmp_path / "t", "llama", seed=2, tie_word_embeddings=True)
    for donor, target in ((untied, tied), (tied, untied)):
        report = analysis.check(donor, target)
        assert report.ok and report.unshared == ["lm_head.weight", "model.embed_tokens.weight"]
        code, out, _ = run(["check", "--donor", str(donor), "--target", str(target)], capsys)
        assert code == 0 and "unshared model.embed_tokens.weight: one model's LM head too (tied)" in out
        dest = tmp_path / f"o-{target.name}"
        code, _, _ = run(transplant_args(donor, target, dest, "-c", "L0.mlp", "-c", "L1.H2"), capsys)
        assert code == 0
        written, original = (AutoModelForCausalLM.from_pretrained(p) for p in (dest, target))
        assert written.config.tie_word_embeddings == original.config.tie_word_embeddings
        assert torch.equal(written.lm_head.weight, original.lm_head.weight)
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            code, _, err = run(transplant_args(donor, target, tmp_path / "refused", "-c", name), capsys)
            assert code == 2 and name in err and not (tmp_path / "refused").exists()


def test_check_says_when_the_heads_share_one_norm(tmp_path: Path, capsys) -> None:
    """OLMo 2 normalizes the queries (keys) of all heads together: transplantable, with a note saying a head
    is a unit of weight there, not of activation; Qwen3's norm, one per head size, gets no note."""
    from analysis.check import SHARED_NORM

    for family, noted in (("olmo2", True), ("qwen3", False)):
        donor = build_model(tmp_path / family / "d", family, seed=1)
        target = build_model(tmp_path / family / "t", family, seed=2)
        code, out, _ = run(["check", "--donor", str(donor), "--target", str(target)], capsys)
        assert code == 0 and (SHARED_NORM[:40] in " ".join(out.split())) == noted, out


def smollm2_scoring_pair():  # -> SweepConfig
    """bench/sweep.py's real pair: SmolLM2-135M-Instruct and its copy with noise in the MLPs of layers 20–29."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_sweep", Path(__file__).resolve().parents[1] / "bench" / "sweep.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.scoring_config(dev=4, test=4)


@pytest.mark.real
def test_a_real_twin_whose_tokenizer_adds_a_token(tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct's real BPE tokenizer with a pad token added and the embeddings resized (as before
    a fine-tune), against the copy whose MLPs in layers 20–29 got noise: the tokenizers are compatible, the
    embeddings are the one unshared tensor, and gradient localization on ARC-Easy scores those ten MLPs and
    nothing else that the pair shares."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = smollm2_scoring_pair()
    donor = tmp_path / "donor-with-pad"
    tok = AutoTokenizer.from_pretrained(cfg.donor)
    model = AutoModelForCausalLM.from_pretrained(cfg.donor)
    tok.add_special_tokens({"pad_token": "<|graft_pad|>"})
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(donor)
    tok.save_pretrained(donor)
    report = analysis.check(donor, cfg.target)
    assert report.ok and report.tokenizer == "compatible" and report.unshared == ["model.embed_tokens.weight"]
    result = analysis.localize(donor, cfg.target, "arc_easy", method="gradient", limit=8, progress=False)
    assert "model.embed_tokens.weight" not in result.scores.index
    moved = set(result.scores.index[result.scores["score"].abs() > 0])
    assert moved == {f"L{layer}.mlp" for layer in range(20, 30)}, moved


@pytest.mark.real
def test_a_real_twin_that_unties_its_lm_head(tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct (its LM head tied to its embeddings) saved with the head untied, as some
    fine-tuning frameworks write it, against the copy whose MLPs in layers 20–29 got noise: the head and the
    embeddings are unshared, and gradient localization on ARC-Easy scores those ten MLPs and nothing else."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = smollm2_scoring_pair()
    donor = tmp_path / "donor-untied"
    model = AutoModelForCausalLM.from_pretrained(cfg.donor)
    assert model.config.tie_word_embeddings
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    model.save_pretrained(donor)
    AutoTokenizer.from_pretrained(cfg.donor).save_pretrained(donor)
    report = analysis.check(donor, cfg.target)
    assert report.ok and report.unshared == ["lm_head.weight", "model.embed_tokens.weight"]
    result = analysis.localize(donor, cfg.target, "arc_easy", method="gradient", limit=8, progress=False)
    assert not {"lm_head.weight", "model.embed_tokens.weight"} & set(result.scores.index)
    moved = set(result.scores.index[result.scores["score"].abs() > 0])
    assert moved == {f"L{layer}.mlp" for layer in range(20, 30)}, moved
