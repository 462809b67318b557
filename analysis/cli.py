"""The `graftlm` command: a thin layer over the Python API with the same verbs.

Bad input raises :class:`~analysis.errors.GraftError` below this module; here it becomes one line on
stderr and exit code 2, without a traceback.

Over 400 lines: one typer command per verb, each with the help text of its options — the CLI's
reference page; every verb's work is the Python API's.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from analysis.errors import GraftError, Terminated, problem_of

if TYPE_CHECKING:
    from rich.console import Console

app = typer.Typer(
    name="graftlm",
    help="Find the heads and MLPs that carry a task, transplant them from a donor into a target model, "
    "and measure what that recovers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class _LazyConsole:
    """rich's Console, imported on first use: `transplant` and `apply-patch` print one plain line."""

    def __init__(self, stderr: bool = False) -> None:
        self._stderr = stderr
        self._console: Console | None = None

    def print(self, *objects: Any, **kwargs: Any) -> None:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=self._stderr)
            if not self._console.is_terminal and not os.environ.get("COLUMNS"):
                self._console.width = 160  # a log or a pipe: tables on one line a row, not folded to 80
        self._console.print(*objects, **kwargs)


out_console = _LazyConsole()
err_console = _LazyConsole(stderr=True)

Donor = Annotated[str, typer.Option("--donor", "-d", help="Donor model: HF folder, .gguf file, demo:NAME or hub id.")]
Target = Annotated[str, typer.Option("--target", "-t", help="Target model (same architecture), as for --donor.")]
AllowPickle = Annotated[bool, typer.Option("--allow-pickle", help="Accept .bin/.pt weights (loaded weights_only).")]
TrustCode = Annotated[bool, typer.Option("--trust-remote-code", help="Run a model's own modelling code.")]


@app.command("check")
def check_cmd(
    donor: Donor,
    target: Target,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustCode = False,
) -> None:
    """Can the donor's components go into the target? Exit 2 if not, naming the first offending tensors."""
    from rich.table import Table

    from analysis.check import check

    report = check(donor, target, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if as_json:
        print(json.dumps(report.to_dict()))
    else:
        table = Table(title=f"{report.donor} → {report.target} ({report.family})")
        for col in ("kind", "matched", "of"):
            table.add_column(col, justify="right" if col != "kind" else "left")
        for kind, total in report.totals.items():
            table.add_row(kind, str(report.matched.get(kind, 0)), str(total))
        out_console.print(table)
        for key, (d, t) in sorted(report.config_diffs.items()):
            out_console.print(f"config {key}: donor {d!r}, target {t!r}")
        tok = {"same": "identical", "different": "DIFFERENT", None: "not compared (no tokenizer.json)",
               "compatible": "compatible (one adds tokens; every shared token has the same id)"}[report.tokenizer]
        out_console.print(f"tokenizer: {tok}")
        for name, d, t in report.mismatched[:5]:
            why = " (the vocabulary's: not transplantable, no candidate)" if name in report.unshared else ""
            out_console.print(f"mismatch {name}: donor {d}, target {t}{why}")
        tied = [n for n in report.unshared if n not in {m[0] for m in report.mismatched}]
        if tied:  # the embeddings a model ties its LM head to: the same shape, another meaning
            out_console.print(f"unshared {', '.join(tied)}: one model's LM head too (tied), no candidate")
        for note in report.notes:
            out_console.print(f"note: {note}")
    if not report.ok:
        raise GraftError(f"not transplantable: {report.problems[0]}", "see the table above (or --json)")
    if not as_json:
        out_console.print("[green]transplantable[/green]")


@app.command("transplant")
def transplant_cmd(
    donor: Donor,
    target: Target,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write (an HF model, or a patch with --patch).")],
    plan: Annotated[Path | None, typer.Option("--plan", "-p", help="Plan YAML (see `analysis.plan`).")] = None,
    components: Annotated[list[str] | None, typer.Option(
        "--components", "-c", help="Component patterns instead of a plan: L3.mlp, 'L*.H0', L5.attn.q, … (repeat).")] = None,
    alpha: Annotated[float | None, typer.Option(
        "--alpha", "--strength", "-a", help="α for every component (default 1 = copy); --strength is its old name.")] = None,
    patch: Annotated[bool, typer.Option("--patch", help="Write a graft patch (changed tensors only).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")] = False,
    allow_extrapolation: Annotated[bool, typer.Option("--allow-extrapolation", help="Allow α outside [0, 1].")] = False,
    verify: Annotated[bool, typer.Option(
        "--verify", help="Hash both sources' files anew instead of trusting remembered hashes or the sha256 the hub "
        "lists (hub cache blob names, hf download --local-dir records).")] = False,
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustCode = False,
) -> None:
    """Blend the donor's components into the target: W' = (1 − α)·W_target + α·W_donor, written to --out."""
    from analysis.transplant import transplant

    written = transplant(donor, target, plan, out=out, components=components, alpha=alpha, patch=patch,
                         force=force, allow_extrapolation=allow_extrapolation, allow_pickle=allow_pickle,
                         trust_remote_code=trust_remote_code, verify=verify)
    print(f"wrote {'patch' if patch else 'model'} {written}")


@app.command("apply-patch")
def apply_patch_cmd(
    target: Target,
    patch: Annotated[Path, typer.Option("--patch", help="Patch folder written by `graftlm transplant --patch`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the transplanted model to.")],
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")] = False,
    verify: Annotated[bool, typer.Option(
        "--verify", help="Hash the target's files anew instead of trusting remembered hashes.")] = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Rebuild a transplanted model from its target and a graft patch (target hashes are checked)."""
    from analysis.graft_files import apply_patch

    written = apply_patch(target, patch, out=out, force=force, allow_pickle=allow_pickle, verify=verify)
    print(f"wrote model {written}")


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Option("--model", "-m", help="Model: HF folder, .gguf file, demo:NAME or hub id.")],
    task: Annotated[str, typer.Option("--task", help="Task YAML, JSONL file, datasets folder, built-in or demo:NAME.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for records.jsonl and summary.json.")],
    split: Annotated[str | None, typer.Option(
        "--split", help="probe | dev | test | retention | all (default: test; a task without splits: all items).")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Evaluate the first N items of the split.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", help="Generation length cap.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Batch size (speed only, never results).")] = 8,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (the summary).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")] = False,
    device_map: Annotated[str | None, typer.Option(
        "--device-map", help="transformers' device_map: auto, balanced, sequential, or a JSON object of module → "
                             "device (cpu, disk, a GPU index); modules may be offloaded to disk.")] = None,
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustCode = False,
) -> None:
    """Evaluate a model on a task: per-item records and accuracy with k/n and a 95% Wilson interval."""
    from analysis.eval import tasks
    from analysis.eval.evaluate import check_options, describe, run
    from analysis.io.files import check_out
    from analysis.io.models import load
    from analysis.io.refs import source_paths

    # every argument is checked before any work: numbers, --out, the task file, then the model
    check_options(batch_size=batch_size, limit=limit, max_new_tokens=max_new_tokens)
    task_file = [Path(task)] if Path(task).exists() else []
    check_out(out, force=force, sources=[*source_paths(model), *task_file])
    loaded_task = tasks.load(task, split=split, limit=limit)  # a bad task file fails before the model loads
    placement = _device_map_option(device_map)
    loaded = load(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, device_map=placement)
    result = run(loaded.model, loaded.tokenizer, loaded_task, split=split, limit=limit, batch_size=batch_size,
                 max_new_tokens=max_new_tokens, out=out, progress=not as_json, force=force)
    if as_json:
        print(json.dumps(result.summary))
    else:
        out_console.print(describe(result.summary), highlight=False)
        out_console.print(f"records: {result.paths['records']}")


def _device_map_option(text: str | None) -> str | dict[str, int | str] | None:
    """--device-map: a strategy name, or a JSON object of module → device."""
    if text is None or not text.lstrip().startswith("{"):
        return text
    try:
        return json.loads(text)  # an object: it starts with "{"
    except ValueError as err:
        raise GraftError(f"--device-map is not a JSON object: {err}",
                         'write it as \'{"model.layers.1": "disk", "": "cpu"}\'') from err


@app.command("sweep")
def sweep_cmd(
    config: Annotated[Path, typer.Argument(help="Sweep config YAML (see examples/demo.yaml).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: results.jsonl, plans, figures, report.")],
    ray: Annotated[str | None, typer.Option(
        "--ray", metavar="[ADDRESS]", help="Run the grid and controls on Ray actors: bare, Ray on this machine (or "
        "as the config's ray: says); auto, HOST:PORT or ray://HOST:PORT, that cluster.")] = None,
) -> None:
    """Baselines, localization on probe, a K × α grid on dev (grown where its top K is still a method's
    best and well short of the donor: k_grow_to), chosen points and controls on test, report.

    Rerunning with the same --out resumes: finished points are skipped.
    """
    from analysis.study.sweep import sweep

    run = sweep(config, out, ray=True if ray == BARE_RAY else ray)
    _finish_run(run)


@app.command("figures")
def figures_cmd(
    run: Annotated[Path, typer.Argument(help="A run folder written by `graftlm sweep`.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for the figures (default RUN/figures).")] = None,
) -> None:
    """Regenerate every figure of a run (PNG and SVG) and its report.md / report.html."""
    from analysis import report
    from analysis.io.files import check_out
    from analysis.report import figures

    report.summarize(run)  # a run that cannot be read is refused before anything is written
    check_out(run, replace=False, flag="RUN")
    if out is not None:
        check_out(out, replace=False, sources=[run / "results.jsonl", run / "config.yaml"])
    made = figures.make_all(run, out)
    report.write(run)
    out_console.print(f"{len(made)} figure files, report {run / 'report.md'}")


@app.command("demo")
def demo_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder.")] = Path("runs/demo"),
) -> None:
    """The whole study on the embedded demo pair (offline, a few minutes on 2 cores)."""
    from analysis.study.config import DEMO_CONFIG
    from analysis.study.sweep import sweep

    out_console.print(f"graftlm demo: {DEMO_CONFIG} → {out}")
    run = sweep(DEMO_CONFIG, out)
    _finish_run(run)


@app.command("localize")
def localize_cmd(
    donor: Donor,
    target: Target,
    task: Annotated[str, typer.Option("--task", help="Task YAML, JSONL file, built-in or demo:NAME (probe split only).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for scores.csv/json, figures and plan-top{K}.yaml.")],
    method: Annotated[str, typer.Option(
        "--method", "-m",
        help="gradient (default) | greedy | mask | attribution | patching | shifts | lae | weight | random.")] = "gradient",
    components: Annotated[str | None, typer.Option(
        "--components", "-c", help="Kinds to rank: head,kv,mlp,outer (default; lae: linear), attn, group, neuron, linear, "
        "layer; outer: the tensors outside the layers (embeddings, LM head, final norm).")] = None,
    mode: Annotated[str | None, typer.Option(
        "--mode", help="teacher (same text, default) | generate (each decodes; default for lae).")] = None,
    positions: Annotated[str, typer.Option("--positions", help="Teacher mode: answer | all | last.")] = "answer",
    metric: Annotated[str, typer.Option(
        "--metric", help="Causal methods: logprob | logit_diff of the forced answer.")] = "logprob",
    answers: Annotated[str, typer.Option(
        "--answers", help="What is forced as the answer: donor (its own correct outputs) | reference (the "
        "task's target template).")] = "donor",
    top: Annotated[list[int] | None, typer.Option("--top", "-k", help="Plan size K (repeat for several).")] = None,
    alpha: Annotated[float, typer.Option("--alpha", "-a", help="Strength α written into the plans.")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random method.")] = 0,
    limit: Annotated[int | None, typer.Option("--limit", help="Use the first N probe items.")] = None,
    split: Annotated[str, typer.Option("--split", help="The task split read as the probe (e.g. train).")] = "probe",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Prompts per forward.")] = 8,
    converse: Annotated[bool, typer.Option("--converse", help="Also patch target → donor (necessity).")] = False,
    per_position: Annotated[bool, typer.Option("--per-position", help="Also patch attn/mlp blocks per position.")] = False,
    dtype: Annotated[str, typer.Option("--dtype", help="Compute dtype: float32 | bfloat16 | float16 | auto.")] = "float32",
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")] = False,
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustCode = False,
) -> None:
    """Rank the components that carry the task difference (probe split only); write scores, figures, plans."""
    from rich.table import Table

    from analysis.interp.localize import localize

    result = localize(donor, target, task, method=method, components=components, mode=mode, positions=positions,
                      metric=metric, answers=answers, top=top or [8], alpha=alpha, seed=seed, limit=limit, split=split,
                      batch_size=batch_size,
                      converse=converse, per_position=per_position, out=out, dtype=dtype, force=force,
                      allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    table = Table(title=f"top {min(10, len(result.ranking))} by {result.method}")
    for col in ("rank", "component", "score"):
        table.add_column(col, justify="right" if col != "component" else "left")
    for i, cid in enumerate(result.ranking[:10], start=1):
        table.add_row(str(i), cid, f"{result.scores.loc[cid, 'score']:.4g}")
    out_console.print(table)
    meta = result.meta
    if "answers" in meta:
        left = ", ".join(f"{n} {why}" for why, n in meta["dropped"].items())
        out_console.print(f"forced answers: {meta['answers']}, on {meta['n_probe_used']} of {meta['n_probe_read']} "
                          f"probe items{f' ({left} left out)' if left else ''}; donor check "
                          f"{meta['check'].get('agreement', 1.0):.0%} agreement", highlight=False)
    if meta.get("warning"):
        from rich.markup import escape

        err_console.print(f"[yellow]warning:[/yellow] {escape(meta['warning'])}", highlight=False, soft_wrap=True)
    out_console.print(f"wrote {out}: scores.csv, scores.json, " + ", ".join(f"plan-top{k}.yaml" for k in result.plans))


def _finish_run(run: Path) -> None:
    """Write the report and print its headline table."""
    from rich import box
    from rich.table import Table

    from analysis import report

    path = report.write(run)
    for summary in report.summarize(run):
        table = Table(title=f"{summary.task}: {summary.donor_ref} → {summary.target_ref}"
                      + (f" (max_new_tokens {summary.max_new_tokens})" if summary.max_new_tokens else ""),
                      box=box.SIMPLE_HEAD)
        for col in report.header(summary):
            table.add_column(col, overflow="fold")  # a narrow terminal folds numbers, never cuts them
        for row in report.headline(summary):
            table.add_row(*row)
        out_console.print(table)
        for line in summary.verdict:
            out_console.print(f"[bold]{line}[/bold]")
        for line in summary.notes:
            out_console.print(f"- {line}", highlight=False)
    out_console.print(f"report: {path}  (and report.html, figures/)")


def _quiet_progress_bars() -> None:
    """Our own bars cover long stages; keep Hugging Face's off (and errors on one line).

    Without importing transformers: it takes a second, and file-to-file commands never need it. The
    variable is read when huggingface_hub is first imported; modules already imported are told directly.
    """
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


BARE_RAY = ""  # what `--ray` without an address stands for: Ray as the config says, else on this machine
RAY_ADDRESS = re.compile(r"auto|local|ray://\S+|[\w.-]+:\d+")


def ray_argument(argv: list[str]) -> list[str]:
    """`graftlm sweep … --ray [ADDRESS]`: a bare --ray (followed by nothing, an option, or a word that is
    no Ray address, such as the config file) gets an empty value, so the parser sees one form."""
    if not argv or argv[0] != "sweep" or "--ray" not in argv:
        return argv
    at = argv.index("--ray")
    following = argv[at + 1] if at + 1 < len(argv) else None
    if following is not None and RAY_ADDRESS.fullmatch(following):
        return argv
    return [*argv[: at + 1], BARE_RAY, *argv[at + 1:]]


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app; bad input of any kind becomes one line on stderr and exit code 2.

    This is the one place that maps exceptions to that line: :class:`GraftError` from the library,
    click's usage errors, and what the operating system says about the user's files and disks
    (:func:`problem_of`). Anything else is a bug in graftlm and keeps its traceback. SIGTERM ends a
    command like Ctrl-C does — staged outputs are removed on the way out — with exit code 143.
    """
    click = _click_exceptions()
    _quiet_progress_bars()
    previous = _on_sigterm()
    try:
        code = app(args=ray_argument(sys.argv[1:] if argv is None else argv), standalone_mode=False,
                   prog_name="graftlm")
    except click.NoArgsIsHelpError as err:  # bare `graftlm`: the help, as click prints it
        err.show()
        code = err.exit_code
    except click.ClickException as err:  # usage: a missing or malformed option, an unknown command
        where = f"graftlm {err.ctx.command.name}" if getattr(err, "ctx", None) and err.ctx.command.name else "graftlm"
        _say_error(f"{err.format_message().rstrip('.')} — see `{where} --help`".replace("graftlm graftlm", "graftlm"))
        code = 2
    except (typer.Abort, KeyboardInterrupt):  # outside the command (typer: exit code 130 inside)
        code = 130
    except Terminated:
        _say_interrupted("terminated")
        code = 143
    except Exception as err:
        line = problem_of(err)
        if line is None:
            raise  # a bug: its traceback is what a report needs
        if os.environ.get("GRAFTLM_TRACEBACK"):
            import traceback

            traceback.print_exc()
        _say_error(line)
        code = 2
    finally:
        _restore_sigterm(previous)
    if code == 130:
        _say_interrupted()
    if argv is None and not code:  # the console script, done: skip tearing down every module
        _exit_now()
    sys.exit(code or 0)


def _click_exceptions() -> Any:
    """The click exceptions of the click that typer runs on (recent typers carry their own copy)."""
    try:
        from typer._click import exceptions
    except ImportError:  # typer on the click package
        from click import exceptions
    return exceptions


def _say_error(line: str) -> None:
    from rich.markup import escape

    from analysis.errors import one_line

    err_console.print(f"[bold red]error:[/bold red] {escape(one_line(line))}", highlight=False, soft_wrap=True)


def _on_sigterm() -> Any:
    """Make SIGTERM raise :class:`Terminated` in the main thread (a second SIGTERM ends at once)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated()

    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm(previous: Any) -> None:
    import signal

    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def _say_interrupted(how: str = "interrupted") -> None:
    # nothing half-written is left: outputs are staged and renamed, a sweep's lines are whole
    err_console.print(f"{how}; a sweep resumes where it stopped when run again with the same --out (nothing "
                      "half-written was kept)", highlight=False, soft_wrap=True)


def _exit_now() -> None:
    """End the process once the exit handlers ran and output is flushed (if no other thread runs).

    Freeing each imported module and object one by one takes ~30 ms (numpy, pydantic, typer…), 7% of
    a transplant written as a patch; every file is closed by then and the operating system frees
    memory at once.
    """
    import atexit
    import threading

    if threading.active_count() > 1:  # a thread still working gets the normal shutdown, which waits for it
        return
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
