"""SLA against the upstream golden outputs (tests/data/golden/sla_L384.safetensors).

fp32 cases: upstream code with its internal dtype set to float32 (tight math reference, 1e-5).
bf16 cases: upstream's default path (q, k, v, P and both branch outputs in bf16), ~2e-2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from turbowan.ops import block_selection, sparse_linear_attention
from turbowan.ops.sla_linear import linear_branch, project_linear_branch, rounder
from turbowan.ops.sla_torch import block_sparse_attention_torch

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden" / "sla_L384.safetensors"
CASES = [  # (case prefix, topk, block_q, block_k)
    ("L384.topk0.25.q64k64", 0.25, 64, 64),
    ("L384.topk0.5.q64k64", 0.5, 64, 64),
    ("L384.topk0.5.q128k64", 0.5, 128, 64),
]
MODES = {"fp32": (torch.float32, 1e-5), "bf16": (torch.bfloat16, 2e-2)}


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN))


def _inputs(golden):
    q, k, v = (golden[f"inputs.L384.{name}"] for name in "qkv")
    return q, k, v, golden["inputs.proj_l.weight"], golden["inputs.proj_l.bias"]


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize(("case", "topk", "block_q", "block_k"), CASES)
def test_output_matches_upstream(golden, case, topk, block_q, block_k, mode):
    q, k, v, weight, bias = _inputs(golden)
    dtype, atol = MODES[mode]
    out = sparse_linear_attention(
        q,
        k,
        v,
        topk=topk,
        block_q=block_q,
        block_k=block_k,
        proj_weight=weight,
        proj_bias=bias,
        backend="torch",
        compute_dtype=dtype,
    )
    expected = golden[f"{case}.{mode}.output"]
    assert out.shape == expected.shape == (1, 384, 2, 64)
    assert out.dtype == torch.float32
    assert (out - expected).abs().max().item() <= atol


@pytest.mark.parametrize(("case", "topk", "block_q", "block_k"), CASES)
def test_block_selection_matches_upstream(golden, case, topk, block_q, block_k):
    q, k, _, _, _ = _inputs(golden)
    selection = block_selection(q, k, topk=topk, block_q=block_q, block_k=block_k)
    for mode in MODES:  # selection runs on the uncast inputs, so both modes agree
        assert torch.equal(selection.lut, golden[f"{case}.{mode}.lut_sorted"])
        assert torch.equal(selection.sparse_map, golden[f"{case}.{mode}.sparse_map"])
    assert selection.sparse_map.dtype == torch.int8
    assert selection.sparse_map.sum(-1).eq(selection.kk).all()


@pytest.mark.parametrize("mode", sorted(MODES))
def test_linear_branch_and_proj_l_match_upstream(golden, mode):
    q, k, v, weight, bias = _inputs(golden)
    dtype, atol = MODES[mode]
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    o_linear = linear_branch(qh, kh, vh, compute_dtype=dtype, arith_dtype=torch.float32)
    expected_pre = golden[f"L384.{mode}.o_linear_pre_proj_BHLD"].float()
    assert (o_linear - expected_pre).abs().max().item() <= atol / 2
    projected = project_linear_branch(
        o_linear, weight, bias, compute_dtype=dtype, arith_dtype=torch.float32
    )
    expected_post = golden[f"L384.{mode}.o_linear_BHLD"].float()
    assert (projected - expected_post).abs().max().item() <= atol / 2


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize(("case", "topk", "block_q", "block_k"), CASES)
def test_sparse_branch_matches_upstream_kernel_output(golden, case, topk, block_q, block_k, mode):
    q, k, v, _, _ = _inputs(golden)
    dtype, atol = MODES[mode]
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    lut = block_selection(q, k, topk=topk, block_q=block_q, block_k=block_k).lut
    rnd = rounder(dtype, torch.float32)
    o_sparse = block_sparse_attention_torch(
        rnd(qh),
        rnd(kh),
        rnd(vh),
        lut,
        block_q=block_q,
        block_k=block_k,
        round_to=None if dtype == torch.float32 else dtype,
    )
    expected = golden[f"{case}.{mode}.o_sparse_BHLD"].float()
    assert (rnd(o_sparse) - expected).abs().max().item() <= atol
