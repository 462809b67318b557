"""The GPU path (`device: cuda`, `dtype: bfloat16`): skipped where torch sees no CUDA device.

Stated tolerances: on CUDA in float32 every item is scored as on the CPU (correctness and generated
tokens); in bfloat16 at least 90% of items keep the CPU float32 result — bfloat16 keeps 8 bits of
mantissa, so near-ties of the argmax flip — and the in-memory restore is bit-exact in either dtype.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import write_task

from analysis.eval import evaluate
from analysis.io.models import load
from analysis.plan import Plan
from analysis.transplant import applied

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BF16_AGREEMENT = 0.9


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_restore_is_bit_exact_on_cuda(llama_pair: tuple[Path, Path], dtype: str) -> None:
    donor_ref, target_ref = llama_pair
    target = load(target_ref, dtype=dtype, device="cuda")  # type: ignore[arg-type]
    donor = load(donor_ref, dtype=dtype, device="cuda")  # type: ignore[arg-type]
    before = {n: p.detach().clone() for n, p in target.parameters().items()}
    with applied(target, donor, Plan.of(["L0.H1", "L1.mlp"], alpha=0.5)):
        assert not torch.equal(target.parameters()["model.layers.1.mlp.down_proj.weight"],
                               before["model.layers.1.mlp.down_proj.weight"])
    for name, p in target.parameters().items():
        as_int = {2: torch.int16, 4: torch.int32}[p.element_size()]  # bits, not values (-0.0, NaN)
        assert p.device.type == "cuda" and torch.equal(p.view(as_int), before[name].view(as_int)), name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_scores_items_as_the_cpu(llama_pair: tuple[Path, Path], tmp_path: Path, dtype: str) -> None:
    _, target_ref = llama_pair
    task = write_task(tmp_path)
    cpu = load(target_ref, dtype="float32")
    gpu = load(target_ref, dtype=dtype, device="cuda")  # type: ignore[arg-type]
    want = evaluate.run(cpu.model, cpu.tokenizer, task, split="test", progress=False).records
    got = evaluate.run(gpu.model, gpu.tokenizer, task, split="test", progress=False).records
    same = [(a["correct"], a.get("tokens")) == (b["correct"], b.get("tokens")) for a, b in zip(want, got, strict=True)]
    if dtype == "float32":
        assert all(same)
    else:
        assert sum(same) / len(same) >= BF16_AGREEMENT
