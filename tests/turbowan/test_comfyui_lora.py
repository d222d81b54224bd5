"""TurboWanLoraLoader run the way ComfyUI runs nodes (stand-in ComfyUI modules from
test_comfyui_nodes): chained LoRAs reach the right expert, and bad files fail at the node."""

from __future__ import annotations

import pytest
import torch
from lora_files import diffusers_keys, kohya_keys, make_lora, peft_keys, write
from test_comfyui_nodes import (  # noqa: F401 - fixtures
    comfy,
    load_models,
    models_dir,
    reference,
    sample,
)

from turbowan.comfyui import NODE_CLASS_MAPPINGS
from turbowan.lora import LoraSpec
from turbowan.pipeline.demo import DEMO_SLA_TOPK, demo_files, demo_image
from turbowan.pipeline.i2v import I2VPipeline, RunSettings

RUN_FRAMES = 5
LORA_NODE = NODE_CLASS_MAPPINGS["TurboWanLoraLoader"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, models_dir):  # noqa: F811
    from safetensors.torch import load_file

    shapes = {k: tuple(v.shape) for k, v in load_file(str(models_dir / "demo_dit_high.safetensors")).items()}
    blocks = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks."))
    directory = tmp_path_factory.mktemp("loras")
    write(directory / "a.safetensors", peft_keys(make_lora(shapes, blocks=blocks, seed=21)))
    write(directory / "b.safetensors", kohya_keys(make_lora(shapes, blocks=blocks, seed=22)))
    write(directory / "c.safetensors", diffusers_keys(make_lora(shapes, blocks=blocks, seed=23)))
    write(directory / "sdxl.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(4, 320),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.ones(320, 4)})
    return directory


@pytest.fixture
def comfy_loras(comfy, lora_dir, monkeypatch):  # noqa: F811
    fp = comfy.modules["folder_paths"]
    models_list, models_path = fp.get_filename_list, fp.get_full_path

    def listing(folder):
        return sorted(p.name for p in lora_dir.glob("*.safetensors")) if folder == "loras" \
            else models_list(folder)

    def full(folder, name):
        if folder == "loras":
            return str(lora_dir / name) if (lora_dir / name).is_file() else None
        return models_path(folder, name)

    monkeypatch.setattr(fp, "get_filename_list", listing)
    monkeypatch.setattr(fp, "get_full_path", full)
    return comfy


def _lora(comfy, model, name, strength):  # noqa: F811
    return comfy.run_node(LORA_NODE, model=model, lora_name=name, strength_model=strength)[0]


def test_chained_loras_reach_their_expert(comfy_loras, reference, models_dir, lora_dir):  # noqa: F811
    standin = comfy_loras
    req = LORA_NODE.INPUT_TYPES()["required"]
    assert req["model"][0] == "TURBOWAN_MODEL"
    assert req["lora_name"][0] == ["a.safetensors", "b.safetensors", "c.safetensors", "sdxl.safetensors"]
    assert req["strength_model"][1]["default"] == 1.0
    context, plain = reference
    high, low, vae = load_models(standin)
    high_ab = _lora(standin, _lora(standin, high, "a.safetensors", 0.8), "b.safetensors", -0.5)
    low_c = _lora(standin, low, "c.safetensors", 1.0)
    assert [(s.name, s.strength) for s in high_ab.loras] == [("a", 0.8), ("b", -0.5)]
    assert high.loras == ()  # nodes return new models; the input is unchanged
    frames = sample(standin, high_ab, low_c, vae, context)
    # the same run through I2VPipeline with each LoRA given for its expert
    files = demo_files(models_dir)
    pipe = I2VPipeline(RunSettings(
        high=files.high, low=files.low, vae=files.vae, text_encoder=files.text_encoder,
        tokenizer="demo", device="cpu", dtype=torch.float32, sla_topk=DEMO_SLA_TOPK,
        loras=(LoraSpec(lora_dir / "a.safetensors", 0.8, "high"),
               LoraSpec(lora_dir / "b.safetensors", -0.5, "high"),
               LoraSpec(lora_dir / "c.safetensors", 1.0, "low"))))
    y = pipe.encode_image(demo_image(), RUN_FRAMES, 16, 16, "crop")
    latents = pipe.sample(y, context, steps=4, sigma_max=200.0, boundary=0.9, seed=1, ode=False)
    expected = ((pipe.decode(latents)[0].permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1)
    assert torch.equal(frames, expected)
    assert (frames - plain).abs().max() > 1e-3


def test_strength_zero_chain_is_the_plain_model(comfy_loras, reference):  # noqa: F811
    context, plain = reference
    high, low, vae = load_models(comfy_loras)
    high0 = _lora(comfy_loras, high, "a.safetensors", 0.0)
    assert torch.equal(sample(comfy_loras, high0, low, vae, context), plain)


def test_bad_lora_fails_at_the_node(comfy_loras):  # noqa: F811
    standin = comfy_loras
    high, _, _ = load_models(standin)
    with pytest.raises(ValueError, match="TurboWanLoraLoader: .*Stable Diffusion / SDXL UNet"):
        _lora(standin, high, "sdxl.safetensors", 1.0)
    with pytest.raises(ValueError, match="TurboWanLoraLoader: .*not in ComfyUI's loras/ folder"):
        _lora(standin, high, "missing.safetensors", 1.0)
    once = _lora(standin, high, "a.safetensors", 1.0)
    with pytest.raises(ValueError, match="already on this model"):
        _lora(standin, once, "a.safetensors", 0.5)
