"""Figures of a sweep run, regenerated from RUN/results.jsonl alone (PNG for reading, SVG for papers).

    accuracy_vs_k     the paper's curve: dev accuracy against K, one line per α, per method
    accuracy_vs_alpha dev accuracy against α at each method's chosen K
    recovery          test accuracy and gap recovery, each with its 95% interval, per method beside its controls
    components        which components each method chose (layer × component heatmap)
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # figures are files: no display needed (CI, remote kernels)

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from analysis import report  # noqa: E402

sns.set_theme(style="whitegrid", context="notebook")


def _save(fig: plt.Figure, folder: Path, name: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png", folder / f"{name}.svg"]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    return paths


def grid_frame(run: str | Path) -> pd.DataFrame:
    """The dev grid as a table: method, top_k, alpha, max_new_tokens, accuracy, ci_low, ci_high."""
    _, rows = report.read_rows(run)
    grid = [r for r in rows if r.get("phase") == "grid"]
    frame = pd.DataFrame([{key: r.get(key) for key in ("method", "top_k", "alpha", "max_new_tokens", "accuracy",
                                                         "ci_low", "ci_high", "k", "n")} for r in grid])
    return frame


def accuracy_vs_k(run: str | Path, folder: Path) -> list[Path]:
    frame = grid_frame(run)
    if frame.empty:
        return []
    summaries = report.summarize(run)
    methods = sorted(frame["method"].unique())
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.6), sharey=True, squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        sub = frame[frame["method"] == method]
        sns.lineplot(sub, x="top_k", y="accuracy", hue="alpha", marker="o", palette="viridis", ax=ax)
        if summaries:
            s = summaries[0]
            ax.axhline(s.donor["dev"].accuracy, color="tab:green", ls="--", lw=1, label="donor")
            ax.axhline(s.target["dev"].accuracy, color="tab:red", ls="--", lw=1, label="target")
        ax.set_xscale("log", base=2)
        ks = sorted(sub["top_k"].unique())
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_title(method)
        ax.set_xlabel("components transplanted (K)")
        ax.set_ylabel("dev accuracy")
        ax.legend(title="α", fontsize=8)
    fig.suptitle("Accuracy against the number of transplanted components", y=1.03)
    return _save(fig, folder, "accuracy_vs_k")


def accuracy_vs_alpha(run: str | Path, folder: Path) -> list[Path]:
    frame = grid_frame(run)
    summaries = report.summarize(run)
    if frame.empty or not summaries:
        return []
    chosen = {f.method: f.k for f in summaries[0].methods}
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
    s = summaries[0]
    ax.axhline(s.donor["dev"].accuracy, color="tab:green", ls="--", lw=1, label="donor")
    ax.axhline(s.target["dev"].accuracy, color="tab:red", ls="--", lw=1, label="target")
    ax.set_xlabel("transplant strength α")
    ax.set_ylabel("dev accuracy (95% CI)")
    ax.legend(fontsize=8)
    ax.set_title("Accuracy against strength at the chosen K")
    return _save(fig, folder, "accuracy_vs_alpha")


def recovery(run: str | Path, folder: Path) -> list[Path]:
    summaries = report.summarize(run)
    if not summaries:
        return []
    s = summaries[0]
    findings = [*s.methods, *s.controls]
    if not findings:
        return []
    labels = [f.label for f in findings]
    colors = ["tab:blue" if f in s.methods else "0.6" for f in findings]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 0.45 * len(findings) + 1.6), sharey=True,
                                      gridspec_kw={"width_ratios": [1.2, 1]})
    acc = [f.acc.accuracy for f in findings]
    left.barh(labels, acc, xerr=[[f.acc.accuracy - f.acc.ci_low for f in findings],
                                 [f.acc.ci_high - f.acc.accuracy for f in findings]], color=colors, capsize=3)
    for name, a, color in (("donor", s.donor["test"], "tab:green"), ("target", s.target["test"], "tab:red")):
        left.axvline(a.accuracy, color=color, ls="--", lw=1)
        left.axvspan(a.ci_low, a.ci_high, color=color, alpha=0.08)
        left.text(a.accuracy, len(findings) - 0.4, f" {name}", color=color, fontsize=8)
    left.invert_yaxis()
    left.set_xlabel("test accuracy (95% Wilson interval)")
    # Gap recovery with its paired bootstrap interval; an unbounded end is drawn to the axis edge.
    values = [f.recovery.value for f in findings]
    shown = [v for v in values if v is not None]
    lo_edge, hi_edge = min([-0.1, *shown]) - 0.1, max([1.1, *shown]) + 0.1
    for i, f in enumerate(findings):
        r = f.recovery
        if r.value is None:
            right.text(0.5, i, "undefined", va="center", ha="center", fontsize=8, color="0.4")
            continue
        lo = r.ci_low if r.ci_low is not None else r.value
        hi = r.ci_high if r.ci_high is not None else r.value
        right.plot([max(lo, lo_edge), min(hi, hi_edge)], [i, i], color=colors[i], lw=2.5, solid_capstyle="butt")
        right.plot([r.value], [i], "o", color=colors[i], markeredgecolor="black", markersize=6)
        right.text(min(hi, hi_edge), i - 0.25, f" {r.value:+.0%}", fontsize=8)
    right.axvline(0, color="tab:red", ls="--", lw=1)
    right.axvline(1, color="tab:green", ls="--", lw=1)
    right.set_xlim(lo_edge, hi_edge)
    right.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    right.set_xlabel("gap recovered (95% paired bootstrap interval)")
    fig.suptitle("Methods (blue) beside their controls (grey), on test", y=1.0)
    return _save(fig, folder, "recovery")


COMPONENT = re.compile(r"L(\d+)(?:\.(.+))?")


def components(run: str | Path, folder: Path) -> list[Path]:
    summaries = report.summarize(run)
    if not summaries or not summaries[0].methods:
        return []
    counts: dict[tuple[int, str], int] = {}
    for f in summaries[0].methods:
        for cid in f.plan:
            m = COMPONENT.fullmatch(cid)
            if m:
                key = (int(m.group(1)), m.group(2) or "layer")
                counts[key] = counts.get(key, 0) + 1
    if not counts:
        return []
    layers = sorted({k[0] for k in counts})
    kinds = sorted({k[1] for k in counts}, key=_kind_order)
    table = pd.DataFrame(0, index=range(min(layers), max(layers) + 1), columns=kinds)
    for (layer, kind), n in counts.items():
        table.loc[layer, kind] = n
    fig, ax = plt.subplots(figsize=(0.5 * len(kinds) + 2.5, 0.4 * len(table) + 1.5))
    sns.heatmap(table, annot=True, fmt="d", cmap="Blues", cbar=False, ax=ax, linewidths=0.5)
    ax.set_xlabel("component")
    ax.set_ylabel("layer")
    ax.set_title(f"Chosen components (how many of {len(summaries[0].methods)} methods)")
    return _save(fig, folder, "components")


def _kind_order(kind: str) -> tuple[int, int | str]:
    m = re.fullmatch(r"([HGN])(\d+)", kind)
    if m:
        return ({"H": 0, "G": 1, "N": 3}[m.group(1)], int(m.group(2)))
    return (2, kind)


def make_all(run: str | Path, folder: str | Path | None = None) -> list[Path]:
    """Every figure of a run into ``folder`` (default RUN/figures)."""
    run = Path(run)
    out = Path(folder) if folder is not None else run / "figures"
    made: list[Path] = []
    for fn in (accuracy_vs_k, accuracy_vs_alpha, recovery, components):
        made += fn(run, out)
    return made
