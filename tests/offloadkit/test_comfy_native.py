"""comfy_native against the ComfyUI stand-in (tests/comfy_standin.py, mirroring
comfy.model_management's load_models_gpu / free_memory / LoadedModel of ComfyUI v0.33):
ComfyUI makes room, its grant becomes the budget, the rest streams, ComfyUI can shrink or
unload the model, and its loaded-model list is clean afterwards."""

from __future__ import annotations

import sys

import pytest
import torch
from comfy_standin import ComfyUI, load_other_model
from models import make_inputs, make_model, run_on_thread

import offloadkit
from offloadkit.errors import OffloadError


@pytest.fixture(autouse=True)
def inference_mode():
    """offloadkit is inference-only; ComfyUI runs every node inside inference mode."""
    with torch.inference_mode():
        yield


def sizes(model) -> tuple[int, int, int]:
    """(total, non-block, one block) bytes, as the strategy's profile counts them."""
    profile = offloadkit.profile_model(model, device="cpu")
    return profile.total_bytes, profile.non_block_bytes, profile.max_block_bytes


def entries(comfy: ComfyUI) -> list:
    return [m.model for m in comfy.current_loaded_models]


@pytest.fixture
def comfy_for(monkeypatch):
    def make(**kwargs) -> ComfyUI:
        comfy = ComfyUI(**kwargs).install(monkeypatch)
        return comfy
    return make


def test_outside_comfyui_it_says_it_needs_comfyui(monkeypatch):
    monkeypatch.setitem(sys.modules, "comfy", None)
    monkeypatch.setitem(sys.modules, "comfy.model_management", None)
    model = make_model()
    with pytest.raises(OffloadError, match=r"needs ComfyUI.*strategy='adaptive'"):
        offloadkit.apply(model, "comfy_native", device="cpu", budget="1GiB")
    tokens, mask = make_inputs()
    assert torch.isfinite(model(tokens, mask=mask)).all()  # left as it was


def test_comfyui_makes_room_and_its_grant_is_the_budget(comfy_for):
    model = make_model()
    tokens, mask = make_inputs()
    expected = model(tokens, mask=mask)
    total, non_block, block = sizes(model)
    reserve = block // 4
    vram = total // 2 + reserve  # ComfyUI can give half the model once the encoder is gone
    comfy = comfy_for(mode="normal", vram_bytes=vram, reserve_bytes=reserve)
    encoder = load_other_model(comfy, vram - reserve)  # the text encoder holds the device
    assert encoder.loaded_size() == vram - reserve

    handle = offloadkit.apply(model, "comfy_native", device="cpu", budget="1GiB",
                              activation_reserve=reserve)
    (patcher,) = entries(comfy)  # ComfyUI unloaded the encoder (free_memory) and lists ours
    assert encoder.loaded_size() == 0
    stats = handle.stats()
    grant = vram - reserve  # load_models_gpu's lowvram_model_memory: free less the reserve
    assert stats.budget_bytes == grant
    assert 0 < stats.resident_blocks < len(model.blocks)  # half resident, the rest streamed
    assert patcher.loaded_size() == stats.current_device_bytes <= grant
    assert torch.equal(model(tokens, mask=mask), expected)
    assert handle.stats().peak_device_bytes <= grant
    handle.remove()
    assert entries(comfy) == [] and comfy.mm.get_free_memory() == vram
    assert torch.equal(model(tokens, mask=mask), expected)


def test_stage_packs_on_the_staging_thread_and_comfyui_places_it_later(comfy_for):
    """What turbowan's switch to the low expert relies on: stage() on a background thread
    does the packing (before ComfyUI is asked for anything), place() only takes the grant."""
    model = make_model()
    tokens, mask = make_inputs()
    expected = model(tokens, mask=mask)
    total, _, block = sizes(model)
    reserve = block // 4
    comfy = comfy_for(mode="normal", vram_bytes=total + 2 * reserve, reserve_bytes=reserve)
    block_bytes = offloadkit.profile_model(model).block_bytes
    staged = run_on_thread(offloadkit.stage, model, "comfy_native", device="cpu",
                           budget="1GiB", activation_reserve=reserve)
    stats = staged.stats()
    assert staged.staged_by == "test-stager"
    assert stats.host_pageable_bytes == block_bytes  # packed
    assert entries(comfy) == [] and stats.current_device_bytes == 0  # ComfyUI not asked yet
    handle = staged.place()
    assert len(entries(comfy)) == 1 and handle.stats().current_device_bytes > 0
    assert handle.stats().stage_seconds == stats.stage_seconds  # no second packing
    assert torch.equal(model(tokens, mask=mask), expected)
    handle.remove()
    assert entries(comfy) == []


def test_handle_state_dict_reads_the_real_weights(comfy_for):
    """handle.state_dict() under comfy_native: the weights, not the stand-ins (it raised
    AttributeError after the shim's rewrite)."""
    model = make_model()
    want = {k: v.clone() for k, v in model.state_dict().items()}
    total, _, block = sizes(model)
    comfy_for(mode="normal", vram_bytes=total // 2, reserve_bytes=block // 4)
    handle = offloadkit.apply(model, "comfy_native", device="cpu", budget="1GiB",
                              activation_reserve=block // 4)
    got = handle.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    handle.remove()


def test_outside_comfyui_stage_refuses_before_packing(monkeypatch):
    monkeypatch.setitem(sys.modules, "comfy", None)
    monkeypatch.setitem(sys.modules, "comfy.model_management", None)
    model = make_model()
    ptr = model.blocks[0].qkv.weight.data_ptr()
    with pytest.raises(OffloadError, match="needs ComfyUI"):
        offloadkit.stage(model, "comfy_native", device="cpu", budget="1GiB")
    assert model.blocks[0].qkv.weight.data_ptr() == ptr  # never packed, never touched


def placed_with_room_for_all(comfy_for):
    """The test model placed by comfy_native in a stand-in whose device holds all of it."""
    model = make_model()
    tokens, mask = make_inputs()
    expected = model(tokens, mask=mask)
    total, non_block, block = sizes(model)
    reserve = block // 4
    comfy = comfy_for(mode="normal", vram_bytes=total + 2 * reserve, reserve_bytes=reserve)
    handle = offloadkit.apply(model, "comfy_native", device="cpu", budget="1GiB",
                              activation_reserve=reserve)
    return comfy, model, handle, (tokens, mask, expected), (total, non_block, block), reserve


def test_comfyui_shrinks_it_when_another_model_needs_the_device(comfy_for):
    comfy, model, handle, (tokens, mask, expected), (total, non_block, block), reserve = \
        placed_with_room_for_all(comfy_for)
    assert handle.stats().resident_blocks == len(model.blocks)  # everything fit
    before = handle.stats().current_device_bytes

    want = 3 * block  # another model needs three blocks' worth: ComfyUI calls partially_unload
    other = load_other_model(comfy, want)
    assert other.loaded_size() == want
    after = handle.stats()
    assert before - after.current_device_bytes >= want - reserve
    assert after.resident_blocks < len(model.blocks) and after.streamed_blocks > 0
    assert len(entries(comfy)) == 2  # shrunk, not dropped
    assert torch.equal(model(tokens, mask=mask), expected)  # streams what it gave back
    handle.remove()
    assert entries(comfy) == [other]


def test_a_full_unload_keeps_the_minimum_and_reregisters_before_the_next_forward(comfy_for):
    comfy, model, handle, (tokens, mask, expected), (total, non_block, block), reserve = \
        placed_with_room_for_all(comfy_for)
    comfy.mm.unload_all_models()  # the "Unload models" button: free_memory(1e30, device)
    assert entries(comfy) == []
    assert handle.stats().current_device_bytes == non_block + block
    assert torch.equal(model(tokens, mask=mask), expected)
    assert len(entries(comfy)) == 1 and handle.stats().resident_blocks == len(model.blocks)
    handle.remove()
    assert entries(comfy) == []


@pytest.mark.parametrize("mode", ["cpu", "highvram", "novram", "lowvram"])
def test_every_comfyui_vram_mode(comfy_for, mode):
    """--cpu / --highvram: ComfyUI grants everything; --novram: 0.1 byte, so the minimum
    (everything streams); --lowvram: free memory less the reserve."""
    model = make_model()
    tokens, mask = make_inputs()
    expected = model(tokens, mask=mask)
    total, non_block, block = sizes(model)
    reserve = block // 4
    vram = non_block + 3 * block + reserve
    comfy = comfy_for(mode=mode, vram_bytes=vram, reserve_bytes=reserve)
    handle = offloadkit.apply(model, "comfy_native", device="cpu", budget="1GiB",
                              activation_reserve=reserve)
    stats = handle.stats()
    resident = {"cpu": len(model.blocks), "highvram": len(model.blocks), "novram": 0,
                "lowvram": 1}[mode]  # lowvram: 3 blocks of room less two slots (prefetch 1)
    assert stats.resident_blocks == resident
    if mode == "novram":
        assert stats.budget_bytes == non_block + block
    if mode == "lowvram":
        assert stats.budget_bytes == vram - reserve
    assert torch.equal(model(tokens, mask=mask), expected)
    handle.remove()
    assert entries(comfy) == []


def test_an_explicit_budget_caps_the_grant(comfy_for):
    model = make_model()
    total, non_block, block = sizes(model)
    comfy_for(mode="highvram", vram_bytes=10 * total)
    cap = non_block + 4 * block
    with offloadkit.offloaded(model, "comfy_native", device="cpu", budget=cap) as handle:
        assert handle.stats().budget_bytes == cap
        assert handle.stats().peak_device_bytes <= cap


def test_budget_below_the_minimum_is_refused_before_comfyui_is_asked(comfy_for):
    comfy = comfy_for(mode="normal")
    model = make_model()
    total, non_block, block = sizes(model)
    with pytest.raises(offloadkit.BudgetError, match="comfy_native"):
        offloadkit.apply(model, "comfy_native", device="cpu", budget=non_block)
    assert comfy.load_calls == [] and entries(comfy) == []
