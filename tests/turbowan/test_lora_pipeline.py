"""LoRAs through the pipeline and `turbowan generate`: which expert gets which LoRA, strength
changes, and bad files refused by pre-flight from their headers, before any weight is read."""

from __future__ import annotations

import warnings

import pytest
import torch
from lora_files import kohya_keys, make_lora, peft_keys, write

from turbowan.cli.main import main
from turbowan.lora import LoraError, LoraSpec, attach_lora, load_lora_tensors, match_for_model
from turbowan.pipeline import demo as demo_mod
from turbowan.pipeline.i2v import I2VPipeline
from turbowan.pipeline.preflight import PreflightError

TINY = dict(frames=5, width=16, height=16, seed=3, decode=False)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def demo_expert_meta() -> torch.nn.Module:
    from turbowan.dit.model import WanDiT

    with torch.device("meta"):
        return WanDiT(demo_mod.demo_dit_config(), quant=demo_mod.DEMO_DIT_QUANT)


@pytest.fixture(scope="module")
def demo_shapes():
    return {k: tuple(v.shape) for k, v in demo_expert_meta().state_dict().items()}


@pytest.fixture(scope="module")
def lora_path(tmp_path_factory, demo_shapes):
    blocks = demo_mod.demo_dit_config().num_layers
    lora = make_lora(demo_shapes, blocks=blocks, rank=4, seed=11, alpha=8.0)
    return write(tmp_path_factory.mktemp("loras") / "style.safetensors", peft_keys(lora))


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("demo")


def test_lora_goes_to_the_expert_it_is_given_for_and_strength_zero_is_exact(demo_dir, lora_path):
    plain = I2VPipeline.demo(directory=demo_dir).generate(steps=2, **TINY).latents
    pipe = I2VPipeline.demo(directory=demo_dir, loras=[(lora_path, 0.0, "high")])
    assert torch.equal(pipe.generate(steps=2, **TINY).latents, plain)  # strength 0: no LoRA
    pipe.set_lora_strength("style", 1.5)
    styled = pipe.generate(steps=2, **TINY).latents
    assert (styled - plain).abs().max() > 1e-3
    # 2 steps never reach the low expert, so a low-only LoRA changes nothing
    low_only = I2VPipeline.demo(directory=demo_dir, loras=[LoraSpec(lora_path, 1.5, "low")])
    assert torch.equal(low_only.generate(steps=2, **TINY).latents, plain)
    with pytest.raises(LoraError, match="no LoRA named 'nope'"):
        pipe.set_lora_strength("nope", 1.0)


def test_cli_lora_flags_run_and_record_the_loras(tmp_path, lora_path, capsys):
    out = tmp_path / "v.mp4"
    assert main(["generate", "-o", str(out), "--frames", "5", "--width", "16", "--height", "16",
                 "--steps", "2", "--lora", f"{lora_path}:0.5", "--save-latents"]) == 0
    from turbowan.pipeline.latents_io import latents_path_for, load_latents

    _, settings = load_latents(latents_path_for(out))
    assert settings["loras"] == [f"{lora_path}:0.5 (both)"]


def test_lora_spec_parsing():
    assert LoraSpec.parse("a/b.safetensors:0.7") == LoraSpec("a/b.safetensors", 0.7)
    assert LoraSpec.parse("C:/loras/x.safetensors").strength == 1.0  # a drive letter is no strength
    assert LoraSpec.parse("x.safetensors:-1", "low").expert == "low"
    with pytest.raises(LoraError, match="finite"):
        LoraSpec("x.safetensors", float("nan"))


def _headers_only(monkeypatch):
    """Fail the test if pre-flight reads any LoRA tensor or writes/loads any weight."""
    import turbowan.lora.attach
    import turbowan.pipeline.demo

    def forbidden(*a, **k):
        raise AssertionError("weights read before the inputs were checked")

    monkeypatch.setattr(turbowan.lora.attach, "load_lora_tensors", forbidden)
    monkeypatch.setattr(turbowan.pipeline.demo, "write_demo_checkpoints", forbidden)


def _refused(monkeypatch, tmp_path, loras) -> str:
    _headers_only(monkeypatch)
    with pytest.raises(PreflightError) as info:
        I2VPipeline.demo(directory=tmp_path / "demo", loras=loras)
    return str(info.value)


def test_missing_and_unsafe_files_are_refused(monkeypatch, tmp_path):
    text = _refused(monkeypatch, tmp_path, ["nowhere.safetensors:0.5"])
    assert "--lora" in text and "does not exist" in text
    (tmp_path / "x.txt").write_text("hi")
    assert "unknown file type" in _refused(monkeypatch, tmp_path, [tmp_path / "x.txt"])
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "obj": LoraSpec("p")}, evil)  # needs code to unpickle
    assert "weights-only" in _refused(monkeypatch, tmp_path, [evil])


def test_wan21_14b_t2v_lora_has_the_wrong_dims(monkeypatch, tmp_path):
    # Wan2.1 14B: width 5120, FFN 13824 (written for two blocks at rank 1, bf16)
    g = torch.Generator().manual_seed(0)
    keys = {}
    for i in range(2):
        for name, (out_f, in_f) in (("self_attn.q", (5120, 5120)), ("ffn.0", (13824, 5120))):
            keys[f"diffusion_model.blocks.{i}.{name}.lora_down.weight"] = torch.randn(1, in_f, generator=g).bfloat16()
            keys[f"diffusion_model.blocks.{i}.{name}.lora_up.weight"] = torch.randn(out_f, 1, generator=g).bfloat16()
    path = write(tmp_path / "wan21_t2v_14b.safetensors", keys)
    text = _refused(monkeypatch, tmp_path, [LoraSpec(path, 1.0, "high")])
    assert "--lora-high" in text and "wrong dims" in text and "Wan 14B" in text


def test_other_families_and_adapter_kinds_are_named(monkeypatch, tmp_path, demo_shapes):
    sdxl = write(tmp_path / "sdxl.safetensors", {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.ones(4, 640),
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.ones(640, 4)})
    text = _refused(monkeypatch, tmp_path, [sdxl])
    assert "Stable Diffusion / SDXL UNet" in text and "none of its 2 keys" in text
    loha = write(tmp_path / "loha.safetensors", {
        "lora_unet_blocks_0_self_attn_q.hada_w1_a": torch.ones(256, 4),
        "lora_unet_blocks_0_self_attn_q.hada_w1_b": torch.ones(4, 256)})
    assert "LoHa" in _refused(monkeypatch, tmp_path, [loha])
    lokr = write(tmp_path / "lokr.safetensors", {"diffusion_model.blocks.0.ffn.0.lokr_w1": torch.ones(4, 4)})
    assert "LoKr" in _refused(monkeypatch, tmp_path, [lokr])
    dim = demo_shapes["blocks.0.self_attn.q.weight"][1]
    bad_rank = write(tmp_path / "rank.safetensors", {
        "diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.ones(4, dim),
        "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.ones(dim, 8)})
    assert "wrong rank shapes" in _refused(monkeypatch, tmp_path, [bad_rank])


def test_all_problems_are_reported_together(monkeypatch, tmp_path):
    text = _refused(monkeypatch, tmp_path, ["a.safetensors", LoraSpec("b.safetensors", 1, "low")])
    assert "2 problems" in text and "--lora-low" in text


def test_mismatched_keys_are_counted_and_a_pt_lora_loads_weights_only(tmp_path, demo_shapes):
    lora = make_lora(demo_shapes, blocks=2, rank=2, seed=12, extras=False)
    keys = kohya_keys(lora)
    for i in (7, 8, 9):  # blocks this expert does not have
        keys[f"lora_unet_blocks_{i}_self_attn_q.lora_down.weight"] = torch.ones(2, 8)
        keys[f"lora_unet_blocks_{i}_self_attn_q.lora_up.weight"] = torch.ones(8, 2)
    keys["lora_unet_blocks_0_cross_attn_k_img.lora_down.weight"] = torch.ones(2, 8)
    path = tmp_path / "mixed.pt"
    torch.save(keys, path)
    model = demo_expert_meta().to_empty(device="cpu")
    match = match_for_model(model, path)
    assert len(match.deltas) == 2 * 10 and len(match.unmatched) == 7
    summary = match.problems_summary(limit=3)
    assert summary.startswith("7 key(s) match no module") and "and 4 more" in summary
    assert "CLIP image cross-attention of Wan2.1" in summary
    assert match.naming == "kohya/musubi-tuner"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attach_lora(model, path)  # attach itself only reports; the pipeline warns


def test_budget_check_counts_the_lora_bytes(monkeypatch, tmp_path, demo_shapes):
    """A budget that holds every model but not the expert plus its LoRA is refused up front."""
    import offloadkit
    from turbowan.pipeline.budget_fit import demo_placed_models

    blocks = demo_mod.demo_dit_config().num_layers
    path = write(tmp_path / "big.safetensors",
                 peft_keys(make_lora(demo_shapes, blocks=blocks, rank=64, extras=False)))
    layerwise = offloadkit.get_strategy("layerwise")()
    models = demo_placed_models(dtype=torch.float32, attention="sla", sla_topk=0.5, home="host")
    need = {role: layerwise.min_device_bytes(offloadkit.profile_model(m.model, m.blocks))
            for role, m in models.items()}
    expert = models["high"].model
    attach_lora(expert, load_lora_tensors(path), name="big")
    with_lora = layerwise.min_device_bytes(offloadkit.profile_model(expert, "blocks"))
    budget = max(need.values())
    assert with_lora > budget  # the LoRA makes the expert the one that does not fit
    I2VPipeline.demo(directory=tmp_path / "ok", strategy="layerwise", budget=budget)
    _headers_only(monkeypatch)
    with pytest.raises(PreflightError, match="high-noise expert") as info:
        I2VPipeline.demo(directory=tmp_path / "no", strategy="layerwise", budget=budget,
                         loras=[path])
    assert "below the minimum" in str(info.value)
