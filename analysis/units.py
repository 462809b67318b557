"""Components: the parts of a model that can be measured and transplanted.

A :class:`Component` names a part of one layer (an attention head, a KV group, an MLP, one neuron,
one projection, the attention block, or the whole layer) and carries two views of it: the
TransformerLens hook names where its activation is seen, and the slices of Hugging Face tensors that
hold its weights. Architectures differ only in how they name and fuse tensors; a :class:`Layout`
hides that (:data:`NAMINGS`: separate q/k/v as in Llama, Qwen, Gemma, Phi-2, OPT, GPT-J; fused as in
Phi-3 (and GLM-4's gate/up); GPT-2's transposed ``Conv1D``; GPT-NeoX's and BLOOM's per-head interleaved
``query_key_value``).

Component ids (also the pattern syntax, with ``*`` wildcards)::

    L12              the whole layer (block with its norms)
    L12.attn         the attention block (q, k, v, o and attention-internal norms)
    L12.mlp          the MLP (gate, up, down)
    L12.H3           query head 3: its rows of q and columns of o. Without GQA it has its own K/V
                     rows too; with GQA the shared K/V is left alone (L12.KV1 or L12.G1 take it)
    L12.KV1          KV head 1 (GQA only): its rows of k and v, shared by a group of query heads — with
                     the query heads and the MLPs, the KV heads cover every attention and MLP weight
    L12.G1           KV group 1: its K/V rows and every query head that shares them
    L12.N407         MLP neuron 407: its rows of gate/up and column of down
    L12.attn.q       one projection (+ bias): attn.q / .k / .v / .o, mlp.gate / .up / .down
    model.layers.12.mlp.down_proj.weight   an HF tensor name (whole tensor; embeddings only this way)

The kind ``outer`` lists the tensors outside the decoder layers — the embeddings, the LM head, the final
norm — each a whole-tensor component named by its HF name. A regression that lives there (an LM head
trained further, a specialist's embeddings) is out of reach of any choice among heads and MLPs.

Over 400 lines: every family's tensor naming (a :class:`Layout`) and the components cut from it are
one table read together; apart, a family's naming would be written in two places.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from analysis.errors import GraftError

Kind = Literal["layer", "attn", "mlp", "head", "kv", "group", "neuron", "linear", "tensor", "outer"]
KINDS: tuple[Kind, ...] = ("layer", "attn", "mlp", "head", "kv", "group", "neuron", "linear", "tensor", "outer")
# The candidates by default: every attention and MLP weight (with GQA the KV heads hold what query heads
# leave out; without GQA a query head owns its K/V) and the tensors outside the layers, so that copy-all
# moves all of them and a regression in the LM head or the embeddings is within reach.
DEFAULT_KINDS: tuple[Kind, ...] = ("head", "kv", "mlp", "outer")
ATTN_LINEARS = ("q", "k", "v", "o")
MLP_LINEARS = ("gate", "up", "down")
HOOK_LINEAR = {"q": "attn.q", "k": "attn.k", "v": "attn.v", "o": "attn.o",
               "gate": "mlp.gate", "up": "mlp.in", "down": "mlp.out"}


@dataclass(frozen=True, order=True)
class Slice:
    """Rows ``start:stop`` along ``dim`` of one HF tensor; ``dim=None`` means the whole tensor."""

    param: str
    dim: int | None = None
    start: int = 0
    stop: int = 0

    def index(self, ndim: int) -> tuple[slice, ...]:
        if self.dim is None:
            return (slice(None),) * ndim
        return tuple(slice(self.start, self.stop) if d == self.dim else slice(None) for d in range(ndim))


@dataclass(frozen=True)
class Component:
    """One transplantable unit: its id, kind, layer, weight slices and TransformerLens hooks."""

    id: str
    kind: Kind
    layer: int | None
    slices: tuple[Slice, ...]
    hooks: tuple[str, ...] = ()
    index: int | None = None  # head, group or neuron index (the position within its hook's axis)
    heads: tuple[int, ...] = ()  # query heads covered (heads and groups), for hook_z

    @property
    def params(self) -> set[str]:
        return {s.param for s in self.slices}


def _ranges(starts: Iterable[int], width: int) -> list[tuple[int, int]]:
    return [(s, s + width) for s in starts]


@dataclass(frozen=True)
class Naming:
    """How one family names its projections (the tensor path within a layer, per logical projection)
    and lays out the fused ones."""

    linears: Mapping[str, str]  # "q", "k", "v", "o", ("gate"), "up", "down" -> e.g. "self_attn.q_proj"
    # q/k/v in their own tensors ("separate"), one after another in one tensor ("concat": q of every head,
    # then k, then v), or interleaved per head ("per_head": head 0's q, k, v, then head 1's, ...)
    qkv: Literal["separate", "concat", "per_head"] = "separate"
    conv1d: bool = False  # GPT-2's Conv1D stores weights as (in, out)


_SELF_ATTN = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"}
# Tried in this order; a family is recognised when every one of its tensors exists in layer 0 (so none is
# taken for another: Llama needs a gate, GPT-2 a c_attn, OPT its fc1 beside the attention).
NAMINGS: dict[str, Naming] = {
    "llama": Naming({**_SELF_ATTN, "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}),
    "phi3": Naming({"q": "self_attn.qkv_proj", "k": "self_attn.qkv_proj", "v": "self_attn.qkv_proj",
                    "o": "self_attn.o_proj", "gate": "mlp.gate_up_proj", "up": "mlp.gate_up_proj",
                    "down": "mlp.down_proj"}, qkv="concat"),
    "gpt2": Naming({"q": "attn.c_attn", "k": "attn.c_attn", "v": "attn.c_attn", "o": "attn.c_proj",
                    "up": "mlp.c_fc", "down": "mlp.c_proj"}, qkv="concat", conv1d=True),
    "neox": Naming({"q": "attention.query_key_value", "k": "attention.query_key_value",
                    "v": "attention.query_key_value", "o": "attention.dense",
                    "up": "mlp.dense_h_to_4h", "down": "mlp.dense_4h_to_h"}, qkv="per_head"),
    "bloom": Naming({"q": "self_attention.query_key_value", "k": "self_attention.query_key_value",
                     "v": "self_attention.query_key_value", "o": "self_attention.dense",
                     "up": "mlp.dense_h_to_4h", "down": "mlp.dense_4h_to_h"}, qkv="per_head"),
    "phi": Naming({**_SELF_ATTN, "o": "self_attn.dense", "up": "mlp.fc1", "down": "mlp.fc2"}),
    "opt": Naming({**_SELF_ATTN, "o": "self_attn.out_proj", "up": "fc1", "down": "fc2"}),
    "gptj": Naming({"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.out_proj",
                    "up": "mlp.fc_in", "down": "mlp.fc_out"}),
    "starcoder2": Naming({**_SELF_ATTN, "up": "mlp.c_fc", "down": "mlp.c_proj"}),
    "glm": Naming({**_SELF_ATTN, "gate": "mlp.gate_up_proj", "up": "mlp.gate_up_proj", "down": "mlp.down_proj"}),
    # Llama's attention over an MLP without a gate (Arcee's AFM, Apertus): tried after Llama, which needs one
    "arcee": Naming({**_SELF_ATTN, "up": "mlp.up_proj", "down": "mlp.down_proj"}),
}
SUPPORTED = ("Llama-style models (Llama, Mistral, Qwen, Gemma, OLMo, SmolLM, Granite, Cohere, EXAONE, Arcee, "
             "Apertus, ...), Phi-1/2/3, GPT-2, GPT-NeoX (Pythia), GPT-J, OPT, BLOOM, StarCoder2 and GLM-4")
# Tensors inside the attention module besides its projections: norms of the queries and of the keys.
Q_NORMS = ("self_attn.q_norm", "self_attn.q_layernorm", "self_attn.query_layernorm")
K_NORMS = ("self_attn.k_norm", "self_attn.k_layernorm", "self_attn.key_layernorm")
ATTN_NORMS = Q_NORMS + K_NORMS
# Tensors inside the MLP besides its projections: a learned activation's parameters (Apertus's xIELU).
MLP_EXTRAS = ("mlp.act_fn",)


@dataclass
class Layout:
    """How one architecture stores its layers; built from parameter names, shapes and the config."""

    family: str  # a key of NAMINGS
    prefix: str  # text before the layer index, e.g. "model.layers."
    n_layers: int
    n_heads: int
    n_kv: int
    head_dim: int
    d_mlp: int
    shapes: Mapping[str, tuple[int, ...]] = field(repr=False)
    # Tensors the two models do not share (:func:`unshared_vocabulary`): the embeddings and LM head of a
    # donor whose tokenizer adds tokens to the target's (io.tokenizers.tokenizer_relation), or of a pair
    # where one model ties its LM head to its embeddings. They are no candidate: nothing to transplant.
    unshared: frozenset[str] = frozenset()
    tied_in_one: bool = False  # unshared because one model ties its LM head to its embeddings

    @property
    def naming(self) -> Naming:
        return NAMINGS[self.family]

    def _rel(self, lin: str) -> str:
        return self.naming.linears.get(lin, "")

    def _shared(self, lin: str) -> bool:
        """True when the projection shares its tensor with another (fused q/k/v, fused gate/up)."""
        return any(other != lin and rel == self._rel(lin) for other, rel in self.naming.linears.items())

    @property
    def conv1d(self) -> bool:
        """GPT-2's Conv1D stores weights as (in, out): output features are along dim 1."""
        return self.naming.conv1d

    @property
    def has_gate(self) -> bool:
        return "gate" in self.naming.linears

    @property
    def gqa(self) -> bool:
        return self.n_kv < self.n_heads

    def linears(self) -> tuple[str, ...]:
        return ATTN_LINEARS + (MLP_LINEARS if self.has_gate else ("up", "down"))

    def _out(self, layer: int, lin: str, rows: list[tuple[int, int]]) -> list[Slice]:
        """Output-feature rows of a projection: weight rows (Conv1D: columns) and bias entries."""
        base = f"{self.prefix}{layer}.{self._rel(lin)}"
        wdim = 1 if self.conv1d else 0
        slices = [Slice(f"{base}.weight", wdim, a, b) for a, b in rows]
        if f"{base}.bias" in self.shapes:
            slices += [Slice(f"{base}.bias", 0, a, b) for a, b in rows]
        return slices

    def _in(self, layer: int, lin: str, cols: list[tuple[int, int]]) -> list[Slice]:
        """Input-feature columns of a projection (o and down): weight only, bias is the layer's."""
        base = f"{self.prefix}{layer}.{self._rel(lin)}"
        return [Slice(f"{base}.weight", 0 if self.conv1d else 1, a, b) for a, b in cols]

    # --- rows of each logical projection within its (possibly fused) tensor ------------------------
    def _q_rows(self, head: int) -> list[tuple[int, int]]:
        hd = self.head_dim
        if self.naming.qkv == "per_head":
            return [(head * 3 * hd, head * 3 * hd + hd)]
        return [(head * hd, (head + 1) * hd)]

    def _kv_rows(self, which: Literal["k", "v"], group: int) -> list[tuple[int, int]]:
        hd, q_width = self.head_dim, self.n_heads * self.head_dim
        qkv = self.naming.qkv
        if qkv == "separate":
            start = group * hd
        elif qkv == "concat":  # [q of every head | k of every KV head | v of every KV head]
            start = q_width + (0 if which == "k" else self.n_kv * hd) + group * hd
        else:  # per head [q | k | v]
            start = group * 3 * hd + (1 if which == "k" else 2) * hd
        return [(start, start + hd)]

    def _mlp_rows(self, lin: Literal["gate", "up"], neurons: tuple[int, int]) -> list[tuple[int, int]]:
        a, b = neurons
        if lin == "up" and self._shared("up"):  # fused [gate | up]
            return [(self.d_mlp + a, self.d_mlp + b)]
        return [(a, b)]

    def linear_slices(self, layer: int, lin: str) -> list[Slice]:
        """A whole logical projection: the full tensor, or its share of a fused one."""
        if not self._shared(lin):
            base = f"{self.prefix}{layer}.{self._rel(lin)}"
            return [Slice(f"{base}.weight")] + ([Slice(f"{base}.bias")] if f"{base}.bias" in self.shapes else [])
        if lin in ("gate", "up"):
            return self._out(layer, lin, self._mlp_rows(lin, (0, self.d_mlp)))  # type: ignore[arg-type]
        if lin == "q":
            rows = [r for h in range(self.n_heads) for r in self._q_rows(h)]
        else:
            rows = [r for g in range(self.n_kv) for r in self._kv_rows(lin, g)]  # type: ignore[arg-type]
        return self._out(layer, lin, _merge(rows))

    def _norm_slices(self, layer: int, which: Literal["q", "k"], index: int) -> list[Slice]:
        """A head's own entries of the norm of its queries (keys): where the norm's weight (and bias) has
        one entry per feature of every head (OLMo 2: width heads × head size) or one row per head (Cohere),
        those of head (KV head) ``index``; a norm shared by every head (Qwen3: width head size) has none —
        it belongs to the attention block."""
        n, hd = (self.n_heads if which == "q" else self.n_kv), self.head_dim
        slices = []
        for rel in Q_NORMS if which == "q" else K_NORMS:
            for part in ("weight", "bias"):
                name = f"{self.prefix}{layer}.{rel}.{part}"
                shape = self.shapes.get(name)
                if shape == (n * hd,) and n > 1:
                    slices.append(Slice(name, 0, index * hd, (index + 1) * hd))
                elif shape == (n, hd) and n > 1:
                    slices.append(Slice(name, 0, index, index + 1))
        return slices

    @property
    def heads_share_a_norm(self) -> bool:
        """True when the norm of the queries or keys runs over every head's features at once (OLMo 2): a
        head moved alone then rescales the other heads' queries or keys, so the activations of those heads
        move a little too (the weights of none but its own)."""
        return any(self.shapes.get(f"{self.prefix}0.{rel}.weight") == (n * self.head_dim,) and n > 1
                   for rels, n in ((Q_NORMS, self.n_heads), (K_NORMS, self.n_kv)) for rel in rels)

    def head_slices(self, layer: int, head: int, with_kv: bool) -> list[Slice]:
        slices = self._out(layer, "q", self._q_rows(head)) + self._norm_slices(layer, "q", head)
        if with_kv:
            group = head // (self.n_heads // self.n_kv)
            slices += self._out(layer, "k", self._kv_rows("k", group)) + self._norm_slices(layer, "k", group)
            slices += self._out(layer, "v", self._kv_rows("v", group))
        slices += self._in(layer, "o", [(head * self.head_dim, (head + 1) * self.head_dim)])
        return slices

    def kv_slices(self, layer: int, group: int) -> list[Slice]:
        return self._out(layer, "k", self._kv_rows("k", group)) + self._norm_slices(layer, "k", group) + \
            self._out(layer, "v", self._kv_rows("v", group))

    def group_slices(self, layer: int, group: int) -> list[Slice]:
        per = self.n_heads // self.n_kv
        heads = range(group * per, (group + 1) * per)
        slices = [s for h in heads for s in self._out(layer, "q", self._q_rows(h)) + self._norm_slices(layer, "q", h)]
        slices += self._out(layer, "k", self._kv_rows("k", group)) + self._norm_slices(layer, "k", group)
        slices += self._out(layer, "v", self._kv_rows("v", group))
        slices += self._in(layer, "o", [(heads[0] * self.head_dim, (heads[-1] + 1) * self.head_dim)])
        return _merge_slices(slices)

    def neuron_slices(self, layer: int, neuron: int) -> list[Slice]:
        span = (neuron, neuron + 1)
        slices = self._out(layer, "gate", self._mlp_rows("gate", span)) if self.has_gate else []
        slices += self._out(layer, "up", self._mlp_rows("up", span))
        slices += self._in(layer, "down", [span])
        return slices

    def layer_params(self, layer: int) -> list[str]:
        head = f"{self.prefix}{layer}."
        return sorted(n for n in self.shapes if n.startswith(head))

    def block_params(self, layer: int, block: Literal["attn", "mlp"]) -> list[str]:
        """Tensors of the attention block or the MLP (q_norm/k_norm belong to attention)."""
        rels = [self._rel(lin) for lin in (ATTN_LINEARS if block == "attn" else MLP_LINEARS)]
        rels = [r for r in dict.fromkeys(rels) if r]
        rels += list(ATTN_NORMS if block == "attn" else MLP_EXTRAS)
        head = f"{self.prefix}{layer}."
        return sorted(n for n in self.shapes if any(n.startswith(head + r + ".") for r in rels))


def _merge(rows: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge touching row ranges, so a fused q is one slice when it is contiguous."""
    merged: list[tuple[int, int]] = []
    for a, b in sorted(rows):
        if merged and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return merged


def _merge_slices(slices: list[Slice]) -> list[Slice]:
    out: list[Slice] = []
    for s in sorted(slices, key=lambda s: (s.param, s.dim if s.dim is not None else -1, s.start)):
        if out and out[-1].param == s.param and out[-1].dim == s.dim and out[-1].stop == s.start:
            out[-1] = Slice(s.param, s.dim, out[-1].start, s.stop)
        else:
            out.append(s)
    return out


LAYER_RE = re.compile(r"^(?P<prefix>.*?(?:layers|\.h)\.)(?P<layer>\d+)\.")


def layout(config: object, shapes: Mapping[str, tuple[int, ...]],
           donor_shapes: Mapping[str, tuple[int, ...]] | None = None) -> Layout:
    """Recognise the architecture from its tensor names and check its shapes against the config; raise a
    clear error when it is unknown or they disagree (a wrong guess would cut the wrong rows, silently).
    ``donor_shapes``: the other model's, whose differing tensors become :attr:`Layout.unshared`."""
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):  # a multimodal wrapper (Gemma 3 with its vision tower): the LM's own config
        config = get_text_config()
    names = list(shapes)
    prefixes = dict.fromkeys(m.group("prefix") for n in names if (m := LAYER_RE.match(n)) and m.group("layer") == "0")
    found = [(family, prefix) for family, naming in NAMINGS.items() for prefix in prefixes
             if all(f"{prefix}0.{rel}.weight" in shapes for rel in naming.linears.values())]
    if not found:
        experts = next((n for n in names if ".experts." in n), None)
        what = (f"a mixture of experts ({experts}): graftlm cuts one MLP per layer" if experts else
                f"no layer 0 with a known set of attention and MLP projections (first tensors: {', '.join(names[:3])})")
        raise GraftError(f"unsupported architecture: {what}", f"graftlm supports {SUPPORTED}")
    family, prefix = found[0]
    if getattr(config, "model_type", None) == "falcon" and (getattr(config, "multi_query", False) or
                                                            getattr(config, "new_decoder_architecture", False)):
        raise GraftError("unsupported architecture: Falcon's multi-query or grouped query_key_value (Falcon-7B, "
                         "-40B, -180B) is cut another way than BLOOM's, whose names it shares",
                         f"Falcon 3 is Llama-style and works; graftlm supports {SUPPORTED}")
    n_layers = 1 + max(int(m.group("layer")) for n in names if (m := LAYER_RE.match(n)) and m.group("prefix") == prefix)
    n_heads = int(config.num_attention_heads)  # type: ignore[attr-defined]
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
    hidden = int(config.hidden_size)  # type: ignore[attr-defined]
    head_dim = int(getattr(config, "head_dim", None) or hidden // n_heads)
    naming = NAMINGS[family]
    down = shapes[f"{prefix}0.{naming.linears['down']}.weight"]
    d_mlp = down[0] if naming.conv1d else down[1]
    differ = mismatches(donor_shapes, shapes) if donor_shapes is not None else []
    tied = bool(differ) and bool(tied_head(differ, donor_shapes or {}, shapes))
    unshared = frozenset(unshared_vocabulary(differ, donor_shapes or {}, shapes))
    lay = Layout(family, prefix, n_layers, n_heads, n_kv, head_dim, d_mlp, shapes, unshared, tied)
    _check(lay)
    return lay


def _check(lay: Layout) -> None:
    """Every layer has the family's projections, and layer 0's widths are those the config implies."""
    naming, hd = lay.naming, lay.head_dim
    for layer in range(lay.n_layers):
        missing = [rel for rel in naming.linears.values() if f"{lay.prefix}{layer}.{rel}.weight" not in lay.shapes]
        if missing:
            raise GraftError(f"unsupported architecture: layer {layer} has no {missing[0]}.weight, which layer 0 has "
                             "(layers of different kinds: experts, or blocks without attention or MLP)",
                             f"graftlm supports models whose layers are alike: {SUPPORTED}")
    fused_qkv = {"separate": None, "concat": (lay.n_heads + 2 * lay.n_kv) * hd, "per_head": 3 * lay.n_heads * hd}
    want = {"q": lay.n_heads * hd, "k": lay.n_kv * hd, "v": lay.n_kv * hd,
            "gate": lay.d_mlp, "up": lay.d_mlp}
    if lay._shared("up"):  # fused [gate | up]
        want["gate"] = want["up"] = 2 * lay.d_mlp
    if fused_qkv[naming.qkv] is not None:
        want["q"] = want["k"] = want["v"] = fused_qkv[naming.qkv]  # type: ignore[assignment]
    out_dim = 1 if naming.conv1d else 0
    widths = {lin: lay.shapes[f"{lay.prefix}0.{naming.linears[lin]}.weight"][out_dim] for lin in want
              if lin in naming.linears}
    widths["o"] = lay.shapes[f"{lay.prefix}0.{naming.linears['o']}.weight"][1 - out_dim]
    want["o"] = lay.n_heads * hd
    wrong = [(lin, widths[lin], want[lin]) for lin in widths if widths[lin] != want[lin]]
    if lay.n_heads % lay.n_kv or (naming.qkv == "per_head" and lay.n_kv != lay.n_heads) or wrong:
        lin, got, expected = wrong[0] if wrong else ("q", widths["q"], want["q"])
        raise GraftError(
            f"unsupported architecture: the config's {lay.n_heads} query heads and {lay.n_kv} key/value heads of "
            f"{hd} ({lay.family}-style tensors) need {expected} features in {naming.linears[lin]}, which has {got}",
            f"graftlm cuts heads only where the layout is known: {SUPPORTED}")


def component(lay: Layout, cid: str) -> Component:
    """Build one component from its canonical id (no wildcards)."""
    if cid in lay.shapes:
        layer = _layer_of(lay, cid)
        return Component(cid, "tensor" if layer is not None else "outer", layer, (Slice(cid),))
    m = re.fullmatch(r"L(\d+)(?:\.(attn|mlp|H\d+|KV\d+|G\d+|N\d+)(?:\.(q|k|v|o|gate|up|down))?)?", cid)
    if not m:
        raise GraftError(f"unknown component {cid!r}",
                         "use L12, L12.attn, L12.mlp, L12.H3, L12.KV1, L12.G1, L12.N407, L12.attn.q, L12.mlp.down "
                         "or an HF tensor name (see `graftlm check`)")
    layer = int(m.group(1))
    if layer >= lay.n_layers:
        raise GraftError(f"component {cid!r}: the model has layers 0..{lay.n_layers - 1}", "pick an existing layer")
    part, lin = m.group(2), m.group(3)
    b = f"blocks.{layer}"
    if part is None:
        return Component(cid, "layer", layer, tuple(Slice(n) for n in lay.layer_params(layer)), (f"{b}.hook_out",))
    if lin is not None:
        if (part == "attn" and lin not in ATTN_LINEARS) or (part == "mlp" and lin not in MLP_LINEARS):
            raise GraftError(f"unknown component {cid!r}", "attn has q, k, v, o; mlp has gate, up, down")
        if lin not in lay.linears():
            raise GraftError(f"component {cid!r}: this {lay.family} model has no {lin} projection",
                             f"use one of {', '.join(lay.linears())}")
        return Component(cid, "linear", layer, tuple(lay.linear_slices(layer, lin)), (f"{b}.{HOOK_LINEAR[lin]}.hook_out",))
    if part in ("attn", "mlp"):
        hooks = (f"{b}.hook_attn_out",) if part == "attn" else (f"{b}.hook_mlp_out",)
        params = lay.block_params(layer, part)  # type: ignore[arg-type]
        return Component(cid, part, layer, tuple(Slice(n) for n in params), hooks)  # type: ignore[arg-type]
    kind, idx = (part[:2], int(part[2:])) if part.startswith("KV") else (part[0], int(part[1:]))
    if kind == "KV" and not lay.gqa:
        raise GraftError(f"component {cid!r}: this model has no grouped-query attention, so every head owns its "
                         "keys and values", f"use L{layer}.H{idx}")
    limit = {"H": lay.n_heads, "KV": lay.n_kv, "G": lay.n_kv, "N": lay.d_mlp}[kind]
    if idx >= limit:
        raise GraftError(f"component {cid!r}: index out of range (0..{limit - 1})", "pick an existing one")
    if kind == "H":
        return Component(cid, "head", layer, tuple(lay.head_slices(layer, idx, with_kv=not lay.gqa)),
                         (f"{b}.attn.hook_z",), idx, (idx,))
    if kind == "KV":
        return Component(cid, "kv", layer, tuple(lay.kv_slices(layer, idx)), (f"{b}.attn.hook_k", f"{b}.attn.hook_v"),
                         idx)
    if kind == "G":
        per = lay.n_heads // lay.n_kv
        heads = tuple(range(idx * per, (idx + 1) * per))
        return Component(cid, "group", layer, tuple(lay.group_slices(layer, idx)), (f"{b}.attn.hook_z",), idx, heads)
    return Component(cid, "neuron", layer, tuple(lay.neuron_slices(layer, idx)), (f"{b}.mlp.hook_post",), idx)


def _layer_of(lay: Layout, name: str) -> int | None:
    m = LAYER_RE.match(name)
    return int(m.group("layer")) if m and m.group("prefix") == lay.prefix else None


def layer_ids(lay: Layout, layer: int, kind: Kind) -> list[str]:
    """Canonical ids of one layer's components of one kind, in index order (none where the model has no
    such component: KV heads and groups need grouped-query attention)."""
    L = layer
    if kind in ("layer", "attn", "mlp"):
        return [f"L{L}" if kind == "layer" else f"L{L}.{kind}"]
    if kind == "head":
        return [f"L{L}.H{h}" for h in range(lay.n_heads)]
    if kind in ("kv", "group"):
        return [f"L{L}.{'KV' if kind == 'kv' else 'G'}{g}" for g in range(lay.n_kv)] if lay.gqa else []
    if kind == "neuron":
        return [f"L{L}.N{n}" for n in range(lay.d_mlp)]
    if kind == "linear":
        return [f"L{L}.{'attn' if lin in ATTN_LINEARS else 'mlp'}.{lin}" for lin in lay.linears()]
    return []  # tensors and outer tensors are not per layer


LAYER_KINDS: tuple[Kind, ...] = ("layer", "attn", "mlp", "head", "kv", "group", "neuron", "linear")


def component_ids(lay: Layout, kinds: Iterable[Kind] = ("layer", "attn", "mlp", "head", "group", "linear")) -> list[str]:
    """Canonical ids of every component of the given kinds, layer by layer."""
    kinds = set(kinds)
    ids: list[str] = []
    for L in range(lay.n_layers):
        for kind in LAYER_KINDS:  # this order within a layer, whatever order ``kinds`` come in
            if kind in kinds:
                ids += layer_ids(lay, L, kind)
    if "tensor" in kinds:
        ids += list(lay.shapes)
    elif "outer" in kinds:
        ids += outer_ids(lay)
    return ids


def outer_ids(lay: Layout) -> list[str]:
    """HF names of the language model's tensors outside its decoder layers (embeddings, LM head, final norm),
    in file order: those under the module that holds the layers (``model.`` of ``model.layers.``) and the
    top-level heads (``lm_head.weight``). A multimodal checkpoint's vision tower and projector are not the
    language model's: a text task cannot measure them, and as candidates they would only swell K. Tensors
    the donor holds in another shape (:attr:`Layout.unshared`) are left out too."""
    parts = lay.prefix.rstrip(".").split(".")
    root = ".".join(parts[:-1]) + "." if len(parts) > 1 else ""
    return [name for name in lay.shapes if _layer_of(lay, name) is None and name not in lay.unshared
            and (name.startswith(root) or name.count(".") == 1)]


def language_model_names(lay: Layout) -> list[str]:
    """HF names of every tensor of the language model: its layers' and :func:`outer_ids`."""
    outer = set(outer_ids(lay))
    return [name for name in lay.shapes if name in outer or _layer_of(lay, name) is not None]


def components(lay: Layout, kinds: Iterable[Kind]) -> list[Component]:
    return [component(lay, cid) for cid in component_ids(lay, kinds)]


def select(lay: Layout, patterns: Iterable[str]) -> list[Component]:
    """Components matching id patterns (``*`` wildcards) or HF tensor names, in a stable order."""
    patterns = [p.strip() for p in patterns if p.strip()]
    if not patterns:
        raise GraftError("no components given", "pass patterns such as L3.mlp or 'L*.H0', or a plan")
    chosen: dict[str, None] = {}
    for pattern in patterns:
        if "*" not in pattern and "?" not in pattern:
            chosen[component(lay, pattern).id] = None
            continue
        kinds: tuple[Kind, ...] = ("tensor",) if not pattern.startswith("L") else (
            "layer", "attn", "mlp", "head", "kv", "group", "linear") + (("neuron",) if ".N" in pattern else ())
        hits = [cid for cid in component_ids(lay, kinds) if fnmatch.fnmatchcase(cid, pattern)]
        if not hits:
            raise GraftError(f"pattern {pattern!r} matches no component",
                             "see `graftlm check` for the ids, e.g. L*.mlp, L3.H*, L*.attn.q")
        chosen.update(dict.fromkeys(hits))
    return [component(lay, cid) for cid in chosen]


# --- matching donor and target -------------------------------------------------------------------

@dataclass
class Matching:
    """Which components exist with the same tensor names and shapes in donor and target."""

    layout: Layout
    matched: dict[Kind, int]
    mismatched: list[tuple[str, tuple[int, ...] | None, tuple[int, ...] | None]]  # name, donor, target

    @property
    def ok(self) -> bool:
        return not self.mismatched


def mismatches(donor_shapes: Mapping[str, tuple[int, ...]], target_shapes: Mapping[str, tuple[int, ...]]
               ) -> list[tuple[str, tuple[int, ...] | None, tuple[int, ...] | None]]:
    """(name, donor shape, target shape) of every tensor whose shape differs or that one model lacks."""
    return [(name, donor_shapes.get(name), target_shapes.get(name))
            for name in sorted(set(donor_shapes) | set(target_shapes), key=_natural)
            if donor_shapes.get(name) != target_shapes.get(name)]


def match(donor_shapes: Mapping[str, tuple[int, ...]], target_shapes: Mapping[str, tuple[int, ...]],
          lay: Layout) -> Matching:
    """Compare every tensor by name and shape, and count the components that match per kind."""
    mismatched = mismatches(donor_shapes, target_shapes)
    # A tensor present on one side only (a bias, say) spoils the component whose weight it sits beside.
    bad = {m[0] for m in mismatched} | {m[0].removesuffix(".bias") + ".weight" for m in mismatched}
    counts: dict[Kind, int] = {}
    for kind in ("layer", "attn", "mlp", "head", "kv", "group", "neuron", "linear"):
        if kind in ("kv", "group") and not lay.gqa:
            continue
        if kind == "neuron":
            # Neurons share their tensors: all of a layer's neurons match when its MLP tensors match.
            counts[kind] = sum(lay.d_mlp for L in range(lay.n_layers)
                               if not bad or not bad & set(lay.block_params(L, "mlp")))
            continue
        ids = component_ids(lay, (kind,))  # type: ignore[arg-type]
        # the usual case, same shapes everywhere: every component matches (no need to build them)
        counts[kind] = len(ids) if not bad else sum(  # type: ignore[index]
            1 for cid in ids if not component(lay, cid).params & bad)
    return Matching(lay, counts, mismatched)


def vocabulary_only(mismatched: list[tuple[str, tuple[int, ...] | None, tuple[int, ...] | None]]) -> list[str]:
    """The names of ``mismatched`` (name, donor shape, target shape) when each is a vocabulary's tensor —
    outside the layers, differing in its first dimension only (embeddings, an LM head and its bias) — or
    none when any other tensor differs."""
    def vocabulary(name: str, d: tuple[int, ...] | None, t: tuple[int, ...] | None) -> bool:
        return LAYER_RE.match(name) is None and d is not None and t is not None and len(d) == len(t) and d[1:] == t[1:]
    return [m[0] for m in mismatched] if all(vocabulary(*m) for m in mismatched) else []


def tied_head(mismatched: list[tuple[str, tuple[int, ...] | None, tuple[int, ...] | None]],
              donor_shapes: Mapping[str, tuple[int, ...]], target_shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """When the one tensor ``mismatched`` names is an LM head only one model has — the other ties its head to
    its input embeddings, and neither file nor parameter list holds it — that head and the embeddings of its
    shape (in the tying model they are its LM head too: moving them would move the head) ; else none."""
    if len(mismatched) != 1:
        return []
    name, d, t = mismatched[0]
    shape = d or t
    if LAYER_RE.match(name) is not None or (d is None) == (t is None) or shape is None or len(shape) != 2:
        return []
    partners = [n for n, s in target_shapes.items() if n != name and s == shape and donor_shapes.get(n) == s
                and LAYER_RE.match(n) is None]
    return [name, *partners] if len(partners) == 1 else []


def unshared_vocabulary(mismatched: list[tuple[str, tuple[int, ...] | None, tuple[int, ...] | None]],
                        donor_shapes: Mapping[str, tuple[int, ...]], target_shapes: Mapping[str, tuple[int, ...]],
                        tokenizers_alike: bool = True) -> list[str]:
    """The vocabulary's tensors that are not the same thing in the two models (:attr:`Layout.unshared`):
    those of two sizes (:func:`vocabulary_only`: one tokenizer adds tokens, or its embeddings are padded —
    only where ``tokenizers_alike``) or an LM head tied in one model only (:func:`tied_head`, whatever the
    tokenizers); none when something else differs."""
    return (vocabulary_only(mismatched) if tokenizers_alike else []) or tied_head(mismatched, donor_shapes,
                                                                                  target_shapes)


def _natural(name: str) -> list[object]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
