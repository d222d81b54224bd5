"""SLA (topk 0.1, block 128 x 64, with proj_l) against PyTorch SDPA on the CPU.

Shapes follow the issue: head_dim 128, 2 heads, batch 1, L = 4k, 8k, 16k tokens, float32
(bf16 GEMMs are slow on CPUs). SDPA does 4*L^2*D FLOPs per head; SLA's sparse branch does a
tenth of that plus an O(L*D^2) linear branch, so about 10x is the ceiling.

    nox -s bench -- -k sla
    python benchmarks/bench_sla.py           # prints the markdown table of results/sla-cpu.md
"""

from __future__ import annotations

import os
import platform
import time

import pytest
import torch
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


def _min_time(fn, *args, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - start)
    return best


def main(rounds: int = 5) -> None:
    """Interleave SDPA and SLA runs in one process and print a markdown table of minima."""
    cpu = platform.processor() or platform.machine()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs visible ({cpu}), float32, best of {rounds}\n"
    )
    print("| L | SDPA (s) | SLA topk 0.1 (s) | SDPA / SLA |")
    print("|---|---|---|---|")
    with torch.inference_mode():
        for length in LENGTHS:
            operands = _operands(length)
            _sdpa(*operands), _sla(*operands)  # warm up
            sdpa = sla = float("inf")
            for _ in range(rounds):  # interleaved, so load changes hit both alike
                sdpa = min(sdpa, _min_time(_sdpa, *operands, rounds=1))
                sla = min(sla, _min_time(_sla, *operands, rounds=1))
            print(f"| {length} | {sdpa:.3f} | {sla:.3f} | {sdpa / sla:.1f}x |")


if __name__ == "__main__":
    main()
