"""SLA Triton kernels against the PyTorch path.

Without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 before the kernels are decorated, so
they run in Triton's interpreter on CPU tensors: shapes stay tiny (it is slow), and no bf16
enters a kernel (the interpreter multiplies bf16 bit patterns as integers).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from turbowan.ops import mean_pool_blocks, sla_triton, sparse_linear_attention
from turbowan.ops.block_map import select_blocks
from turbowan.ops.sla_torch import block_sparse_attention_torch

pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden" / "sla_L384.safetensors"


def _bhld(length: int, heads: int, dim: int, seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, length, dim, generator=gen) for _ in range(3))
    shift = torch.randn(1, heads, -(-length // 64), dim, generator=gen)
    shift = shift.repeat_interleave(64, dim=2)[:, :, :length]
    return tuple(x.to(DEVICE, dtype) for x in (q + shift, k + shift, v))


@pytest.mark.parametrize(("length", "block"), [(200, 64), (200, 128), (256, 64)])
def test_mean_pool_kernel_matches_torch(length, block):
    x = _bhld(length, 2, 64, seed=length)[0]
    pooled = sla_triton.mean_pool_triton(x, block)
    expected = mean_pool_blocks(x, block)
    assert pooled.shape == expected.shape == (1, 2, -(-length // block), 64)
    assert (pooled - expected).abs().max().item() < 1e-5


def test_mean_pool_kernel_fp16_input():
    x = _bhld(200, 2, 64, seed=1, dtype=torch.float16)[0]
    pooled = sla_triton.mean_pool_triton(x, 64)
    assert pooled.dtype == torch.float32
    assert (pooled - mean_pool_blocks(x.float(), 64)).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    ("length", "dim", "block_q", "topk"), [(200, 64, 128, 0.5), (256, 128, 64, 0.25)]
)
def test_block_sparse_kernel_matches_torch_fp32(length, dim, block_q, topk):
    q, k, v = _bhld(length, 2, dim, seed=dim)
    lut = select_blocks(q, k, topk=topk, block_q=block_q, block_k=64).lut
    out = sla_triton.block_sparse_attention_triton(q, k, v, lut, block_q=block_q, block_k=64)
    expected = block_sparse_attention_torch(q, k, v, lut, block_q=block_q, block_k=64)
    assert out.dtype == torch.float32
    assert (out - expected).abs().max().item() < 1e-5


def test_block_sparse_kernel_matches_torch_fp16():
    q, k, v = _bhld(200, 2, 64, seed=7, dtype=torch.float16)
    lut = select_blocks(q, k, topk=0.5, block_q=64, block_k=64).lut
    out = sla_triton.block_sparse_attention_triton(q, k, v, lut, block_q=64, block_k=64)
    expected = block_sparse_attention_torch(q, k, v, lut, block_q=64, block_k=64)
    assert out.dtype == torch.float16
    assert (out.float() - expected).abs().max().item() < 5e-3


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_public_op_triton_equals_torch(compute_dtype):
    q, k, v = (x.transpose(1, 2) for x in _bhld(200, 2, 64, seed=3))
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(64, 64, generator=gen) / 8, torch.randn(64, generator=gen) / 10
    kwargs = dict(
        topk=0.5,
        block_q=128,
        block_k=64,
        proj_weight=weight.to(DEVICE),
        proj_bias=bias.to(DEVICE),
        compute_dtype=compute_dtype,
    )
    out = sparse_linear_attention(q, k, v, backend="triton", **kwargs)
    expected = sparse_linear_attention(q, k, v, backend="torch", **kwargs)
    # bf16: both round to bf16 at the same places; one ulp (1/64 at |x| < 4) may differ.
    atol = 1e-5 if compute_dtype == torch.float32 else 1.6e-2
    assert (out.float() - expected.float()).abs().max().item() <= atol


@pytest.mark.parametrize(
    ("mode", "dtype", "atol"), [("fp32", torch.float32, 1e-5), ("bf16", torch.bfloat16, 2e-2)]
)
def test_triton_backend_reproduces_golden(mode, dtype, atol):
    golden = load_file(str(GOLDEN))
    q, k, v = (golden[f"inputs.L384.{name}"].to(DEVICE) for name in "qkv")
    out = sparse_linear_attention(
        q,
        k,
        v,
        topk=0.5,
        block_q=128,
        block_k=64,
        backend="triton",
        proj_weight=golden["inputs.proj_l.weight"].to(DEVICE),
        proj_bias=golden["inputs.proj_l.bias"].to(DEVICE),
        compute_dtype=dtype,
    )
    expected = golden[f"L384.topk0.5.q128k64.{mode}.output"].to(DEVICE)
    assert (out - expected).abs().max().item() <= atol


@pytest.mark.skipif(not sla_triton.INTERPRETED, reason="bf16 limit applies to the interpreter")
def test_interpreter_refuses_bf16_kernel_inputs():
    q, k, v = _bhld(128, 1, 64, seed=2, dtype=torch.bfloat16)
    lut = select_blocks(q, k, topk=0.5, block_q=64, block_k=64).lut
    with pytest.raises(ValueError, match="float32 or float16"):
        sla_triton.block_sparse_attention_triton(q, k, v, lut, block_q=64, block_k=64)


def test_kernel_rejects_sizes_it_cannot_tile():
    q = torch.zeros(1, 128, 2, 48, device=DEVICE)
    with pytest.raises(ValueError, match="power of two"):
        sparse_linear_attention(q, q, q, topk=0.5, backend="triton")
