"""analysis.io.safetensors: float conversions bit for bit as torch rounds and widens; raw reads equal safetensors' own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_model
from safetensors import safe_open

from analysis.io.checkpoint import Checkpoint
from analysis.io.safetensors import RAW_DTYPES, from_float32, st_dtype, to_float32, torch_dtype

EDGES = np.array([0, 0x80000000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000, 0x00000001, 0x00008000,
                  0x00018000, 0x3F808000, 0x3F818000, 0x3F807FFF, 0x477FEFFF, 0x477FF000, 0x33000000,
                  0x33000001, 0x387FC000, 0x7F7F8000, 0x7FC00000, 0xFFC00001, 0x7F800001, 0x7FFFFFFF], np.uint32)


def bits(t: torch.Tensor) -> np.ndarray:
    raw = t.contiguous().view(torch.uint8).numpy().tobytes()
    return np.frombuffer(raw, np.uint16 if t.element_size() == 2 else np.uint32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rounding_from_float32_is_torchs(dtype: torch.dtype) -> None:
    """Every float32 bit pattern class: ties, carries into the exponent, overflow, subnormals, NaN."""
    patterns = np.concatenate([EDGES, np.random.default_rng(0).integers(0, 2**32, 1_000_003, dtype=np.uint32)])
    x = patterns.view(np.float32)
    name = st_dtype(dtype)
    assert name is not None
    ours = from_float32(x, name)
    theirs = bits(torch.from_numpy(x.copy()).to(dtype))
    nan = np.isnan(x)
    assert np.array_equal(ours[~nan], theirs[~nan])
    assert np.isnan(to_float32(ours[nan], name)).all()  # NaN stays NaN (never Inf or zero)
    if dtype == torch.bfloat16:
        assert np.array_equal(from_float32(x[~nan], name, finite=True), ours[~nan])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_widening_to_float32_is_exact(dtype: torch.dtype) -> None:
    width = np.uint16 if dtype != torch.float32 else np.uint32
    raw = np.random.default_rng(1).integers(0, np.iinfo(width).max, 300_001, dtype=width, endpoint=True)
    name = st_dtype(dtype)
    assert name is not None
    ours = to_float32(raw, name)
    theirs = torch.from_numpy(raw.view(np.int16 if width == np.uint16 else np.int32).copy()).view(dtype).float().numpy()
    nan = np.isnan(theirs)
    assert np.array_equal(ours.view(np.uint32)[~nan], theirs.view(np.uint32)[~nan]) and np.isnan(ours[nan]).all()


def test_raw_reads_match_safetensors(tmp_path: Path) -> None:
    folder = build_model(tmp_path / "m", "llama", seed=3, dtype=torch.bfloat16, shard="20KB")
    ck = Checkpoint.open(folder)
    assert ck.streamable and len(ck.hashed_files()) > 1
    for name, info in ck.infos.items():  # type: ignore[union-attr]
        with safe_open(str(info.file), framework="pt") as fh:
            ref = bits(fh.get_tensor(name)).reshape(-1)
        assert info.dtype == "BF16" and ck.st_dtype(name) == "BF16" and ck.dtype(name) == torch.bfloat16
        assert info.numel == ref.size and np.array_equal(info.read(), ref)
        if ref.size > 5:
            out = np.empty(16, RAW_DTYPES["BF16"])
            assert np.array_equal(info.read(2, 3, out), ref[2:5])
    assert torch_dtype("F16") == torch.float16 and st_dtype(torch.complex64) is None
