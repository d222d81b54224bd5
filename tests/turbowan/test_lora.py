"""LoRA on the tiny DiT: each naming, int8 and bf16-style (unquantised) experts, resident and
streamed by every offloadkit strategy, against the delta applied by hand in float64."""

from __future__ import annotations

import pytest
import torch
from lora_files import (
    build,
    dense_base,
    diffusers_keys,
    golden_state,
    kohya_keys,
    make_lora,
    merged_state,
    min_budget,
    peft_keys,
    reference,
    shapes_of,
    write,
)

import offloadkit
from turbowan.lora import (
    LoraError,
    attach_lora,
    attached_loras,
    detach_lora,
    lora_nbytes,
    set_lora_strength,
)

ALIGN = 256  # offloadkit's per-tensor alignment inside a block buffer


@pytest.fixture(scope="module")
def golden():
    return golden_state()


WRITERS = {"peft": (peft_keys, False), "kohya": (kohya_keys, False),
           "diffusers": (diffusers_keys, True)}
STRATEGIES = [("layerwise", {}), ("adaptive", {}), ("chunkwise", {"chunk_size": 2})]



@pytest.mark.parametrize("quant", ["int8", "none"])
@pytest.mark.parametrize("naming", list(WRITERS))
def test_lora_matches_hand_merged_float64_resident_and_streamed(golden, tmp_path, quant, naming):
    state, args = golden
    model = build(state, quant)
    writer, is_diffusers = WRITERS[naming]
    lora = make_lora(shapes_of(build(state, "none")), blocks=3, rank=4, seed=1)
    path = write(tmp_path / f"{naming}.safetensors", writer(lora))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    match = attach_lora(model, path, strength=0.8)
    assert not match.unmatched
    expected_targets = 3 * 10 + 2 + (0 if is_diffusers else 2)  # + norm_q, norm3 deltas
    assert len(match.deltas) == expected_targets
    # the checkpoint stays exact: same keys, same int8/bf16 tensors
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)

    ref = reference(merged_state(dense_base(state, quant), lora, 0.8, diffusers=is_diffusers), args)
    with torch.no_grad():
        resident = model(*args)
    base_ref = reference({k: v.double() for k, v in dense_base(state, quant).items()}, args)
    assert (resident - ref).abs().max() < 2e-4 * ref.abs().max()
    # and the LoRA really changed the output, by much more than the tolerance
    assert (base_ref - ref).abs().max() > 100 * (resident - ref).abs().max()

    for strategy, options in STRATEGIES:
        budget = min_budget(model, strategy, options)
        with torch.no_grad(), offloadkit.offloaded(model, strategy, device="cpu", budget=budget,
                                                    **options) as handle:
            streamed = model(*args)
            stats = handle.stats()
        assert stats.streamed_blocks == 3, strategy
        assert torch.equal(streamed, resident), strategy


def test_block_bytes_grow_by_the_lora_bytes_of_that_block(golden, tmp_path):
    state, args = golden
    model = build(state, "int8")
    before = offloadkit.profile_model(model, "blocks")
    lora = make_lora(shapes_of(build(state, "none")), blocks=3, rank=8, seed=2)
    attach_lora(model, write(tmp_path / "l.safetensors", peft_keys(lora)))
    after = offloadkit.profile_model(model, "blocks")

    def aligned(tensors):
        return sum(-(-(t.numel() * t.element_size()) // ALIGN) * ALIGN for t in tensors)

    for i, block in enumerate(model.blocks):
        lora_tensors = [b for n, b in block.named_buffers() if ".lora." in f".{n}"]
        assert lora_tensors
        grew = after.blocks[i].nbytes - before.blocks[i].nbytes
        assert grew == aligned(lora_tensors) > 0
    outside = [b for n, b in model.named_buffers() if ".lora." in n and not n.startswith("blocks.")]
    assert after.non_block_bytes - before.non_block_bytes == sum(
        t.numel() * t.element_size() for t in outside) > 0
    assert lora_nbytes(model) == sum(t.numel() * t.element_size()
                                     for n, t in model.named_buffers() if ".lora." in n)


def test_strength_changes_under_offload_without_repacking(golden, tmp_path):
    state, args = golden
    model = build(state, "int8")
    with torch.no_grad():
        base = model(*args)
    lora = make_lora(shapes_of(build(state, "none")), blocks=3, rank=4, seed=3)
    attach_lora(model, write(tmp_path / "style.safetensors", kohya_keys(lora)), strength=1.0)
    with torch.no_grad():
        full = model(*args)
        set_lora_strength(model, "style", 0.5)
        half = model(*args)
        set_lora_strength(model, "style", 0.0)
        zero = model(*args)
    assert torch.equal(zero, base)  # strength 0 is the model without the LoRA, bit for bit
    set_lora_strength(model, "style", 1.0)
    budget = min_budget(model, "layerwise", {})
    with torch.no_grad(), offloadkit.offloaded(model, "layerwise", device="cpu", budget=budget) as h:
        assert torch.equal(model(*args), full)
        staged = h.stats().stage_seconds
        set_lora_strength(model, "style", 0.5)
        assert torch.equal(model(*args), half)
        set_lora_strength(model, "style", 0.0)
        assert torch.equal(model(*args), base)
        assert h.stats().stage_seconds == staged  # nothing was packed again
        with pytest.raises(LoraError, match="offloaded"):
            detach_lora(model, "style")
        with pytest.raises(LoraError, match="offloaded"):
            attach_lora(model, tmp_path / "style.safetensors", name="again")


def test_two_loras_stack_and_detach_restores_the_model_exactly(golden, tmp_path):
    state, args = golden
    model = build(state, "none")
    shapes = shapes_of(model)
    a = make_lora(shapes, blocks=3, rank=4, seed=4, extras=False)
    b = make_lora(shapes, blocks=2, rank=2, seed=5, alpha=None, extras=False)
    with torch.no_grad():
        base = model(*args)
    attach_lora(model, write(tmp_path / "a.safetensors", peft_keys(a)), strength=0.7)
    attach_lora(model, write(tmp_path / "b.safetensors", diffusers_keys(b)), strength=-0.4)
    assert attached_loras(model) == {"a": pytest.approx(0.7), "b": pytest.approx(-0.4)}
    merged = merged_state(merged_state(state, a, 0.7), b, -0.4, diffusers=True)
    ref = reference(merged, args)
    with torch.no_grad():
        out = model(*args)
    assert (out - ref).abs().max() < 2e-4 * ref.abs().max()
    detach_lora(model, "a")
    detach_lora(model, "b")
    assert not any("lora" in n for n, _ in model.named_modules())
    assert not model.blocks[0].self_attn.q._forward_hooks
    with torch.no_grad():
        assert torch.equal(model(*args), base)


def test_merge_on_unquantised_expert_equals_the_unmerged_branch(golden, tmp_path):
    state, args = golden
    lora = make_lora(shapes_of(build(state, "none")), blocks=3, rank=4, seed=6)
    path = write(tmp_path / "m.safetensors", peft_keys(lora))
    unmerged, merged = build(state, "none"), build(state, "none")
    attach_lora(unmerged, path, strength=0.6)
    attach_lora(merged, path, strength=0.6, merge=True)
    assert not any("lora" in n for n, _ in merged.named_modules())
    with torch.no_grad():
        a, b = unmerged(*args), merged(*args)
    assert (a - b).abs().max() < 2e-4 * a.abs().max()
    with pytest.raises(LoraError, match="bf16 .non-quantised"):
        attach_lora(build(state, "int8"), path, merge=True)


def test_bf16_compute_int8_expert_with_lora_is_close_to_float64(golden, tmp_path):
    state, args = golden
    model = build(state, "int8", dtype=torch.bfloat16)
    lora = make_lora(shapes_of(build(state, "none")), blocks=3, rank=4, seed=7, extras=False,
                     top=True)
    attach_lora(model, write(tmp_path / "b.safetensors", peft_keys(lora)))
    assert model.blocks[0].self_attn.q.lora["b"].down.dtype == torch.bfloat16
    # the time embedding and the head run in fp32 whatever the weights: so do their branches
    assert model.time_embedding[0].lora["b"].down.dtype == torch.float32
    assert model.head.head.lora["b"].down.dtype == torch.float32
    ref = reference(merged_state(dense_base(state, "int8"), lora, 1.0), args)
    with torch.no_grad():
        out = model(*args)
    base = reference({k: v.double() for k, v in dense_base(state, "int8").items()}, args)
    err, effect = (out - ref).abs().mean(), (base - ref).abs().mean()
    assert err < 0.1 * effect  # bf16 rounding, well below what the LoRA changes


@pytest.mark.parametrize("mode", ["fast", "reference", "triton"])
def test_branch_adds_exactly_its_delta_on_every_int8_path(mode):
    """Whatever GEMM the int8 layer runs, the LoRA adds s*alpha/r*B(A x) on top of its output."""
    from turbowan.quant.int8_linear import Int8Linear

    g = torch.Generator().manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(256, 128), mode=mode)
    wrapper = torch.nn.Module()
    wrapper.blocks = torch.nn.ModuleList([torch.nn.Module()])
    wrapper.blocks[0].q = layer
    x = torch.randn(2, 8, 256, generator=g)
    with torch.no_grad():
        base = layer(x)
    down, up = torch.randn(4, 256, generator=g), torch.randn(128, 4, generator=g)
    attach_lora(wrapper, {"blocks.0.q.lora_down.weight": down, "blocks.0.q.lora_up.weight": up,
                          "blocks.0.q.alpha": torch.tensor(2.0)}, strength=0.5, name="t")
    with torch.no_grad():
        out = layer(x)
    expected = base + 0.5 * (2.0 / 4) * (x @ down.T @ up.T)
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)
    assert not torch.equal(out, base)


def test_changing_one_experts_loras_leaves_the_other_offloaded(golden, tmp_path):
    """Adding a LoRA re-stages only the expert it touches: the other keeps its handle."""
    state, args = golden
    high, low = build(state, "int8"), build(state, "int8")
    lora = make_lora(shapes_of(build(state, "none")), blocks=3, rank=4, seed=8)
    path = write(tmp_path / "h.safetensors", peft_keys(lora))
    budget = min_budget(high, "layerwise", {})
    h_high = offloadkit.apply(high, "layerwise", device="cpu", budget=budget)
    h_low = offloadkit.apply(low, "layerwise", device="cpu", budget=budget)
    with torch.no_grad():
        low_before = low(*args)
    h_high.remove()
    attach_lora(high, path)
    h_high = offloadkit.apply(high, "layerwise", device="cpu", budget=min_budget(high, "layerwise", {}))
    assert not h_low.removed and offloadkit.is_offloaded(low)
    with torch.no_grad():
        assert torch.equal(low(*args), low_before)
        streamed = high(*args)
    h_high.remove()
    h_low.remove()
    with torch.no_grad():
        assert torch.equal(high(*args), streamed)
