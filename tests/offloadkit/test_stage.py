"""``offloadkit.stage``: pack now (on any thread, no device), place later (``place()``).

A staged-then-placed model must behave exactly like ``apply()`` (it is the same mechanism),
``discard()`` must restore the model exactly, and budget errors must come before packing.
"""

from __future__ import annotations

import json

import pytest
import torch
from models import make_inputs, make_model, run_on_thread, snapshot

import offloadkit
import offloadkit.budget as budget_module
from offloadkit.engine import profile_model
from offloadkit.engine.disk import DiskStore
from offloadkit.engine.packing import HostStore
from offloadkit.errors import AlreadyOffloadedError, BudgetError, OffloadError
from offloadkit.probe import DeviceMemory


@pytest.fixture(scope="module")
def reference():
    model = make_model(seed=5)
    tokens, mask = make_inputs()
    with torch.no_grad():
        expected = model(tokens, mask=mask, scale=0.5)
    return model, tokens, mask, expected


def _stage_in_thread(model, *args, **kwargs):
    """Run offloadkit.stage on a background thread, as the turbowan pipeline does."""
    return run_on_thread(offloadkit.stage, model, *args, **kwargs)


@pytest.mark.parametrize(("name", "options", "home", "share"), [
    ("layerwise", {}, "host", 1.0),
    ("adaptive", {}, "host", 0.5),
    ("chunkwise", {"chunk_size": 3}, "disk", 1.0),
])
def test_staged_on_a_thread_then_placed_equals_apply(reference, tmp_path, name, options, home,
                                                     share):
    model, tokens, mask, expected = reference
    profile = profile_model(model)
    need = offloadkit.get_strategy(name)(**options).min_device_bytes(profile)
    budget = max(need, int(profile.total_bytes * share))
    kwargs = dict(device="cpu", budget=budget, home=home, replan_every=0, **options)
    if home == "disk":
        kwargs["disk_path"] = str(tmp_path)

    with offloadkit.offloaded(model, name, **kwargs) as handle:
        with torch.no_grad():
            applied = model(tokens, mask=mask, scale=0.5)
        applied_plan = handle.plan

    staged = _stage_in_thread(model, name, **kwargs)
    try:
        assert staged.state == "staged" and staged.staged_by == "test-stager"
        stats = staged.stats()
        # packed into the home tier, nothing on the device yet
        assert stats.current_device_bytes == 0 and stats.peak_device_bytes == 0
        packed = stats.disk_bytes if home == "disk" else stats.host_pageable_bytes
        assert packed == profile.block_bytes
        assert stats.stage_seconds > 0 and stats.place_seconds == 0
        assert torch.isnan(model.blocks[0].qkv.weight).all()  # stand-ins until placed
        handle = staged.place()
        assert staged.state == "placed" and staged.handle is handle
        with torch.no_grad():
            out = model(tokens, mask=mask, scale=0.5)
        assert torch.equal(out, applied) and torch.equal(out, expected)
        assert handle.plan == applied_plan
        placed = handle.stats()
        assert placed.stage_seconds == stats.stage_seconds and placed.place_seconds > 0
        assert 0 < placed.peak_device_bytes <= budget
    finally:
        staged.discard()  # no-op once placed
        if staged.handle is not None:
            staged.handle.remove()
    with torch.no_grad():
        assert torch.equal(model(tokens, mask=mask, scale=0.5), expected)
    assert list(tmp_path.iterdir()) == []  # the disk tier's temporary file is gone


@pytest.mark.parametrize("home", ["host", "disk"])
def test_discard_restores_the_model_exactly(home, tmp_path):
    model = make_model(seed=6)
    model.blocks[1].norm1.weight.requires_grad_(False)  # requires_grad comes back as it was
    before = snapshot(model)
    params = {name: p for name, p in model.named_parameters()}
    tokens, mask = make_inputs()
    with torch.no_grad():
        expected = model(tokens, mask=mask)
    staged = offloadkit.stage(model, "layerwise", device="cpu", budget=10**9, home=home,
                              disk_path=str(tmp_path) if home == "disk" else None)
    with pytest.raises(AlreadyOffloadedError, match="discard"):
        offloadkit.apply(model.blocks[2], "layerwise", device="cpu", budget=10**9,
                         blocks=[model.blocks[2].qkv, model.blocks[2].proj])
    staged.discard()
    staged.discard()  # idempotent
    assert staged.state == "discarded" and staged.removed
    after = snapshot(model)
    assert after.keys() == before.keys()
    for key, (value, device, dtype, grad) in before.items():
        assert torch.equal(after[key][0], value), key
        assert after[key][1:] == (device, dtype, grad), key
    assert all(p is params[name] for name, p in model.named_parameters())  # same objects
    assert "forward" not in model.blocks[0].__dict__
    with torch.no_grad():
        assert torch.equal(model(tokens, mask=mask), expected)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OffloadError, match="already discarded"):
        staged.place()
    offloadkit.apply(model, "layerwise", device="cpu", budget=10**9).remove()  # not marked


def test_budget_below_minimum_fails_at_stage_before_any_packing(monkeypatch):
    model = make_model(seed=7)
    need = offloadkit.get_strategy("layerwise")().min_device_bytes(profile_model(model))

    def no_packing(*a, **k):
        raise AssertionError("a block was packed despite the budget error")

    monkeypatch.setattr(HostStore, "add", no_packing)
    monkeypatch.setattr(DiskStore, "add", no_packing)
    before = snapshot(model)
    for home in ("host", "disk"):
        with pytest.raises(BudgetError, match=f"minimum.*{need} bytes"):
            offloadkit.stage(model, "layerwise", device="cpu", budget=need - 1, home=home)
    assert all(torch.equal(snapshot(model)[k][0], v[0]) for k, v in before.items())
    monkeypatch.undo()
    offloadkit.stage(model, "layerwise", device="cpu", budget=need).discard()  # not marked


def test_auto_budget_is_read_again_at_place(monkeypatch):
    """Free memory while staging may belong to the model being replaced: "auto" is checked
    against the whole device at stage() and resolved when place() runs."""
    model = make_model(seed=8)
    tokens, mask = make_inputs()
    with torch.no_grad():
        expected = model(tokens, mask=mask)
    profile = profile_model(model)
    need = offloadkit.get_strategy("adaptive")().min_device_bytes(profile)
    staged = offloadkit.stage(model, "adaptive", device="cpu", budget="auto", replan_every=0)
    assert staged.plan.streamed == ()  # planned against the whole (host) device: all fits
    # at the switch only the minimum is free: too little first, then just enough
    total = offloadkit.probe("cpu").total_bytes
    reserve = staged.budget.reserve_bytes

    def free(nbytes):
        return lambda device: DeviceMemory("cpu", "host RAM", total, nbytes, "os")

    monkeypatch.setattr(budget_module, "probe", free(need - 1 + reserve))
    with pytest.raises(BudgetError, match="minimum"):
        staged.place()
    assert staged.state == "staged"  # nothing was placed; free memory and retry
    monkeypatch.setattr(budget_module, "probe", free(need + reserve))
    handle = staged.place()
    try:
        assert len(handle.plan.streamed) == profile.num_blocks  # re-planned for the budget
        assert handle.stats().budget_bytes == need
        with torch.no_grad():
            assert torch.equal(model(tokens, mask=mask), expected)
        assert handle.stats().peak_device_bytes <= need
    finally:
        handle.remove()


def test_strategy_with_its_own_mechanism_is_placed_at_place(reference):
    model, tokens, mask, expected = reference
    staged = offloadkit.stage(model, "cpu_only")
    assert staged.stats().strategy == "cpu_only" and staged.stats().host_pageable_bytes == 0
    with staged.place() as handle:
        with torch.no_grad():
            assert torch.equal(model(tokens, mask=mask, scale=0.5), expected)
        assert handle.stats().peak_device_bytes == 0


def test_trace_shows_packing_and_placement(reference, tmp_path):
    model, tokens, mask, _ = reference
    staged = offloadkit.stage(model, "layerwise", device="cpu", budget=10**9)
    with staged.place() as handle:
        with torch.no_grad():
            model(tokens, mask=mask)
        data = json.loads(handle.export_trace(tmp_path / "t.json").read_text())
    spans = [e for e in data["traceEvents"] if e["ph"] == "X" and e["cat"] == "stage"]
    assert [e["name"] for e in spans] == ["pack 8 blocks (host)", "place"]
    pack, place = spans
    assert pack["ts"] + pack["dur"] <= place["ts"]  # packed before placement began
    first_compute = min(e["ts"] for e in data["traceEvents"]
                        if e["ph"] == "X" and e["cat"] == "compute")
    assert place["ts"] + place["dur"] <= first_compute


def test_remove_or_discard_without_restore_frees_memory_and_copies_nothing(tmp_path,
                                                                          monkeypatch):
    """For a model dropped right after (the pipeline's expert switch): memory is given back
    and no weight is copied out of the home tier."""
    from offloadkit.engine.core import Engine

    def no_restore(self, block):
        raise AssertionError("a block was restored")

    monkeypatch.setattr(Engine, "_restore_block", no_restore)
    model = make_model(seed=9)
    tokens, mask = make_inputs()
    profile = profile_model(model)
    handle = offloadkit.apply(model, "adaptive", device="cpu", budget=profile.total_bytes // 2)
    with torch.no_grad():
        model(tokens, mask=mask)
    handle.remove(restore=False)
    stats = handle.stats()
    assert stats.current_device_bytes == 0 and stats.host_pageable_bytes == 0
    assert handle.removed and "forward" not in model.blocks[0].__dict__
    for block in model.blocks:  # stand-ins: no memory of their own, nothing stale
        assert torch.isnan(block.qkv.weight).all() and block.qkv.weight.device.type == "cpu"
        assert block.qkv.weight.untyped_storage().nbytes() == block.qkv.weight.element_size()

    other = make_model(seed=10)
    staged = offloadkit.stage(other, "layerwise", device="cpu", budget=10**9, home="disk",
                              disk_path=str(tmp_path))
    assert staged.stats().disk_bytes == profile.block_bytes
    staged.discard(restore=False)
    assert staged.state == "discarded" and staged.stats().disk_bytes == 0
    assert list(tmp_path.iterdir()) == []
    assert torch.isnan(other.blocks[3].qkv.weight).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("home", ["host", "disk"])
def test_cuda_staging_on_a_thread_uses_no_device_memory_and_pins(home):
    model = make_model(seed=12, dim=256, hidden=1024, heads=4)
    tokens, mask = make_inputs(batch=2, length=64)
    with torch.no_grad():
        expected = make_model(seed=12, dim=256, hidden=1024, heads=4).cuda()(
            tokens.cuda(), mask=mask.cuda()).cpu()
    profile = profile_model(model)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    staged = _stage_in_thread(model, "adaptive", device="cuda", budget=profile.total_bytes // 2,
                              home=home, replan_every=0)
    assert torch.cuda.memory_allocated() == before  # packing touched host memory only
    stats = staged.stats()
    if home == "host":
        assert stats.host_pinned_bytes == profile.block_bytes
    else:
        assert stats.disk_bytes == profile.block_bytes
    with staged.place() as handle:
        assert torch.cuda.memory_allocated() > before
        with torch.no_grad():
            out = model(tokens.cuda(), mask=mask.cuda()).cpu()
        assert torch.equal(out, expected)
        assert handle.stats().peak_device_bytes <= profile.total_bytes // 2
