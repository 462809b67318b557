"""Load a model reference into a Hugging Face model, its tokenizer and a TransformerLens bridge.

A reference is a local Hugging Face folder, a ``.gguf`` file (dequantized), ``demo:NAME`` for the
embedded pair, or a hub id (only from the local cache unless ``online=True``). The bridge wraps the
*same* parameters as the HF model (raw weights, never TransformerLens's processed ones), so an edit
made through either view is seen by both.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from analysis.errors import GraftError
from analysis.io import offload
from analysis.io.offload import Offloaded
from analysis.io.refs import (
    GGUF_ERRORS,
    ModelRef,
    check_architecture,
    gguf_unreadable,
    hub_mode,
    pickle_files,
    resolve,
    weight_files,
)

if TYPE_CHECKING:  # torch is imported where a model is loaded: resolving a reference must stay fast
    import torch
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Wrapped modules keep the HF module under this attribute once a TransformerBridge has booted.
BRIDGE_WRAPPER = "._original_component"

FUSED = re.compile(r"(qkv_proj|c_attn|query_key_value|gate_up_proj)\.")
LAYER_INDEX = re.compile(r"\.(\d+)\.")

DTypeName = Literal["auto", "float32", "bfloat16", "float16"]


def _dtype(name: DTypeName | torch.dtype) -> torch.dtype | str:
    import torch

    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return "auto"
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise GraftError(f"unknown dtype {name!r}", "use auto, float32, bfloat16 or float16") from None


@dataclass
class LoadedModel:
    """An HF model, its tokenizer, and (booted on first use) a TransformerBridge over the same weights."""

    ref: ModelRef
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    storage_dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    _bridge: TransformerBridge | None = None
    _params: dict[str, torch.nn.Parameter] = field(default_factory=dict)
    _hooked: PreTrainedModel | None = None
    _offloaded: dict[str, Offloaded] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Names are taken before the bridge boots: booting renames modules (and, for fused q/k/v,
        # re-registers the fused projection under another name), but keeps the same Parameter objects.
        if not self._params:
            self._params = hf_parameters(self.model)
            self._offloaded = offload.find(self.model)

    @property
    def name(self) -> str:
        return self.ref.text

    @property
    def bridge(self) -> TransformerBridge:
        """TransformerLens view of :attr:`model`; its parameters *are* the HF parameters.

        The bridge wraps the modules of a twin of :attr:`model` (new module objects holding the same
        parameter and buffer tensors): booting rewires the modules it wraps and leaves their KV cache
        empty, so :attr:`model` stays a plain HF model for evaluation, and an edit of a parameter is
        seen by both views at once.
        """
        if self._bridge is None:
            from transformer_lens.model_bridge import TransformerBridge

            shared: dict[int, Any] = {id(t): t for t in (*self.model.parameters(), *self.model.buffers())}
            # the twin's hooks read offloaded weights through the same loader, so an edit served there
            # (:meth:`edited`) reaches both views
            shared.update({id(where.loader): where.loader for where in self._offloaded.values()})
            hooked = copy.deepcopy(self.model, shared)
            try:
                with hub_mode(False):
                    self._bridge = TransformerBridge.boot_transformers(
                        str(self.ref.path or self.ref.repo_id),
                        hf_model=hooked,
                        tokenizer=self.tokenizer,
                        dtype=self.model.dtype,
                        device=self.model.device,
                    )
            except Exception as err:  # TransformerLens's own limits (an architecture it cannot split), not ours
                reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
                raise GraftError(f"TransformerLens cannot wrap {self.name} ({type(err).__name__}: {reason})",
                                 "the activation methods (shifts, lae, attribution, patching) need it; gradient, "
                                 "greedy, mask and weight do not") from err
            self._hooked = hooked
        return self._bridge

    @property
    def hooked(self) -> PreTrainedModel:
        """The HF model whose modules the bridge wraps: called like :attr:`model` (same weights, same
        logits), it fires the bridge's hooks."""
        _ = self.bridge
        assert self._hooked is not None
        return self._hooked

    def parameters(self) -> dict[str, torch.nn.Parameter]:
        """HF parameter names (as in the checkpoint) → live parameters, also after the bridge boots."""
        return self._params

    @property
    def offloaded(self) -> list[str]:
        """Parameters accelerate keeps off the devices (``device_map`` offload): read with :meth:`tensor`."""
        return list(self._offloaded)

    def tensor(self, name: str) -> torch.Tensor:
        """A parameter's value: the live tensor, or an offloaded one as accelerate serves it (a copy)."""
        where = self._offloaded.get(name)
        return self._params[name] if where is None else where.read()

    def tensors(self) -> Mapping[str, torch.Tensor]:
        """Every parameter's value by HF name (offloaded ones read when asked for)."""
        return _Values(self)

    @contextlib.contextmanager
    def edited(self, changed: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """Compute with ``changed`` (name → value) in place of the model's own tensors for the block, in
        both views (:attr:`model`, :attr:`bridge`); restored bit-exactly after. A resident parameter is
        overwritten in place and copied back; an offloaded one is served from memory in place of the
        stored copy, which is never written (it may be the source checkpoint itself)."""
        import torch

        resident = {n: v for n, v in changed.items() if n not in self._offloaded}
        saved = {n: self._params[n].detach().clone() for n in resident}
        elsewhere = {n: (self._offloaded[n], v.to(self._params[n].dtype)) for n, v in changed.items()
                     if n in self._offloaded}
        try:
            with offload.served(elsewhere), torch.no_grad():
                for name, value in resident.items():
                    self._params[name].copy_(value.to(self._params[name].dtype))
                self.sync(changed)  # the bridge's split copies of fused q/k/v and gate/up follow the edit
                yield
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    self._params[name].copy_(value)
            self.sync(changed)

    def sync(self, names: Iterable[str]) -> None:
        """Refresh the bridge's split copies of fused tensors after they were edited in place.

        For fused projections (Phi-3 ``qkv_proj`` and ``gate_up_proj``, GPT-2 ``c_attn``, GPT-NeoX
        ``query_key_value``) the bridge computes with separate q/k/v (gate/up) copies made when it
        booted; an edit of the fused HF tensor reaches the forward pass only through this call.
        """
        if self._bridge is None:
            return
        import torch

        layers = sorted({int(m.group(1)) for n in names if FUSED.search(n) and (m := LAYER_INDEX.search(n))})
        with torch.no_grad():
            for layer in layers:
                block = self._bridge.blocks[layer]
                attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
                if attn is not None and hasattr(attn, "split_qkv_matrix"):
                    fresh = attn.split_qkv_matrix(attn.original_component)
                    for part, new in zip((attn.q, attn.k, attn.v), fresh, strict=True):
                        _copy_linear(part.original_component, new)
                if mlp is not None and hasattr(mlp, "split_gate_up_matrix"):
                    gate, up = mlp.split_gate_up_matrix(mlp.original_component)
                    _copy_linear(mlp.gate.original_component, gate)
                    _copy_linear(getattr(mlp, "in").original_component, up)


class _Values(Mapping[str, "torch.Tensor"]):
    """:meth:`LoadedModel.tensors`: parameter values by name, offloaded ones read on access."""

    def __init__(self, loaded: LoadedModel) -> None:
        self._loaded = loaded

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._loaded.tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaded.parameters())

    def __len__(self) -> int:
        return len(self._loaded.parameters())


def _copy_linear(dest: torch.nn.Module, src: torch.nn.Module) -> None:
    dest.weight.copy_(src.weight)
    if getattr(dest, "bias", None) is not None and getattr(src, "bias", None) is not None:
        dest.bias.copy_(src.bias)


def hf_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Checkpoint-style names of a model's parameters, undoing the bridge's module wrapping."""
    return {name.replace(BRIDGE_WRAPPER, ""): p for name, p in model.named_parameters()}


def require_same_shapes(donor: LoadedModel, target: LoadedModel) -> None:
    """Refuse a pair that does not share every parameter name and shape (one line: the first offender) —
    unless only the vocabulary's tensors differ, and either the tokenizers are the same or one merely adds
    tokens to the other's (:func:`analysis.io.tokenizers.tokenizer_relation`), or one model ties its LM head
    to its embeddings: those tensors are then no candidate (:attr:`analysis.units.Layout.unshared`) and
    everything else is compared and transplanted."""
    from analysis.io.tokenizers import tokenizer_relation
    from analysis.units import mismatches, tied_head, vocabulary_only

    dp, tp = ({n: tuple(p.shape) for n, p in m.parameters().items()} for m in (donor, target))
    mismatched = mismatches(dp, tp)
    if not mismatched or tied_head(mismatched, dp, tp):  # an LM head one model ties to its embeddings
        return
    vocabulary = bool(vocabulary_only(mismatched))
    if vocabulary and tokenizer_relation(donor.ref, target.ref) in ("same", "compatible"):
        return
    name, other, shape = mismatched[0]
    raise GraftError(f"tensor {name}: donor {other or 'missing'}, target {shape or 'missing'}",
                     "the tokenizers must be the same, or one add tokens to the other (run `graftlm check`)"
                     if vocabulary else "donor and target must share architecture and shapes (run `graftlm check`)")


def check_device(name: str) -> None:
    """A device torch can use here, or one line saying why not (before any weights are read)."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise GraftError(f"unknown device {name!r}", "use cpu, cuda, cuda:N or mps") from err
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if device.type in available and not available[device.type]():
        raise GraftError(f"device {name!r} is not available to this torch build",
                         "use cpu (in a sweep config: device: cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise GraftError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)",
                         "use cuda:0 … or cpu (in a sweep config: device: …)")


def load(
    ref: str | os.PathLike[str] | ModelRef,
    *,
    dtype: DTypeName | torch.dtype = "auto",
    device: str = "cpu",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    online: bool = False,
    attn_implementation: str = "eager",
    device_map: str | dict[str, int | str] | None = None,
) -> LoadedModel:
    """Load a model reference for analysis.

    ``attn_implementation`` defaults to eager because the TransformerLens bridge forces eager
    attention: loading eager from the start keeps the HF model's logits and the bridge's identical.
    ``device_map`` (transformers' own: ``auto``, ``balanced``, ``sequential`` or module → device) spreads
    a model that does not fit one device over several, and over the CPU; ``device`` is then unused. A map
    that offloads modules (to disk or the CPU, behind accelerate's hooks) works too: a transplant's edit of
    an offloaded weight is served from memory (:meth:`LoadedModel.edited`), never written where accelerate
    stores it — for a safetensors folder, the source files themselves.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mref = resolve(ref)
    torch_dtype = _dtype(dtype)
    check_device(device)
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype,
        "trust_remote_code": trust_remote_code,
        "attn_implementation": attn_implementation,
    }
    if device_map is not None:
        kwargs["device_map"] = _device_map(device_map)
    source: str = str(mref.path) if mref.path is not None else mref.repo_id
    tok_kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if mref.path is None and mref.revision:  # a hub id to download (online) at a branch, tag or commit
        kwargs["revision"] = tok_kwargs["revision"] = mref.revision
    if mref.kind == "gguf":
        from transformers import GgufConfig

        kwargs["gguf_file"] = tok_kwargs["gguf_file"] = mref.gguf_file
        # Without dequantize the model cannot be saved or edited as float tensors.
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
        if torch_dtype == "auto":
            kwargs["dtype"] = torch.float32
    elif mref.path is not None:  # a folder, a demo model, a hub id in the hub cache
        if not weight_files(mref):
            pickles = pickle_files(mref)
            if not pickles:
                raise GraftError(f"{mref.text} has no weights (*.safetensors)", "check the folder")
            if not allow_pickle:
                raise GraftError(
                    f"{mref.text} holds pickle weights ({pickles[0].name}), which can run code when loaded",
                    "convert it to safetensors, or pass --allow-pickle (loaded with weights_only=True)",
                )
            kwargs["use_safetensors"] = False  # transformers loads .bin with torch.load(weights_only=True)
    elif not allow_pickle:  # a hub id to download (online): its safetensors weights only
        kwargs["use_safetensors"] = True
    check_architecture(mref, trust_remote_code)
    from analysis.io.safetensors import read_headers, torch_dtype

    # safetensors headers are checked against their files first (a truncated download is one line here)
    storage = {name: torch_dtype(info.dtype) for name, info in read_headers(mref.text, weight_files(mref)).items()}
    import pickle
    import warnings

    try:
        with hub_mode(online), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(source, **tok_kwargs)
    except GraftError:
        raise
    except pickle.UnpicklingError as err:  # weights_only refused something that is not a tensor
        raise GraftError(f"{mref.text}: its pickle weights hold objects other than tensors, which could run code; "
                         "loading them was refused", "use safetensors weights from a source you trust") from err
    except OSError as err:
        if mref.kind == "hub":
            get = f"hf download {mref.repo_id}" + (f" --revision {mref.revision}" if mref.revision else "")
            how = (f"download it once (`{get}`, or load(..., online=True) in Python), or pass "
                   "a local folder") if not online else "check the id (a model with only pickle weights needs --allow-pickle)"
            raise GraftError(f"model {mref.text!r} is not a local folder and not in the hub cache", how) from err
        if mref.kind == "gguf":
            raise gguf_unreadable(mref, err) from err
        raise GraftError(f"could not load {mref.text}: {str(err).splitlines()[0]}", "check the folder") from err
    except GGUF_ERRORS as err:
        if mref.kind != "gguf":
            raise
        raise gguf_unreadable(mref, err) from err
    except ImportError as err:  # a tokenizer or model class that needs a package this environment lacks
        raise GraftError(f"loading {mref.text} needs a package that is not installed: {str(err).splitlines()[0]}",
                         "install it in this environment") from err
    if device_map is None:
        model.to(device)
    model.eval()
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(ref=mref, model=model, tokenizer=tokenizer, storage_dtypes=storage)


def _device_map(device_map: str | dict[str, int | str]) -> str | dict[str, int | str]:
    """transformers' device_map, once accelerate (which places the modules) is known to be there."""
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        raise GraftError("device_map needs the accelerate package, which is not installed",
                         "pip install accelerate (or leave device_map unset)")
    if isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise GraftError(f"unknown device_map {device_map!r}",
                         "use auto, balanced, balanced_low_0, sequential, or a mapping of modules to devices")
    return device_map


