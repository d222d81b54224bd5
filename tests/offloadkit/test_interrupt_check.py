"""The ``interrupt_check`` engine option: a host's Cancel raised between blocks while a model
is packed or its resident blocks are loaded stops the work and leaves the model as it was."""

from __future__ import annotations

import pytest
import torch
from models import make_inputs, make_model

import offloadkit


@pytest.fixture(autouse=True)
def inference_mode():
    """offloadkit is inference-only; ComfyUI runs every node inside inference mode."""
    with torch.inference_mode():
        yield


class Cancel(Exception):
    pass


def cancel_on(call: int):
    calls: list[int] = []

    def check() -> None:
        calls.append(1)
        if len(calls) == call:
            raise Cancel(f"cancelled at check {call}")
    return check, calls


@pytest.mark.parametrize("strategy, call", [("layerwise", 3), ("adaptive", 11)])
def test_a_cancel_while_packing_or_placing_restores_the_model(strategy, call):
    """8 blocks: checks 1-8 run while packing, 9.. while adaptive loads resident blocks."""
    model = make_model()
    tokens, mask = make_inputs()
    expected = model(tokens, mask=mask)
    check, calls = cancel_on(call)
    with pytest.raises(Cancel):
        offloadkit.apply(model, strategy, device="cpu", budget="1GiB", interrupt_check=check)
    assert len(calls) == call  # stopped at the check that raised, nothing after it
    assert torch.equal(model(tokens, mask=mask), expected)
    # the model is not left marked as offloaded: it can be placed again
    with offloadkit.offloaded(model, strategy, device="cpu", budget="1GiB") as handle:
        assert torch.equal(model(tokens, mask=mask), expected)
        assert handle.stats().current_device_bytes > 0


def test_a_check_that_never_raises_changes_nothing():
    model = make_model()
    tokens, mask = make_inputs()
    expected = model(tokens, mask=mask)
    check, calls = cancel_on(-1)
    with offloadkit.offloaded(model, "adaptive", device="cpu", budget="1GiB",
                              interrupt_check=check):
        assert torch.equal(model(tokens, mask=mask), expected)
    assert len(calls) == 8 + 8  # every block packed, then every block loaded resident
