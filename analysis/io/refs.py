"""Model references: what a user typed (a folder, a ``.gguf`` file, ``demo:NAME``, a hub id) resolved to
files, without loading anything — the weight files, the sources a command reads (never written), and the
config (``load_config``) with its architecture checked."""

from __future__ import annotations

import contextlib
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

from analysis.demo import MODELS_DIR as DEMO_DIR
from analysis.errors import GraftError

SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
COMMIT = re.compile(r"[0-9a-f]{40}")
REVISION = re.compile(r"[\w.-]+(/[\w.-]+)*")  # a branch or tag (may hold slashes) or a commit hash
RefKind = Literal["folder", "gguf", "demo", "hub"]


@dataclass(frozen=True)
class ModelRef:
    """Where a model's files are: resolved from what the user typed, nothing loaded yet."""

    text: str
    kind: RefKind
    path: Path | None  # the folder holding config/weights (a hub id's snapshot in the hub cache; None if absent)
    gguf_file: str | None = None
    revision: str | None = None  # a hub id's branch, tag or commit (``ID@REV``); None: main

    @property
    def name(self) -> str:
        return self.text

    @property
    def repo_id(self) -> str:
        """A hub reference's repository id, without its revision."""
        return self.text.rsplit("@", 1)[0] if self.revision else self.text


def resolve(ref: str | os.PathLike[str] | ModelRef) -> ModelRef:
    """Turn a user's model reference into a :class:`ModelRef`, checking that it exists."""
    if isinstance(ref, ModelRef):
        return ref
    text = str(ref)
    if text.startswith("demo:"):
        name = text.removeprefix("demo:")
        folder = DEMO_DIR / name
        if not (folder / "config.json").is_file():
            known = sorted(p.name for p in DEMO_DIR.glob("*") if (p / "config.json").is_file())
            raise GraftError(
                f"unknown demo model {text!r}",
                f"use one of {', '.join('demo:' + k for k in known) or '(none shipped)'}",
            )
        return ModelRef(text, "demo", folder)
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise GraftError(f"no such GGUF file: {text}", "check the path")
        check_gguf_magic(path)
        return ModelRef(text, "gguf", path.parent, path.name)
    if path.exists():
        if not path.is_dir():
            raise GraftError(
                f"{text} is a file, not a model folder",
                "pass the folder holding config.json (or a .gguf file)",
            )
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                check_gguf_magic(ggufs[0])
                return ModelRef(text, "gguf", path, ggufs[0].name)
            raise GraftError(
                f"{text} is not a model folder (no config.json)",
                "pass a Hugging Face folder saved with save_pretrained, or a .gguf file",
            )
        return ModelRef(text, "folder", path)
    repo_id, at, revision = text.partition("@")  # ID@REV: a branch, tag or commit (Pythia's step143000)
    bad_revision = at and (not REVISION.fullmatch(revision) or ".." in revision.split("/"))
    if text.startswith((".", "/", "~")) or not HUB_ID.fullmatch(repo_id) or bad_revision:
        raise GraftError(f"no such model folder: {text}", "check the path (a hub id is ID or ID@REVISION)")
    return ModelRef(text, "hub", cached_snapshot(repo_id, revision or "main"), revision=revision or None)


def hub_cache() -> Path:
    """Where huggingface_hub keeps downloads (``HF_HUB_CACHE``, else ``HF_HOME``/hub), found without
    importing it: its download module takes a quarter of a second, as long as the rest of a file-to-file
    transplant's start-up."""
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")).expanduser()
    return Path(os.environ.get("HF_HUB_CACHE", home / "hub")).expanduser()


def cached_snapshot(repo_id: str, revision: str = "main") -> Path | None:
    """A hub id's revision (a branch or tag, ``main`` by default, or a commit hash) in the local hub cache,
    or None. huggingface_hub's layout: ``refs/REVISION`` names the commit, ``snapshots/COMMIT`` holds the
    files as links into ``blobs/``. A cached model is then read like a folder: streamed, hashed, its
    weights checked for pickle, never downloaded again."""
    repo = hub_cache() / ("models--" + repo_id.replace("/", "--"))
    try:
        commit = (repo / "refs" / revision).read_text().strip()
    except (OSError, UnicodeDecodeError):
        commit = revision if COMMIT.fullmatch(revision) else ""  # downloaded by commit: no ref names it
    if not commit or not COMMIT.fullmatch(commit):
        return None
    folder = repo / "snapshots" / commit
    return folder if (folder / "config.json").is_file() else None


def source_paths(ref: str | os.PathLike[str] | ModelRef) -> list[Path]:
    """The files or folders a model reference reads: no output may replace them or go inside them."""
    mref = resolve(ref)
    if mref.kind == "gguf" and mref.path is not None and mref.gguf_file:
        return [mref.path / mref.gguf_file]
    if mref.kind == "hub":  # all of its cache folder: the snapshot's files are links into blobs/
        return [hub_cache() / ("models--" + mref.repo_id.replace("/", "--"))]
    assert mref.path is not None
    return [mref.path]


def check_gguf_magic(path: Path) -> None:
    """A .gguf file starts with the GGUF magic and a version this reader knows (v2, v3)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as err:
        raise GraftError(f"cannot read {path}: {err.strerror}", "check the file") from err
    if head[:4] != b"GGUF":
        raise GraftError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)",
                         "pass a .gguf written by llama.cpp or gguf-py, or a Hugging Face folder")
    version = int.from_bytes(head[4:8], "little")
    if version not in (2, 3):
        raise GraftError(f"{path} is a corrupt or unsupported GGUF file (version {version}; v2 and v3 are read)",
                         "re-download or re-export it")


def gguf_unreadable(mref: ModelRef, err: BaseException) -> GraftError:
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return GraftError(f"{mref.text} is not a readable GGUF file ({reason})", "re-download or re-export it")


# What reading a damaged GGUF file raises in transformers' reader (besides OSError).
GGUF_ERRORS = (ValueError, KeyError, IndexError, OverflowError, UnicodeDecodeError, struct.error)


def weight_files(ref: ModelRef) -> list[Path]:
    """The safetensors files of a folder reference (empty when it has none)."""
    if ref.path is None or ref.kind == "gguf":
        return []
    index = ref.path / "model.safetensors.index.json"
    if index.is_file():
        import json

        from analysis.io.files import read_text

        try:
            weight_map = json.loads(read_text(index, "safetensors index"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise GraftError(f"{index} is not a valid safetensors index (it needs a weight_map of tensor → file)",
                             "re-save the model") from err
        if not all(isinstance(n, str) and n and "/" not in n and n not in (".", "..") for n in names):
            raise GraftError(f"{index} names weight files outside its folder", "re-save the model")
        return [ref.path / n for n in names]
    single = ref.path / "model.safetensors"
    if single.is_file():
        return [single]
    return sorted(ref.path.glob("*.safetensors"))


def pickle_files(ref: ModelRef) -> list[Path]:
    if ref.path is None:
        return []
    return sorted(p for p in ref.path.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())


# GPT-2-style config keys → the names the other architectures use.
CONFIG_ALIASES = {"n_head": "num_attention_heads", "n_embd": "hidden_size", "n_layer": "num_hidden_layers",
                  "n_positions": "max_position_embeddings", "n_inner": "intermediate_size"}


class ModelConfig(SimpleNamespace):
    """A model's config.json as attributes, read without importing transformers (it takes seconds)."""

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def load_config(ref: str | os.PathLike[str] | ModelRef, *, trust_remote_code: bool = False) -> ModelConfig:
    """The model's configuration without loading weights; GPT-2 style keys get their common names too."""

    mref = resolve(ref)
    if mref.path is not None and mref.kind != "gguf":
        data = read_config_json(mref.path / "config.json")
    else:
        from transformers import AutoConfig

        kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if mref.kind == "gguf":
            kwargs["gguf_file"] = mref.gguf_file
        elif mref.revision:
            kwargs["revision"] = mref.revision
        try:
            with hub_mode(False):
                data = AutoConfig.from_pretrained(str(mref.path or mref.repo_id), **kwargs).to_dict()
        except (OSError, *GGUF_ERRORS) as err:
            if mref.kind == "gguf":
                raise gguf_unreadable(mref, err) from err
            raise GraftError(f"could not read the config of {mref.text}: {str(err).splitlines()[0]}",
                             "pass a Hugging Face model folder") from err
    if isinstance(data.get("text_config"), dict):  # multimodal wrappers keep the LM's fields here
        data = {**data["text_config"], **{k: v for k, v in data.items() if k != "text_config"}}
    for alias, name in CONFIG_ALIASES.items():
        if alias in data and data.get(name) is None:
            data[name] = data[alias]
    return ModelConfig(**data)


def refuse_quantized(mref: ModelRef) -> None:
    """Refuse a checkpoint its config says is quantized (GPTQ, AWQ, bitsandbytes, FP8, compressed-tensors, …):
    its weights are packed or scaled, so a head cut from them or a blend of them is other weights, silently.
    (A GGUF file is dequantized as it loads.)"""
    if mref.path is None or mref.kind == "gguf" or not (mref.path / "config.json").is_file():
        return
    quant = read_config_json(mref.path / "config.json").get("quantization_config")
    if not isinstance(quant, dict):
        return
    method = str(quant.get("quant_method") or quant.get("format") or "unknown method")
    bits = quant.get("bits") or ("4" if quant.get("load_in_4bit") else "8" if quant.get("load_in_8bit") else None)
    raise GraftError(f"{mref.text} is a quantized checkpoint ({method}{f', {bits} bits' if bits else ''}): its weights "
                     "are stored packed or scaled, and cutting or blending those bytes would give other weights",
                     "use the unquantized release it was made from (or load it, dequantize() it and save it in "
                     "bfloat16), and quantize the transplanted model afterwards")


def check_architecture(mref: ModelRef, trust_remote_code: bool) -> None:
    """Refuse custom modelling code unless asked (it would run arbitrary Python), and quantized weights."""
    refuse_quantized(mref)
    if mref.path is None or mref.kind == "gguf" or trust_remote_code:
        return
    config = read_config_json(mref.path / "config.json")
    if config.get("auto_map"):
        raise GraftError(
            f"{mref.text} needs custom code (auto_map in config.json)",
            "review it, then pass --trust-remote-code",
        )


def read_config_json(path: Path) -> dict[str, Any]:
    """A model's config.json as a dict, or one line saying what is wrong with the file."""
    import json

    from analysis.io.files import read_text

    try:
        data = json.loads(read_text(path, "config.json"))
    except json.JSONDecodeError as err:
        raise GraftError(f"{path} is not valid JSON (line {err.lineno})", "repair or re-save the model") from err
    if not isinstance(data, dict):
        raise GraftError(f"{path} is not a JSON object", "repair or re-save the model")
    return data


@contextlib.contextmanager
def hub_mode(online: bool):
    """Keep the hub offline unless asked: offline, a missing id fails at once instead of retrying."""
    import huggingface_hub.constants as hub_constants

    saved = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = not online
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = saved
