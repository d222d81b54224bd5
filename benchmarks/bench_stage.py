"""What a model switch costs with and without "pack now, place later" (offloadkit.stage).

Without staging, the switch runs ``offloadkit.apply``: pack every block into the home tier,
then place. With staging the packing already happened on a background thread (while the
other model computed), and the switch only runs ``staged.place()``. The ratio of the two
is what the turbowan pipeline saves at its expert switch. CPU device, ~256 MiB of weights.

    pytest benchmarks/bench_stage.py -p no:cacheprovider -o addopts= \
        -o python_files='bench_*.py' --benchmark-only
"""

from __future__ import annotations

import pytest
import torch
from pytest_benchmark.fixture import BenchmarkFixture
from torch import nn

import offloadkit

ROUNDS = 3
BUDGET = 64 * 2**20  # a fraction of the model: most blocks stream


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class Stack(nn.Module):
    def __init__(self, dim: int = 1024, depth: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


@pytest.fixture(scope="module")
def model() -> Stack:
    torch.manual_seed(0)
    return Stack().eval()  # 8 blocks x 32 MiB


@pytest.mark.parametrize("how", ["apply_at_switch", "place_staged"])
def test_switch_cost(benchmark: BenchmarkFixture, model: Stack, how: str) -> None:
    live: list = []

    def setup():
        while live:
            live.pop().remove()
        if how == "place_staged":  # done in the background in the pipeline: not timed
            return (offloadkit.stage(model, "adaptive", device="cpu", budget=BUDGET),), {}
        return (None,), {}

    def switch(staged):
        handle = staged.place() if staged is not None else offloadkit.apply(
            model, "adaptive", device="cpu", budget=BUDGET)
        live.append(handle)

    benchmark.pedantic(switch, setup=setup, rounds=ROUNDS, iterations=1)
    while live:
        live.pop().remove()
    benchmark.extra_info["how"] = how
