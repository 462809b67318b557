"""A localization's figures: a layer × head heatmap of the scores, the blocks' scores by layer, the top
components, and the answer positions where the method measured them — each drawn on a given axis for
notebooks, or all written as PNG files beside scores.csv (:func:`analysis.interp.localize.write`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from analysis.interp.methods import CAUSAL

if TYPE_CHECKING:
    import pandas as pd

    from analysis.interp.localize import Localization


def _label(result: Localization) -> str:
    col = {"shifts": "rel. distance" if result.meta.get("mode") == "teacher" else "|effect size|",
           "lae": "|Δ mean |a|| (last generated token)", "weight": "‖W_d − W_t‖/‖W_t‖", "random": "random score"}
    metric = result.meta.get("metric", "logprob")
    return col.get(result.method, f"Δ {metric} (donor → target)")


def _diverging(result: Localization) -> bool:
    return result.method in CAUSAL


def plot_heads(result: Localization, ax: Any = None) -> Any:
    """Heatmap layer × head of the method's score."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    heads = result.scores[result.scores["kind"] == "head"]
    if heads.empty:
        return None
    grid = heads.pivot_table(index="layer", columns="index", values="score", aggfunc="first")
    ax = ax or plt.subplots(figsize=(1.0 + 0.5 * grid.shape[1], 1.0 + 0.4 * grid.shape[0]))[1]
    kw: dict[str, Any] = {"center": 0, "cmap": "RdBu_r"} if _diverging(result) else {"cmap": "viridis"}
    sns.heatmap(grid, ax=ax, annot=grid.size <= 64, fmt=".2g", cbar_kws={"label": _label(result)}, **kw)
    ax.set(xlabel="head", ylabel="layer", title=f"{result.method}: heads")
    return ax


def plot_blocks(result: Localization, ax: Any = None) -> Any:
    """Heatmap layer × {attn, mlp} (or layer × projection for linears)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    s = result.scores
    blocks = s[s["kind"].isin(["attn", "mlp"])]
    if blocks.empty:
        blocks = s[s["kind"] == "linear"]
        if blocks.empty:
            return None
        blocks = blocks.assign(part=[i.split(".", 1)[1] for i in blocks.index])
    else:
        blocks = blocks.assign(part=blocks["kind"])
    grid = blocks.pivot_table(index="layer", columns="part", values="score", aggfunc="first")
    grid = grid[[c for c in ("attn", "mlp", "attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")
                 if c in grid.columns]]
    ax = ax or plt.subplots(figsize=(1.5 + 0.8 * grid.shape[1], 1.0 + 0.4 * grid.shape[0]))[1]
    kw: dict[str, Any] = {"center": 0, "cmap": "RdBu_r"} if _diverging(result) else {"cmap": "viridis"}
    sns.heatmap(grid, ax=ax, annot=grid.size <= 64, fmt=".2g", cbar_kws={"label": _label(result)}, **kw)
    ax.set(xlabel="", ylabel="layer", title=f"{result.method}: blocks")
    return ax


def plot_top(result: Localization, n: int = 20, ax: Any = None) -> Any:
    """Bar chart of the top ``n`` ranked components by the method's score."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    ids = result.ranking[:n]
    data = result.scores.loc[ids].reset_index()
    ax = ax or plt.subplots(figsize=(6, 0.8 + 0.25 * len(ids)))[1]
    sns.barplot(data=data, y="id", x="score", hue="kind", dodge=False, ax=ax)
    ax.set(xlabel=_label(result), ylabel="", title=f"top {len(ids)} by {result.method}")
    return ax


def plot_positions(table: pd.DataFrame, ax: Any = None) -> Any:
    """Heatmap component × position (from the end) of per-position patching."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    ax = ax or plt.subplots(figsize=(1.5 + 0.4 * table.shape[1], 1.0 + 0.35 * table.shape[0]))[1]
    sns.heatmap(table, ax=ax, center=0, cmap="RdBu_r", cbar_kws={"label": "Δ metric"})
    ax.set(xlabel="position (from the end)", ylabel="", title="patching per position")
    return ax


def plot_all(result: Localization, out: Path) -> dict[str, str]:
    """Every figure of ``result`` as a PNG in ``out``. Figures are built without pyplot, so a
    notebook's backend is left alone and nothing stays open."""
    from matplotlib.figure import Figure

    s = result.scores
    n_layers = int(s["layer"].max()) + 1
    n_heads = int(s.loc[s["kind"] == "head", "index"].max() + 1) if (s["kind"] == "head").any() else 0
    n_parts = 2 if s["kind"].isin(["attn", "mlp"]).any() else 7
    sizes = {"heads": (min(2.5 + 0.5 * n_heads, 24), min(1.5 + 0.4 * n_layers, 18)),
             "blocks": (2.5 + 0.8 * n_parts, min(1.5 + 0.4 * n_layers, 18)),
             "top": (7, 1.2 + 0.25 * min(20, len(result.ranking)))}
    jobs: list[tuple[str, Any, tuple[float, float]]] = [
        ("heads", plot_heads, sizes["heads"]), ("blocks", plot_blocks, sizes["blocks"]), ("top", plot_top, sizes["top"])]
    if result.positions is not None:
        t = result.positions
        jobs.append(("positions", lambda r, ax: plot_positions(t, ax=ax),
                     (min(2.5 + 0.4 * t.shape[1], 24), 1.5 + 0.35 * t.shape[0])))
    paths: dict[str, str] = {}
    for name, fn, size in jobs:
        fig = Figure(figsize=size)
        if fn(result, ax=fig.add_subplot()) is None:
            continue
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=120)
        paths[name] = str(out / f"{name}.png")
    return paths
