"""A bank of small transplant pairs (donor, target) that nobody tuned a localization method on.

    .venv/bin/python bench/pairs.py                 # build every pair (cached), print one table
    .venv/bin/python bench/pairs.py gpt2-quant      # one pair
    .venv/bin/python bench/pairs.py --list          # names and what each stands for
    .venv/bin/python bench/pairs.py NAME --force    # rebuild (its base model too)

Every pair is built here, in-process, from a fixed seed, on the demo's synthetic skills and filler
language (``analysis.demo.data``: held-out probe / dev / test problems that no training stream ever
emits) with the demo's training loop and writer (``analysis.demo.build``). Eight base models — a Llama
like the demo's, a deeper Llama with a different query/KV grouping, a GPT-2, a GPT-NeoX, a Phi-3, an
OLMo 2, a Qwen2 and a Gemma 2 (``BASES``) — are trained once each and cached; each pair then applies one
regression recipe to a base:

- ``forget``: the base trained on a shifted mix without one skill (at two lengths); donor = base,
  target = the continued model (a newer release that regressed);
- ``specialist``: the base fine-tuned on one skill it is weak at — every weight, or low-rank adapters
  merged afterwards (``Lora``); donor = the fine-tune, target = base (the base <-> tuned setting);
- ``quantize``: symmetric per-output-row round-to-nearest of every linear weight of a few layers at
  2-4 bits, dequantized back to float; donor = base, target = the damaged copy (damage confined to
  known layers);
- ``prune``: the smallest-magnitude share of every linear weight of a few layers set to zero (a pruned
  release); donor = base, target = the pruned copy.

A pair folder (``build(name)``; cached under ``default_cache()``, never inside the repository)::

    FOLDER/donor/  FOLDER/target/   HF folders (bf16 safetensors, float32 compute), the donor better
    FOLDER/task.yaml + items.jsonl  (or task.jsonl for the plain-JSONL pair): probe 64 / dev 150 /
                                    test 300 items, and 100 retention texts (split "retention")
    FOLDER/pair.json                recipe, its hash, sha256 of both models, measured accuracies

A pair is rebuilt when its recipe hash (the recipe's dataclasses as JSON, ``BUILDER_VERSION`` and the
torch version) no longer matches; it is written into a temporary folder and renamed, so a killed build
leaves no half pair. ``--force`` rebuilds the named pairs and their bases.

Measured here (torch 2.13.0 CPU, 1 thread, 2 shared cores; test split; seconds for the pair from its
cached base, + the base's own build, paid once by the first pair on it):

    pair                 recipe      kind      donor test      target test     gap    s (+base)
    llama4-forget-short  forget      generate  300/300 1.000   92/300 0.307    +69.3   82 (+271)
    llama4-forget-long   forget      generate  300/300 1.000    0/300 0.000   +100.0  196 (+271)
    llama4-quant         quantize    generate  300/300 1.000  139/300 0.463    +53.7    1 (+271)
    llama6-specialist    specialist  choice    278/300 0.927  158/300 0.527    +40.0  124 (+242)
    llama6-forget-long   forget      generate  300/300 1.000    0/300 0.000   +100.0  187 (+242)
    llama6-quant         quantize    generate  297/300 0.990  160/300 0.533    +45.7    1 (+242)
    gpt2-forget-short    forget      choice    299/300 0.997  141/300 0.470    +52.7   32 (+250)
    gpt2-quant           quantize    generate  294/300 0.980  181/300 0.603    +37.7    1 (+250)
    gpt2-specialist      specialist  choice    297/300 0.990  106/300 0.353    +63.7   47 (+250)
    ...                  (the NeoX, Phi-3 and OLMo 2 pairs of session 12: see docs/localization.md)
    qwen2-forget-long    forget      generate  300/300 1.000    0/300 0.000   +100.0  189 (+256)
    qwen2-prune          prune       generate  300/300 1.000   64/300 0.213    +78.7    4 (+256)
    gemma2-specialist    specialist  choice    276/300 0.920   47/300 0.157    +76.3   45 (+222)
    gemma2-forget-short  forget      generate  300/300 1.000   26/300 0.087    +91.3   69 (+222)
    llama6-lora-specialist  specialist  choice  262/300 0.873  153/300 0.510  +36.3  126 (+242)

Reproducibility, checked: ``python bench/pairs.py llama4-forget-short --force`` after a full
``--force`` build gave the same sha256 for the base/donor (efd5b0d6…) and the target (467cb151…); the
three bases came out identical in all of their builds (three each for llama4 and gpt2, two for llama6,
the first ones with two builds running side by side), and so did gpt2-quant's target (c5ef6d40…).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from analysis.demo import build as demo_build  # noqa: E402
from analysis.demo import data  # noqa: E402
from analysis.demo.build import Phase, Recipe  # noqa: E402

BUILDER_VERSION = "1"  # bump when the builder's output changes for an unchanged recipe
THREADS = 1  # on a busy 2-core machine one thread is as fast as two, and bit-reproducible
SPLIT_SIZES = {"probe": 64, "dev": 150, "test": 300}  # first items of the HeldOut's 64 / 200 / 400


# ---------------------------------------------------------------- what a pair is


@dataclass(frozen=True)
class Base:
    """A model trained from scratch once and shared by several pairs."""

    name: str
    arch: str  # "llama" | "gpt2" | "neox" | "phi3" | "olmo2" | "qwen2" | "gemma2"
    recipe: Recipe  # sizes, seed, batch and the one training phase (parent None)
    held_seed: int  # seed of the held-out problems (data.held_out): every pair on this base uses them


@dataclass(frozen=True)
class TaskSpec:
    """The evaluated task: a skill of analysis.demo.data in one prompt format, scored one way."""

    skill: str  # arith | reverse | upper
    fmt: str = "plain"  # plain | chat (data.FORMATS)
    kind: str = "generate"  # generate | choice
    file: str = "yaml"  # yaml: task.yaml over items.jsonl; jsonl: a plain task.jsonl, every default


@dataclass(frozen=True)
class Quant:
    """Round-to-nearest of the linear weights (attention and MLP) of ``layers`` at ``bits``."""

    bits: int
    layers: tuple[int, ...]


@dataclass(frozen=True)
class Prune:
    """Magnitude pruning of the linear weights (attention and MLP) of ``layers``: in each weight, the
    ``sparsity`` share of its entries smallest in magnitude set to zero (a pruned release)."""

    sparsity: float
    layers: tuple[int, ...]


@dataclass(frozen=True)
class Lora:
    """Low-rank adapters ``W + (alpha / rank) · B A`` on every attention and MLP linear weight, trained with
    the base frozen and merged into the weights afterwards (how most published fine-tunes are made)."""

    rank: int
    alpha: float


@dataclass(frozen=True)
class PairSpec:
    name: str
    description: str  # one line: what the pair stands for
    base: Base
    recipe: str  # forget | specialist | quantize | prune
    task: TaskSpec
    phase: Phase | None = None  # forget, specialist: the training applied to the base
    quant: Quant | None = None  # quantize
    prune: Prune | None = None  # prune
    lora: Lora | None = None  # specialist: adapters trained instead of every weight

    @property
    def arch(self) -> str:
        return self.base.arch


def _base(name: str, arch: str, seed: int, size: dict, mix: dict[str, float], steps: int = 800,
          lr: float = 3e-3) -> Base:
    recipe = Recipe(seed=seed, threads=THREADS, **size,
                    phases=(Phase(name, None, mix, steps, lr, 100, seed + 1),))
    return Base(name, arch, recipe, held_seed=seed)


# Seeds differ from the demo's (0; phases 1-3). Mixes are shares of training lines (data.Stream). What
# each base learned (dev, measured): addition is the hard skill — partly learned by the Llamas, barely
# by the GPT-2 — which is what the specialist pairs start from; reversal and uppercasing are learned fully.
BASES = {
    # The demo's shape (hidden 128, 4 layers, 4 query heads sharing 2 KV heads). Reversal 100%,
    # addition ~55% (generated) — the demo's gen1 reached 100% with its seed and a little more addition.
    "llama4": _base("llama4", "llama", 21, dict(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=512),
                    {"arith:plain": 0.45, "reverse:plain": 0.3, "text": 0.25}),
    # Deeper and narrower: 6 layers, 6 query heads of dim 16 in 2 KV groups of 3. Reversal and
    # uppercasing 100% (uppercasing from 4% of the lines), addition ~25% generated / ~53% as a choice.
    "llama6": _base("llama6", "llama", 22, dict(hidden=96, layers=6, heads=6, kv_heads=2, intermediate=384),
                    {"arith:plain": 0.35, "reverse:plain": 0.3, "upper:plain": 0.04, "text": 0.31}),
    # GPT-2 (LayerNorm, GELU, learned positions, tied embeddings, fused c_attn). Reversal 100%, addition
    # ~6%; the chat format of addition, seen in 3% of the lines, not learned either.
    "gpt2": _base("gpt2", "gpt2", 23, dict(hidden=128, layers=4, heads=4, kv_heads=4, intermediate=512),
                  {"arith:plain": 0.4, "reverse:plain": 0.3, "arith:chat": 0.03, "text": 0.27}),
    # GPT-NeoX as Pythia is cut (parallel attention and MLP, rotary on a quarter of each head, q/k/v fused
    # per head); its mix brings uppercasing too.
    "neox4": _base("neox4", "neox", 24, dict(hidden=128, layers=4, heads=4, kv_heads=4, intermediate=512),
                   {"arith:plain": 0.4, "reverse:plain": 0.3, "upper:plain": 0.05, "text": 0.25}),
    # Phi-3 (q/k/v in one projection, gate and up in another), 6 query heads of dim 16 in 2 KV groups.
    "phi3": _base("phi3", "phi3", 25, dict(hidden=96, layers=4, heads=6, kv_heads=2, intermediate=384),
                  {"arith:plain": 0.45, "reverse:plain": 0.3, "text": 0.25}),
    # OLMo 2 (queries and keys normalized over every head at once, norms after attention and MLP), 6 query
    # heads of dim 16 in 3 KV groups.
    "olmo2": _base("olmo2", "olmo2", 26, dict(hidden=96, layers=4, heads=6, kv_heads=3, intermediate=384),
                   {"arith:plain": 0.45, "reverse:plain": 0.3, "text": 0.25}),
    # Qwen2 (biases on q/k/v, LM head tied to the embeddings, as Qwen2-0.5B ships), 4 query heads in 2 KV
    # groups; its mix brings uppercasing.
    "qwen2": _base("qwen2", "qwen2", 27, dict(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=512),
                   {"arith:plain": 0.4, "reverse:plain": 0.3, "upper:plain": 0.05, "text": 0.25}),
    # Gemma 2 (norms stored as 1 + w before and after each block, embeddings scaled by sqrt(hidden) and tied
    # to the LM head, attention and final logits soft-capped, a 32-token sliding window on every other
    # layer: shorter than a training row), 6 query heads of dim 16 in 2 KV groups.
    "gemma2": _base("gemma2", "gemma2", 28, dict(hidden=96, layers=4, heads=6, kv_heads=2, intermediate=384),
                    {"arith:plain": 0.45, "reverse:plain": 0.3, "reverse:chat": 0.03, "text": 0.22}),
}

# Continued training without reversal. The Llama 4's mix adds nothing new, so reversal fades slowly (dev:
# 150/150 after 150 steps, 119 after 200, 56 after 250, 11 after 350, 0 from 450). The GPT-2's mix
# brings uppercasing, new to it, which takes over the word prompts: choosing the reversal drops at once
# (dev: 90/150 after 25 steps, 72 after 100, 14 after 175 — below chance, as the model then prefers
# the unreversed word).
FORGET_QUIET = {"arith:plain": 0.6, "text": 0.4}
FORGET_NEW_SKILL = {"arith:plain": 0.45, "upper:plain": 0.3, "text": 0.25}


def _phase(name: str, parent: str, mix: dict[str, float], steps: int, seed: int, lr: float = 1e-3) -> Phase:
    """Continued training of a base: warmup 50 steps, then a constant rate (a release's extra training)."""
    return Phase(name, parent, mix, steps, lr, 50, seed, schedule="constant")


PAIRS: dict[str, PairSpec] = {p.name: p for p in (
    PairSpec("llama4-forget-short",
             "a newer release trained 250 more steps on a mix without word reversal: partly forgotten",
             BASES["llama4"], "forget", TaskSpec("reverse"),
             phase=_phase("llama4-forget-short", "llama4", FORGET_QUIET, 250, 31)),
    PairSpec("llama4-forget-long",
             "the same release trained 600 steps without reversal: forgotten, the damage spread",
             BASES["llama4"], "forget", TaskSpec("reverse"),
             phase=_phase("llama4-forget-long", "llama4", FORGET_QUIET, 600, 31)),
    PairSpec("llama4-quant",
             "layers 1 and 2 of 4 rounded to 2 bits (ternary RTN): damage confined to two layers",
             BASES["llama4"], "quantize", TaskSpec("reverse"),
             quant=Quant(bits=2, layers=(1, 2))),
    PairSpec("llama6-specialist",
             "a base that half learned addition beside its fine-tune on addition, as a 4-way choice "
             "(base <-> tuned)",
             BASES["llama6"], "specialist", TaskSpec("arith", kind="choice"),
             phase=_phase("llama6-specialist", "llama6", {"arith:plain": 0.8, "text": 0.2}, 400, 32)),
    PairSpec("llama6-forget-long",
             "a newer release trained 600 steps without reversal; its task a plain JSONL, every default",
             BASES["llama6"], "forget", TaskSpec("reverse", file="jsonl"),
             phase=_phase("llama6-forget-long", "llama6", {"arith:plain": 0.45, "upper:plain": 0.25,
                                                           "text": 0.3}, 600, 33)),
    PairSpec("llama6-quant",
             "one layer (2 of 6) rounded to 2 bits: uppercasing damaged from a single layer of a deeper model",
             BASES["llama6"], "quantize", TaskSpec("upper"),
             quant=Quant(bits=2, layers=(2,))),
    PairSpec("gpt2-forget-short",
             "a GPT-2 trained 100 more steps on a new skill instead of reversal, judged as a 4-way choice",
             BASES["gpt2"], "forget", TaskSpec("reverse", kind="choice"),
             phase=_phase("gpt2-forget-short", "gpt2", FORGET_NEW_SKILL, 100, 34)),
    PairSpec("gpt2-quant",
             "a GPT-2 with layer 1 of 4 rounded to 2 bits: damage in a single layer",
             BASES["gpt2"], "quantize", TaskSpec("reverse"),
             quant=Quant(bits=2, layers=(1,))),
    PairSpec("gpt2-specialist",
             "a GPT-2 base beside its fine-tune on the chat format of reversal, as a 4-way choice "
             "(base <-> chat-tuned)",
             BASES["gpt2"], "specialist", TaskSpec("reverse", fmt="chat", kind="choice"),
             phase=_phase("gpt2-specialist", "gpt2", {"reverse:chat": 0.8, "text": 0.2}, 150, 35)),
    # Two architectures whose projections are fused, added after the methods were settled on the nine above.
    PairSpec("neox4-forget-long",
             "a GPT-NeoX (Pythia's cut) trained 600 more steps without reversal: forgotten, the damage spread",
             BASES["neox4"], "forget", TaskSpec("reverse"),
             phase=_phase("neox4-forget-long", "neox4", FORGET_QUIET, 600, 36)),
    PairSpec("neox4-quant",
             "a GPT-NeoX with layer 2 of 4 rounded to 2 bits, judged on uppercasing (a skill from 5% of its lines)",
             BASES["neox4"], "quantize", TaskSpec("upper"),
             quant=Quant(bits=2, layers=(2,))),
    PairSpec("phi3-forget-short",
             "a Phi-3 trained 150 more steps on a new skill instead of reversal, judged as a 4-way choice",
             BASES["phi3"], "forget", TaskSpec("reverse", kind="choice"),
             phase=_phase("phi3-forget-short", "phi3", FORGET_NEW_SKILL, 150, 37)),
    PairSpec("phi3-quant",
             "a Phi-3 with layers 0 and 3 of 4 rounded to 2 bits: damage at both ends",
             BASES["phi3"], "quantize", TaskSpec("reverse"),
             quant=Quant(bits=2, layers=(0, 3))),
    # Added in session 12 with the heads-share-a-norm family: a head is a unit of weight there, not of activation.
    PairSpec("olmo2-forget-long",
             "an OLMo 2 trained 600 more steps without reversal: forgotten, the damage spread",
             BASES["olmo2"], "forget", TaskSpec("reverse"),
             phase=_phase("olmo2-forget-long", "olmo2", FORGET_QUIET, 600, 38)),
    PairSpec("olmo2-quant",
             "an OLMo 2 with layer 1 of 4 rounded to 2 bits: damage in one layer",
             BASES["olmo2"], "quantize", TaskSpec("reverse"),
             quant=Quant(bits=2, layers=(1,))),
    # Added in session 13, every method and default as they were: two more families (tied LM heads, biases,
    # soft-capping, sliding windows) and a fourth recipe (pruning).
    PairSpec("qwen2-forget-long",
             "a Qwen2 (tied LM head) trained 600 more steps without uppercasing: forgotten, the damage spread",
             BASES["qwen2"], "forget", TaskSpec("upper"),
             phase=_phase("qwen2-forget-long", "qwen2", {"arith:plain": 0.45, "reverse:plain": 0.3, "text": 0.25},
                          600, 39)),
    PairSpec("qwen2-prune",
             "a Qwen2 with layers 1 and 3 of 4 pruned to 70% sparsity by magnitude: a pruned release",
             BASES["qwen2"], "prune", TaskSpec("reverse"),
             prune=Prune(sparsity=0.7, layers=(1, 3))),
    PairSpec("gemma2-specialist",
             "a Gemma 2 base beside its fine-tune on addition in the chat format it never saw, as a 4-way "
             "choice (base <-> chat-tuned)",
             BASES["gemma2"], "specialist", TaskSpec("arith", fmt="chat", kind="choice"),
             phase=_phase("gemma2-specialist", "gemma2", {"arith:chat": 0.8, "text": 0.2}, 150, 40)),
    PairSpec("llama6-lora-specialist",
             "llama6-specialist's base beside a rank-4 LoRA fine-tune on addition, merged (base <-> tuned "
             "as most fine-tunes are published), as a 4-way choice",
             BASES["llama6"], "specialist", TaskSpec("arith", kind="choice"),
             phase=_phase("llama6-lora-specialist", "llama6", {"arith:plain": 0.8, "text": 0.2}, 400, 42, lr=3e-3),
             lora=Lora(rank=4, alpha=8.0)),
    PairSpec("gemma2-forget-short",
             "a Gemma 2 trained 250 more steps without reversal: partly forgotten",
             BASES["gemma2"], "forget", TaskSpec("reverse"),
             phase=_phase("gemma2-forget-short", "gemma2", FORGET_QUIET, 250, 41)),
)}


# ---------------------------------------------------------------- cache and hashes


def default_cache() -> Path:
    """``$GRAFTLM_CACHE/pairs``, else ``~/.cache/graftlm/pairs``: never inside the repository."""
    root = os.environ.get("GRAFTLM_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "graftlm") / "pairs"


def _key(obj: object) -> str:
    text = json.dumps({"recipe": obj, "builder": BUILDER_VERSION, "torch": torch.__version__}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def recipe_dict(spec: PairSpec) -> dict:
    """The recipe as JSON-able data: everything the build depends on besides the code."""
    d = asdict(spec)
    d.pop("description")
    for key in LATER_FIELDS:  # unset, a field added after pairs were cached leaves their hash as it was
        if d[key] is None:
            d.pop(key)
    return d


LATER_FIELDS = ("lora",)


def recipe_hash(spec: PairSpec) -> str:
    return _key(recipe_dict(spec))


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace ``final`` by the complete folder ``tmp`` (two renames; never a half folder at ``final``)."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _tmp_dir(final: Path) -> Path:
    for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a build that was killed
        pid = stale.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


# ---------------------------------------------------------------- models


def new_model(base: Base, tok):  # -> PreTrainedModel
    """A fresh model of the base's architecture, initialised from its seed."""
    if base.arch == "llama":
        return demo_build.new_model(base.recipe, tok)
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        Phi3Config,
        Phi3ForCausalLM,
    )

    r = base.recipe
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if base.arch == "neox":  # Pythia's shape: q/k/v fused per head, a quarter of each head rotated, parallel blocks
        torch.manual_seed(r.seed)
        return GPTNeoXForCausalLM(GPTNeoXConfig(
            vocab_size=len(tok), hidden_size=r.hidden, num_hidden_layers=r.layers, num_attention_heads=r.heads,
            intermediate_size=r.intermediate, rotary_pct=0.25, use_parallel_residual=True, max_position_embeddings=128,
            hidden_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=False, **ids))
    if base.arch == "olmo2":  # Llama's projections; queries and keys normalized over all heads at once
        from transformers import Olmo2Config, Olmo2ForCausalLM

        torch.manual_seed(r.seed)
        return Olmo2ForCausalLM(Olmo2Config(
            vocab_size=len(tok), hidden_size=r.hidden, num_hidden_layers=r.layers, num_attention_heads=r.heads,
            num_key_value_heads=r.kv_heads, intermediate_size=r.intermediate, max_position_embeddings=128,
            attention_dropout=0.0, tie_word_embeddings=False, **ids))
    if base.arch == "qwen2":  # biases on q/k/v; the LM head is the embedding matrix
        from transformers import Qwen2Config, Qwen2ForCausalLM

        torch.manual_seed(r.seed)
        return Qwen2ForCausalLM(Qwen2Config(
            vocab_size=len(tok), hidden_size=r.hidden, num_hidden_layers=r.layers, num_attention_heads=r.heads,
            num_key_value_heads=r.kv_heads, intermediate_size=r.intermediate, max_position_embeddings=128,
            attention_dropout=0.0, tie_word_embeddings=True, **ids))
    if base.arch == "gemma2":  # 1 + w norms around each block, soft-capping, sliding window on even layers
        from transformers import Gemma2Config, Gemma2ForCausalLM

        torch.manual_seed(r.seed)
        head_dim = r.hidden // r.heads
        return Gemma2ForCausalLM(Gemma2Config(
            vocab_size=len(tok), hidden_size=r.hidden, num_hidden_layers=r.layers, num_attention_heads=r.heads,
            num_key_value_heads=r.kv_heads, head_dim=head_dim, query_pre_attn_scalar=head_dim,
            intermediate_size=r.intermediate, max_position_embeddings=128, sliding_window=32,
            attention_dropout=0.0, tie_word_embeddings=True, attn_implementation="eager", **ids))
    if base.arch == "phi3":  # q/k/v fused one after another, gate and up fused; grouped KV heads
        torch.manual_seed(r.seed)
        return Phi3ForCausalLM(Phi3Config(
            vocab_size=len(tok), hidden_size=r.hidden, num_hidden_layers=r.layers, num_attention_heads=r.heads,
            num_key_value_heads=r.kv_heads, intermediate_size=r.intermediate, max_position_embeddings=128,
            original_max_position_embeddings=128, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
            tie_word_embeddings=False, **ids))
    config = GPT2Config(
        vocab_size=len(tok), n_embd=r.hidden, n_layer=r.layers, n_head=r.heads, n_inner=r.intermediate,
        n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # no dropout, like the Llamas
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(r.seed)
    return GPT2LMHeadModel(config)


def load_float(folder: Path):  # -> PreTrainedModel
    """A saved model in float32 (the bf16 values it was stored with), for further training or editing."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


_rebuilt: set[Path] = set()  # bases rebuilt by --force in this process: shared, so rebuilt once


def base_model(base: Base, cache: Path, force: bool, log: bool) -> tuple[Path, float]:
    """The trained base's HF folder (trained now unless cached) and the seconds its build took."""
    folder = cache / "bases" / f"{base.name}-{_key(asdict(base))}"
    meta = folder / "base.json"
    if meta.is_file() and not (force and folder not in _rebuilt):
        return folder, json.loads(meta.read_text())["build_s"]
    t0 = time.time()
    tok = data.build_tokenizer()
    held = data.held_out(base.held_seed)
    model = new_model(base, tok)
    phase = base.recipe.phases[0]
    if log:
        print(f"base {base.name}: {phase.steps} steps from scratch, mix {phase.mix}", flush=True)
    curve = demo_build.train(model, phase, base.recipe, held, tok.get_vocab(), log=log)
    tmp = _tmp_dir(folder)
    demo_build.save(model, tok, tmp)
    seconds = round(time.time() - t0, 1)
    info = {"base": asdict(base), "build_s": seconds, "loss_curve": curve, "threads": THREADS,
            "torch": torch.__version__, "sha256": demo_build.sha256(tmp / "model.safetensors")}
    (tmp / "base.json").write_text(json.dumps(info, indent=2) + "\n")
    _swap_in(tmp, folder)
    _rebuilt.add(folder)
    return folder, seconds


def _copy_model(src: Path, dest: Path) -> None:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("base.json"))


# ---------------------------------------------------------------- the three recipes


def continued(spec: PairSpec, base_dir: Path, held: data.HeldOut, tok, log: bool):  # -> PreTrainedModel
    """The base (as saved) trained further with the pair's phase."""
    assert spec.phase is not None
    model = load_float(base_dir)
    if log:
        print(f"{spec.name}: {spec.phase.steps} steps from {spec.base.name}, mix {spec.phase.mix}", flush=True)
    demo_build.train(model, spec.phase, spec.base.recipe, held, tok.get_vocab(), log=log)
    return model


def forget(spec: PairSpec, base_dir: Path, held: data.HeldOut, tok, out: Path, log: bool) -> None:
    """Donor: the base. Target: the base trained on a mix without the task's skill."""
    _copy_model(base_dir, out / "donor")
    demo_build.save(continued(spec, base_dir, held, tok, log), tok, out / "target")


def specialist(spec: PairSpec, base_dir: Path, held: data.HeldOut, tok, out: Path, log: bool) -> None:
    """Donor: the base fine-tuned on the task's skill (every weight, or low-rank adapters merged). Target: the base."""
    tuned = continued(spec, base_dir, held, tok, log) if spec.lora is None else lora_tuned(spec, base_dir, held, tok, log)
    demo_build.save(tuned, tok, out / "donor")
    _copy_model(base_dir, out / "target")


class LowRank(torch.nn.Module):
    """A weight's parametrization ``W + scale · B A`` (``B`` starts at zero, so training starts at the base)."""

    def __init__(self, weight: torch.Tensor, rank: int, scale: float, out_dim: int, gen: torch.Generator) -> None:
        super().__init__()
        n_out, n_in = weight.shape if out_dim == 0 else weight.shape[::-1]
        self.a = torch.nn.Parameter(torch.randn(rank, n_in, generator=gen) / n_in ** 0.5)
        self.b = torch.nn.Parameter(torch.zeros(n_out, rank))
        self.scale, self.out_dim = scale, out_dim

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        delta = self.scale * (self.b @ self.a)
        return weight + (delta if self.out_dim == 0 else delta.T)


def lora_tuned(spec: PairSpec, base_dir: Path, held: data.HeldOut, tok, log: bool):  # -> PreTrainedModel
    """The base with adapters on every attention and MLP linear weight, trained on the pair's phase with
    everything else frozen, then merged."""
    from torch.nn.utils import parametrize

    assert spec.phase is not None and spec.lora is not None
    model = load_float(base_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(spec.phase.seed)
    chosen = linear_weights(spec.arch, tuple(range(spec.base.recipe.layers)))
    for name, out_dim in chosen.items():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        parametrize.register_parametrization(
            module, "weight", LowRank(module.weight, spec.lora.rank, spec.lora.alpha / spec.lora.rank, out_dim, gen))
    if log:
        print(f"{spec.name}: rank-{spec.lora.rank} adapters on {len(chosen)} weights, {spec.phase.steps} steps, "
              f"mix {spec.phase.mix}", flush=True)
    demo_build.train(model, spec.phase, spec.base.recipe, held, tok.get_vocab(), log=log)
    with torch.no_grad():
        for name in chosen:
            parametrize.remove_parametrizations(model.get_submodule(name.rsplit(".", 1)[0]), "weight")
    return model


def rtn(weight: torch.Tensor, bits: int, out_dim: int) -> torch.Tensor:
    """Symmetric round-to-nearest with one scale per output row (``out_dim``: the axis of the outputs),
    dequantized: every row takes one of 2**(bits-1) - 1 positive levels, their negatives, or zero."""
    qmax = 2 ** (bits - 1) - 1
    reduce = 1 - out_dim  # the input axis of a 2-D weight
    scale = weight.abs().amax(dim=reduce, keepdim=True).clamp(min=1e-12) / qmax
    return (weight / scale).round().clamp(-qmax, qmax) * scale


def linear_weights(arch: str, layers: tuple[int, ...]) -> dict[str, int]:
    """Parameter name -> output axis, for every attention and MLP linear weight of ``layers``."""
    if arch in ("llama", "olmo2", "qwen2", "gemma2"):
        names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
        return {f"model.layers.{i}.{n}.weight": 0 for i in layers for n in names}  # nn.Linear: (out, in)
    if arch == "neox":
        names = ["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]
        return {f"gpt_neox.layers.{i}.{n}.weight": 0 for i in layers for n in names}
    if arch == "phi3":
        names = ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"]
        return {f"model.layers.{i}.{n}.weight": 0 for i in layers for n in names}
    names = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    return {f"transformer.h.{i}.{n}.weight": 1 for i in layers for n in names}  # Conv1D: (in, out)


def quantize(spec: PairSpec, base_dir: Path, held: data.HeldOut, tok, out: Path, log: bool) -> None:
    """Donor: the base. Target: the base with the chosen layers' linear weights round-to-nearest."""
    assert spec.quant is not None
    _copy_model(base_dir, out / "donor")
    model = load_float(base_dir)
    params = dict(model.named_parameters())
    chosen = linear_weights(spec.arch, spec.quant.layers)
    if log:
        print(f"{spec.name}: {len(chosen)} weights of layers {list(spec.quant.layers)} at {spec.quant.bits} bits",
              flush=True)
    with torch.no_grad():
        for name, out_dim in chosen.items():
            params[name].copy_(rtn(params[name], spec.quant.bits, out_dim))
    demo_build.save(model, tok, out / "target")


def magnitude_pruned(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """``weight`` with the ``sparsity`` share of its entries smallest in magnitude set to zero (ties at the
    threshold pruned too, as torch.nn.utils.prune's global threshold does)."""
    k = int(sparsity * weight.numel())
    if k == 0:
        return weight.clone()
    threshold = weight.abs().flatten().kthvalue(k).values
    return torch.where(weight.abs() <= threshold, torch.zeros_like(weight), weight)


def prune(spec: PairSpec, base_dir: Path, held: data.HeldOut, tok, out: Path, log: bool) -> None:
    """Donor: the base. Target: the base with the chosen layers' linear weights pruned by magnitude."""
    assert spec.prune is not None
    _copy_model(base_dir, out / "donor")
    model = load_float(base_dir)
    params = dict(model.named_parameters())
    chosen = linear_weights(spec.arch, spec.prune.layers)  # the same linear weights
    if log:
        print(f"{spec.name}: {len(chosen)} weights of layers {list(spec.prune.layers)} pruned to "
              f"{spec.prune.sparsity:.0%}", flush=True)
    with torch.no_grad():
        for name in chosen:
            params[name].copy_(magnitude_pruned(params[name], spec.prune.sparsity))
    demo_build.save(model, tok, out / "target")


RECIPES = {"forget": forget, "specialist": specialist, "quantize": quantize, "prune": prune}


# ---------------------------------------------------------------- tasks


def _distractors(skill: str, answer: str, problem: object, rng: random.Random) -> list[str]:
    """Plausible wrong answers (at least three, distinct, none the answer)."""
    if skill == "arith":
        s = int(answer)
        swap = answer[:-2] + answer[-1] + answer[-2]  # the last two digits swapped: 95 -> 59
        cands = [str(s + 1), str(s - 1), str(s + 10), str(s - 10), swap.lstrip("0") or "0"]
    else:
        word = str(problem)
        i = rng.randrange(len(answer) - 1)
        swapped = answer[:i] + answer[i + 1] + answer[i] + answer[i + 2:]  # two neighbours swapped
        if skill == "reverse":
            cands = [word, swapped, answer[1:] + answer[0]]  # not reversed, one swap, rotated
        else:
            cands = [word, word.capitalize(), swapped]  # not uppercased, only the first letter, one swap
    out: list[str] = []
    while len(out) < 3 or cands:
        c = cands.pop(0) if cands else _one_letter_changed(answer, rng)
        if c != answer and c not in out:
            out.append(c)
    return out


def _one_letter_changed(answer: str, rng: random.Random) -> str:
    j = rng.randrange(len(answer))
    letter = rng.choice([c for c in data.LETTERS if c != answer[j].lower()])
    return answer[:j] + (letter.upper() if answer[j].isupper() else letter) + answer[j + 1:]


def items(spec: PairSpec, held: data.HeldOut) -> list[dict]:
    """The task's items (probe / dev / test, held out from every training stream), then the retention
    texts; choices, when asked, are the answer and three plausible wrong ones in a seeded order."""
    t = spec.task
    rng = random.Random(f"graftlm-pairs-{spec.name}")
    rows: list[dict] = []
    for split, n in SPLIT_SIZES.items():
        for i, problem in enumerate(held.problems[t.skill][split][:n]):
            prompt, answer = data.FORMATS[t.fmt](t.skill, problem)
            row: dict = {"id": f"{t.skill}-{split}-{i:03d}", "prompt": prompt}
            if t.kind == "choice":
                choices = [answer, *rng.sample(_distractors(t.skill, answer, problem, rng), 3)]
                rng.shuffle(choices)
                row.update(choices=choices, answer=choices.index(answer))
            else:
                row["answer"] = answer
            row["split"] = split
            rows.append(row)
    rows += [{"id": f"text-{i:03d}", "text": text, "split": "retention"}
             for i, text in enumerate(held.retention["test"])]
    return rows


def write_task(spec: PairSpec, held: data.HeldOut, out: Path) -> str:
    """Write the task into ``out``; returns the file name of the task reference."""
    t = spec.task
    rows = items(spec, held)
    if t.file == "jsonl":  # a new user's file: no YAML, every default of docs/tasks.md
        data.write_jsonl(out / "task.jsonl", rows)
        return "task.jsonl"
    data.write_jsonl(out / "items.jsonl", rows)
    if t.kind == "generate":
        conf = {"kind": "generate", "filter": "numeric" if t.skill == "arith" else "exact", "metric": "strict",
                "prompt": "{prompt}", "target": "{answer}", "stop": ["\n"], "max_new_tokens": 12,
                "fewshot_separator": "\n"}
    else:
        # The models write answers right after the prompt, without a space.
        conf = {"kind": "choice", "prompt": "{prompt}", "choice_prefix": "", "metric": "acc"}
    conf = {"name": spec.name, **conf, "data": "items.jsonl"}
    head = f"# {spec.name}: {spec.description}\n# Written by bench/pairs.py; retention texts are in items.jsonl.\n"
    (out / "task.yaml").write_text(head + "".join(f"{k}: {json.dumps(v)}\n" for k, v in conf.items()))
    return "task.yaml"


def measure(folder: Path, task: Path) -> dict:
    """Dev and test accuracy (k, n, acc) of a saved model, loaded and scored as the suite does."""
    from analysis.eval import evaluate
    from analysis.io import models

    lm = models.load(folder)
    res = {}
    for split in ("dev", "test"):
        s = evaluate.run(lm.model, lm.tokenizer, task, split=split, batch_size=128, progress=False).summary
        res[split] = {"k": s["k"], "n": s["n"], "acc": round(s["accuracy"], 4)}
    return res


def n_components(folder: Path) -> int:
    """Heads + MLPs of a model folder."""
    config = json.loads((folder / "config.json").read_text())
    layers = config.get("num_hidden_layers", config.get("n_layer"))
    heads = config.get("num_attention_heads", config.get("n_head"))
    return layers * (heads + 1)


# ---------------------------------------------------------------- build


def build(name: str, *, cache: Path | None = None, force: bool = False, log: bool = True) -> Path:
    """The folder of pair ``name``: reused from the cache when its recipe hash matches, else built."""
    if name not in PAIRS:
        raise KeyError(f"unknown pair {name!r}; pairs: {', '.join(PAIRS)}")
    spec = PAIRS[name]
    cache = Path(cache) if cache is not None else default_cache()
    folder = cache / name
    digest = recipe_hash(spec)
    meta = folder / "pair.json"
    if not force and meta.is_file() and json.loads(meta.read_text()).get("recipe_hash") == digest:
        return folder
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)  # the caller's setting comes back afterwards
    try:
        return _build(spec, cache / name, digest, force, log)
    finally:
        torch.set_num_threads(threads)


def _build(spec: PairSpec, folder: Path, digest: str, force: bool, log: bool) -> Path:
    cache, name = folder.parent, spec.name
    t0 = time.time()
    base_dir, base_s = base_model(spec.base, cache, force, log)
    t1 = time.time()
    tok = data.build_tokenizer()
    held = data.held_out(spec.base.held_seed)
    tmp = _tmp_dir(folder)
    try:
        RECIPES[spec.recipe](spec, base_dir, held, tok, tmp, log)
        task = write_task(spec, held, tmp)
        baseline = {role: measure(tmp / role, tmp / task) for role in ("donor", "target")}
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info = {
        "name": name, "description": spec.description, "recipe": recipe_dict(spec), "recipe_hash": digest,
        "arch": spec.arch, "kind": spec.task.kind, "task": task, "components": n_components(tmp / "target"),
        "sha256": {role: demo_build.sha256(tmp / role / "model.safetensors") for role in ("donor", "target")},
        "baseline": baseline,
        "build_s": round(time.time() - t0, 1),  # this call, the base's training included if it ran
        "pair_s": round(time.time() - t1, 1),  # the pair alone, from a cached base
        "base_build_s": base_s,
        "threads": THREADS, "torch": torch.__version__,
    }
    (tmp / "pair.json").write_text(json.dumps(info, indent=2) + "\n")
    _swap_in(tmp, folder)
    if log:
        print(f"{name}: built in {info['build_s']} s into {folder}", flush=True)
    return folder


def _row(folder: Path) -> list[str]:
    p = json.loads((folder / "pair.json").read_text())
    d, t = p["baseline"]["donor"]["test"], p["baseline"]["target"]["test"]
    return [p["name"], p["arch"], p["recipe"]["recipe"], p["kind"], f"{d['k']}/{d['n']} {d['acc']:.3f}",
            f"{t['k']}/{t['n']} {t['acc']:.3f}", f"{100 * (d['acc'] - t['acc']):+.1f}",
            f"{p['pair_s']:.0f} (+{p['base_build_s']:.0f})"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python bench/pairs.py", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"pairs to build (default: all): {', '.join(PAIRS)}")
    parser.add_argument("--force", action="store_true", help="rebuild even when cached (their bases too)")
    parser.add_argument("--cache", type=Path, default=None, help=f"cache folder (default: {default_cache()})")
    parser.add_argument("--list", action="store_true", help="list the pairs and what each stands for")
    args = parser.parse_args(argv)
    if args.list:
        for spec in PAIRS.values():
            print(f"{spec.name:22s} {spec.description}")
        return
    unknown = [n for n in args.names if n not in PAIRS]
    if unknown:
        parser.error(f"unknown pair(s) {', '.join(unknown)}; pairs: {', '.join(PAIRS)}")
    rows = [_row(build(n, cache=args.cache, force=args.force)) for n in args.names or PAIRS]
    head = ["name", "arch", "recipe", "kind", "donor test", "target test", "gap pts", "build s (+base)"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    print(f"cache: {args.cache or default_cache()}")


if __name__ == "__main__":
    main()
