"""Test LoRAs for the tiny DiT, written in each community naming by the tests themselves.

The key rules are the trainers' (facts from ComfyUI's comfy/lora.py, musubi-tuner and
diffusers' Wan conversion), written out here independently of turbowan.lora, so a test
fails if turbowan's matching drifts from the real formats.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import offloadkit
from turbowan.dit.config import PRESETS, DiTConfig
from turbowan.dit.model import WanDiT
from turbowan.quant.int8_linear import dequantize_blockwise
from turbowan.quant.quantize import quantize_state_dict

GOLDEN = Path(__file__).parents[1] / "data" / "golden" / "dit_tiny_i2v.safetensors"

# the linears outside the blocks that real Wan LoRAs train (diffusion-pipe, musubi, ComfyUI)
TOP_LINEARS = ("text_embedding.2", "time_embedding.0", "time_embedding.2", "time_projection.1",
               "head.head")
LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q",
           "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
# diffusers' WanTransformer3DModel names of the same modules
DIFFUSERS = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
             "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q",
             "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
             "cross_attn.o": "attn2.to_out.0", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
             "patch_embedding": "patch_embedding",
             "text_embedding.0": "condition_embedder.text_embedder.linear_1",
             "text_embedding.2": "condition_embedder.text_embedder.linear_2",
             "time_embedding.0": "condition_embedder.time_embedder.linear_1",
             "time_embedding.2": "condition_embedder.time_embedder.linear_2",
             "time_projection.1": "condition_embedder.time_proj", "head.head": "proj_out"}


@dataclass
class TestLora:
    """Low-rank pairs (Wan module -> (down, up, alpha)) and full bias/norm deltas."""

    pairs: dict[str, tuple[torch.Tensor, torch.Tensor, float | None]] = field(default_factory=dict)
    # Wan module (or modulation table, e.g. "blocks.0.modulation") -> weight / table delta
    diff: dict[str, torch.Tensor] = field(default_factory=dict)
    diff_b: dict[str, torch.Tensor] = field(default_factory=dict)  # Wan module -> bias delta


def make_lora(shapes: dict[str, tuple[int, ...]], *, blocks: int, rank: int = 4, seed: int = 0,
              alpha: float | None = 2.0, extras: bool = True, top: bool = False) -> TestLora:
    """Random LoRA on every block linear (and, with ``extras``, a bias delta, norm deltas and
    two linears outside the blocks; with ``top``, the time embedding, time projection, head
    and text_embedding.2 linears, their bias deltas and ``.diff`` deltas on every modulation
    table). ``shapes`` is the model's state-dict key -> shape."""
    g = torch.Generator().manual_seed(seed)
    lora = TestLora()
    names = [f"blocks.{i}.{n}" for i in range(blocks) for n in LINEARS]
    if extras:
        names += ["patch_embedding", "text_embedding.0"]
    if top:
        names += list(TOP_LINEARS)
    for name in names:
        out_f, in_f = shapes[f"{name}.weight"] if f"{name}.weight" in shapes else shapes[f"{name}.int8_weight"]
        down = torch.randn(rank, in_f, generator=g) / in_f**0.5
        up = torch.randn(out_f, rank, generator=g) * 0.5
        lora.pairs[name] = (down, up, alpha)
    if extras:
        lora.diff_b["blocks.0.self_attn.q"] = 0.1 * torch.randn(shapes["blocks.0.self_attn.q.bias"][0], generator=g)
        lora.diff["blocks.1.self_attn.norm_q"] = 0.1 * torch.randn(shapes["blocks.1.self_attn.norm_q.weight"], generator=g)
        last = f"blocks.{blocks - 1}.norm3"
        lora.diff[last] = 0.1 * torch.randn(shapes[f"{last}.weight"], generator=g)
        lora.diff_b[last] = 0.1 * torch.randn(shapes[f"{last}.bias"], generator=g)
    if top:
        for name in ("time_projection.1", "head.head"):
            lora.diff_b[name] = 0.1 * torch.randn(shapes[f"{name}.bias"], generator=g)
        for name in [f"blocks.{i}.modulation" for i in range(blocks)] + ["head.modulation"]:
            lora.diff[name] = 0.1 * torch.randn(shapes[name], generator=g)
    return lora


def _wan_named(lora: TestLora, stem, down: str, up: str) -> dict[str, torch.Tensor]:
    """Wan module names through ``stem(name)``, with the naming's factor suffixes."""
    out = {}
    for name, (d, u, alpha) in lora.pairs.items():
        out[f"{stem(name)}.{down}"] = d.to(torch.bfloat16)
        out[f"{stem(name)}.{up}"] = u.to(torch.bfloat16)
        if alpha is not None:
            out[f"{stem(name)}.alpha"] = torch.tensor(alpha)
    out.update({f"{stem(n)}.diff": t for n, t in lora.diff.items()})
    out.update({f"{stem(n)}.diff_b": t for n, t in lora.diff_b.items()})
    return out


def peft_keys(lora: TestLora, prefix: str = "diffusion_model.") -> dict[str, torch.Tensor]:
    """ComfyUI / diffusion-pipe PEFT: Wan names, lora_A/lora_B, .alpha, .diff, .diff_b."""
    return _wan_named(lora, lambda n: prefix + n, "lora_A.weight", "lora_B.weight")


def kohya_keys(lora: TestLora, prefix: str = "lora_unet_") -> dict[str, torch.Tensor]:
    """kohya / musubi-tuner: dots as underscores, lora_down/lora_up, .alpha."""
    return _wan_named(lora, lambda n: prefix + n.replace(".", "_"), "lora_down.weight",
                      "lora_up.weight")


def _diffusers_name(name: str) -> str:
    if name.startswith("blocks."):
        _, index, inner = name.split(".", 2)
        return f"blocks.{index}.{DIFFUSERS[inner]}"
    return DIFFUSERS[name]


def diffusers_keys(lora: TestLora, prefix: str = "transformer.") -> dict[str, torch.Tensor]:
    """diffusers: its module names, lora_A/lora_B with alpha/rank folded into the factors
    (diffusers files carry no alpha), bias deltas as lora_B.bias. Linears only."""
    out = {}
    for name, (down, up, alpha) in lora.pairs.items():
        scale = 1.0 if alpha is None else alpha / down.shape[0]
        stem = prefix + _diffusers_name(name)
        if name == "patch_embedding":  # a Conv3d in diffusers: conv-shaped factors
            down = down.reshape(down.shape[0], -1, 1, 2, 2)
            up = up.reshape(*up.shape, 1, 1, 1)
        out[f"{stem}.lora_A.weight"] = (down * scale).to(torch.bfloat16)
        out[f"{stem}.lora_B.weight"] = up.to(torch.bfloat16)
    for name, t in lora.diff_b.items():
        if name in lora.pairs:  # a linear's bias delta; diffusers has none for norms
            out[f"{prefix}{_diffusers_name(name)}.lora_B.bias"] = t
    return out


def write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def merged_state(state: dict[str, torch.Tensor], lora: TestLora, strength: float, *,
                 diffusers: bool = False) -> dict[str, torch.Tensor]:
    """The base weights with the LoRA delta applied by hand in float64 (what the branch must
    equal). The factors go through bf16 as the files store them; ``diffusers`` folds alpha
    into the down factor before that rounding, as diffusers files do."""
    out = {k: v.double() for k, v in state.items()}
    for name, (down, up, alpha) in lora.pairs.items():
        scale = 1.0 if alpha is None else alpha / down.shape[0]
        if diffusers:
            d, factor = (down * scale).to(torch.bfloat16).double(), 1.0
        else:
            d, factor = down.to(torch.bfloat16).double(), scale
        out[f"{name}.weight"] += strength * factor * (up.to(torch.bfloat16).double() @ d)
    for name, t in lora.diff.items():
        if not diffusers:
            key = name if name in out else f"{name}.weight"  # a table is a parameter itself
            out[key] += strength * t.double()
    for name, t in lora.diff_b.items():
        if not diffusers or name in lora.pairs:
            out[f"{name}.bias"] += strength * t.double()
    return out


@functools.cache
def golden_state() -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, ...]]:
    """The tiny DiT's golden weights (fp32) and its golden inputs (x, t, context, y)."""
    g = load_file(str(GOLDEN))
    state = {k[8:]: v.float() for k, v in g.items() if k.startswith("weights.") and "proj_l" not in k}
    args = (g["inputs.x_B_C_T_H_W"], g["inputs.timesteps_B_T"], g["inputs.crossattn_emb"],
            g["inputs.y_B_C_T_H_W"])
    return state, args


def build(state: dict[str, torch.Tensor], quant: str, dtype=torch.float32,
          config: DiTConfig = PRESETS["tiny"]) -> WanDiT:
    """The tiny expert from ``state``: int8-quantised or not, weights in ``dtype``."""
    sd = quantize_state_dict(state) if quant == "int8" else dict(state)
    with torch.device("meta"):
        model = WanDiT(config, quant=quant, attention="original", dtype=dtype)
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() and "norm" not in k else v
                           for k, v in sd.items()}, assign=True)
    return model.requires_grad_(False).eval()


def dense_base(state: dict[str, torch.Tensor], quant: str) -> dict[str, torch.Tensor]:
    """The weights the model really computes with: dequantised int8 for the int8 expert."""
    if quant != "int8":
        return dict(state)
    q = quantize_state_dict(state)
    out = {}
    for k, v in state.items():
        stem = k[: -len(".weight")]
        if k.endswith(".weight") and f"{stem}.int8_weight" in q:
            out[k] = dequantize_blockwise(q[f"{stem}.int8_weight"], q[f"{stem}.scale"], torch.float64)
        else:
            out[k] = v
    return out


def reference(state64: dict[str, torch.Tensor], args) -> torch.Tensor:
    """The tiny DiT run in float64 on ``state64`` (its fp32 islands stay fp32)."""
    with torch.device("meta"):
        model = WanDiT(PRESETS["tiny"], quant="none", attention="original", dtype=torch.float64)
    model.load_state_dict({k: v.double() for k, v in state64.items()}, assign=True)
    x, t, ctx, y = args
    with torch.no_grad():
        return model(x.double(), t, ctx.double(), y.double())


def shapes_of(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def min_budget(model: torch.nn.Module, strategy: str, options: dict) -> int:
    """The smallest device budget ``strategy`` accepts for ``model``'s blocks."""
    profile = offloadkit.profile_model(model, "blocks")
    return offloadkit.get_strategy(strategy)(**options).min_device_bytes(profile)
