"""The engine on CPU: same code paths as on a GPU (packing, slots, prefetch thread, ledger).

Every built-in strategy, over several budgets and both host and disk homes, must give
outputs bitwise equal to the model without offload, stay within its budget (measured),
and ``remove()`` must put the model back exactly.
"""

from __future__ import annotations

import json

import pytest
import torch
from models import make_inputs, make_model, snapshot

import offloadkit
from offloadkit.engine import profile_model
from offloadkit.registry import get_strategy

BUILTIN_ENGINE = ("layerwise", "chunkwise", "adaptive")


@pytest.fixture(scope="module")
def reference():
    model = make_model()
    tokens, mask = make_inputs()
    with torch.no_grad():
        expected = model(tokens, mask=mask, scale=0.5)
    return model, tokens, mask, expected


def budgets_for(name: str, model, **options) -> list[int]:
    """The strategy's minimum, a middle budget, and enough for everything."""
    profile = profile_model(model)
    low = get_strategy(name)(**options).min_device_bytes(profile)
    high = profile.total_bytes
    return sorted({low, (low + high) // 2, high + 1})


CASES = [
    ("layerwise", {}),
    ("layerwise", {"prefetch": False}),
    ("chunkwise", {"chunk_size": 3}),
    ("adaptive", {}),
    ("adaptive", {"prefetch_depth": 2}),
]


@pytest.mark.parametrize(("name", "options", "home"),
                         [(n, o, "host") for n, o in CASES] + [(n, o, "disk") for n, o in CASES[::2]])
def test_outputs_bitwise_equal_and_peak_within_budget(reference, name, options, home, tmp_path):
    model, tokens, mask, expected = reference
    budgets = budgets_for(name, model, **options)
    if home == "disk":
        budgets = budgets[:1] + budgets[-1:]  # the tightest (all streamed) and the loosest
    for budget in budgets:
        handle = offloadkit.apply(model, name, device="cpu", budget=budget, home=home,
                                  disk_path=str(tmp_path) if home == "disk" else None,
                                  **options)
        try:
            with torch.no_grad():
                for _ in range(2):  # the second forward uses slots prefetched by the first
                    out = model(tokens, mask=mask, scale=0.5)
                    assert torch.equal(out, expected), (name, options, budget)
            stats = handle.stats()
        finally:
            handle.remove()
        assert 0 < stats.peak_device_bytes <= budget
        assert stats.forwards == 2
        assert stats.resident_blocks + stats.streamed_blocks == len(model.blocks)
        if stats.streamed_blocks:
            assert stats.bytes_transferred > 0 and stats.transfers > 0
        if home == "disk":
            assert stats.disk_bytes == profile_model(model).block_bytes
        else:
            assert stats.host_pageable_bytes == profile_model(model).block_bytes


def test_cpu_only_is_exact_and_places_nothing(reference):
    model, tokens, mask, expected = reference
    handle = offloadkit.apply(model, "cpu_only", budget=0)
    with torch.no_grad():
        assert torch.equal(model(tokens, mask=mask, scale=0.5), expected)
    stats = handle.stats()
    handle.remove()
    assert stats.peak_device_bytes == 0 and stats.bytes_transferred == 0


def test_peak_tracks_plan_and_layerwise_streams_everything(reference):
    model, tokens, mask, _ = reference
    profile = profile_model(model)
    handle = offloadkit.apply(model, "layerwise", device="cpu", budget=profile.total_bytes * 2)
    with torch.no_grad():
        model(tokens, mask=mask)
    stats = handle.stats()
    handle.remove()
    # layerwise ignores a large budget: two slots of one block beside the non-block weights
    assert stats.peak_device_bytes == profile.non_block_bytes + 2 * profile.max_block_bytes
    assert stats.streamed_blocks == 8 and stats.resident_blocks == 0


@pytest.mark.parametrize("home", ["host", "disk"])
def test_remove_restores_model_exactly(home, tmp_path):
    model = make_model(seed=3)
    model.blocks[2].qkv.weight.requires_grad_(False)  # a mix of requires_grad must survive
    before = snapshot(model)
    params_before = {n: p for n, p in model.named_parameters()}
    handle = offloadkit.apply(model, "adaptive", device="cpu",
                              budget=profile_model(model).total_bytes // 2, home=home,
                              disk_path=str(tmp_path) if home == "disk" else None)
    tokens, mask = make_inputs()
    with torch.no_grad():
        model(tokens, mask=mask)
    handle.remove()
    after = snapshot(model)
    assert before.keys() == after.keys()
    for name, (value, device, dtype, grad) in before.items():
        v2, d2, t2, g2 = after[name]
        assert (device, dtype, grad) == (d2, t2, g2), name
        assert torch.equal(value, v2), name
    # same Parameter objects (optimisers and user references stay valid)
    assert all(params_before[n] is p for n, p in model.named_parameters())
    for module in model.modules():
        assert "forward" not in module.__dict__
        assert not module._forward_pre_hooks and not module._forward_hooks
        assert not module._backward_hooks and not module._forward_hooks_with_kwargs
        assert not any(k.startswith("_offloadkit") for k in module.__dict__)
    # restored tensors own their memory again: no aliasing into packed buffers
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(storages) == len(list(model.parameters()))
    if home == "disk":
        assert not list(tmp_path.iterdir())  # the temporary safetensors file is gone


def test_repeated_forwards_leave_ledger_at_baseline(reference):
    model, tokens, mask, _ = reference
    profile = profile_model(model)
    handle = offloadkit.apply(model, "adaptive", device="cpu",
                              budget=profile.non_block_bytes + 5 * profile.max_block_bytes,
                              replan_every=0)
    try:
        with torch.no_grad():
            model(tokens, mask=mask)
        base = handle.stats()
        with torch.no_grad():
            for _ in range(5):
                model(tokens, mask=mask)
        later = handle.stats()
    finally:
        handle.remove()
    assert later.current_device_bytes == base.current_device_bytes > 0
    assert later.peak_device_bytes == base.peak_device_bytes
    assert later.host_pageable_bytes == base.host_pageable_bytes
    assert later.forwards == 6
    # each forward moves the same bytes: every streamed block exactly once
    per_forward = (later.bytes_transferred - base.bytes_transferred) / 5
    streamed = [b.nbytes for b in profile.blocks if b.index in handle.plan.streamed]
    assert per_forward == sum(streamed)
    assert later.mispredicted_loads == 0
    stats_after = handle.stats()
    assert stats_after.current_device_bytes == 0  # remove() gave everything back


def test_streamed_weights_are_placeholders_between_uses(reference):
    """Outside its turn a streamed block holds NaN stand-ins, not stale slot contents."""
    model, tokens, mask, _ = reference
    profile = profile_model(model)
    handle = offloadkit.apply(model, "layerwise", device="cpu", budget=profile.total_bytes)
    try:
        with torch.no_grad():
            model(tokens, mask=mask)
        assert torch.isnan(model.blocks[4].qkv.weight).all()
        assert model.blocks[4].proj.weight.shape == (64, 64)
        assert model.blocks[4].proj.weight.dtype == torch.int8
    finally:
        handle.remove()
    assert not torch.isnan(model.blocks[4].qkv.weight).any()


def test_blocks_given_by_name_and_inference_mode(reference):
    model, tokens, mask, expected = reference
    with offloadkit.offloaded(model, "chunkwise", device="cpu", budget=10**9, blocks="blocks",
                              chunk_size=2) as handle:
        with torch.inference_mode():
            out = model(tokens, mask=mask, scale=0.5)
        assert torch.equal(out, expected)
        # views were made outside inference mode: normal use afterwards still works
        with torch.no_grad():
            assert torch.equal(model(tokens, mask=mask, scale=0.5), expected)
        assert handle.stats().group_size == 2
    assert handle.removed


def test_export_trace_is_chrome_json(reference, tmp_path):
    model, tokens, mask, _ = reference
    with offloadkit.offloaded(model, "layerwise", device="cpu", budget=10**9) as handle:
        with torch.no_grad():
            model(tokens, mask=mask)
        path = handle.export_trace(tmp_path / "trace.json")
    data = json.loads(path.read_text())
    spans = [e for e in data["traceEvents"] if e["ph"] == "X"]
    names = {e["name"] for e in spans}
    assert {f"block {i}" for i in range(8)} <= names
    transfers = [e for e in spans if e["cat"] == "transfer"]
    assert len(transfers) >= 8 and all(e["args"]["bytes"] > 0 for e in transfers)
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)


def test_replan_changes_placement_and_stays_exact(reference):
    """A strategy's replan() is put in force between forwards; outputs stay exact."""
    from offloadkit.strategies.adaptive import AdaptiveStrategy
    from offloadkit.strategy import Plan

    class Halving(AdaptiveStrategy):
        name = "halving-test"

        def replan(self, plan, stats, profile):
            if not plan.resident:
                return None
            return Plan.build(profile, plan.resident[::2], prefetch_depth=1)

    model, tokens, mask, expected = reference
    profile = profile_model(model)
    handle = offloadkit.apply(model, Halving(), device="cpu",
                              budget=profile.non_block_bytes + 6 * profile.max_block_bytes,
                              replan_every=0)
    try:
        before = handle.plan
        with torch.no_grad():
            model(tokens, mask=mask, scale=0.5)
        new = handle.replan()
        assert new is not None and len(new.resident) < len(before.resident)
        assert handle.plan == new
        with torch.no_grad():
            assert torch.equal(model(tokens, mask=mask, scale=0.5), expected)
        stats = handle.stats()
        assert stats.replans == 1 and stats.resident_blocks == len(new.resident)
        assert stats.current_device_bytes == new.predicted_peak_device_bytes
    finally:
        handle.remove()


@pytest.mark.parametrize("name", ["layerwise", "adaptive"])
def test_every_copy_into_a_slot_waits_for_a_compute_token(reference, monkeypatch, name):
    """On CUDA a new slot may get memory that queued compute still reads (a resident block
    evicted by a re-plan or OOM recovery): every copy into a slot, the first one included,
    must be ordered after a token from ``release`` (an event on the compute stream)."""
    from offloadkit.engine.transfer import CpuTransport

    tokens_made: list[object] = []
    afters: list[object] = []
    real_submit = CpuTransport.submit

    def release(self, slot_buffer):
        tokens_made.append(object())
        return tokens_made[-1]

    def submit(self, label, copies, after=None):
        afters.append(after)
        return real_submit(self, label, copies, after)

    monkeypatch.setattr(CpuTransport, "release", release)
    monkeypatch.setattr(CpuTransport, "submit", submit)
    model, tokens, mask, expected = reference
    profile = profile_model(model)
    handle = offloadkit.apply(model, name, device="cpu", replan_every=0,
                              budget=profile.non_block_bytes + 4 * profile.max_block_bytes)
    try:
        with torch.no_grad():
            out = model(tokens, mask=mask, scale=0.5)
    finally:
        handle.remove()
    assert torch.equal(out, expected)
    assert len(afters) >= handle.stats().streamed_blocks > 0
    assert all(any(a is t for t in tokens_made) for a in afters)
