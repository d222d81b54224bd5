"""The embedded demo: tiny models with deterministic random weights and a start image drawn
in code, so `turbowan generate` runs the whole pipeline with nothing downloaded.

The weights are written as small checkpoint files in the real formats (Wan2.2 DiT experts,
Wan2.1 VAE, umT5 encoder) and loaded by the same code as real checkpoints, so the demo
exercises every stage a real run does. They are random: the video is noise by design.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image, ImageDraw

DEMO_SEED = 2026  # fixed: the demo gives the same weights, image and video everywhere
DEMO_FRAMES = 17
DEMO_WIDTH = 128
DEMO_HEIGHT = 128
DEMO_PROMPT = "a red kite drifts over green hills under a low sun, the camera pans slowly right"
DEMO_VAE_PRESET = "wan2.1-vae-tiny"
DEMO_TEXT_PRESET = "umt5-tiny"
# SLA keeps floor(topk * key blocks), at least one; a 128x128 clip has only 5 key blocks of
# 64 tokens, where the real default 0.1 would keep a single block. The demo keeps half, so the
# block selection really chooses.
DEMO_SLA_TOPK = 0.5
# bf16 weights like the non-quant TurboWan files: on the CPU the int8 path dequantises every
# weight at every call, which costs more than the tiny matmuls themselves.
DEMO_DIT_QUANT = "none"

NOISE_NOTICE = (
    "This is the embedded demo: tiny models with RANDOM weights, so the video is noise by "
    "design; it shows that every stage runs. For a real video pass the checkpoints: "
    "--high TurboWan2.2-I2V-A14B-high-720P-quant.pth --low TurboWan2.2-I2V-A14B-low-720P-quant.pth "
    "--vae Wan2.1_VAE.pth --text-encoder models_t5_umt5-xxl-enc-bf16.pth --tokenizer <umt5-xxl "
    "tokenizer dir> --image start.png --prompt '...'"
)

_ROLE_SEED = {"high": 1, "low": 2, "vae": 3, "text_encoder": 4}


@dataclass(frozen=True)
class DemoFiles:
    """Paths of the demo checkpoints written to a directory."""

    high: Path
    low: Path
    vae: Path
    text_encoder: Path


def demo_dit_config():
    """The tiny DiT preset with the tiny umT5's text width (64), so the two fit together,
    and two blocks instead of three (the demo is about the pipeline, not the model)."""
    from turbowan.dit.config import get_preset
    from turbowan.text_encoder.config import preset_config

    return replace(get_preset("tiny"), text_dim=preset_config(DEMO_TEXT_PRESET).dim, num_layers=2)


def _random_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic weights for every tensor of a meta-device model, in state-dict order.

    Norm scales 1 + 0.1 N, other 1-D tensors 0.1 N, matrices N / sqrt(fan_in): outputs stay
    of order one through the tiny stacks. int8 linears (quant="int8") get a float weight
    quantised by the real block-wise rule, so their scales are valid.
    """
    from turbowan.quant.int8_linear import quantize_blockwise

    gen = torch.Generator().manual_seed(seed)
    meta = model.state_dict(keep_vars=False)
    out: dict[str, torch.Tensor] = {}
    for key, ref in meta.items():
        if key in out:
            continue
        shape, dtype = tuple(ref.shape), ref.dtype
        if key.endswith("int8_weight"):
            fan_in = shape[1]
            w = torch.randn(shape, generator=gen) / fan_in**0.5
            q, scale = quantize_blockwise(w)
            out[key] = q
            scale_key = key[: -len("int8_weight")] + "scale"
            out[scale_key] = scale.to(meta[scale_key].dtype)
            continue
        if not dtype.is_floating_point:
            out[key] = torch.zeros(shape, dtype=dtype)
            continue
        leaf = key.rsplit(".", 1)[-1]
        values = torch.randn(shape, generator=gen)
        if len(shape) <= 1 or leaf == "gamma":
            if "norm" in key or leaf == "gamma":
                values = 1.0 + 0.1 * values
            else:
                values = 0.1 * values
        elif "modulation" in key:
            values = values / shape[-1] ** 0.5
        else:
            fan_in = max(1, ref[0].numel())
            values = values / fan_in**0.5
        out[key] = values.to(dtype)
    return out


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".partial")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)
    return path


def demo_files(directory: str | os.PathLike[str]) -> DemoFiles:
    """Where the demo checkpoints go in ``directory`` (nothing is written)."""
    directory = Path(directory)
    return DemoFiles(
        high=directory / "demo_dit_high.safetensors",
        low=directory / "demo_dit_low.safetensors",
        vae=directory / "demo_vae.safetensors",
        text_encoder=directory / "demo_umt5.safetensors",
    )


def write_demo_vae(directory: str | os.PathLike[str]) -> Path:
    from turbowan.vae.meta import build_manifest_model

    Path(directory).mkdir(parents=True, exist_ok=True)
    model = build_manifest_model(DEMO_VAE_PRESET)
    return _save(_random_state(model, DEMO_SEED + _ROLE_SEED["vae"]), demo_files(directory).vae)


def write_demo_checkpoints(directory: str | os.PathLike[str]) -> DemoFiles:
    """Write the four demo checkpoints into ``directory`` (about 12 MB, well under a second)."""
    from turbowan.dit.meta import build_manifest_model as dit_manifest
    from turbowan.text_encoder.meta import build_manifest_model as te_manifest

    files = demo_files(directory)
    Path(directory).mkdir(parents=True, exist_ok=True)
    config = demo_dit_config()
    for role, path in (("high", files.high), ("low", files.low)):
        model = dit_manifest(config, quant=DEMO_DIT_QUANT, attention="sla")
        _save(_random_state(model, DEMO_SEED + _ROLE_SEED[role]), path)
    te = te_manifest(DEMO_TEXT_PRESET, naming="wan")
    _save(_random_state(te, DEMO_SEED + _ROLE_SEED["text_encoder"]), files.text_encoder)
    write_demo_vae(directory)
    return files


def demo_image(size: int = 256) -> Image.Image:
    """The built-in start image: sky, sun, two hills and a kite, drawn in code."""
    img = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(img)
    for row in range(size):  # sky gradient, deep blue to pale orange
        f = row / (size - 1)
        draw.line([(0, row), (size, row)], fill=(int(40 + 200 * f), int(90 + 110 * f), int(200 - 60 * f)))
    s = size / 256
    draw.ellipse([170 * s, 40 * s, 220 * s, 90 * s], fill=(255, 220, 120))
    draw.ellipse([-80 * s, 150 * s, 200 * s, 400 * s], fill=(60, 140, 70))
    draw.ellipse([90 * s, 170 * s, 360 * s, 420 * s], fill=(40, 110, 55))
    draw.polygon([(70 * s, 60 * s), (90 * s, 85 * s), (70 * s, 115 * s), (50 * s, 85 * s)], fill=(210, 40, 40))
    draw.line([(70 * s, 115 * s), (100 * s, 200 * s)], fill=(250, 250, 250), width=max(1, int(s)))
    return img
