"""``torch.compile`` on an offloaded model: of the whole model, and of each block (regional
compilation). The engine's steps stay out of the graphs, the block bodies compile once and
are reused by every block (their weights are graph inputs), and the output is bit-equal.

A counting backend stands in for inductor (a C++ build per graph is minutes on a loaded
2-core CI machine); ``aot_eager`` runs the AOT-autograd path inductor uses.
"""

from __future__ import annotations

import pytest
import torch
from models import make_inputs, make_model

import offloadkit
from offloadkit.engine import profile_model

torch_dynamo = pytest.importorskip("torch._dynamo")


class CountingBackend:
    """Counts the graphs dynamo hands to the backend, then runs them with ``inner``."""

    def __init__(self, inner: str = "eager") -> None:
        self.graphs = 0
        self.inner = inner

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        if self.inner == "eager":
            return gm.forward
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend(self.inner)(gm, example_inputs)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch_dynamo.reset()
    yield
    torch_dynamo.reset()


@pytest.mark.parametrize(("how", "inner", "name", "num_blocks"), [
    ("whole", "eager", "layerwise", 4), ("blocks", "aot_eager", "layerwise", 4),
    ("whole", "aot_eager", "adaptive", 6), ("blocks", "eager", "adaptive", 6),
])
def test_compiled_offloaded_model_is_bit_equal_without_per_block_graphs(how, inner, name,
                                                                       num_blocks):
    model = make_model(seed=3, dim=32, hidden=64, num_blocks=num_blocks).requires_grad_(False)
    tokens, mask = make_inputs(length=8)
    with torch.no_grad():
        expected = model(tokens, mask=mask)
    profile = profile_model(model)
    low = offloadkit.get_strategy(name)().min_device_bytes(profile)
    budget = low if name == "layerwise" else (low + profile.total_bytes) // 2
    backend = CountingBackend(inner)
    with offloadkit.offloaded(model, name, device="cpu", budget=budget, replan_every=0) as handle:
        if how == "whole":
            run = torch.compile(model, backend=backend)
        else:
            for block in model.blocks:
                block.compile(backend=backend)
            run = model
        with torch.no_grad():
            outputs = [run(tokens, mask=mask)]
            warm = backend.graphs
            outputs += [run(tokens, mask=mask) for _ in range(2)]
        stats = handle.stats()
    for out in outputs:
        assert torch.equal(out, expected), (how, inner, name)
    assert stats.streamed_blocks > 0 and stats.forwards == 3
    # every block of the model shares the block graph: none is compiled per block
    assert 1 <= warm < num_blocks, warm
    assert backend.graphs == warm  # nothing recompiled after the first forward
    # the blocks are plain modules again after remove(): compiled code left no trace
    assert "forward" not in model.blocks[0].__dict__
