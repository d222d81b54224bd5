"""offloadkit under every grad mode: ``torch.inference_mode()`` (ComfyUI runs each node in it),
``torch.no_grad()`` and plain, for apply/stage/place and for forward, on the calling thread and
with the packing on a staging thread.

Inference mode is thread-local and makes the tensors allocated in it read-only outside it, so
an engine that allocates its slots under the caller's mode breaks as soon as its prefetch
thread (never in inference mode) copies into them, or a forward runs in another mode.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from models import make_inputs, make_model, run_on_thread, snapshot

import offloadkit
from offloadkit.engine import profile_model

MODES = {
    "inference": torch.inference_mode,
    "no_grad": torch.no_grad,
    "plain": contextlib.nullcontext,
}

STRATEGIES = [
    ("layerwise", {}, "host"),
    ("chunkwise", {"chunk_size": 2}, "host"),
    ("adaptive", {}, "host"),
    ("layerwise", {}, "disk"),
]


def _frozen_model(built_in: str):
    """A frozen model (a plain-mode forward is then inference, not training), built under the
    mode it is placed in: ComfyUI loads its models inside inference mode too."""
    with MODES[built_in]():
        return make_model(seed=3, dim=32, hidden=64, num_blocks=4).requires_grad_(False)


def _stage_on_thread(mode: str, model, *args, **kwargs):
    def stage():
        with MODES[mode]():
            return offloadkit.stage(model, *args, **kwargs)

    return run_on_thread(stage)


@pytest.mark.parametrize("where", ["caller", "staging_thread"])
@pytest.mark.parametrize("run_mode", list(MODES))
@pytest.mark.parametrize("place_mode", list(MODES))
@pytest.mark.parametrize(("name", "options", "home"), STRATEGIES)
def test_every_mode_combination_gives_the_unwrapped_output(tmp_path, name, options, home,
                                                           place_mode, run_mode, where):
    model = _frozen_model(place_mode)
    tokens, mask = make_inputs(length=8)
    with torch.no_grad():
        expected = model(tokens, mask=mask)
    before = snapshot(model)
    # the strategy's minimum: every block streams (adaptive keeps none resident)
    budget = offloadkit.get_strategy(name)(**options).min_device_bytes(profile_model(model))
    kwargs = dict(device="cpu", budget=budget, home=home, **options)
    if home == "disk":
        kwargs["disk_path"] = str(tmp_path)
    if where == "caller":
        with MODES[place_mode]():
            handle = offloadkit.apply(model, name, **kwargs)
    else:
        staged = _stage_on_thread(place_mode, model, name, **kwargs)
        with MODES[place_mode]():
            handle = staged.place()
    try:
        assert handle.stats().streamed_blocks == 4
        with MODES[run_mode]():
            for _ in range(3):  # later forwards run on slots the prefetch thread filled
                out = model(tokens, mask=mask)
                assert torch.equal(out, expected), (name, place_mode, run_mode, where)
        assert handle.stats().forwards == 3
    finally:
        handle.remove()
    after = snapshot(model)
    assert after.keys() == before.keys()
    for key, (value, device, dtype, grad) in before.items():
        assert torch.equal(after[key][0], value) and after[key][1:] == (device, dtype, grad), key
