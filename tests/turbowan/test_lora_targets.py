"""LoRA deltas on what the DiT computes outside the block linears (time embedding, time
projection, head, text embedding, modulation tables, a Conv3d-shaped patch_embedding .diff),
strength changes under torch.compile, and merged LoRAs detached exactly."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from lora_files import (
    TOP_LINEARS,
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
from lora_files import TestLora as LoraParts  # not a test class

import offloadkit
from turbowan.dit.config import PRESETS
from turbowan.dit.model import WanDiT
from turbowan.lora import (
    LoraError,
    attach_lora,
    attached_loras,
    detach_lora,
    lora_nbytes,
    merged_loras,
    read_lora_specs,
    set_lora_strength,
)

STRATEGIES = [("layerwise", {}), ("adaptive", {}), ("chunkwise", {"chunk_size": 2})]
TABLES = ("blocks.1.modulation", "head.modulation")


@pytest.fixture(scope="module")
def golden():
    return golden_state()


def only(lora: LoraParts, name: str) -> LoraParts:
    """The part of ``lora`` that changes the module or table ``name``."""
    return LoraParts({k: v for k, v in lora.pairs.items() if k == name},
                    {k: v for k, v in lora.diff.items() if k == name},
                    {k: v for k, v in lora.diff_b.items() if k == name})



def _close(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("family", [*TOP_LINEARS, *TABLES])
def test_each_family_equals_its_delta_merged_by_hand_in_float64(golden, tmp_path, family):
    """One family at a time, so a delta that is matched but not applied cannot hide behind
    the others: the output moves by the delta, and equals the float64 hand merge. (These
    modules are not quantised in an int8 expert; the full test below runs both kinds.)"""
    state, args = golden
    quant = "int8"
    full = make_lora(shapes_of(build(state, "none")), blocks=3, rank=4, seed=11, top=True)
    lora = only(full, family)
    model = build(state, quant)
    match = attach_lora(model, write(tmp_path / "f.safetensors", peft_keys(lora)), strength=0.7)
    assert list(match.deltas) == [family] and not match.unmatched
    with torch.no_grad():
        out = model(*args)
    base = dense_base(state, quant)
    ref = reference(merged_state(base, lora, 0.7), args)
    base_ref = reference(base, args)
    err = _close(out, ref)
    assert err < 2e-4
    assert _close(base_ref, ref) > 100 * err  # the delta really reached the output


def test_conv_shaped_patch_embedding_diff_is_the_linears_delta(golden, tmp_path):
    """Official Wan stores patch_embedding as a Conv3d (dim, 36, 1, 2, 2); a full ``.diff`` in
    that shape is the Linear (dim, 144) delta with the (in_ch, kt, kh, kw) flatten order."""
    state, args = golden
    g = torch.Generator().manual_seed(12)
    dim, flat = state["patch_embedding.weight"].shape
    diff = 0.05 * torch.randn(dim, flat // 4, 1, 2, 2, generator=g)
    model = build(state, "none")
    attach_lora(model, write(tmp_path / "p.safetensors",
                             {"diffusion_model.patch_embedding.diff": diff}), strength=0.9)
    with torch.no_grad():
        out = model(*args)
    ref = reference(merged_state(state, LoraParts(diff={"patch_embedding": diff.reshape(dim, flat)}),
                                 0.9), args)
    err = _close(out, ref)
    assert err < 2e-4 and _close(reference(state, args), ref) > 100 * err


# naming -> (writer, diffusers?, expert kind it is tested on)
WRITERS = {"peft": (peft_keys, False, "none"), "kohya": (kohya_keys, False, "int8"),
           "diffusers": (diffusers_keys, True, "int8")}


@pytest.mark.parametrize("naming", list(WRITERS))
def test_full_lora_applies_every_key_streamed_equals_resident(golden, tmp_path, naming):
    """A LoRA on every family in each naming: nothing reported as not applied, the hand
    merge matched, and every offloadkit strategy bit-equal to the resident run."""
    state, args = golden
    writer, is_diffusers, quant = WRITERS[naming]
    lora = make_lora(shapes_of(build(state, "none")), blocks=3, rank=4, seed=13, top=True)
    path = write(tmp_path / f"{naming}.safetensors", writer(lora))
    model = build(state, quant)
    match = attach_lora(model, path, strength=0.8)
    assert not match.unmatched and match.problems_summary() is None
    # 30 block linears, patch/text/top linears; and, except diffusers: 2 norms, 4 tables
    assert len(match.deltas) == 30 + 2 + len(TOP_LINEARS) + (0 if is_diffusers else 2 + 4)
    ref = reference(merged_state(dense_base(state, quant), lora, 0.8, diffusers=is_diffusers),
                    args)
    with torch.no_grad():
        resident = model(*args)
    assert _close(resident, ref) < 2e-4
    for strategy, options in STRATEGIES:
        budget = min_budget(model, strategy, options)
        with torch.no_grad(), offloadkit.offloaded(model, strategy, device="cpu", budget=budget,
                                                    **options):
            assert torch.equal(model(*args), resident), strategy


def test_real_naming_file_reports_nothing_unapplied_and_preflight_counts_its_bytes(golden,
                                                                                    tmp_path):
    """Keys as diffusion-pipe/ComfyUI write them for a full Wan DiT LoRA (time embedding,
    time projection, head, text embedding, ComfyUI's generic ``<param>.diff`` on modulation
    tables): all apply. The header-only (pre-flight) attach gives the same bytes."""
    state, _ = golden
    lora = make_lora(shapes_of(build(state, "none")), blocks=3, rank=4, seed=14, top=True)
    keys = peft_keys(lora)
    for stem in ("time_embedding.0", "time_embedding.2", "time_projection.1", "head.head",
                 "text_embedding.2"):
        assert f"diffusion_model.{stem}.lora_A.weight" in keys
    assert "diffusion_model.blocks.0.modulation.diff" in keys
    assert "diffusion_model.head.modulation.diff" in keys
    path = write(tmp_path / "full.safetensors", keys)
    model = build(state, "int8")
    match = attach_lora(model, path)
    assert match.unmatched == [] and match.problems_summary() is None
    assert sum(len(d.keys) for d in match.deltas.values()) == len(keys)
    with torch.device("meta"):
        meta = WanDiT(PRESETS["tiny"], quant="int8", attention="original")
    attach_lora(meta, read_lora_specs(path), name="full")
    assert lora_nbytes(meta) == lora_nbytes(model) > 0
    # the tables' deltas belong to their block: streamed with it, counted in its bytes
    table = model.blocks[0].modulation_deltas["full"].diff
    assert table.shape == model.blocks[0].modulation.shape and table.dtype == torch.float32


def test_keys_of_modules_wan22_lacks_stay_reported(golden):
    """Wan2.1 I2V's CLIP image branch (img_emb, k_img/v_img) does not exist in Wan2.2 A14B:
    those keys are reported, by name and reason, and the rest applies."""
    state, _ = golden
    model = build(state, "none")
    dim = state["blocks.0.self_attn.q.weight"].shape[1]
    tensors = {"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(2, dim),
               "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(dim, 2),
               "diffusion_model.img_emb.proj.1.lora_A.weight": torch.zeros(2, 1280),
               "diffusion_model.img_emb.proj.1.lora_B.weight": torch.zeros(dim, 2),
               "diffusion_model.blocks.0.cross_attn.k_img.lora_A.weight": torch.zeros(2, dim),
               "diffusion_model.blocks.0.cross_attn.k_img.lora_B.weight": torch.zeros(dim, 2)}
    match = attach_lora(model, tensors)
    assert list(match.deltas) == ["blocks.0.self_attn.q"]
    summary = match.problems_summary()
    assert "4 key(s)" in summary and "CLIP image" in summary and "img_emb.proj.1" in summary


def test_table_strength_zero_is_the_base_and_detach_restores_it(golden, tmp_path):
    state, args = golden
    model = build(state, "none", dtype=torch.bfloat16)
    with torch.no_grad():
        base = model(*args)
    lora = make_lora(shapes_of(build(state, "none")), blocks=3, rank=4, seed=15, top=True)
    attach_lora(model, write(tmp_path / "t.safetensors", peft_keys(lora)))
    with torch.no_grad():
        full = model(*args)
        set_lora_strength(model, "t", 0.0)
        assert torch.equal(model(*args), base)
    assert not torch.equal(full, base)
    detach_lora(model, "t")
    assert not any("lora" in n or "deltas" in n for n, _ in model.named_modules())
    with torch.no_grad():
        assert torch.equal(model(*args), base)


def test_low_rank_pair_on_a_table_is_refused(golden):
    state, _ = golden
    model = build(state, "none")
    with pytest.raises(LoraError, match="modulation table, not a linear"):
        attach_lora(model, {"blocks.0.modulation.lora_A.weight": torch.zeros(2, 6),
                            "blocks.0.modulation.lora_B.weight": torch.zeros(6, 2)})


def test_strength_follows_under_torch_compile_without_a_recompile_per_value(golden, tmp_path):
    """The strength is a Python float the compiled graph reads as a symbolic input: after one
    recompile (the first change makes it dynamic) and one for 0 (no branch at all), new
    values run the same graph, and the output follows them."""
    state, args = golden
    one_block = {k: v for k, v in state.items() if not k.startswith(("blocks.1.", "blocks.2."))}
    model = build(one_block, "none", config=dataclasses.replace(PRESETS["tiny"], num_layers=1))
    lora = make_lora(shapes_of(model), blocks=1, rank=2, seed=16, extras=False, top=True)
    attach_lora(model, peft_keys(lora), name="s")
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counting_backend)
    counts = {}
    try:
        for strength in (1.0, 0.5, 0.25, -0.3, 2.0, 0.0, 0.7):
            set_lora_strength(model, "s", strength)
            with torch.no_grad():
                out, eager = compiled(*args), model(*args)
            assert torch.equal(out, eager), strength
            counts[strength] = len(graphs)
    finally:
        torch._dynamo.reset()
    assert counts[1.0] == 1  # one graph, no graph breaks
    assert counts[0.5] <= 2 and counts[2.0] == counts[0.5]  # no recompile for new values
    assert counts[0.7] == counts[0.0] <= counts[2.0] + 1


def test_merged_lora_detaches_exactly_even_in_bf16(golden, tmp_path):
    """bf16 (w + d) - d is not w; detach puts back the tensors the merge replaced, so the
    model is bit for bit the one before, and a second merged LoRA survives as if merged alone."""
    state, args = golden
    shapes = shapes_of(build(state, "none"))
    a = write(tmp_path / "a.safetensors",
              peft_keys(make_lora(shapes, blocks=3, rank=4, seed=17, top=True)))
    b = write(tmp_path / "b.safetensors",
              kohya_keys(make_lora(shapes, blocks=2, rank=2, seed=18, top=True)))
    model = build(state, "none", dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = model(*args)
    attach_lora(model, a, merge=True, strength=0.8)
    attach_lora(model, b, merge=True, strength=-0.5)
    assert merged_loras(model) == {"a": 0.8, "b": -0.5} and attached_loras(model) == {}
    with pytest.raises(LoraError, match="merged into the weights"):
        set_lora_strength(model, "a", 0.3)
    only_b = build(state, "none", dtype=torch.bfloat16)
    attach_lora(only_b, b, merge=True, strength=-0.5)
    detach_lora(model, "a")
    assert merged_loras(model) == {"b": -0.5}
    now, want = model.state_dict(), only_b.state_dict()
    assert all(torch.equal(now[k], want[k]) for k in want)
    detach_lora(model, "b")
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model(*args), base)
    with pytest.raises(LoraError, match="no LoRA named 'a'"):
        detach_lora(model, "a")


def test_merge_of_every_family_equals_the_unmerged_branches(golden, tmp_path):
    state, args = golden
    lora = make_lora(shapes_of(build(state, "none")), blocks=3, rank=4, seed=19, top=True)
    path = write(tmp_path / "m.safetensors", peft_keys(lora))
    unmerged, merged = build(state, "none"), build(state, "none")
    attach_lora(unmerged, path, strength=0.6)
    attach_lora(merged, path, strength=0.6, merge=True)
    with torch.no_grad():
        a, b = unmerged(*args), merged(*args)
    assert _close(b, a) < 2e-4
    assert _close(b, reference(merged_state(state, lora, 0.6), args)) < 2e-4
