"""Bad input, a table across every verb: each row exits with code 2 and one line on stderr that names
the problem, shows no traceback, writes nothing anywhere and leaves every source's bytes as they were.

Rows run ``analysis.cli.main`` in-process. A row may first break the machine a little (a full disk, a
read-only file system, a folder that refuses writing), by patching the functions that write."""

from __future__ import annotations

import builtins
import errno
import fcntl
import hashlib
import io
import json
import os
import shutil
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import build_model, write_task

from analysis.cli import main
from analysis.study.config import SweepConfig


@dataclass(frozen=True)
class Row:
    id: str
    argv: tuple[str, ...]  # "{r}" stands for the workspace
    words: tuple[str, ...]  # each in the error line; "!word": not in it
    broken: str | None = None  # "enospc" | "erofs" | "no-access": the machine fails writes this way


def row(id: str, argv: str, *words: str, broken: str | None = None) -> Row:
    return Row(id, tuple(argv.split()), words, broken)


D, T, TASK = "--donor {r}/donor", "--target {r}/target", "--task {r}/task.yaml"
TR = f"transplant {D} {T}"
AP = "apply-patch --target {r}/target --patch {r}/patch"
EV = "eval --model {r}/donor --task {r}/task.yaml"
LO = f"localize {D} {T} {TASK} --method weight"

ROWS = [
    # check: what a model reference can be wrong with
    row("check-missing-model", f"check --donor {{r}}/nope {T}", "no such model folder", "nope"),
    row("check-model-is-a-file", f"check --donor {{r}}/afile.txt {T}", "is a file, not a model folder"),
    row("check-random-safetensors-header", f"check {D} --target {{r}}/random-header", "header claims"),
    row("check-keyless-safetensors-header", f"check {D} --target {{r}}/keyless", "lacks dtype, shape or data_offsets"),
    row("check-truncated-target", f"check {D} --target {{r}}/truncated", "truncated", "model.safetensors"),
    row("check-gguf-without-magic", f"check {D} --target {{r}}/nomagic.gguf", "not a GGUF file", "magic"),
    row("check-gguf-corrupt", f"check {D} --target {{r}}/badversion.gguf", "corrupt or unsupported GGUF",
        "!config", "!JSON"),
    row("check-gguf-cut-short", f"check {D} --target {{r}}/short.gguf", "not a readable GGUF file", "!config"),
    row("transplant-gguf-cut-short", f"transplant {D} --target {{r}}/short.gguf -c L1.mlp --out {{r}}/outs/o",
        "not a readable GGUF file", "!config"),
    row("check-config-not-json", f"check {D} --target {{r}}/badconfig", "config.json is not valid JSON"),
    row("check-config-not-utf8", f"check {D} --target {{r}}/latin1config", "config.json is not UTF-8"),
    row("check-quantized-target", f"check {D} --target {{r}}/gptq", "quantized checkpoint (gptq, 4 bits)",
        "unquantized"),
    row("transplant-quantized-donor", f"transplant --donor {{r}}/gptq {T} -c L1.mlp --out {{r}}/outs/o",
        "quantized checkpoint"),
    row("localize-quantized-target", f"localize {D} --target {{r}}/gptq {TASK} --method weight --out {{r}}/outs/o",
        "quantized checkpoint"),
    row("eval-quantized-model", "eval --model {r}/gptq --task {r}/task.yaml --out {r}/outs/o", "quantized checkpoint"),
    row("check-unknown-demo", f"check --donor demo:nope {T}", "unknown demo model 'demo:nope'"),
    row("check-missing-option", f"check {D}", "Missing option '--target'", "--help"),
    row("unknown-command", "transmogrify", "No such command 'transmogrify'"),
    # transplant: where the output goes
    row("transplant-out-is-the-donor", f"{TR} -c L1.mlp --out {{r}}/donor --force", "is a source", "donor"),
    row("transplant-out-is-the-target", f"{TR} -c L1.mlp --out {{r}}/target", "is a source", "target"),
    row("transplant-out-inside-the-target", f"{TR} -c L1.mlp --out {{r}}/target/sub", "inside a source"),
    row("transplant-out-holds-the-sources", f"{TR} -c L1.mlp --out {{r}} --force", "holds a source"),
    row("transplant-out-exists", f"{TR} -c L1.mlp --out {{r}}/existing", "already exists", "--force"),
    row("transplant-out-is-a-file", f"{TR} -c L1.mlp --out {{r}}/afile.txt --force", "is a file, not a folder"),
    row("transplant-out-under-a-file", f"{TR} -c L1.mlp --out {{r}}/afile.txt/sub", "afile.txt is a file"),
    row("transplant-out-not-writable", f"{TR} -c L1.mlp --out {{r}}/outs/o", "is not writable", broken="no-access"),
    row("transplant-read-only-file-system", f"{TR} -c L1.mlp --out {{r}}/outs/o", "Read-only file system",
        "outs/o", broken="erofs"),
    row("transplant-disk-full", f"{TR} -c L1.mlp --out {{r}}/outs/o", "No space left on device", broken="enospc"),
    row("transplant-patch-disk-full", f"{TR} -c L1.mlp --patch --out {{r}}/outs/o", "No space left on device",
        broken="enospc"),
    # transplant: the plan and its strengths
    row("plan-not-utf8", f"{TR} --plan {{r}}/plan-latin1.yaml --out {{r}}/outs/o", "plan-latin1.yaml is not UTF-8"),
    row("plan-misspelt-key", f"{TR} --plan {{r}}/plan-typo.yaml --out {{r}}/outs/o", "unknown key 'componentz'",
        "did you mean 'components'", "!Field required"),
    row("plan-not-yaml", f"{TR} --plan {{r}}/plan-broken.yaml --out {{r}}/outs/o", "not valid YAML", "line 3, column 1"),
    row("plan-nan-alpha", f"{TR} --plan {{r}}/plan-nan.yaml --out {{r}}/outs/o", "alpha", "finite"),
    row("plan-is-a-list", f"{TR} --plan {{r}}/plan-list.yaml --out {{r}}/outs/o", "a plan is a mapping"),
    row("plan-missing", f"{TR} --plan {{r}}/plan-nope.yaml --out {{r}}/outs/o", "no such plan file"),
    row("strength-nan", f"{TR} -c L1.mlp --alpha nan --out {{r}}/outs/o", "α=nan is not a finite number"),
    row("strength-nan-extrapolated", f"{TR} -c L1.mlp --strength nan --allow-extrapolation --out {{r}}/outs/o",
        "α=nan is not a finite number", "!donor tensor"),
    row("strength-above-one", f"{TR} -c L1.mlp --alpha 1.5 --out {{r}}/outs/o", "outside [0, 1]",
        "--allow-extrapolation"),
    row("strength-not-a-number", f"{TR} -c L1.mlp --strength much --out {{r}}/outs/o", "Invalid value for '--alpha' / '--strength'"),
    row("component-matches-nothing", f"{TR} -c L*.foo --out {{r}}/outs/o", "matches no component"),
    row("plan-and-components", f"{TR} --plan {{r}}/plan.yaml -c L1.mlp --out {{r}}/outs/o", "either --plan or"),
    row("nothing-to-transplant", f"{TR} --out {{r}}/outs/o", "nothing to transplant"),
    row("transplant-truncated-target", f"transplant {D} --target {{r}}/truncated -c L1.mlp --out {{r}}/outs/o",
        "truncated"),
    row("transplant-random-header-donor", f"transplant --donor {{r}}/random-header {T} -c L1.mlp --out {{r}}/outs/o",
        "not a readable safetensors file"),
    row("transplant-pickle-not-allowed", f"transplant {D} --target {{r}}/evil -c L1.mlp --out {{r}}/outs/o",
        "pickle", "--allow-pickle"),
    row("transplant-malicious-pickle", f"transplant {D} --target {{r}}/evil -c L1.mlp --allow-pickle --out {{r}}/outs/o",
        "objects other than tensors", "refused"),
    # apply-patch
    row("apply-patch-out-is-the-target", f"{AP} --out {{r}}/target --force", "is a source"),
    row("apply-patch-out-is-the-patch", f"{AP} --out {{r}}/patch --force", "is a source"),
    row("apply-patch-out-inside-the-patch", f"{AP} --out {{r}}/patch/o", "inside a source"),
    row("apply-patch-no-patch", "apply-patch --target {r}/target --patch {r}/nope --out {r}/outs/o", "no graft patch"),
    row("apply-patch-not-a-patch", "apply-patch --target {r}/target --patch {r}/donor/model.safetensors "
        "--out {r}/outs/o", "is not a graft patch"),
    row("apply-patch-another-target", "apply-patch --target {r}/donor --patch {r}/patch --out {r}/outs/o",
        "another target"),
    row("apply-patch-target-edited-in-place", "apply-patch --target {r}/edited --patch {r}/patch --out {r}/outs/o",
        "another target"),
    row("apply-patch-truncated-target", "apply-patch --target {r}/truncated --patch {r}/patch --out {r}/outs/o",
        "truncated"),
    row("apply-patch-disk-full", f"{AP} --out {{r}}/outs/o", "No space left on device", broken="enospc"),
    # eval
    row("eval-max-new-tokens-0", f"{EV} --max-new-tokens 0 --out {{r}}/outs/e", "max_new_tokens must be at least 1"),
    row("eval-max-new-tokens-negative", f"{EV} --max-new-tokens -1 --out {{r}}/outs/e", "got -1"),
    row("eval-batch-size-0", f"{EV} --batch-size 0 --out {{r}}/outs/e", "batch size must be at least 1"),
    row("eval-limit-0", f"{EV} --limit 0 --out {{r}}/outs/e", "limit must be at least 1"),
    row("eval-out-is-the-model", f"{EV} --out {{r}}/donor --force", "is a source"),
    row("eval-out-exists", f"{EV} --out {{r}}/existing", "already exists", "--force"),
    row("eval-out-is-a-file", f"{EV} --out {{r}}/afile.txt", "is a file, not a folder"),
    row("eval-without-out", f"{EV} --json", "Missing option '--out'"),
    row("eval-task-not-utf8", "eval --model {r}/donor --task {r}/latin1.jsonl --out {r}/outs/e",
        "latin1.jsonl is not UTF-8", "line 2"),
    row("eval-task-bad-json", "eval --model {r}/donor --task {r}/broken.jsonl --out {r}/outs/e",
        "broken.jsonl:2: malformed JSON"),
    row("eval-task-misspelt-key", "eval --model {r}/donor --task {r}/typo.yaml --out {r}/outs/e",
        "unknown key 'prompts'", "did you mean 'prompt'"),
    row("eval-task-yaml-not-utf8", "eval --model {r}/donor --task {r}/latin1.yaml --out {r}/outs/e", "not UTF-8"),
    row("eval-unknown-split", f"{EV} --split nope --out {{r}}/outs/e", "no split 'nope'"),
    row("eval-truncated-model", "eval --model {r}/truncated --task {r}/task.yaml --out {r}/outs/e", "truncated"),
    row("eval-gguf-without-magic", "eval --model {r}/nomagic.gguf --task {r}/task.yaml --out {r}/outs/e",
        "not a GGUF file"),
    row("eval-out-not-writable", f"{EV} --out {{r}}/outs/e", "is not writable", broken="no-access"),
    row("eval-read-only-file-system", f"{EV} --limit 2 --json --out {{r}}/outs/e", "Read-only file system",
        broken="erofs"),
    row("eval-disk-full", f"{EV} --limit 2 --json --out {{r}}/outs/e", "No space left on device", broken="enospc"),
    # localize
    row("localize-alpha-above-one", f"{LO} --alpha 1.5 --out {{r}}/outs/l", "α=1.5", "outside [0, 1]"),
    row("localize-alpha-nan", f"{LO} --alpha nan --out {{r}}/outs/l", "α=nan"),
    row("localize-top-0", f"{LO} --top 0 --out {{r}}/outs/l", "--top must be at least 1"),
    row("localize-batch-size-0", f"{LO} --batch-size 0 --out {{r}}/outs/l", "batch size"),
    row("localize-out-inside-the-donor", f"{LO} --out {{r}}/donor/loc", "inside a source"),
    row("localize-out-exists", f"{LO} --out {{r}}/existing", "already exists"),
    row("localize-unknown-method", f"localize {D} {T} {TASK} --method vibes --out {{r}}/outs/l", "vibes"),
    row("localize-unknown-kind", f"{LO} -c head,bogus --out {{r}}/outs/l", "unknown component kind 'bogus'"),
    row("localize-disk-full", f"{LO} --out {{r}}/outs/l", "No space left on device", broken="enospc"),
    # sweep: the config, validated whole before anything is written
    row("sweep-batch-size-0", "sweep {r}/cfg-batch0.yaml --out {r}/outs/s", "batch_size", "greater than or equal to 1"),
    row("sweep-misspelt-key", "sweep {r}/cfg-typo.yaml --out {r}/outs/s", "unknown key 'batchsize'",
        "did you mean 'batch_size'"),
    row("sweep-not-yaml", "sweep {r}/cfg-broken.yaml --out {r}/outs/s", "not valid YAML", "line 2, column 2",
        "but got ':'"),
    row("sweep-config-not-utf8", "sweep {r}/cfg-latin1.yaml --out {r}/outs/s", "not UTF-8"),
    row("sweep-k-0", "sweep {r}/cfg-k0.yaml --out {r}/outs/s", "k:", "positive"),
    row("sweep-alpha-above-one", "sweep {r}/cfg-alpha.yaml --out {r}/outs/s", "alpha"),
    row("sweep-no-such-device", "sweep {r}/cfg-device.yaml --out {r}/outs/s", "cuda:99", "!--device"),
    row("sweep-max-new-tokens-0", "sweep {r}/cfg-mnt0.yaml --out {r}/outs/s", "max_new_tokens"),
    row("sweep-retention-limit-0", "sweep {r}/cfg-ret0.yaml --out {r}/outs/s", "retention_limit"),
    row("sweep-negative-memory", "sweep {r}/cfg-mem.yaml --out {r}/outs/s", "reuse_memory_gb"),
    row("sweep-config-is-a-list", "sweep {r}/cfg-list.yaml --out {r}/outs/s", "mapping of keys"),
    row("sweep-missing-config", "sweep {r}/cfg-nope.yaml --out {r}/outs/s", "no such sweep config"),
    row("sweep-missing-task", "sweep {r}/cfg-notask.yaml --out {r}/outs/s", "nothere.yaml"),
    row("sweep-perplexity-task", "sweep {r}/cfg-ppl.yaml --out {r}/outs/s", "is a perplexity task",
        "retention: FILE"),
    row("sweep-out-is-a-file", "sweep {r}/cfg.yaml --out {r}/afile.txt", "is a file, not a folder"),
    row("sweep-out-inside-the-target", "sweep {r}/cfg.yaml --out {r}/target/run", "inside a source"),
    row("sweep-run-in-use", "sweep {r}/cfg.yaml --out {r}/locked", "in use by another sweep", f"pid {os.getpid()}"),
    row("sweep-inputs-changed", "sweep {r}/cfg.yaml --out {r}/changed", "computed from other inputs",
        "the task's items"),
    row("sweep-out-not-writable", "sweep {r}/cfg.yaml --out {r}/outs/s", "is not writable", broken="no-access"),
    row("sweep-read-only-file-system", "sweep {r}/cfg.yaml --out {r}/outs/s", "Read-only file system",
        broken="erofs"),
    row("sweep-disk-full", "sweep {r}/cfg.yaml --out {r}/outs/s", "No space left on device", broken="enospc"),
    # figures and demo
    row("figures-garbage-results", "figures {r}/run-garbage", "line 1 is not a result line"),
    row("figures-row-missing-fields", "figures {r}/run-fieldless", "lacks fields a result has"),
    row("figures-no-results", "figures {r}/existing", "holds no results.jsonl"),
    row("figures-missing-run", "figures {r}/nope", "no such run folder"),
    row("figures-run-is-a-file", "figures {r}/afile.txt", "is not a run folder"),
    row("figures-out-is-a-file", "figures {r}/run --out {r}/afile.txt", "is a file, not a folder"),
    row("figures-out-not-writable", "figures {r}/run --out {r}/outs/f", "is not writable", broken="no-access"),
    row("figures-read-only-file-system", "figures {r}/run", "Read-only file system", broken="erofs"),
    row("figures-disk-full", "figures {r}/run", "No space left on device", broken="enospc"),
    row("demo-out-is-a-file", "demo --out {r}/afile.txt", "is a file, not a folder"),
]


# --- the workspace: sources, good and bad ---------------------------------------------------------

def _small_files(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy2(f, dst / f.name)
    return dst


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from test_report import write_run

    from analysis.io.checkpoint import file_sha256
    from analysis.transplant import transplant

    r = tmp_path_factory.mktemp("bad")
    donor, target = build_model(r / "donor", "llama", seed=1), build_model(r / "target", "llama", seed=2)
    write_task(r)
    (r / "outs").mkdir()
    (r / "existing").mkdir()
    (r / "existing" / "keep.txt").write_text("the user's")
    (r / "afile.txt").write_text("a file")
    transplant(donor, target, components=["L0.mlp"], out=r / "patch", patch=True)
    # broken models
    (_small_files(target, r / "random-header") / "model.safetensors").write_bytes(os.urandom(1000))
    header = json.dumps({"x": {"dtype": "F32"}}).encode()
    (_small_files(target, r / "keyless") / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    shutil.copytree(target, r / "truncated")
    data = (target / "model.safetensors").read_bytes()
    (r / "truncated" / "model.safetensors").write_bytes(data[:-1000])
    (r / "nomagic.gguf").write_bytes(os.urandom(2000))
    (r / "badversion.gguf").write_bytes(b"GGUF" + struct.pack("<I", 99) + os.urandom(2000))
    (r / "short.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 5, 1000) + b"\x07\x00")  # cut in its metadata
    shutil.copytree(target, r / "badconfig")
    (r / "badconfig" / "config.json").write_text('{"model_type": ')
    shutil.copytree(target, r / "latin1config")
    # a GPTQ checkpoint as AutoGPTQ writes it: packed weights beside their scales, said in config.json
    gptq = _small_files(target, r / "gptq")
    config = json.loads((target / "config.json").read_text())
    (gptq / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq", "bits": 4}}))
    shutil.copy(target / "model.safetensors", gptq / "model.safetensors")
    (r / "latin1config" / "config.json").write_bytes(b'{"model_type": "llama", "name": "caf\xe9"}')
    evil = _small_files(target, r / "evil")
    (evil / "pytorch_model.bin").write_bytes(_malicious_pickle())
    shutil.copytree(target, r / "edited")  # hashed, then edited in place with its mtime set back
    weights = r / "edited" / "model.safetensors"
    file_sha256(weights)
    stat = weights.stat()
    time.sleep(0.05)  # past the clock tick of the hash: the edit gets a ctime of its own
    with open(weights, "r+b") as fh:
        fh.seek(-4, os.SEEK_END)
        fh.write(b"\x00\x00\x80\x7f")
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    # broken tasks and plans
    (r / "latin1.jsonl").write_bytes(b'{"prompt": "1+1=", "answer": "2"}\n{"prompt": "caf\xe9", "answer": "1"}\n')
    (r / "broken.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": \n')
    (r / "typo.yaml").write_text("data: task.jsonl\nprompts: '{prompt}'\n")
    (r / "latin1.yaml").write_bytes(b"data: task.jsonl\ndescription: caf\xe9\n")
    (r / "texts.jsonl").write_text("".join(json.dumps({"id": f"x{i}", "text": f"line {i % 2}", "split": s}) + "\n"
                                           for i, s in enumerate(["probe", "dev", "test"] * 2)))  # texts repeat
    (r / "texts.yaml").write_text("data: texts.jsonl\nkind: perplexity\n")
    (r / "plan.yaml").write_text("components: [L1.mlp]\n")
    (r / "plan-latin1.yaml").write_bytes(b"\xff\xfe components: [L1.mlp]\n")
    (r / "plan-typo.yaml").write_text("componentz: [L1.mlp]\n")
    (r / "plan-broken.yaml").write_text("alpha: 1.0\ncomponents: [L1.mlp\n")
    (r / "plan-nan.yaml").write_text("alpha: .nan\ncomponents: [L1.mlp]\n")
    (r / "plan-list.yaml").write_text("- L1.mlp\n")
    # sweep configs
    cfg = SweepConfig(donor=str(donor), target=str(target), task=str(r / "task.yaml"), methods=["weight"], k=[1],
                      alpha=[1.0], components=["head", "mlp"],
                      controls={"random_seeds": [0], "copy_all": False, "weight": False}, batch_size=4)
    base = cfg.to_yaml()
    (r / "cfg.yaml").write_text(base)
    for name, text in {"batch0": base.replace("batch_size: 4", "batch_size: 0"),
                       "typo": base.replace("batch_size: 4", "batchsize: 4"),
                       "broken": "donor: [a\nb: c\n",
                       "k0": base.replace("k:\n- 1", "k:\n- 0"),
                       "alpha": base.replace("alpha:\n- 1.0", "alpha:\n- 1.5"),
                       "device": base.replace("device: cpu", "device: cuda:99"),
                       "mnt0": base.replace("max_new_tokens:\n- null", "max_new_tokens:\n- 0"),
                       "ret0": base.replace("retention_limit: 100", "retention_limit: 0"),
                       "mem": base.replace("reuse_memory_gb: 2.0", "reuse_memory_gb: -1"),
                       "list": "- donor\n- target\n",
                       "notask": base.replace(str(r / "task.yaml"), str(r / "nothere.yaml")),
                       "ppl": base.replace(str(r / "task.yaml"), str(r / "texts.yaml"))}.items():
        assert text != base or name in ("broken", "list"), name
        (r / f"cfg-{name}.yaml").write_text(text)
    (r / "cfg-latin1.yaml").write_bytes(base.encode() + b"# caf\xe9\n")
    # run folders: one in use by another sweep, one computed from other inputs, finished and broken runs
    (r / "locked").mkdir()
    lock = os.open(r / "locked" / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(lock, f"{os.getpid()}\n".encode())
    (r / "changed").mkdir()
    (r / "changed" / "config.yaml").write_text(f"# config hash {cfg.digest()}\n{base}")
    (r / "changed" / "inputs.json").write_text(json.dumps({"task": "0" * 64, "retention": None, "donor": {},
                                                           "target": {}}))
    (r / "changed" / "results.jsonl").write_text(json.dumps({"key": "baseline|dev|a|-|None|None|None|None"}) + "\n")
    write_run(r / "run", [i % 10 < 6 for i in range(100)])
    shutil.copytree(r / "run", r / "run-garbage")
    (r / "run-garbage" / "results.jsonl").write_text("garbage\n{also not json\n" + "{}\n")
    shutil.copytree(r / "run", r / "run-fieldless")
    with (r / "run-fieldless" / "results.jsonl").open("a") as fh:
        fh.write(json.dumps({"key": "grid|dev|transplant|x|1|1.0|None|None", "phase": "grid"}) + "\n")
    yield r
    os.close(lock)


def _malicious_pickle() -> bytes:
    """A checkpoint whose unpickling would call a function (harmless here: it only reads the clock)."""
    import pickle

    class Payload:
        def __reduce__(self) -> tuple[Callable[[], float], tuple[()]]:
            return (time.time, ())

    return pickle.dumps({"model.embed_tokens.weight": Payload()})


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root``: its sha256, or 'dir'."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            seen[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            path = os.path.join(dirpath, f)
            with open(path, "rb") as fh:
                seen[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return seen


# --- a machine that fails writes --------------------------------------------------------------------

class _Failing:
    """An open file whose writes fail (the disk filled up after it was opened)."""

    def __init__(self, fh: io.IOBase, code: int) -> None:
        self._fh, self._code = fh, code

    def write(self, *_: object) -> int:
        raise OSError(self._code, os.strerror(self._code))

    writelines = write

    def __enter__(self) -> _Failing:
        return self

    def __exit__(self, *_: object) -> None:
        self._fh.close()

    def __getattr__(self, name: str) -> object:
        return getattr(self._fh, name)


def break_writes(monkeypatch: pytest.MonkeyPatch, how: str, root: Path) -> None:
    """enospc: every write fails, no space left; erofs: creating files or folders fails, read-only;
    no-access: the folder outs/ says it may not be written to."""
    if how == "no-access":
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == root / "outs" else real(p, mode, **kw))
        return
    code = errno.ENOSPC if how == "enospc" else errno.EROFS
    real_open = builtins.open

    def fail(*_: object, **__: object) -> None:
        raise OSError(code, os.strerror(code))

    def opener(file: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        writing = any(c in mode for c in "wax+")
        if writing and how == "erofs":
            fail()
        fh = real_open(file, mode, *args, **kwargs)
        return _Failing(fh, code) if writing else fh

    monkeypatch.setattr(builtins, "open", opener)
    monkeypatch.setattr(io, "open", opener)
    for name in ("write", "pwrite", "pwritev", "writev", "copy_file_range", "sendfile"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, fail)
    if how == "erofs":
        real_os_open = os.open
        monkeypatch.setattr(os, "mkdir", fail)
        monkeypatch.setattr(os, "open", lambda p, flags, *a, **k: fail() if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
                            else real_os_open(p, flags, *a, **k))


# --- the table --------------------------------------------------------------------------------------

def test_the_table_is_large_and_covers_every_verb() -> None:
    assert len(ROWS) >= 50 and len({r.id for r in ROWS}) == len(ROWS)
    verbs = {r.argv[0] for r in ROWS}
    assert {"check", "transplant", "apply-patch", "eval", "localize", "sweep", "figures", "demo"} <= verbs


@pytest.mark.parametrize("bad", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(bad: Row, ws: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    argv = [a.format(r=ws) for a in bad.argv]
    before = snapshot(ws)
    capsys.readouterr()
    with monkeypatch.context() as broken:
        if bad.broken:
            break_writes(broken, bad.broken, ws)
        with pytest.raises(SystemExit) as stop:
            main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert stop.value.code == 2, err or out
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in bad.words:
        if word.startswith("!"):
            assert word[1:].lower() not in err.lower(), err
        else:
            assert word.lower() in err.lower(), err
    assert snapshot(ws) == before  # nothing written anywhere, no source touched
