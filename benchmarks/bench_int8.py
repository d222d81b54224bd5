"""Int8 block-wise linear (fast path: dequantise + F.linear) against a plain linear layer of
the same shape and compute dtype, on the CPU.

The fast path pays one dequantisation of the weight per call (N*K multiply-adds) on top of
the same GEMM (M*N*K), so its overhead shrinks as the token count M grows; what it buys is
half the weight bytes at rest (int8 vs bf16), which is what offloading moves.

    nox -s bench -- -k int8
    python benchmarks/bench_int8.py          # prints the markdown table of results/int8-cpu.md
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _timing import min_time  # benchmarks/_timing.py; this folder is on sys.path
from pytest_benchmark.fixture import BenchmarkFixture

from turbowan.quant.int8_linear import Int8Linear, dequantize_blockwise, quantize_blockwise

# (label, tokens M, in K, out N): the `small` preset's attention and FFN linears, and the
# real A14B FFN up-projection at a short token count
SHAPES = [
    ("small q/k/v/o", 1024, 1536, 1536),
    ("small ffn.0", 1024, 1536, 6144),
    ("small ffn.0 long", 4096, 1536, 6144),
    ("a14b ffn.0", 256, 5120, 13824),
]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _operands(m: int, k: int, n: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    bias = (torch.randn(n, generator=g) * 0.1).to(dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    layer = Int8Linear(k, n, dtype=dtype)
    q, scale = quantize_blockwise(w)
    layer.int8_weight.copy_(q)
    layer.scale.copy_(scale)
    layer.bias.copy_(bias)
    return x, w, bias, layer


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0].replace(" ", "-") for s in SHAPES])
@pytest.mark.parametrize("path", ["linear", "int8_fast", "dequant_only"])
def test_int8_linear(benchmark: BenchmarkFixture, path: str, shape, dtype_name: str) -> None:
    label, m, k, n = shape
    dtype = DTYPES[dtype_name]
    x, w, bias, layer = _operands(m, k, n, dtype)
    benchmark.group = f"int8 {label} {dtype_name}"
    benchmark.extra_info.update(tokens=m, in_features=k, out_features=n, dtype=dtype_name)
    with torch.inference_mode():
        if path == "linear":
            out = benchmark.pedantic(F.linear, args=(x, w, bias), rounds=5, warmup_rounds=1)
        elif path == "int8_fast":
            out = benchmark.pedantic(layer, args=(x,), rounds=5, warmup_rounds=1)
        else:
            out = benchmark.pedantic(
                dequantize_blockwise,
                args=(layer.int8_weight, layer.scale, dtype),
                rounds=5,
                warmup_rounds=1,
            )
    assert torch.isfinite(out).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
@pytest.mark.parametrize("path", ["linear", "int8_fast", "int8_triton"])
def test_int8_linear_cuda(benchmark: BenchmarkFixture, path: str) -> None:
    """A14B ffn.0 at a 480p-like token count, bf16 on the GPU (fast vs Triton W8A8)."""
    m, k, n = 8192, 5120, 13824
    x, w, bias, layer = _operands(m, k, n, torch.bfloat16)
    x, w, bias, layer = x.cuda(), w.cuda(), bias.cuda(), layer.cuda()
    layer.mode = "triton" if path == "int8_triton" else "fast"
    benchmark.group = "int8 a14b ffn.0 cuda bf16"

    def call():
        out = F.linear(x, w, bias) if path == "linear" else layer(x)
        torch.cuda.synchronize()
        return out

    with torch.inference_mode():
        out = benchmark.pedantic(call, rounds=10, warmup_rounds=2)
    assert torch.isfinite(out).all()



def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| shape (M x K -> N) | dtype | linear ms | int8 fast ms | dequant ms | ratio |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for label, m, k, n in SHAPES:
            for name, dtype in DTYPES.items():
                x, w, bias, layer = _operands(m, k, n, dtype)
                t_lin = min_time(F.linear, x, w, bias, rounds=5, warmup=1)
                t_int8 = min_time(layer, x, rounds=5, warmup=1)
                t_deq = min_time(dequantize_blockwise, layer.int8_weight, layer.scale, dtype, rounds=5, warmup=1)
                print(
                    f"| {label} ({m} x {k} -> {n}) | {name} | {t_lin * 1e3:.1f} | "
                    f"{t_int8 * 1e3:.1f} | {t_deq * 1e3:.1f} | {t_int8 / t_lin:.2f} |"
                )


if __name__ == "__main__":
    main()
