"""SLA (topk 0.1, block 128 x 64, with proj_l) against PyTorch SDPA on the CPU.

Shapes follow the issue: head_dim 128, 2 heads, batch 1, L = 4k, 8k, 16k tokens, float32
(bf16 GEMMs are slow on CPUs). SDPA does 4*L^2*D FLOPs per head; SLA's sparse branch does a
tenth of that plus an O(L*D^2) linear branch, so about 10x is the ceiling.

On a CUDA machine the same file also times the Triton kernels (bf16, 40 heads: the real
A14B layer at 480p and 720p token counts) against SDPA, after checking them against the
PyTorch path.

    nox -s bench -- -k sla
    python benchmarks/bench_sla.py [threads]  # prints the markdown table of results/sla-cpu.md
"""

from __future__ import annotations

import os
import platform

import pytest
import torch
from _timing import min_time  # benchmarks/_timing.py; this folder is on sys.path
from pytest_benchmark.fixture import BenchmarkFixture

from turbowan.ops import dense_attention, sparse_linear_attention

LENGTHS = [4096, 8192, 16384]
HEADS, HEAD_DIM, TOPK = 2, 128, 0.1


def _operands(length: int):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, length, HEADS, HEAD_DIM, generator=gen) for _ in range(3))
    weight = torch.randn(HEAD_DIM, HEAD_DIM, generator=gen) / HEAD_DIM**0.5
    bias = torch.randn(HEAD_DIM, generator=gen) * 0.1
    return q, k, v, weight, bias


def _sla(q, k, v, weight, bias):
    return sparse_linear_attention(
        q, k, v, topk=TOPK, proj_weight=weight, proj_bias=bias, backend="torch"
    )


def _sdpa(q, k, v, weight, bias):
    return dense_attention(q, k, v)


IMPLS = {"sdpa": _sdpa, "sla": _sla}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("length", LENGTHS)
def test_sla_vs_sdpa(benchmark: BenchmarkFixture, impl: str, length: int) -> None:
    operands = _operands(length)
    benchmark.group = f"attention L={length} H={HEADS} D={HEAD_DIM}"
    benchmark.extra_info.update(tokens=length, heads=HEADS, head_dim=HEAD_DIM, topk=TOPK)
    with torch.inference_mode():
        out = benchmark.pedantic(IMPLS[impl], args=operands, rounds=3, warmup_rounds=1)
    assert out.shape == operands[0].shape and torch.isfinite(out).all()


CUDA_LENGTHS = [16384, 32760, 75600]  # 75600 = 720p 81 frames, 32760 = 480p 81 frames
CUDA_HEADS = 40


def _cuda_operands(length: int):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(1, length, CUDA_HEADS, HEAD_DIM, generator=gen, device="cuda").bfloat16()
        for _ in range(3)
    )
    weight = (torch.randn(HEAD_DIM, HEAD_DIM, generator=gen, device="cuda") / 12).bfloat16()
    bias = (torch.randn(HEAD_DIM, generator=gen, device="cuda") * 0.1).bfloat16()
    return q, k, v, weight, bias


def _synced(fn):
    def run(*args):
        out = fn(*args)
        torch.cuda.synchronize()
        return out

    return run


def _sla_triton(q, k, v, weight, bias):
    return sparse_linear_attention(
        q, k, v, topk=TOPK, proj_weight=weight, proj_bias=bias, backend="triton"
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels need CUDA")
@pytest.mark.parametrize("impl", ["sdpa", "sla_triton"])
@pytest.mark.parametrize("length", CUDA_LENGTHS)
def test_sla_triton_vs_sdpa_cuda(benchmark: BenchmarkFixture, impl: str, length: int) -> None:
    operands = _cuda_operands(length)
    fn = _synced(_sdpa if impl == "sdpa" else _sla_triton)
    benchmark.group = f"cuda attention L={length} H={CUDA_HEADS} D={HEAD_DIM} bf16"
    with torch.inference_mode():
        out = benchmark.pedantic(fn, args=operands, rounds=5, warmup_rounds=2)
    assert out.shape == operands[0].shape and torch.isfinite(out).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels need CUDA")
def test_sla_triton_matches_torch_path_cuda() -> None:
    """Before timing the kernels, check them on the GPU: same selection, bf16-level error."""
    q, k, v, weight, bias = (x[:, :4000, :4] if x.dim() == 4 else x for x in _cuda_operands(4000))
    kwargs = dict(topk=TOPK, proj_weight=weight, proj_bias=bias)
    with torch.inference_mode():
        fast = sparse_linear_attention(q, k, v, backend="triton", **kwargs)
        ref = sparse_linear_attention(q, k, v, backend="torch", **kwargs)
    assert (fast.float() - ref.float()).abs().max().item() < 5e-2



def main(rounds: int = 5) -> None:
    """Interleave SDPA and SLA runs in one process and print a markdown table of minima.

    ``python benchmarks/bench_sla.py [threads]``: torch threads (default: torch's choice).
    """
    import sys

    if len(sys.argv) > 1:
        torch.set_num_threads(int(sys.argv[1]))
    cpu = platform.processor() or platform.machine()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs visible ({cpu}), float32, best of {rounds}\n"
    )
    print("| L | SDPA (s) | SLA topk 0.1 (s) | SDPA / SLA | load avg (1 min) |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        for length in LENGTHS:
            operands = _operands(length)
            _sdpa(*operands), _sla(*operands)  # warm up
            sdpa = sla = float("inf")
            for _ in range(rounds):  # interleaved, so load changes hit both alike
                sdpa = min(sdpa, min_time(_sdpa, *operands, rounds=1))
                sla = min(sla, min_time(_sla, *operands, rounds=1))
            load = os.getloadavg()[0]
            print(f"| {length} | {sdpa:.3f} | {sla:.3f} | {sdpa / sla:.1f}x | {load:.1f} |")
        if torch.cuda.is_available():
            print(f"\n{torch.cuda.get_device_name()}, bf16, {CUDA_HEADS} heads, Triton kernels\n")
            print("| L | SDPA (ms) | SLA triton (ms) | SDPA / SLA |")
            print("|---|---|---|---|")
            for length in CUDA_LENGTHS:
                operands = _cuda_operands(length)
                sdpa_fn, sla_fn = _synced(_sdpa), _synced(_sla_triton)
                sdpa_fn(*operands), sla_fn(*operands)
                sdpa = min_time(sdpa_fn, *operands, rounds=rounds)
                sla = min_time(sla_fn, *operands, rounds=rounds)
                print(f"| {length} | {sdpa * 1e3:.1f} | {sla * 1e3:.1f} | {sdpa / sla:.1f}x |")


if __name__ == "__main__":
    main()
