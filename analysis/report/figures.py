"""Figures of a sweep run, regenerated from RUN/results.jsonl alone (PNG for reading, SVG for papers).

    accuracy_vs_k     the paper's curve: dev accuracy against K, one line per α, per method
    accuracy_vs_k_by_length  (several decoding lengths) dev accuracy against K, one line per length
    accuracy_vs_alpha dev accuracy against α at each method's chosen K
    recovery          test accuracy and gap recovery, each with its 95% interval, per method beside its controls
    components        which components each method chose (layer × component heatmap)
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # figures are files: no display needed (CI, remote kernels)

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from analysis.io.files import check_out, write_with  # noqa: E402
from analysis.report import summary  # noqa: E402  (the numbers; analysis.report renders them as text)
from analysis.study.runfolder import length_suffix

sns.set_theme(style="whitegrid", context="notebook")


def _save(fig: plt.Figure, folder: Path, name: str) -> list[Path]:
    """The figure as PNG and SVG, each file written whole or not at all."""
    try:
        paths = [write_with(folder / f"{name}.png", lambda tmp: fig.savefig(tmp, format="png", dpi=150,
                                                                          bbox_inches="tight")),
                 write_with(folder / f"{name}.svg", lambda tmp: fig.savefig(tmp, format="svg", bbox_inches="tight"))]
    finally:
        plt.close(fig)
    return paths


ALL = object()  # grid_frame: every decoding length


def grid_frame(run: str | Path, max_new_tokens: Any = ALL) -> pd.DataFrame:
    """The dev grid as a table: method, top_k, alpha, max_new_tokens, accuracy, ci_low, ci_high (of one
    decoding length when ``max_new_tokens`` is given; None is the task's own)."""
    _, rows = summary.read_rows(run)
    grid = [r for r in rows if r.get("phase") == "grid"
            and (max_new_tokens is ALL or r.get("max_new_tokens") == max_new_tokens)]
    frame = pd.DataFrame([{key: r.get(key) for key in ("method", "top_k", "alpha", "max_new_tokens", "accuracy",
                                                         "ci_low", "ci_high", "k", "n")} for r in grid])
    return frame


def accuracy_vs_k(run: str | Path, folder: Path, s: summary.Summary, name: str = "accuracy_vs_k") -> list[Path]:
    frame = grid_frame(run, s.max_new_tokens)
    if frame.empty:
        return []
    methods = sorted(frame["method"].unique())
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.6), sharey=True, squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        sub = frame[frame["method"] == method]
        sns.lineplot(sub, x="top_k", y="accuracy", hue="alpha", marker="o", palette="viridis", ax=ax)
        ax.axhline(s.donor["dev"].accuracy, color="tab:green", ls="--", lw=1, label="donor")
        ax.axhline(s.target["dev"].accuracy, color="tab:red", ls="--", lw=1, label="target")
        _k_axis(ax, sub["top_k"], method, "dev accuracy", "α")
    fig.suptitle("Accuracy against the number of transplanted components" + _length(s), y=1.03)
    return _save(fig, folder, name)


def _k_axis(ax: plt.Axes, ks: pd.Series, title: str, ylabel: str, legend: str) -> None:
    """A panel of accuracy against K: K on a log₂ axis ticked at the grid's values."""
    ax.set_xscale("log", base=2)
    ticks = sorted(ks.unique())
    ax.set_xticks(ticks, [str(k) for k in ticks])
    ax.minorticks_off()
    ax.set_title(title)
    ax.set_xlabel("components transplanted (K)")
    ax.set_ylabel(ylabel)
    ax.legend(title=legend, fontsize=8)


def accuracy_vs_k_by_length(run: str | Path, folder: Path, summaries: list[summary.Summary],
                            name: str = "accuracy_vs_k_by_length") -> list[Path]:
    """The paper's figure: dev accuracy against K, one line per decoding length (at each K the best α on
    dev), one panel per method; each length's donor and target as dashed lines of its colour."""
    frame = grid_frame(run)
    if frame.empty or len(summaries) < 2:
        return []
    frame["length"] = [_length_label(v) for v in frame["max_new_tokens"]]
    frame = frame.loc[frame.groupby(["method", "top_k", "length"])["accuracy"].idxmax()]
    lengths = sorted(frame["length"].unique(), key=lambda v: (isinstance(v, str), v))
    colors = dict(zip(lengths, sns.color_palette("viridis", len(lengths)), strict=True))
    methods = sorted(frame["method"].unique())
    fig, axes = plt.subplots(1, len(methods), figsize=(4.6 * len(methods), 3.8), sharey=True, squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        for mnt in lengths:
            part = frame[(frame["method"] == method) & (frame["length"] == mnt)].sort_values("top_k")
            ax.errorbar(part["top_k"], part["accuracy"], yerr=[part["accuracy"] - part["ci_low"],
                                                               part["ci_high"] - part["accuracy"]],
                        marker="o", capsize=2, color=colors[mnt], label=str(mnt))
        for s in summaries:
            color = colors.get(_length_label(s.max_new_tokens))
            if color is not None:
                ax.axhline(s.donor["dev"].accuracy, color=color, ls="--", lw=1)
                ax.axhline(s.target["dev"].accuracy, color=color, ls=":", lw=1)
        _k_axis(ax, frame["top_k"], method, "dev accuracy (95% CI)", "max_new_tokens")
    fig.suptitle("Accuracy against K at each decoding length\n(dashed: donor, dotted: target; best α per K)",
                 y=1.06)
    return _save(fig, folder, name)


def _length_label(max_new_tokens: Any) -> int | str:
    """A decoding length as a legend shows it: the number, or "default" (the task's own)."""
    return "default" if max_new_tokens is None or pd.isna(max_new_tokens) else int(max_new_tokens)


def accuracy_vs_alpha(run: str | Path, folder: Path, s: summary.Summary, name: str = "accuracy_vs_alpha") -> list[Path]:
    frame = grid_frame(run, s.max_new_tokens)
    if frame.empty:
        return []
    chosen = {f.method: f.k for f in s.methods}
    rows = [frame[(frame["method"] == m) & (frame["top_k"] == k)] for m, k in chosen.items()]
    if not rows:
        return []
    sub = pd.concat(rows)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for method, part in sub.groupby("method"):
        part = part.sort_values("alpha")
        ax.errorbar(part["alpha"], part["accuracy"], yerr=[part["accuracy"] - part["ci_low"],
                                                           part["ci_high"] - part["accuracy"]],
                    marker="o", capsize=3, label=f"{method} (K={chosen[method]})")
    ax.axhline(s.donor["dev"].accuracy, color="tab:green", ls="--", lw=1, label="donor")
    ax.axhline(s.target["dev"].accuracy, color="tab:red", ls="--", lw=1, label="target")
    ax.set_xlabel("transplant strength α")
    ax.set_ylabel("dev accuracy (95% CI)")
    ax.legend(fontsize=8)
    ax.set_title("Accuracy against strength at the chosen K" + _length(s))
    return _save(fig, folder, name)


def recovery(run: str | Path, folder: Path, s: summary.Summary, name: str = "recovery") -> list[Path]:
    findings = [*s.methods, *s.controls]
    if not findings:
        return []
    labels = [f.label for f in findings]
    colors = ["tab:blue" if f in s.methods else "0.6" for f in findings]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 0.45 * len(findings) + 1.6), sharey=True,
                                      gridspec_kw={"width_ratios": [1.2, 1], "wspace": 0.12})
    acc = [f.acc.accuracy for f in findings]
    left.barh(labels, acc, xerr=[[f.acc.accuracy - f.acc.ci_low for f in findings],
                                 [f.acc.ci_high - f.acc.accuracy for f in findings]], color=colors, capsize=3)
    for who, a, color in (("donor", s.donor["test"], "tab:green"), ("target", s.target["test"], "tab:red")):
        left.axvline(a.accuracy, color=color, ls="--", lw=1)
        left.axvspan(a.ci_low, a.ci_high, color=color, alpha=0.08)
        left.text(a.accuracy, len(findings) - 0.4, f" {who}", color=color, fontsize=8)
    if len(s.random_pooled) == 1:  # one budget: the band a method must clear to beat random
        ((k, a), pooled), = s.random_pooled.items()
        left.axvspan(pooled.ci_low, pooled.ci_high, color="0.5", alpha=0.15)
        left.text(pooled.ci_high, -0.6, f" band: random K={k} α={a}, seeds pooled", color="0.35", fontsize=7)
    left.invert_yaxis()
    left.set_xlabel("test accuracy (95% Wilson interval)")
    # Gap recovery with its paired bootstrap interval; an end beyond the axis (or unbounded) stops at the
    # edge in an arrowhead.
    lo_edge, hi_edge = recovery_axis([f.recovery for f in findings])
    for i, f in enumerate(findings):
        r = f.recovery
        if r.value is None:
            right.text(0.5, i, "undefined", va="center", ha="center", fontsize=8, color="0.4")
            continue
        lo = r.ci_low if r.ci_low is not None else r.value
        hi = r.ci_high if r.ci_high is not None else r.value
        right.plot([max(lo, lo_edge), min(hi, hi_edge)], [i, i], color=colors[i], lw=2.5, solid_capstyle="butt")
        for end, edge, marker in ((lo, lo_edge, "<"), (hi, hi_edge, ">")):
            if (end < edge) if marker == "<" else (end > edge):
                right.plot([edge], [i], marker, color=colors[i], markersize=7, clip_on=False)
        right.plot([r.value], [i], "o", color=colors[i], markeredgecolor="black", markersize=6)
        right.text(min(hi, hi_edge), i - 0.25, f" {r.value:+.0%}", fontsize=8)
    right.axvline(0, color="tab:red", ls="--", lw=1)
    right.axvline(1, color="tab:green", ls="--", lw=1)
    right.set_xlim(lo_edge, hi_edge)
    right.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    right.set_xlabel("gap recovered (95% paired bootstrap interval)")
    fig.suptitle("Methods (blue) beside their controls (grey), on test" + _length(s), y=1.0)
    return _save(fig, folder, name)


def recovery_axis(recoveries: list[Any]) -> tuple[float, float]:
    """The gap-recovered axis: 0% and 100%, every estimate, and every finite interval end within
    [-150%, 250%] (a wider end would squeeze the rest into a line)."""
    shown = [v for r in recoveries if r.value is not None
             for v in (r.value, r.ci_low, r.ci_high) if v is not None and math.isfinite(v)]
    shown = [min(max(v, -1.5), 2.5) for v in shown]
    return min([-0.1, *shown]) - 0.1, max([1.1, *shown]) + 0.1


COMPONENT = re.compile(r"L(\d+)(?:\.(.+))?")


def component_counts(plans: list[list[str]]) -> pd.DataFrame:
    """How many of the plans chose each component: layers × kinds (H0, KV1, mlp, …), and a row ``outer``
    for the tensors outside the layers (embeddings, LM head, final norm) by their short name."""
    counts: dict[tuple[int | str, str], int] = {}
    for plan in plans:
        for cid in plan:
            m = COMPONENT.fullmatch(cid)
            key = (int(m.group(1)), m.group(2) or "layer") if m else ("outer", _tensor_label(cid))
            counts[key] = counts.get(key, 0) + 1
    layers = sorted({k[0] for k in counts if isinstance(k[0], int)})
    rows: list[int | str] = list(range(min(layers), max(layers) + 1)) if layers else []
    rows += ["outer"] if any(k[0] == "outer" for k in counts) else []
    table = pd.DataFrame(0, index=rows, columns=sorted({k[1] for k in counts}, key=_kind_order))
    for (row, kind), n in counts.items():
        table.loc[row, kind] = n
    return table


def components(run: str | Path, folder: Path, s: summary.Summary, name: str = "components") -> list[Path]:
    if not s.methods:
        return []
    table = component_counts([f.plan for f in s.methods])
    if table.empty:
        return []
    kinds = list(table.columns)
    fig, ax = plt.subplots(figsize=(0.5 * len(kinds) + 2.5, 0.4 * len(table) + 1.5))
    sns.heatmap(table, annot=True, fmt="d", cmap="Blues", cbar=False, ax=ax, linewidths=0.5)
    ax.set_xlabel("component")
    ax.set_ylabel("layer")
    ax.set_title(f"Chosen components (how many of {len(s.methods)} methods)" + _length(s))
    return _save(fig, folder, name)


def _tensor_label(name: str) -> str:
    """``model.embed_tokens.weight`` → ``embed_tokens``; ``lm_head.weight`` → ``lm_head``."""
    parts = name.split(".")
    if len(parts) > 1 and parts[-1] in ("weight", "bias"):
        return parts[-2] + ("" if parts[-1] == "weight" else ".bias")
    return name


def _kind_order(kind: str) -> tuple[int, int | str]:
    m = re.fullmatch(r"([HGN])(\d+)", kind)
    if m:
        return ({"H": 0, "G": 1, "N": 3}[m.group(1)], int(m.group(2)))
    return (2, kind)


def _length(s: summary.Summary) -> str:
    return f" (max_new_tokens {s.max_new_tokens})" if s.max_new_tokens is not None else ""


def make_all(run: str | Path, folder: str | Path | None = None) -> list[Path]:
    """Every figure of a run into ``folder`` (default RUN/figures); a study of several decoding lengths
    gets one set per length, named ``…-tokens{N}``."""
    run = Path(run)
    out = Path(folder) if folder is not None else run / "figures"
    summaries = summary.summarize(run)  # a damaged run is refused before anything is written
    check_out(out, replace=False, sources=[run / "results.jsonl", run / "config.yaml"])
    made: list[Path] = []
    for s in summaries:
        suffix = length_suffix(s.max_new_tokens, len(summaries) > 1)
        for fn in (accuracy_vs_k, accuracy_vs_alpha, recovery, components):
            made += fn(run, out, s, fn.__name__ + suffix)
    return made + accuracy_vs_k_by_length(run, out, summaries)
