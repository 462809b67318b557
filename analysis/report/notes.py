"""What qualifies a study's numbers, said after its verdict: what localization forced and measured,
the donor auto_order picked, the items overlap: drop removed, the grid's K (shares resolved, values
clipped, grown by k_grow_to, a choice at the top of the grid), and what copy-all cannot reach."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from analysis.check import SHARED_NORM
from analysis.study.config import KGrid
from analysis.study.runfolder import length_suffix, short_name
from analysis.study.splits import dropped_line
from analysis.study.sweep import swapped

if TYPE_CHECKING:
    from analysis.report.summary import Summary

ANSWER_SOURCES = {"donor": "the donor's own outputs", "reference": "the task's reference answers (its target "
                  "template)", "text": "the texts themselves"}


def localization_notes(localized: dict[str, dict[str, Any]], order: dict[str, Any], methods: list[str],
                       several: bool) -> list[str]:
    """What localization forced as the answer and measured (from RUN/rankings), for the notes: the answer
    source with the probe items used and left out, the donor check, the metric; gradient's completeness."""
    name = "-reversed" if order.get("donor") == "b" else ""
    suffix = length_suffix(order.get("max_new_tokens"), several)
    metas = {m: localized.get(f"{m}{name}{suffix}") or localized.get(f"{m}{name}") or {} for m in methods}
    said = []
    forced = next((meta for meta in metas.values() if "answers" in meta), None)
    if forced is not None:
        left = ", ".join(f"{n} {why}" for why, n in forced.get("dropped", {}).items())
        check = forced.get("check") or {}
        agrees = (f"; where the evaluation counts the donor right, its greedy output is the forced answer "
                  f"(agreement {check['agreement']:.0%})") if "agreement" in check else ""
        metric = forced.get("metric")
        said.append(f"Localization forced {ANSWER_SOURCES.get(forced['answers'], forced['answers'])} on "
                    f"{forced['n_probe_used']} of {forced['n_probe_read']} probe items"
                    f"{f' ({left} left out)' if left else ''}{agrees}"
                    f"{f'; metric: {metric} of the forced answer' if metric else ''}.")
    said += [f"{method}: {meta['warning']}." for method, meta in metas.items() if meta.get("warning")]
    said += unscored_note(metas)
    info = metas.get("gradient", {}).get("gradient")
    if info:
        tol = info.get("tolerance")
        over = (f"; more than the {tol:.0%} tolerance even at {info['steps']} nodes: its scores are approximate"
                if tol is not None and info["relative_error"] > tol else "")
        said.append(f"gradient: its shares sum to {info['sum_of_scores']:.4g} per item against a measured change of "
                    f"{info['metric_change']:.4g} from the target to copy-all ({info['relative_error']:.2%} apart, "
                    f"{info['steps']} path nodes{over}).")
    return said


def unscored_note(metas: dict[str, dict[str, Any]]) -> list[str]:
    """Activation methods cannot score the tensors outside the layers (embeddings, LM head, final norm: no
    hook point) and rank them last; where a weight-space method of the same study ranks one of them among
    its first three, that is what they could not see (a further-trained, tied LM head, say)."""
    blind = [m for m, meta in metas.items() if meta.get("unscored")]
    if not blind:
        return []
    high: dict[str, list[str]] = {}  # tensor → "gradient #1", ...
    for m, meta in metas.items():
        for cid, rank in sorted((meta.get("outer_ranks") or {}).items(), key=lambda kv: kv[1]):
            if rank <= 3:
                high.setdefault(cid, []).append(f"{m} #{rank}")
    ranked = "; ".join(cid + " " + ", ".join(r) for cid, r in high.items())
    seen = f"; the weight-space methods rank {ranked}" if high else ""
    return [f"{', '.join(blind)}: no hook point on the tensors outside the layers "
            f"({', '.join(metas[blind[0]]['unscored'])}), ranked last{seen}."]


def notes(s: Summary, order: dict[str, Any], grid_ks: dict[str, set[int]]) -> list[str]:
    """What qualifies the numbers, after the verdict: the donor auto_order picked, items overlap: drop
    removed, the grid's K as resolved and clipped, the Ks it grew to, and a chosen K at the top of the grid."""
    said = []
    if order.get("donor") == "b":  # the config's target: only auto_order swaps
        said.append(swapped(short_name(s.donor_ref), (s.donor["dev"].k, s.donor["dev"].n),
                            (s.target["dev"].k, s.target["dev"].n)) + ".")
    if order.get("overlap_dropped"):
        dropped = order["overlap_dropped"]
        said.append(dropped_line(dropped["counts"], dropped["overlaps"]) + ".")
    if order.get("unshared") and order.get("tied_in_one"):
        said.append(f"One model ties its LM head to its input embeddings, the other does not: "
                    f"{', '.join(order['unshared'])} are not the same tensors in the two, and are no candidate.")
    elif order.get("unshared"):
        said.append(f"The vocabularies differ in size (one tokenizer adds tokens, or pads its embeddings; every "
                    f"shared token has the same id): {', '.join(order['unshared'])} differ in size, and are no "
                    "candidate.")
    if order.get("heads_share_a_norm"):
        said.append(f"Note: {SHARED_NORM}.")
    k_grid = KGrid(**order["k_grid"]) if order.get("k_grid") else None
    if k_grid is not None and k_grid.describe():
        said.append(f"k: {k_grid.describe()}.")
    n = k_grid.n_components if k_grid is not None else None
    asked = max(k_grid.resolved) if k_grid is not None else None
    for method, ks in grid_ks.items():
        grown = sorted(k for k in ks if asked is not None and k > asked)
        if grown:
            said.append(f"{method}: the grid grew past K={asked} to K={', '.join(map(str, grown))} (k_grow_to): its "
                        f"top K was its best on dev (or nothing was clearly above the target yet) and well short "
                        f"of the donor.")
    at_top: dict[int, list[str]] = {}  # K → the methods that chose it at the top of their grid
    most = order.get("k_grow_to") or 0  # below it the grid grew where it had to (config.grown_k); older runs: 0
    for f in s.methods:
        ks = grid_ks.get(f.method) or set()
        if ks and f.k == max(ks) and (n is None or f.k < n) and f.k >= most:  # K = n: nothing larger to try
            at_top.setdefault(f.k, []).append(f.method)
    for k, methods in at_top.items():
        of = (f" (of {n} components{', as far as k_grow_to lets it grow' if most else ''})" if n is not None else "")
        said.append(f"{', '.join(methods)}: chosen K={k} is the top of the grid{of}: a larger K might do better.")
    said.extend(outside_note(s, order))
    return said


OUTSIDE_RECOVERY = 0.8  # below this copy-all recovery, the weight difference outside the candidates is named
OUTSIDE_SHARE = 0.05  # ... when at least this share of it lies there


def outside_note(s: Summary, order: dict[str, Any]) -> list[str]:
    """When copying every candidate component recovers little of the gap and much of the donor–target
    weight difference lies outside the candidates (an LM head or embeddings trained further, say), name
    the largest untouched tensors: no selection among the candidates can recover what lies there."""
    out = order.get("outside")
    copy_all = next((f for f in s.controls if f.method == "copy-all"), None)
    if not out or copy_all is None or copy_all.recovery.value is None:
        return []
    if copy_all.recovery.value >= OUTSIDE_RECOVERY or out["share"] < OUTSIDE_SHARE:
        return []
    largest = ", ".join(f"{name} (changed {rel:.0%})" for name, rel in out["largest"])
    add = (f", largest in {largest}: no selection among the candidates can recover it; a plan takes such a "
           f"tensor by name among its components (e.g. {out['largest'][0][0]})") if largest else \
        ": no selection among the candidates can recover it"
    return [f"copy-all recovers {copy_all.recovery.value:.0%} of the gap, and {out['share']:.0%} of the donor–target "
            f"weight difference lies outside the candidate components{add}."]
