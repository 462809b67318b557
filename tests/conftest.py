"""Tiny random models of twelve architectures, built in-process and saved as HF folders (no downloads)."""

from __future__ import annotations

import json
import math
import os
import random
import string
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import os

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers as T  # noqa: E402
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402

from analysis.study.config import SweepConfig

torch.set_num_threads(1)

CHARS = [chr(i) for i in range(32, 127)]
FAMILIES = ("llama", "qwen2", "gemma3", "phi3", "gpt2", "neox", "phi", "opt", "gptj", "bloom", "starcoder2", "glm",
            # Llama's names with something of their own: a shared (qwen3, exaone4, hunyuan, apertus) or an
            # all-heads (olmo2) norm of queries and keys, sliding windows (mistral, gemma2, exaone4),
            # multipliers (granite), a parallel block (cohere), no MLP gate (arcee, apertus: a learned activation)
            "qwen3", "mistral", "olmo2", "granite", "gemma2", "cohere", "smollm3", "exaone4", "seedoss", "hunyuan",
            "arcee", "apertus")
# The query and key norm of these runs over every head at once: a head moved alone rescales the others'.
HEADS_SHARE_A_NORM = ("olmo2",)


def char_tokenizer(folder: Path, extra: int = 0) -> T.PreTrainedTokenizerFast:
    """A character-level tokenizer saved to ``folder`` (``extra`` adds tokens, changing the vocab)."""
    vocab = {t: i for i, t in enumerate(["<s>", "</s>", "<pad>", "<unk>"] + CHARS + [f"<x{i}>" for i in range(extra)])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = T.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                    unk_token="<unk>")
    tok.save_pretrained(folder)
    return tok


def tiny_config(family: str, vocab: int, **over: object) -> T.PretrainedConfig:
    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if family == "gpt2":
        cfg = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, **common)
        cfg.update(over)
        return T.GPT2Config(**cfg)
    if family == "neox":
        cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                   max_position_embeddings=64, **common)
        cfg.update(over)
        return T.GPTNeoXConfig(**cfg)
    if family in ("gptj", "bloom"):
        cfg = dict(n_embd=32, n_layer=2, n_head=4, **common) if family == "gptj" else dict(
            hidden_size=32, n_layer=2, n_head=4, **common)
        if family == "gptj":
            cfg.update(n_positions=64, rotary_dim=4)
        cfg.update(over)
        return T.GPTJConfig(**cfg) if family == "gptj" else T.BloomConfig(**cfg)
    if family in ("phi", "opt"):
        cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, **common)
        cfg.update(dict(intermediate_size=64) if family == "phi" else dict(ffn_dim=64, word_embed_proj_dim=32))
        cfg.update(over)
        return T.PhiConfig(**cfg) if family == "phi" else T.OPTConfig(**cfg)
    cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=64, max_position_embeddings=64, **common)
    if family in ("gemma3", "gemma2", "qwen3", "exaone4", "seedoss", "hunyuan"):  # head_dim set apart
        cfg["head_dim"] = 8
    if family == "cohere":  # a LayerNorm of each head's queries and keys: weights one row per head
        cfg["use_qk_norm"] = True
    cfg.update(over)
    cls = {"llama": T.LlamaConfig, "qwen2": T.Qwen2Config, "gemma3": T.Gemma3TextConfig, "phi3": T.Phi3Config,
           "starcoder2": T.Starcoder2Config, "glm": T.Glm4Config, "qwen3": T.Qwen3Config, "mistral": T.MistralConfig,
           "olmo2": T.Olmo2Config, "granite": T.GraniteConfig, "gemma2": T.Gemma2Config, "cohere": T.CohereConfig,
           "smollm3": T.SmolLM3Config, "exaone4": T.Exaone4Config, "seedoss": T.SeedOssConfig,
           "hunyuan": T.HunYuanDenseV1Config, "arcee": T.ArceeConfig, "apertus": T.ApertusConfig}[family]
    return cls(**cfg)


def build_model(folder: Path, family: str, seed: int, *, dtype: torch.dtype = torch.float32, extra_vocab: int = 0,
                shard: str | None = None, **over: object) -> Path:
    """Save a random tiny model of ``family`` with its tokenizer to ``folder``."""
    tok = char_tokenizer(folder, extra_vocab)
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(tiny_config(family, len(tok), **over))
    with torch.no_grad():  # random norms and biases, so a transplant of them is visible
        for name, p in model.named_parameters():
            if p.ndim == 1 or "norm" in name:  # (Cohere's norms of queries and keys: a row per head)
                p.add_(torch.randn_like(p) * 0.1)
    model.to(dtype).save_pretrained(folder, max_shard_size=shard or "2GB")
    return folder


def write_task(folder: Path, overlap: bool = False) -> Path:
    """A small generation task (two-digit sums; probe 6, dev 12, test 16) with a retention set."""
    rng = random.Random(0)
    lines = []
    for i, split in enumerate(["probe"] * 6 + ["dev"] * 12 + ["test"] * 16):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        lines.append({"id": f"q{i}", "prompt": f"{a}+{b}=", "answer": str(a + b), "split": split})
    if overlap:
        lines.append({**lines[0], "id": "dup", "split": "test"})  # a probe prompt again in test
    (folder / "task.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (folder / "ret.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "text": f"the cat sat on mat {i}."}) + "\n"
                                              for i in range(6)))
    (folder / "task.yaml").write_text("kind: generate\ndata: task.jsonl\nfilter: numeric\nmax_new_tokens: 3\n"
                                      "retention: ret.jsonl\n")
    return folder / "task.yaml"


def write_gguf(folder: Path, path: Path) -> Path:
    """The tiny Llama in ``folder`` as a float32 GGUF file (llama.cpp's tensor names and q/k row order)."""
    import gguf
    import numpy as np

    model = T.AutoModelForCausalLM.from_pretrained(folder)
    cfg, tok = model.config, T.AutoTokenizer.from_pretrained(folder)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda x: x[1])]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([1] * len(tokens))
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_pad_token_id(2)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    hf_to_gguf = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                  "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                  "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg.num_hidden_layers):
        names.update({f"model.layers.{i}.{k}.weight": f"blk.{i}.{v}.weight" for k, v in hf_to_gguf.items()})
    for name, tensor in model.state_dict().items():
        x = tensor.float().numpy()
        heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}.get(name.split(".")[-2])
        if heads:  # llama.cpp interleaves the rotary halves of each head; transformers undoes it on load
            x = x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
        w.add_tensor(names[name], np.ascontiguousarray(x))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def tiny_pairs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, Path]]:
    """``tiny_pairs(family)`` → (donor, target) folders of the same architecture, built once per session."""
    root = tmp_path_factory.mktemp("tiny")
    cache: dict[str, tuple[Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in cache:
            cache[family] = (build_model(root / f"{family}-donor", family, seed=1),
                             build_model(root / f"{family}-target", family, seed=2))
        return cache[family]

    return get


@pytest.fixture
def llama_pair(tiny_pairs: Callable[[str], tuple[Path, Path]]) -> tuple[Path, Path]:
    return tiny_pairs("llama")


@pytest.fixture(scope="module")
def pair(tiny_pairs: Callable[[str], tuple[Path, Path]]) -> tuple[object, object]:
    """The tiny Llama pair, loaded (donor, target) in float32."""
    from analysis.io.models import load

    donor, target = tiny_pairs("llama")
    return load(donor, dtype="float32"), load(target, dtype="float32")


PRINTABLE = sorted(set(string.printable) - set("\x0b\x0c\r"))


def fused_char_tokenizer(folder: Path) -> T.PreTrainedTokenizerBase:
    """Character tokenizer (newline included) whose decode concatenates; reloaded from disk."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {c: i + 4 for i, c in enumerate(PRINTABLE)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.decoder = decoders.Fuse()
    T.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                              unk_token="<unk>").save_pretrained(folder)
    return T.AutoTokenizer.from_pretrained(folder)


def bigram_model(tok: T.PreTrainedTokenizerBase, table: torch.Tensor) -> T.LlamaForCausalLM:
    """A Llama whose next-token logits are ``table[last token]``: one-hot embeddings, a layer that adds
    nothing (zero o_proj and down_proj), and an LM head holding the table — numbers checkable by hand."""
    hidden = 128
    cfg = T.LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=8, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=0.0,
                        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = T.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, : len(tok)] = torch.eye(len(tok))
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        head = torch.zeros(len(tok), hidden)
        head[:, : len(tok)] = table.T / math.sqrt(hidden)  # the final norm scales one-hot by sqrt(hidden)
        model.lm_head.weight.copy_(head)
    return model


@pytest.fixture(scope="module")
def bigram(tmp_path_factory: pytest.TempPathFactory) -> tuple[T.LlamaForCausalLM, T.PreTrainedTokenizerBase]:
    tok = fused_char_tokenizer(tmp_path_factory.mktemp("bigram-tok"))
    table = torch.zeros(len(tok), len(tok))
    table[:, tok.convert_tokens_to_ids("x")] = 5.0  # every character's favourite next token is "x" ...
    table[tok.convert_tokens_to_ids("="), tok.convert_tokens_to_ids("4")] = 10.0  # ... but "=" → "4"
    table[tok.convert_tokens_to_ids("4"), tok.convert_tokens_to_ids("\n")] = 10.0  # and "4" → newline
    return bigram_model(tok, table), tok


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def random_char_llama(folder: Path, seed: int) -> tuple[T.LlamaForCausalLM, T.PreTrainedTokenizerBase]:
    """A random 2-layer GQA Llama over the character tokenizer saved in ``folder``."""
    tok = fused_char_tokenizer(folder)
    torch.manual_seed(seed)
    cfg = T.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return T.LlamaForCausalLM(cfg).eval(), tok


@pytest.fixture(scope="module")
def random_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[T.LlamaForCausalLM, T.PreTrainedTokenizerBase, Path]:
    folder = tmp_path_factory.mktemp("rand-llama")
    model, tok = random_char_llama(folder, seed=0)
    model.save_pretrained(folder)
    return model, tok, folder


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SweepConfig]:
    root = tmp_path_factory.mktemp("study")
    donor = build_model(root / "donor", "llama", seed=1)
    target = build_model(root / "target", "llama", seed=2)
    task = write_task(root)
    cfg = SweepConfig(donor=str(donor), target=str(target), task=str(task), methods=["weight"], k=[1, 2],
                      alpha=[0.5, 1.0], components=["head", "mlp"], controls={"random_seeds": [0, 1]}, batch_size=4)
    return root, cfg


def per_item(run: Path) -> dict[str, list]:
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)), "duplicate points"
    return {r["key"]: r.get("items") or r.get("perplexity") for r in rows}


def small(cfg: SweepConfig, **update: object) -> SweepConfig:
    """The study on a few items: a handful of quick evaluations."""
    return SweepConfig.model_validate({**cfg.model_dump(), "k": [1], "alpha": [1.0], "dev_limit": 2, "test_limit": 2,
                                       "retention_limit": 2, "probe_limit": 2,
                                       "controls": {"random_seeds": [0], "copy_all": False, "weight": False},
                                       **update})


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            out.update({n: fh.get_tensor(n) for n in fh.keys()})  # noqa: SIM118
    return out


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()  # 0-dim too (a learned scalar)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def arith_task(folder: Path, n: int = 10) -> Path:
    """A generate task of n probe items (and a few dev/test items localize must not read)."""
    path = folder / "arith.jsonl"
    with path.open("w") as fh:
        for i in range(n + 4):
            a, b = (7 * i) % 23, (5 * i + 3) % 17
            split = "probe" if i < n else ("dev" if i % 2 else "test")
            fh.write(json.dumps({"id": f"a{i}", "prompt": f"{a}+{b}=" + "x" * (i % 4), "answer": str(a + b),
                                 "split": split}) + "\n")
    return path


def hub_cache_entry(folder: Path, cache: Path, repo_id: str, commit: str = "a" * 40, ref: str | None = "main") -> Path:
    """``folder`` laid out in ``cache`` the way huggingface_hub downloads ``repo_id``: each file a blob named
    by its sha256 (weights, stored with LFS) or its git blob sha1 (small files), linked from
    ``snapshots/COMMIT``, with ``refs/REF`` (a branch or tag; None: a download by commit) naming the commit.
    Returns the snapshot folder."""
    import hashlib

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    if ref is not None:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(folder).iterdir()):
        data = f.read_bytes()
        if f.suffix in (".safetensors", ".bin"):
            name = hashlib.sha256(data).hexdigest()
        else:
            name = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (repo / "blobs" / name).write_bytes(data)
        (snapshot / f.name).symlink_to(Path("../../blobs") / name)
    return snapshot
