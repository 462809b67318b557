"""How two models' tokenizers relate: the same, compatible (one adds tokens to the other), or different.

A pair whose tokenizers differ reads the same ids as different text: no component means the same in
both. A pair where one only adds tokens (an instruction-tuned twin's chat tokens, a pad token added
before fine-tuning) reads every shared token alike: its layers can be compared and transplanted, only the
embedding rows differ.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from analysis.errors import GraftError
from analysis.io.refs import ModelRef

TokenizerRelation = Literal["same", "compatible", "different"]


def _tokenizer_json(ref: ModelRef) -> dict[str, Any] | None:
    """A folder's tokenizer.json, or None when it has none."""
    if ref.path is None or ref.kind == "gguf" or not (ref.path / "tokenizer.json").is_file():
        return None
    from analysis.io.files import read_text

    path = ref.path / "tokenizer.json"
    try:
        data = json.loads(read_text(path, "tokenizer.json"))
    except ValueError as err:
        raise GraftError(f"{path} is not valid JSON", "repair or re-save the tokenizer") from err
    if not isinstance(data, dict):
        raise GraftError(f"{path} is not a tokenizer (not a JSON object)", "repair or re-save the tokenizer")
    return data


def _fingerprint(ref: ModelRef, data: dict[str, Any] | None) -> object | None:
    """A comparable view of a folder's tokenizer (vocabulary, merges, special tokens), or None: its parsed
    tokenizer.json's model and added tokens, else the bytes of vocab.json / tokenizer.model."""
    if data is not None:
        return data.get("model"), data.get("added_tokens")
    if ref.path is None or ref.kind == "gguf":
        return None
    vocab = [p for p in (ref.path / "vocab.json", ref.path / "tokenizer.model") if p.is_file()]
    return "|".join(p.read_bytes().hex()[:4096] + str(p.stat().st_size) for p in vocab) or None


def tokenizer_relation(donor: ModelRef, target: ModelRef) -> TokenizerRelation | None:
    """How the two tokenizers relate: ``same``; ``compatible`` — they split text alike (the same model type,
    merges, normalizer and pre-tokenizer) and every token both know has the same id, one only knowing more
    (an instruction-tuned twin's chat tokens, a pad token added before fine-tuning): the layers read the
    same ids, only the embedding rows differ; ``different``; None when there is nothing to compare."""
    d, t = _tokenizer_json(donor), _tokenizer_json(target)  # each parsed once (a large vocabulary: megabytes)
    prints = _fingerprint(donor, d), _fingerprint(target, t)
    if prints[0] is None or prints[1] is None:
        return None
    if prints[0] == prints[1]:
        return "same"
    if d is None or t is None:
        return "different"
    splitting = ("normalizer", "pre_tokenizer")
    if any(d.get(k) != t.get(k) for k in splitting) or _without_vocab(d) != _without_vocab(t):
        return "different"
    dv, tv = _ids(d), _ids(t)
    return "compatible" if all(dv[tok] == tv[tok] for tok in dv.keys() & tv.keys()) else "different"


def _without_vocab(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in (data.get("model") or {}).items() if k != "vocab"}


def _ids(data: dict[str, Any]) -> dict[str, int]:
    """Token → id of a tokenizer.json: its model's vocabulary (a mapping; Unigram's list of [piece, score]
    by position) and its added tokens."""
    vocab = (data.get("model") or {}).get("vocab") or {}
    ids = {str(p[0]): i for i, p in enumerate(vocab)} if isinstance(vocab, list) else dict(vocab)
    ids.update({str(a.get("content")): a.get("id") for a in data.get("added_tokens") or [] if isinstance(a, dict)})
    return ids
