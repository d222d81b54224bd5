"""LoRA for the Turbo experts: community Wan LoRAs as unmerged low-rank branches.

Files in ComfyUI/PEFT, kohya/musubi-tuner or diffusers naming attach to int8 or bf16 experts
without touching the base weights; each block's LoRA tensors belong to that block, so
offloadkit streams them with it, and strengths change without moving anything.
"""

from turbowan.lora.attach import (
    attach_lora,
    attached_loras,
    detach_lora,
    lora_nbytes,
    match_for_model,
    merged_loras,
    set_lora_strength,
)
from turbowan.lora.branch import LoraBranch
from turbowan.lora.files import LoraSpec, load_lora_tensors, read_lora_specs
from turbowan.lora.formats import LoraError, LoraMatch

__all__ = [
    "LoraBranch",
    "LoraError",
    "LoraMatch",
    "LoraSpec",
    "attach_lora",
    "attached_loras",
    "detach_lora",
    "load_lora_tensors",
    "lora_nbytes",
    "match_for_model",
    "merged_loras",
    "read_lora_specs",
    "set_lora_strength",
]
