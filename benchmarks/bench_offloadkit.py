"""offloadkit on the CPU: time per forward under each strategy, as a ratio to all-resident.

The model is transformer-shaped (embedding, 12 attention+MLP blocks of ~25 MB fp32, head),
about 300 MB. On device "cpu" the engine runs the same plan, packing, slot and prefetch-thread
code as on CUDA, with memcpy standing in for the PCIe copy, so the ratio measures the
engine's own overhead (hooks, packing views, thread hand-off) plus the copies.

    nox -s bench -- -k offloadkit
    pytest benchmarks/bench_offloadkit.py -p no:cacheprovider -o addopts= \
        -o python_files='bench_*.py' --benchmark-only -s

Ratios use each run's minimum time (least disturbed by other processes on the machine).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
import torch.nn.functional as F
from pytest_benchmark.fixture import BenchmarkFixture
from torch import nn

import offloadkit

DIM = 720  # 12 * DIM**2 fp32 parameters per block: ~25 MB
HEADS = 8
NUM_BLOCKS = 12
VOCAB = 1000
TOKENS = 128
ROUNDS = 3


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        # qkv: [B, T, 3, H, D/H] -> three of [B, H, T, D/H]
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block(DIM, HEADS) for _ in range(NUM_BLOCKS))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


@dataclass(frozen=True)
class Case:
    label: str
    strategy: str | None  # None: the plain model, no offloadkit
    budget_share: float = 0.5  # of the model's weight bytes
    home: str = "host"


CASES = [
    Case("all-resident", None),
    Case("adaptive 100% (engine, nothing streams)", "adaptive", 1.0),
    Case("adaptive 50%", "adaptive"),
    Case("layerwise", "layerwise"),
    Case("chunkwise", "chunkwise"),
    Case("adaptive 50% disk", "adaptive", home="disk"),
    Case("layerwise disk", "layerwise", home="disk"),
]
RESULTS: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="module")
def model_and_input() -> tuple[Net, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = Net().eval()
    tokens = torch.randint(0, VOCAB, (1, TOKENS))
    with torch.inference_mode():
        reference = model(tokens)
    return model, tokens, reference


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@pytest.fixture(scope="module", autouse=True)
def summary_table(request: pytest.FixtureRequest) -> Iterator[None]:
    """After the runs, print a markdown table (for benchmarks/results/offloadkit-cpu.md)."""
    yield
    if not RESULTS:
        return
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    write = reporter.write_line if reporter else print
    write("")
    write(
        "| case | min ms / forward | ratio to all-resident | resident / streamed blocks | "
        "peak device MiB | moved MiB / forward | stall s / forward | RSS MiB |"
    )
    write("|---|---|---|---|---|---|---|---|")
    for label, r in RESULTS.items():
        if "resident_blocks" in r:
            placement = f"{r['resident_blocks']} / {r['streamed_blocks']}"
            peak = f"{r['peak_device_bytes'] / 2**20:.0f}"
            moved = f"{r['bytes_moved_per_forward'] / 2**20:.0f}"
            stall = f"{r['stall_seconds_per_forward']:.4f}"
        else:
            placement, peak, moved, stall = "no offloadkit", "-", "-", "-"
        write(
            f"| {label} | {r['min_s'] * 1e3:.1f} | {r['ratio_to_all_resident']:.3f} | "
            f"{placement} | {peak} | {moved} | {stall} | {r['rss'] / 2**20:.0f} |"
        )


@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_forward_time(
    benchmark: BenchmarkFixture,
    case: Case,
    model_and_input: tuple[Net, torch.Tensor, torch.Tensor],
    tmp_path: Path,
) -> None:
    model, tokens, reference = model_and_input
    handle = None
    if case.strategy is not None:
        budget = int(model_bytes(model) * case.budget_share)
        options = (
            {"disk_path": str(tmp_path / "weights.safetensors")} if case.home == "disk" else {}
        )
        handle = offloadkit.apply(
            model, case.strategy, device="cpu", budget=budget, home=case.home, **options
        )
    gc.collect()
    rss = psutil.Process(os.getpid()).memory_info().rss

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return model(tokens)

    try:
        out = benchmark.pedantic(forward, rounds=ROUNDS, warmup_rounds=1, iterations=1)
        assert torch.equal(out, reference), f"{case.label}: output differs from no offload"
        stats = handle.stats() if handle else None
    finally:
        if handle is not None:
            handle.remove()

    if benchmark.stats is None:  # --benchmark-disable: ran once as a correctness check
        return
    best = benchmark.stats.stats.min
    RESULTS[case.label] = {"min_s": best, "mean_s": benchmark.stats.stats.mean, "rss": rss}
    baseline = RESULTS.get("all-resident", {}).get("min_s")
    ratio = best / baseline if baseline else float("nan")
    benchmark.extra_info.update(ratio_to_all_resident=round(ratio, 3), rss_bytes=rss)
    if stats is not None:
        per_forward = stats.bytes_transferred / max(stats.forwards, 1)
        benchmark.extra_info.update(
            peak_device_bytes=stats.peak_device_bytes,
            resident_blocks=stats.resident_blocks,
            streamed_blocks=stats.streamed_blocks,
            bytes_moved_per_forward=int(per_forward),
            stall_seconds_per_forward=round(stats.stall_seconds / max(stats.forwards, 1), 5),
        )
        assert stats.peak_device_bytes <= stats.budget_bytes
    RESULTS[case.label].update(benchmark.extra_info)
    print(f"{case.label}: min {best * 1e3:.1f} ms, ratio {ratio:.3f}, {dict(benchmark.extra_info)}")
