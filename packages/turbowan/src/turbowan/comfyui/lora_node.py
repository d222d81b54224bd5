"""``TurboWanLoraLoader``: a LoRA on one TurboWan expert, chained like LoraLoaderModelOnly.

The node takes a TURBOWAN_MODEL (one expert: high or low) and returns the same expert with
one more LoRA in its list; chain several to stack them, each with its own strength. Like
the model loader it reads only the LoRA's header and checks it against the expert's (naming,
model family, rank and dims), so a wrong file fails here in a second; the tensors are read
when the sampler loads the expert, and stream with its blocks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from turbowan.comfyui import comfy_env
from turbowan.comfyui.models import TurboWanModel
from turbowan.lora import LoraError, LoraSpec

MODEL_TYPE = "TURBOWAN_MODEL"


def check_lora(model: TurboWanModel, path: Any, strength: float) -> TurboWanModel:
    """``model`` with the LoRA at ``path`` added, after a header check against the expert."""
    from turbowan.checkpoint.io import read_tensor_specs
    from turbowan.lora.check import check_loras, meta_experts
    from turbowan.pipeline import preflight

    c = preflight.new_collector()
    spec = c.check(lambda: LoraSpec(path, strength, "high"))
    if spec is not None:
        if spec.name in {s.name for s in model.loras}:
            c.add(f"the LoRA {spec.path.name} is already on this model; chain each file once")
        else:
            experts = meta_experts({"high": read_tensor_specs(model.path)})
            check_loras([spec], experts, c)
    if c.problems:
        text = "; ".join(c.problems).replace("--lora-high ", "")
        raise ValueError(f"TurboWanLoraLoader: {text}")
    return dataclasses.replace(model, loras=(*model.loras, dataclasses.replace(spec, expert="both")))


def expert_loras(high: TurboWanModel, low: TurboWanModel | None) -> list[LoraSpec]:
    """The sampler's LoRA list: each expert's chained LoRAs, for that expert only."""
    out = [dataclasses.replace(s, expert="high") for s in high.loras]
    if low is not None:
        out += [dataclasses.replace(s, expert="low") for s in low.loras]
    return out


class TurboWanLoraLoader:
    """Adds a LoRA from models/loras to a TurboWan expert (chain it like LoraLoaderModelOnly)."""

    CATEGORY = "TurboWan"
    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("model",)
    FUNCTION = "load_lora"
    DESCRIPTION = ("A Wan2.2 LoRA (ComfyUI/PEFT, kohya/musubi or diffusers naming) on one "
                   "TurboWan expert, as an unmerged branch beside its int8 or bf16 weights. "
                   "Put a high-noise LoRA after the high loader and a low-noise one after the "
                   "low loader; chain nodes to stack LoRAs.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "model": (MODEL_TYPE,),
            "lora_name": (comfy_env.file_choices("loras"), {"tooltip": "a file in models/loras"}),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0,
                                         "step": 0.01,
                                         "tooltip": "0 is the model without this LoRA"}),
        }}

    def load_lora(self, model: TurboWanModel, lora_name: str,
                  strength_model: float = 1.0) -> tuple[TurboWanModel]:
        if not isinstance(model, TurboWanModel):
            raise ValueError(f"TurboWanLoraLoader: model must come from TurboWanModelLoader, got "
                             f"{type(model).__name__}")
        try:
            path = comfy_env.full_path("loras", lora_name)
        except (ValueError, OSError, LoraError) as exc:
            raise ValueError(f"TurboWanLoraLoader: {exc}") from None
        return (check_lora(model, path, strength_model),)
