"""Can the donor's components go into the target? Architecture, config, tokenizer and tensor shapes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analysis import units
from analysis.errors import GraftError
from analysis.io.checkpoint import Checkpoint
from analysis.io.refs import load_config
from analysis.io.tokenizers import TokenizerRelation, tokenizer_relation

# Config fields whose difference makes a component mean something else in the other model.
CONFIG_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "intermediate_size", "vocab_size", "rope_theta", "rope_scaling", "rope_parameters",
                 "tie_word_embeddings", "hidden_act", "max_position_embeddings")
# Differences here change what the transplanted weights compute: they block a transplant.
BLOCKING_FIELDS = {"model_type", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                   "vocab_size", "hidden_act"}


@dataclass
class CheckReport:
    """What `graftlm check` prints; ``ok`` is False when the pair cannot be transplanted."""

    donor: str
    target: str
    family: str
    matched: dict[str, int]
    totals: dict[str, int]
    config_diffs: dict[str, tuple[Any, Any]]
    tokenizer_equal: bool | None
    mismatched: list[tuple[str, tuple[int, ...] | None, tuple[int, ...] | None]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    tokenizer: TokenizerRelation | None = None  # see tokenizer_relation
    unshared: list[str] = field(default_factory=list)  # the vocabulary's tensors, when one tokenizer adds tokens
    notes: list[str] = field(default_factory=list)  # what a user should know that blocks nothing

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "donor": self.donor, "target": self.target, "ok": self.ok, "family": self.family,
            "matched": self.matched, "totals": self.totals,
            "config_diffs": {k: list(v) for k, v in self.config_diffs.items()},
            "tokenizer_equal": self.tokenizer_equal, "tokenizer": self.tokenizer, "unshared": self.unshared,
            "mismatched": [{"tensor": n, "donor": d, "target": t} for n, d, t in self.mismatched],
            "problems": self.problems, "notes": self.notes,
        }


def _config_dict(config: Any) -> dict[str, Any]:
    data = config.to_dict()
    fields = {k: data.get(k) for k in CONFIG_FIELDS if k in data}
    heads = getattr(config, "num_attention_heads", None)
    if heads:  # configs spell these out or leave them implied: compare the effective values
        fields["head_dim"] = getattr(config, "head_dim", None) or config.hidden_size // heads
        fields["num_key_value_heads"] = getattr(config, "num_key_value_heads", None) or heads
    return fields


def check(donor: str | Path | Checkpoint, target: str | Path | Checkpoint, *, allow_pickle: bool = False,
          trust_remote_code: bool = False) -> CheckReport:
    """Compare donor and target: config fields, tokenizer, and every tensor by name and shape."""
    dck, tck = (ck if isinstance(ck, Checkpoint) else Checkpoint.open(
        ck, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code) for ck in (donor, target))
    dref, tref = dck.ref, tck.ref
    dcfg, tcfg = (load_config(r, trust_remote_code=trust_remote_code) for r in (dref, tref))
    dconf, tconf = _config_dict(dcfg), _config_dict(tcfg)
    diffs = {k: (dconf.get(k), tconf.get(k)) for k in set(dconf) | set(tconf) if dconf.get(k) != tconf.get(k)}
    relation = tokenizer_relation(dref, tref)
    # A tokenizer that adds tokens to the other's (or an embedding padded to another size) changes the
    # vocabulary's tensors and nothing the layers compute.
    alike = relation in ("same", "compatible")
    blocking = BLOCKING_FIELDS - ({"vocab_size"} if alike else set())
    # model_type first: "different architecture" is the news, the fields that follow from it are not.
    problems = [f"config {k} differs: donor {d!r}, target {t!r}"
                for k, (d, t) in sorted(diffs.items(), key=lambda kv: (kv[0] != "model_type", kv[0]))
                if k in blocking]
    if relation == "different":
        problems.append("tokenizers differ: the same token ids mean different text in the two models")
    lay = units.layout(tcfg, tck.shapes())
    try:
        units.layout(dcfg, dck.shapes())
    except GraftError as err:
        problems.append(f"donor: {err}")
    matching = units.match(dck.shapes(), tck.shapes(), lay)
    unshared = units.unshared_vocabulary(matching.mismatched, dck.shapes(), tck.shapes(), tokenizers_alike=alike)
    shape_problems = [m for m in matching.mismatched if m[0] not in unshared]
    if shape_problems:
        name, d, t = shape_problems[0]
        problems.append(f"tensor {name}: donor {_shape(d)}, target {_shape(t)}"
                        + (f" (and {len(shape_problems) - 1} more)" if len(shape_problems) > 1 else ""))
    totals = units.match(tck.shapes(), tck.shapes(), lay).matched
    notes = [SHARED_NORM] if lay.heads_share_a_norm else []
    return CheckReport(dref.text, tref.text, lay.family, dict(matching.matched), dict(totals), diffs,
                       None if relation is None else relation == "same", matching.mismatched, problems, relation,
                       unshared, notes)


SHARED_NORM = ("the queries (keys) of every head are normalized together (OLMo 2's q_norm and k_norm): a head moved "
               "alone takes its own weights and its share of the norm, and rescales the other heads' queries (keys) "
               "of its layer a little — heads are units of weight, not of activation, here")


def _shape(shape: tuple[int, ...] | None) -> str:
    return "missing" if shape is None else "×".join(map(str, shape))


def require_compatible(report: CheckReport, params: set[str] | None = None) -> None:
    """Raise the first blocking problem; with ``params``, only shape problems in those tensors count."""
    for problem in report.problems:
        if problem.startswith("tensor ") and params is not None:
            continue
        raise GraftError(f"{report.donor} → {report.target}: {problem}",
                         "donor and target must share architecture, shapes and tokenizer (run `graftlm check`)")
    if params is not None:
        for name in sorted(params & set(report.unshared) - {m[0] for m in report.mismatched}):
            raise GraftError(f"tensor {name} is one model's LM head too (tied to its embeddings) but not the "
                             "other's: it is not the same tensor in the two", "leave it out of the plan")
        for name, d, t in report.mismatched:
            if name in params:
                raise GraftError(f"tensor {name}: donor {_shape(d)}, target {_shape(t)}",
                                 "transplant only components whose shapes match (run `graftlm check`)")
