"""The Triton int8 GEMM (interpreted on CPU) equals the reference path bit for bit."""

import pytest
import torch

from turbowan.quant.int8_linear import Int8Linear, int8_linear_reference, quantize_blockwise
from turbowan.quant.int8_triton import int8_linear_triton

pytestmark = pytest.mark.triton


@pytest.mark.parametrize("m,k,n", [(200, 256, 136), (64, 320, 128)])
def test_triton_equals_reference_exactly(m, k, n):
    g = torch.Generator().manual_seed(m + k + n)
    x = torch.randn(m, k, generator=g) * 3
    x[:, 128:] *= 0.01  # K tiles of very different ranges
    w = torch.randn(n, k, generator=g) / k**0.5
    bias = torch.randn(n, generator=g) * 0.1
    q_w, s_w = quantize_blockwise(w)
    out = int8_linear_triton(x, q_w, s_w, bias)
    ref = int8_linear_reference(x, q_w, s_w, bias)
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert torch.equal(out, ref)


def test_layer_mode_triton_matches_reference():
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(256, 128).to(torch.bfloat16)
    layer = Int8Linear.from_linear(lin, mode="triton")
    x = torch.randn(2, 70, 256, generator=g).to(torch.bfloat16)  # bf16 never enters the kernel
    with torch.no_grad():
        out = layer(x)
        layer.mode = "reference"
        ref = layer(x)
    assert out.shape == (2, 70, 128) and out.dtype == torch.bfloat16
    assert torch.equal(out, ref)
