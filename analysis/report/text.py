"""A study's report: RUN/report.md and a self-contained RUN/report.html, the verdict first.

The numbers come from :mod:`analysis.report.summary`; ``write(run)`` regenerates the figures
(:mod:`analysis.report.figures`) and writes both files.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

from analysis.errors import GraftError
from analysis.eval import metrics
from analysis.io.files import read_text, write_file
from analysis.report.summary import Summary, _margin_above_zero, _points, beats_random, summarize
from analysis.study.runfolder import plan_file, short_name

# --- rendering -----------------------------------------------------------------------------------

def _fmt_acc(a: metrics.Accuracy) -> str:
    return f"{a.accuracy:.3f} ({a.k}/{a.n}; {a.ci_low:.3f}–{a.ci_high:.3f})"


def _fmt_retention(value: float | None, change: metrics.Change | None, measure: str = "perplexity") -> str:
    """Perplexity with its relative change, or accuracy with its change in points, each [95% CI]."""
    shown = _fmt(value) if measure == "perplexity" or value is None else f"{value:.3f}"
    if change is None:
        return shown
    if measure == "perplexity":
        return f"{shown} ({change.value:+.1%} [{change.ci_low * 100:+.1f}, {change.ci_high * 100:+.1f}])"
    return f"{shown} ({change.value * 100:+.1f} points [{change.ci_low * 100:+.1f}, {change.ci_high * 100:+.1f}])"


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return f"{x:.0%}" if pct else f"{x:.3g}"


def _gap_reason(s: Summary) -> str:
    gap = s.donor["test"].accuracy - s.target["test"].accuracy
    return f"{gap:+.3f}, donor vs target McNemar p = {s.donor_vs_target.p_value:.3g}"


def headline(s: Summary) -> list[list[str]]:
    """The table printed at the end of a sweep: one row per model / method / control."""
    m = s.retention_metric
    rows = [["target", short_name(s.target_ref), _fmt_acc(s.target["test"]), "1", "0%", "—",
             _fmt_retention(s.retention.get("target"), None, m)],
            ["donor", short_name(s.donor_ref), _fmt_acc(s.donor["test"]), _fmt(metrics.tir(s.donor["test"].accuracy,
                                                                                 s.target["test"].accuracy)),
             "100%", _fmt(s.donor_vs_target.p_value), _fmt_retention(s.retention.get("donor"), s.donor_retention_change, m)]]
    for f in [*s.methods, *s.controls]:
        kind = "method" if f in s.methods else "control"
        rows.append([kind, f.label, _fmt_acc(f.acc), _fmt(f.tir), f.recovery.describe("") if f.recovery.value is not None else "—",
                     _fmt(f.vs_target.p_value), _fmt_retention(f.retention, f.retention_change, m)])
    for (k, a), acc in s.random_pooled.items():
        rows.append(["control", f"random K={k} α={a}, seeds pooled", _fmt_acc(acc), "", "", "", ""])
    return rows


HEADER = ["", "model / point", "test accuracy (k/n; 95% CI)", "TIR", "gap recovery (95% CI)", "McNemar p vs target",
          "retention ppl (Δ, 95% CI)"]


def header(s: Summary) -> list[str]:
    """The headline table's columns: the last says what the retention set measured."""
    return [*HEADER[:-1], "retention ppl (Δ, 95% CI)" if s.retention_metric == "perplexity"
            else "retention accuracy (Δ points, 95% CI)"]


def _environment(run: Path) -> dict[str, Any]:
    """RUN/environment.json (empty when missing or damaged: it only adds the command and versions)."""
    try:
        env = json.loads(read_text(run / "environment.json"))
    except (GraftError, ValueError):
        return {}
    return env if isinstance(env, dict) else {}


def markdown(run: str | Path, figures: list[Path] | None = None) -> str:
    run = Path(run)
    summaries = summarize(run)
    env = _environment(run)
    parts = ["# graftlm sweep report", ""]
    for s in summaries:
        length = f" (max_new_tokens = {s.max_new_tokens})" if s.max_new_tokens else ""
        parts += [f"**Task {s.task}{length}, donor {s.donor_ref} → target {s.target_ref}.**", ""]
        parts += [f"> {line}" for line in s.verdict] + [""]
        if s.notes:
            parts += ["Notes:", "", *(f"- {line}" for line in s.notes), ""]
        parts += ["| " + " | ".join(header(s)) + " |", "|" + "---|" * len(HEADER)]
        parts += ["| " + " | ".join(r) + " |" for r in headline(s)]
        parts += ["", f"Baselines on dev: donor {_fmt_acc(s.donor['dev'])}, target {_fmt_acc(s.target['dev'])}. "
                  "K and α were chosen on dev; every figure above is on test, which selection never saw. "
                  "Accuracy intervals are Wilson's; gap recovery (transplant − target) / (donor − target) has a "
                  "paired percentile bootstrap interval over the test items; the gap itself: "
                  f"{_gap_reason(s)}. Retention: " + ("perplexity on off-task text, its change against the "
                  "target's with a bootstrap interval over the texts (paired)." if s.retention_metric == "perplexity"
                  else "accuracy on a second benchmark, its change against the target's in points with a "
                  "bootstrap interval over the questions (paired)."), ""]
        for f in s.methods:
            against = (f"; against random components at the same budget {_points(f.vs_random)}"
                       if f.vs_random is not None else "")
            parts.append(f"- {f.method}: components {', '.join(f.plan)}; gap recovery {f.recovery}; "
                         f"{_flips(f.vs_target)}{against}.")
        parts.append("")
    for fig in figures or []:
        parts += [f"![{fig.stem}]({fig.relative_to(run)})", ""]
    parts += _ship(run, summaries)
    if env:
        parts += ["## Reproduce", "", f"`{env.get('command', '')}`", "",
                  "Packages: " + ", ".join(f"{k} {v}" for k, v in env.get("packages", {}).items()), ""]
        reuse = env.get("reuse") or {}
        if reuse.get("forward_calls_replayed"):
            parts += [f"Activations below the transplanted layers were computed once and replayed in "
                      f"{reuse['forward_calls_replayed']} forward calls ({reuse['layer_forwards_skipped']} layer "
                      "forwards not run; results identical to full forwards).", ""]
    return "\n".join(parts)



def _flips(vs_target: metrics.McNemar) -> str:
    """What the transplant changed item by item: the target's errors it fixed, its answers it broke."""
    return (f"on test it fixed {vs_target.b} items the target got wrong and broke {vs_target.c} the target "
            "got right")


def _ship(run: Path, summaries: list[Summary]) -> list[str]:
    """How to write the chosen transplant as a model (or a patch), best-recovering method first."""

    lengths = [s.max_new_tokens for s in summaries]
    lines: list[str] = []
    for s in summaries:
        ranked = sorted(s.methods, key=lambda f: (not beats_random(f, s.random_pooled),
                                                  -(f.recovery.value if f.recovery.value is not None else -math.inf)))
        for f in ranked:
            plan = run / plan_file(f.method, s.max_new_tokens, lengths)
            if not plan.is_file():
                continue
            if not lines:
                lines += ["## Ship or roll back", "",
                          "Each method's chosen point is a plan in this folder. `graftlm transplant` writes it as a "
                          "Hugging Face folder (`AutoModelForCausalLM.from_pretrained` loads it) or, with "
                          "`--patch`, as the changed tensors only (`graftlm apply-patch` rebuilds the model from "
                          "the target). The source models are never modified: rolling back is using the target.",
                          ""]
            why = "beats the random control" if beats_random(f, s.random_pooled) else \
                f"beats random components by {_points(f.vs_random)}, not the random control's interval" \
                if _margin_above_zero(f) and f.vs_random is not None else "does NOT beat the random control"
            lines += [f"- {f.label}{' for max_new_tokens ' + str(s.max_new_tokens) if len(lengths) > 1 else ''}: "
                      f"{why}; gap recovery {f.recovery}", "",
                      f"      graftlm transplant -d {s.donor_ref} -t {s.target_ref} --plan {plan} --out "
                      f"{short_name(s.target_ref).replace(':', '-')}-{f.method}", ""]
    return lines


def write(run: str | Path) -> Path:
    """Regenerate the figures and write RUN/report.md and a self-contained RUN/report.html."""
    from analysis.report import figures as figs

    run = Path(run)
    made = figs.make_all(run)
    md = markdown(run, [p for p in made if p.suffix == ".png"])
    write_file(run / "report.md", md)
    write_file(run / "report.html", _html(md, run))
    return run / "report.md"


def _html(md: str, run: Path) -> str:
    """Markdown-ish to HTML with images inlined as base64, so the file travels alone."""
    body = []
    in_table = False
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                body.append("<table>")
                in_table = True
            body.append("<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("    ") and line.strip():  # an indented command
            body.append(f"<pre><code>{html.escape(line.strip())}</code></pre>")
        elif line.startswith("!["):
            src = line[line.index("(") + 1:-1]
            data = base64.b64encode((run / src).read_bytes()).decode()
            body.append(f'<p><img alt="{html.escape(src)}" src="data:image/png;base64,{data}" width="720"></p>')
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("> "):
            body.append(f"<blockquote>{html.escape(line[2:])}</blockquote>")
        elif line.strip():
            body.append(f"<p>{html.escape(line).replace('**', '')}</p>")
    if in_table:
        body.append("</table>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;font-size:90%}blockquote{border-left:4px solid #c33;"
             "margin:0;padding:4px 12px;background:#fff4f4}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>graftlm report</title><style>{style}</style>" \
           f"</head><body>{''.join(body)}</body></html>"
