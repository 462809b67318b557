"""A study's run folder: RUN/results.jsonl (one fsynced line per finished evaluation), the stored config
and input hashes that decide whether a rerun may resume, the lock that keeps a second sweep out, the
cached rankings, and the names of the files a study writes."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from analysis.errors import GraftError
from analysis.io.files import read_text, write_file
from analysis.study.config import SweepConfig


def read_results(path: Path, *, strict: bool = False) -> tuple[dict[str, dict[str, Any]], list[bytes], bool]:
    """RUN/results.jsonl → its rows by key (a key written twice counts once: the last line wins), the
    whole lines, and whether a torn line was left out. A kill can only cut the last line; ``strict``
    refuses a file that is broken before that (the report's reader), otherwise everything from the
    first broken line on is left out (and computed again by a resumed sweep)."""
    try:
        lines = [ln for ln in path.read_bytes().split(b"\n") if ln.strip()]
    except FileNotFoundError:
        return {}, [], False
    rows: dict[str, dict[str, Any]] = {}
    good: list[bytes] = []
    for n, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except ValueError:  # not JSON, or not UTF-8
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("key"), str):
            if strict and n < len(lines):
                raise GraftError(f"{path} line {n} is not a result line (a JSON object with a key)",
                                 "restore the file, or rerun the sweep into a new --out")
            break  # a line cut by a kill: everything after it is lost with it
        rows[row["key"]] = row
        good.append(line)
    return rows, good, len(good) != len(lines)


class Results:
    """RUN/results.jsonl: one line per finished evaluation, keyed; read back on resume."""

    def __init__(self, run: Path) -> None:
        self.path = run / "results.jsonl"
        self.rows, good, torn = read_results(self.path)
        if torn:  # rewrite without the torn tail so the next append starts on a clean line
            write_file(self.path, b"".join(g + b"\n" for g in good), fsync=True)

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def __getitem__(self, key: str) -> dict[str, Any]:
        return self.rows[key]

    def add(self, row: dict[str, Any]) -> dict[str, Any]:
        with open(self.path, "ab") as fh:
            fh.write(json.dumps(row, ensure_ascii=False).encode() + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.rows[row["key"]] = row
        return row

    def where(self, **match: Any) -> Iterator[dict[str, Any]]:
        for row in self.rows.values():
            if all(row.get(k) == v for k, v in match.items()):
                yield row


def _stored_config(out: Path) -> SweepConfig | None:
    stored = out / "config.yaml"
    if not stored.is_file():
        return None
    try:
        return SweepConfig.parse(read_text(stored, "config.yaml"), stored)
    except GraftError as err:
        raise GraftError(f"{out} is not a sweep's run folder ({err.problem})",
                         "use a new --out, or a folder written by `graftlm sweep`") from None


def grows(cfg: SweepConfig, out: Path) -> bool:
    """Whether the study in RUN may grow its K grid (``k_grow_to``): not when RUN holds results of a study
    made before grids grew (its stored config lacks the key) — grown, it would choose anew beside the
    chosen points already on test — so such a run resumes as it was made, or is refused when the config
    asks for growth by name."""
    stored = out / "config.yaml"
    if cfg.k_grow_to is None:
        return False
    if not stored.is_file() or not _holds_results(out) or "\nk_grow_to:" in "\n" + read_text(stored, "config.yaml"):
        return True
    if "k_grow_to" in cfg.model_fields_set:
        raise GraftError(f"{out} holds a study made before K grids grew: it cannot grow now (k_grow_to)",
                         "use a new --out, or leave k_grow_to out of the config to resume it as it was made")
    return False


def _holds_results(out: Path) -> bool:
    """Has anything been computed in RUN (results or rankings)? Before that, its config may be replaced."""
    results = out / "results.jsonl"
    return (results.is_file() and results.stat().st_size > 0) or any((out / "rankings").glob("*.json"))


def refuse_another_config(config: SweepConfig, out: Path) -> None:
    previous = _stored_config(out)
    if previous is not None and previous.digest() != config.digest() and _holds_results(out):
        raise GraftError(f"{out} holds a run of another config (hash {previous.digest()} ≠ {config.digest()})",
                         "use a new --out, or rerun with the config stored in it")


INPUTS = "inputs.json"  # what a run's results were computed from: content hashes, beside config.yaml


def input_identity(task: Any, retention: Any, donor: dict[str, str], target: dict[str, str]) -> dict[str, Any]:
    """What every result of a study depends on besides its config, by content: the task's items and
    settings (all splits), the retention set, and the sha256 of both models' weights, config and
    tokenizer files (``donor``, ``target``: :func:`analysis.io.checkpoint.fingerprint`)."""
    return {"task": task.fingerprint(with_retention=False),
            "retention": retention.fingerprint() if retention is not None else None, "donor": donor, "target": target}


def _changed_inputs(stored: dict[str, Any], now: dict[str, Any], cfg: SweepConfig) -> list[str]:
    said = []
    if stored.get("task") != now["task"]:
        said.append(f"the task's items or settings ({cfg.task})")
    if stored.get("retention") != now["retention"]:
        said.append(f"the retention set ({cfg.retention})" if cfg.retention else "the task's retention set")
    for who, ref in (("donor", cfg.donor), ("target", cfg.target)):
        before, after = stored.get(who) or {}, now[who]
        files = sorted(n for n in set(before) | set(after) if before.get(n) != after.get(n))
        if files:
            said.append(f"the {who}'s files ({', '.join(files)} of {ref})")
    return said


def refuse_other_inputs(out: Path, identity: dict[str, Any], cfg: SweepConfig) -> bool:
    """Refuse a run folder whose results came from other inputs; True when RUN/inputs.json is there."""
    path = out / INPUTS
    if not path.is_file():
        return False
    try:
        stored = json.loads(read_text(path, INPUTS))
    except ValueError:
        stored = None
    if not isinstance(stored, dict):
        raise GraftError(f"{path} is damaged", "use a new --out (its results cannot be tied to their inputs)")
    changed = _changed_inputs(stored, identity, cfg)
    if changed and _holds_results(out):
        raise GraftError(f"{out} was computed from other inputs: {'; '.join(changed)} changed since",
                         "use a new --out (resuming would mix results of two studies), or restore those inputs")
    return not changed


def open_run(config: SweepConfig, out: Path, identity: dict[str, Any] | None = None) -> Results:
    """Create or resume RUN, under its lock (:func:`run_lock`): a different config or different inputs
    stored there are refused (checked once more, now that no other sweep can write)."""
    out.mkdir(parents=True, exist_ok=True)
    refuse_another_config(config, out)
    same_inputs = identity is not None and refuse_other_inputs(out, identity, config)
    previous = _stored_config(out)
    if previous is None or previous.digest() != config.digest():
        write_file(out / "config.yaml", f"# config hash {config.digest()}\n" + config.to_yaml())
    if identity is not None and not same_inputs:
        write_file(out / INPUTS, json.dumps(identity, indent=1) + "\n")
    return Results(out)


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold RUN/.lock (an exclusive ``flock``, with this process's pid in it) for as long as a sweep
    writes RUN; a second sweep on the same folder is refused, naming the first one's pid. A run folder
    this call created is removed again when the block fails before anything was computed in it."""
    import fcntl

    fresh = not out.exists()
    mine = False  # the lock, or (a fresh folder) nobody else's
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise GraftError(f"{out} is in use by another sweep (pid {_holder(fd)})",
                                 "wait for it to finish, or use another --out") from None
            mine = True
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the lock
    except BaseException:
        if fresh and (mine or not (out / ".lock").exists()) and not _holds_results(out):
            shutil.rmtree(out, ignore_errors=True)  # a study that computed nothing leaves no folder behind
        raise


def _holder(fd: int) -> str:
    """The pid in a lock file another sweep holds (it writes it just after taking the lock)."""
    for _ in range(50):
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if pid:
            return pid
        time.sleep(0.01)
    return "unknown"


def short_name(ref: str) -> str:
    """What a person calls a model in a table or a folder name: a path's or hub id's last part."""
    return ref.rstrip("/").split("/")[-1] or ref


def length_suffix(max_new_tokens: int | None, several: bool) -> str:
    """What names a decoding length's files (plans, figures) when a study has several: ``-tokensN``."""
    return f"-tokens{max_new_tokens or 'default'}" if several else ""


def plan_file(method: str, max_new_tokens: int | None, lengths: list[int | None]) -> str:
    """The name of a method's chosen plan in RUN: one per decoding length when the study has several."""
    return f"plan-{method}{length_suffix(max_new_tokens, len(lengths) > 1)}.yaml"


def read_ranking(path: Path) -> Any:
    """A ranking file of RUN/rankings as written: a dict (a list in runs before rankings kept metadata)."""
    try:
        data = json.loads(read_text(path, "ranking"))
    except ValueError:
        data = None
    if not isinstance(data, dict | list) or (isinstance(data, dict) and not isinstance(data.get("ranking"), list)):
        raise GraftError(f"{path} is not a ranking written by graftlm", "delete it (the sweep localizes again)")
    return data


def rankings_meta(run: str | Path) -> dict[str, dict[str, Any]]:
    """RUN/rankings/*.json → their metadata by file stem (``attribution``, ``gradient-tokens64``, ...):
    what each localization forced, on how many probe items, its metric and checks, its wall."""
    out = {}
    for path in sorted((Path(run) / "rankings").glob("*.json")):
        data = read_ranking(path)
        if isinstance(data, dict):
            out[path.stem] = data.get("meta", {})
    return out


def environment() -> dict[str, Any]:
    """The exact command and package versions, for the report."""
    from importlib.metadata import PackageNotFoundError, version

    packages = {}
    for name in ("graftlm", "torch", "transformers", "transformer-lens", "safetensors", "numpy"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    return {"command": " ".join(["graftlm", *sys.argv[1:]]) if "graftlm" in sys.argv[0] else " ".join(sys.argv),
            "python": platform.python_version(), "platform": platform.platform(), "packages": packages}
