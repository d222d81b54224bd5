"""offloadkit on real transformers and diffusers models (tiny configs, random weights):
every built-in strategy and the example ``manual`` plugin give the model's own output bit for
bit, stay within the budget, stream bytes where they stream, and ``remove()`` gives back
exactly the model they were given (values, Parameter objects, dtypes, strides, tied weights).

``comfy_native`` needs ComfyUI (tests/offloadkit/test_comfy_native.py)."""

from __future__ import annotations

import pytest
import torch
from third_party import MODELS, build

import offloadkit
from offloadkit import get_strategy

STRATEGIES = ["adaptive", "layerwise", "chunkwise", "cpu_only", "manual"]
CHUNK = {"chunk_size": 2}


@pytest.fixture(autouse=True)
def own_rng():
    """Models here are built from seeds; the global RNG is left as it was for later tests."""
    with torch.random.fork_rng():
        yield


def tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer slot, shared ones under each of their names."""
    return dict([*model.named_parameters(remove_duplicate=False),
                 *model.named_buffers(remove_duplicate=False)])


def snapshot(model: torch.nn.Module) -> dict:
    slots = tensors(model)
    storage = {name: t.untyped_storage().data_ptr() for name, t in slots.items()}
    return {
        "objects": {name: t for name, t in model.named_parameters(remove_duplicate=False)},
        "values": {name: (t.detach().clone(), t.dtype, t.device, t.requires_grad, t.stride(),
                          type(t)) for name, t in slots.items()},
        # which names share memory (tied embeddings): the partition, not the addresses
        "sharing": sorted(sorted(n for n in storage if storage[n] == ptr)
                          for ptr in set(storage.values())),
    }


def assert_restored(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["sharing"] == before["sharing"]
    for name, param in before["objects"].items():
        assert after["objects"][name] is param, f"{name}: Parameter object replaced"
    assert after["values"].keys() == before["values"].keys()
    for name, (value, *meta) in before["values"].items():
        got, *got_meta = after["values"][name]
        assert got_meta == meta, name
        assert torch.equal(got, value), name
    assert not any("forward" in m.__dict__ for m in model.modules()), "a forward wrapper is left"


def options_for(strategy: str, profile: offloadkit.ModelProfile) -> dict:
    if strategy == "manual":  # the last block (the smallest in Flux and the UNet)
        return {"resident": [profile.num_blocks - 1]}
    if strategy == "adaptive":  # a fixed window: the measured one depends on timing
        return {"prefetch_depth": 1}
    return CHUNK if strategy == "chunkwise" else {}


def budget_for(strategy: str, profile: offloadkit.ModelProfile, options: dict) -> int:
    """The tightest budget the strategy accepts; for adaptive, half the smallest block less
    than the whole model, so that some blocks stay resident and some stream."""
    if strategy == "adaptive":
        return profile.total_bytes - min(b.nbytes for b in profile.blocks) // 2
    return get_strategy(strategy)(**options).min_device_bytes(profile)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", list(MODELS))
def test_strategy_on_real_model(name: str, strategy: str) -> None:
    model, run = build(name)
    with torch.no_grad():
        expected = run(model)
    before = snapshot(model)
    profile = offloadkit.profile_model(model)
    options = options_for(strategy, profile)
    budget = budget_for(strategy, profile, options)
    handle = offloadkit.apply(model, strategy, device="cpu", budget=budget, **options)
    try:
        with torch.no_grad():
            outputs = [run(model), run(model)]  # the second reuses slots in steady state
        stats = handle.stats()
    finally:
        handle.remove()
    for out in outputs:
        assert torch.equal(out, expected)
    assert stats.peak_device_bytes <= stats.budget_bytes
    if strategy == "cpu_only":
        assert stats.peak_device_bytes == 0 and stats.bytes_transferred == 0
    else:
        assert stats.budget_bytes == budget and stats.streamed_blocks > 0
        assert stats.bytes_transferred > 0
    if strategy == "manual":
        assert stats.resident_blocks == 1
    if strategy == "adaptive":
        assert stats.resident_blocks > 0
    assert_restored(model, before)
    with torch.no_grad():
        assert torch.equal(run(model), expected)


@pytest.mark.parametrize("strategy", ["adaptive", "layerwise"])
def test_llama_generate_with_kv_cache(strategy: str) -> None:
    """``generate()`` runs the blocks once per new token against a growing KV cache."""
    model, _ = build("llama")
    prompt = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(5))
    settings = dict(max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    expected = model.generate(prompt, **settings)
    profile = offloadkit.profile_model(model)
    with offloadkit.offloaded(model, strategy, device="cpu",
                              budget=budget_for(strategy, profile, {})) as handle:
        got = model.generate(prompt, **settings)
        stats = handle.stats()
    assert torch.equal(got, expected)
    assert stats.forwards == 5 and stats.bytes_transferred > 0


def test_gpt2_tied_head_stays_tied_and_resident() -> None:
    model, run = build("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    with offloadkit.offloaded(model, "layerwise", device="cpu", budget=10**9):
        assert model.lm_head.weight is model.transformer.wte.weight
        assert "transformer.wte.weight" not in {
            e.ref.qualname for b in offloadkit.engine.layout_model(model, "transformer.h").blocks
            for e in b.entries}
    assert model.lm_head.weight is model.transformer.wte.weight
