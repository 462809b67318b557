"""Components map to the right weights: checked through TransformerLens activations, per architecture.

For each family the donor is the target with one layer's attention (or MLP) projections perturbed, so
layer 0 sees the same input in both models. Transplanting a head must then make that head's
activation the donor's and leave every other head the target's; likewise for neurons and projections.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import transformers
from conftest import FAMILIES, HEADS_SHARE_A_NORM, build_model
from transformers import AutoModelForCausalLM

from analysis import units
from analysis.errors import GraftError
from analysis.io.checkpoint import Checkpoint
from analysis.io.models import load
from analysis.plan import Plan
from analysis.transplant import applied

TEXT = "The cat sat on 12 mats."


def perturbed(target: Path, out: Path, block: str) -> Path:
    """A copy of ``target`` whose layer-0 projections of ``block`` (attn or mlp) are perturbed."""
    model = AutoModelForCausalLM.from_pretrained(target)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    lay = units.layout(model.config, shapes)
    lins = ("q", "k", "v", "o") if block == "attn" else (("gate", "up", "down") if lay.has_gate else ("up", "down"))
    names = {s.param for lin in lins for s in units.component(lay, f"L0.{block}.{lin}").slices}
    names -= {s.param for s in units.component(lay, "L0.attn.o" if block == "attn" else "L0.mlp.down").slices
              if s.param.endswith("bias")}  # output biases belong to no head or neuron: keep them equal
    torch.manual_seed(7)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].add_(torch.randn_like(params[n]) * 0.5)
    model.save_pretrained(out)
    for f in target.glob("tokenizer*"):
        shutil.copy(f, out / f.name)
    return out


def cache(loaded, names: list[str]) -> dict[str, torch.Tensor]:
    bridge = loaded.bridge
    tokens = loaded.tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        _, c = bridge.run_with_cache(tokens, names_filter=lambda n: n in names)
    return {n: c[n].clone() for n in names}


@pytest.mark.parametrize("family", FAMILIES)
def test_heads_and_projections_take_the_donors_activations(family: str, tmp_path: Path) -> None:
    target = build_model(tmp_path / "target", family, seed=3)
    donor = perturbed(target, tmp_path / "donor", "attn")
    t, d = load(target), load(donor)
    hooks = ["blocks.0.attn.hook_z", "blocks.0.hook_attn_out", "blocks.0.attn.hook_q", "blocks.0.attn.hook_k"]
    base, ref = cache(t, hooks), cache(d, hooks)
    lay = units.layout(t.model.config, {n: tuple(p.shape) for n, p in t.parameters().items()})
    dck = Checkpoint.open(donor)
    unit = "G" if lay.gqa else "H"
    # OLMo 2 normalizes the queries (keys) of every head together: a head moved alone changes the scale of
    # the others', so no head's activations are its own — only the whole block's and the projections' are.
    assert lay.heads_share_a_norm == (family in HEADS_SHARE_A_NORM)
    if lay.heads_share_a_norm:
        with applied(t, dck, Plan.of([f"L0.{unit}*", *(["L0.KV*"] if lay.gqa else [])])):
            out = cache(t, ["blocks.0.hook_attn_out"])["blocks.0.hook_attn_out"]
        torch.testing.assert_close(out, ref["blocks.0.hook_attn_out"])
        return
    # A KV group (or, without GQA, a head) carries its own q, k, v and o: its z becomes the donor's.
    for idx in range(lay.n_kv if lay.gqa else lay.n_heads):
        comp = units.component(lay, f"L0.{unit}{idx}")
        with applied(t, dck, Plan.of([comp.id])):
            z = cache(t, ["blocks.0.attn.hook_z"])["blocks.0.attn.hook_z"]
        for h in range(lay.n_heads):
            want = ref if h in comp.heads else base
            torch.testing.assert_close(z[:, :, h], want["blocks.0.attn.hook_z"][:, :, h], msg=f"{comp.id} head {h}")
    # A query head under GQA: its q becomes the donor's, the shared k stays the target's.
    with applied(t, dck, Plan.of(["L0.H1"])):
        after = cache(t, ["blocks.0.attn.hook_q", "blocks.0.attn.hook_k"])
    torch.testing.assert_close(after["blocks.0.attn.hook_q"][:, :, 1], ref["blocks.0.attn.hook_q"][:, :, 1])
    torch.testing.assert_close(after["blocks.0.attn.hook_q"][:, :, 0], base["blocks.0.attn.hook_q"][:, :, 0])
    if lay.gqa:
        torch.testing.assert_close(after["blocks.0.attn.hook_k"], base["blocks.0.attn.hook_k"])
        # A KV head: its keys and values become the donor's, the other KV heads' stay the target's.
        kv = ["blocks.0.attn.hook_k", "blocks.0.attn.hook_v"]
        with applied(t, dck, Plan.of(["L0.KV1"])):
            after = cache(t, kv)
        for hook in kv:
            torch.testing.assert_close(after[hook][:, :, 1], ref[hook][:, :, 1] if hook in ref else
                                       cache(d, [hook])[hook][:, :, 1])
            torch.testing.assert_close(after[hook][:, :, 0], base[hook][:, :, 0] if hook in base else
                                       cache(t, [hook])[hook][:, :, 0])
        # Query heads and KV heads together are the whole attention block.
        with applied(t, dck, Plan.of(["L0.H*", "L0.KV*"])):
            out = cache(t, ["blocks.0.hook_attn_out"])["blocks.0.hook_attn_out"]
        torch.testing.assert_close(out, ref["blocks.0.hook_attn_out"])
    # Every head together (o columns included) gives the donor's attention output.
    with applied(t, dck, Plan.of([f"L0.{unit}*"])):
        out = cache(t, ["blocks.0.hook_attn_out"])["blocks.0.hook_attn_out"]
    torch.testing.assert_close(out, ref["blocks.0.hook_attn_out"])
    # Each projection alone: its output hook becomes the donor's (fused q/k/v included).
    for lin in ("q", "k", "v"):
        hook = f"blocks.0.attn.{lin}.hook_out"
        want = cache(d, [hook])[hook]
        with applied(t, dck, Plan.of([f"L0.attn.{lin}"])):
            got = cache(t, [hook])[hook]
        torch.testing.assert_close(got, want, msg=f"L0.attn.{lin}")
    # And the model is back to the target afterwards.
    torch.testing.assert_close(cache(t, ["blocks.0.attn.hook_z"])["blocks.0.attn.hook_z"], base["blocks.0.attn.hook_z"],
                               rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_neurons_and_mlp_take_the_donors_activations(family: str, tmp_path: Path) -> None:
    target = build_model(tmp_path / "target", family, seed=3)
    donor = perturbed(target, tmp_path / "donor", "mlp")
    t, d = load(target), load(donor)
    hooks = ["blocks.0.mlp.hook_post", "blocks.0.hook_mlp_out"]
    base, ref = cache(t, hooks), cache(d, hooks)
    dck = Checkpoint.open(donor)
    with applied(t, dck, Plan.of(["L0.N5", "L0.N17"])):
        post = cache(t, ["blocks.0.mlp.hook_post"])["blocks.0.mlp.hook_post"]
    moved = torch.zeros(post.shape[-1], dtype=torch.bool)
    moved[[5, 17]] = True
    torch.testing.assert_close(post[..., moved], ref["blocks.0.mlp.hook_post"][..., moved])
    torch.testing.assert_close(post[..., ~moved], base["blocks.0.mlp.hook_post"][..., ~moved])
    with applied(t, dck, Plan.of(["L0.N*"])):
        out = cache(t, ["blocks.0.hook_mlp_out"])["blocks.0.hook_mlp_out"]
    torch.testing.assert_close(out, ref["blocks.0.hook_mlp_out"])
    with applied(t, dck, Plan.of(["L0.mlp"])):
        out = cache(t, ["blocks.0.hook_mlp_out"])["blocks.0.hook_mlp_out"]
    torch.testing.assert_close(out, ref["blocks.0.hook_mlp_out"])


@pytest.mark.parametrize("family", FAMILIES)
def test_the_default_kinds_cover_every_attention_and_mlp_weight_once(family: str, tiny_pairs) -> None:
    """head, kv, mlp — what copy-all moves — hold each element of every attention and MLP weight exactly
    once (with GQA the KV heads are what the query heads leave out), so copy-all is all of them; the output
    biases of attention and MLP belong to their blocks, not to any head or neuron."""
    _, target = tiny_pairs(family)
    ck = Checkpoint.open(target)
    lay = units.layout(load(target).model.config, ck.shapes())
    weights = {s.param for L in range(lay.n_layers) for part in ("attn", "mlp")
               for s in units.component(lay, f"L{L}.{part}").slices if len(ck.shapes()[s.param]) == 2}
    count = {n: torch.zeros(ck.shapes()[n], dtype=torch.int32) for n in weights}
    for comp in units.components(lay, units.DEFAULT_KINDS):
        for sl in comp.slices:
            if sl.param in count:
                count[sl.param][sl.index(count[sl.param].ndim)] += 1
    assert all(bool((c == 1).all()) for c in count.values()), {n for n, c in count.items() if not (c == 1).all()}
    if not lay.gqa:
        assert not units.component_ids(lay, ["kv"])
        with pytest.raises(GraftError, match="owns its keys"):
            units.component(lay, "L0.KV0")


@pytest.mark.parametrize("family", FAMILIES)
def test_outer_lists_every_tensor_outside_the_layers(family: str, tiny_pairs) -> None:
    """With outer, the default kinds reach every tensor a regression can live in but the per-layer norms and
    output biases: the embeddings, the LM head (when not tied) and the final norm, each whole."""
    _, target = tiny_pairs(family)
    ck = Checkpoint.open(target)
    lay = units.layout(load(target).model.config, ck.shapes())
    outer = units.component_ids(lay, ["outer"])
    assert outer and all(units.LAYER_RE.match(n) is None for n in outer)
    assert set(outer) == {n for n in ck.shapes() if not n.startswith(lay.prefix)}
    assert units.component_ids(lay, units.DEFAULT_KINDS)[-len(outer):] == outer
    assert all(units.component(lay, n).kind == "outer" and units.component(lay, n).layer is None for n in outer)


def test_patterns_select_components(llama_pair: tuple[Path, Path]) -> None:
    _, target = llama_pair
    ck = Checkpoint.open(target)
    lay = units.layout(load(target).model.config, ck.shapes())
    assert [c.id for c in units.select(lay, ["L1.H*"])] == ["L1.H0", "L1.H1", "L1.H2", "L1.H3"]
    assert [c.id for c in units.select(lay, ["L*.mlp"])] == ["L0.mlp", "L1.mlp"]
    assert [c.id for c in units.select(lay, ["L*.attn.q", "L0.mlp.down"])] == ["L0.attn.q", "L1.attn.q", "L0.mlp.down"]
    assert units.select(lay, ["L0.N7"])[0].kind == "neuron"
    assert units.select(lay, ["L1"])[0].kind == "layer"
    assert {s.param for s in units.select(lay, ["L1"])[0].slices} >= {"model.layers.1.input_layernorm.weight"}
    tensor = units.select(lay, ["model.embed_tokens.weight"])[0]
    assert tensor.kind == "outer" and tensor.slices[0].dim is None  # outside the layers
    # Embeddings and the LM head are never part of a layer pattern.
    every = units.select(lay, ["L*"])
    assert not any("embed" in p or "lm_head" in p for c in every for p in c.params)


@pytest.mark.parametrize("pattern", ["L9.mlp", "L0.H4", "L0.attn.gate", "X1", "L*.Z*", "L0.N64"])
def test_bad_patterns_are_named(llama_pair: tuple[Path, Path], pattern: str) -> None:
    _, target = llama_pair
    ck = Checkpoint.open(target)
    lay = units.layout(load(target).model.config, ck.shapes())
    with pytest.raises(GraftError, match="component|pattern"):
        units.select(lay, [pattern])


def test_gpt2_conv1d_head_slices_are_columns(tiny_pairs) -> None:
    _, target = tiny_pairs("gpt2")
    lay = units.layout(load(target).model.config, Checkpoint.open(target).shapes())
    head = units.component(lay, "L0.H2")
    qkv = [s for s in head.slices if s.param.endswith("c_attn.weight")]
    # Conv1D is (in, out): q, k and v rows of head 2 are columns 16:24, 48:56, 80:88 of c_attn.
    assert [(s.dim, s.start, s.stop) for s in qkv] == [(1, 16, 24), (1, 48, 56), (1, 80, 88)]
    o = [s for s in head.slices if s.param.endswith("attn.c_proj.weight")]
    assert [(s.dim, s.start, s.stop) for s in o] == [(0, 16, 24)]


@pytest.mark.parametrize("config", [
    # Falcon's grouped query_key_value ([q of a group's heads | k | v] per KV head) is BLOOM's tensor name
    # with another layout: recognised by name, refused by shape, never cut as BLOOM's.
    lambda: transformers.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
                                      new_decoder_architecture=True, vocab_size=50),
    # Falcon-7B's multi-query [q of every head | k | v]
    lambda: transformers.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, multi_query=True,
                                      vocab_size=50),
    # experts instead of one MLP per layer
    lambda: transformers.MixtralConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=16, num_local_experts=2, vocab_size=50),
    # a config whose head count disagrees with the tensors (head_dim left out of a custom config)
    lambda: transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=16, intermediate_size=16, vocab_size=50),
], ids=["falcon", "falcon-7b", "mixtral", "wrong-head-dim"])
def test_an_architecture_cut_otherwise_is_refused_in_one_line(config) -> None:
    cfg = config()
    shapes = {n: tuple(p.shape) for n, p in AutoModelForCausalLM.from_config(cfg).named_parameters()}
    if cfg.model_type == "llama":
        cfg.head_dim = None  # the tensors were built with 16 per head; the config now implies 8
    with pytest.raises(GraftError, match="unsupported architecture") as err:
        units.layout(cfg, shapes)
    assert "\n" not in str(err.value)
    assert ("mixture of experts" in str(err.value)) == (cfg.model_type == "mixtral")
    assert ("Falcon's" in str(err.value)) == (cfg.model_type == "falcon")  # named, not taken for BLOOM


def test_a_multimodal_checkpoint_is_cut_by_its_language_model() -> None:
    """Gemma 3 with its vision tower: the layout reads the text config, the layers are the language model's,
    and neither the vision tower nor the projector is a candidate (a text task cannot measure them)."""
    text = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, head_dim=8, max_position_embeddings=64)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                    image_token_index=50, boi_token_index=51, eoi_token_index=52)
    model = transformers.Gemma3ForConditionalGeneration(cfg)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    lay = units.layout(model.config, shapes)
    assert (lay.prefix, lay.n_layers, lay.n_heads, lay.n_kv) == ("model.language_model.layers.", 2, 4, 2)
    outer = units.component_ids(lay, ["outer"])
    assert outer and all(n.startswith("model.language_model.") or n.count(".") == 1 for n in outer)
    assert any("vision_tower" in n for n in shapes) and not any("vision" in n or "projector" in n for n in outer)
    names = units.language_model_names(lay)
    assert set(names) == {n for n in shapes if n.startswith("model.language_model.") or n.count(".") == 1}


def test_an_lm_head_tied_in_one_model_only_unshares_the_vocabulary_and_nothing_else() -> None:
    """The tying model's files and parameters hold no lm_head: that head, and the embeddings it is tied to,
    are not the same tensors in the two models. Anything else missing or of another shape is no such pair;
    nor is a head whose shape two tensors share (which one is it tied to?)."""
    from analysis.units import mismatches, tied_head

    untied = {"model.embed_tokens.weight": (99, 32), "model.layers.0.mlp.down_proj.weight": (32, 64),
              "model.norm.weight": (32,), "lm_head.weight": (99, 32)}
    tied = {n: s for n, s in untied.items() if n != "lm_head.weight"}
    for donor, target in ((untied, tied), (tied, untied)):
        assert tied_head(mismatches(donor, target), donor, target) == ["lm_head.weight", "model.embed_tokens.weight"]
    other = {**tied, "model.layers.0.mlp.down_proj.weight": (32, 48)}
    assert tied_head(mismatches(untied, other), untied, other) == []
    lookalike = {**untied, "model.pos_embed.weight": (99, 32)}
    ambiguous = {n: s for n, s in lookalike.items() if n != "lm_head.weight"}
    assert tied_head(mismatches(lookalike, ambiguous), lookalike, ambiguous) == []
