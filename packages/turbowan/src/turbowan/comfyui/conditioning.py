"""ComfyUI CONDITIONING (from CLIPLoader type "wan" + CLIPTextEncode) -> DiT text states.

ComfyUI's umT5 output is (1, max(512, n), 4096) with the padding rows already zeroed; the
DiT was trained on exactly 512 rows with zeros after the end token. So: check the width
(a CLIP-L/G conditioning would otherwise crash deep in the DiT with "mat1 and mat2 shapes
cannot be multiplied"), pad with zero rows to 512, and cut prompts longer than 512 tokens
as the upstream tokenizer does.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

TEXT_LEN = 512  # rows the DiT was trained on (spec §7.4)
UMT5_XXL_WIDTH = 4096


def _first_tensor(conditioning: Any) -> torch.Tensor:
    if isinstance(conditioning, torch.Tensor):
        return conditioning
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise ValueError(
            "conditioning must be ComfyUI CONDITIONING (a list of [tensor, dict]); connect the "
            "CONDITIONING output of a CLIPTextEncode node"
        )
    if len(conditioning) > 1:
        raise ValueError(
            f"conditioning holds {len(conditioning)} entries (from Conditioning Combine/Concat?); "
            "TurboDiffusion takes one prompt: connect a single CLIPTextEncode"
        )
    entry = conditioning[0]
    tensor = entry[0] if isinstance(entry, (list, tuple)) and entry else entry
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"conditioning entry holds {type(tensor).__name__}, not a tensor")
    return tensor


def conditioning_to_context(conditioning: Any, text_dim: int, *, text_len: int = TEXT_LEN) -> torch.Tensor:
    """(1, text_len, text_dim) float32 on the CPU, zero rows after the prompt."""
    states = _first_tensor(conditioning)
    if states.dim() == 2:
        states = states.unsqueeze(0)
    if states.dim() != 3:
        raise ValueError(f"conditioning must be (1, tokens, width), got shape {tuple(states.shape)}")
    if states.shape[0] != 1:
        raise ValueError(
            f"conditioning holds a batch of {states.shape[0]} prompts; TurboDiffusion takes one "
            "prompt per run"
        )
    width = states.shape[-1]
    if width != text_dim:
        clip_hint = {768: " (768 is CLIP-L)", 1280: " (1280 is CLIP-G)", 2048: " (2048 is CLIP-L+G)",
                     4096: ""}.get(width, "")
        raise ValueError(
            f"conditioning width is {width}{clip_hint} but this DiT reads text states of width "
            f"{text_dim}: TurboWan2.2 needs the umT5-xxl text encoder (width {UMT5_XXL_WIDTH}). "
            "Load it with CLIPLoader, type 'wan', file umt5_xxl_fp8_e4m3fn_scaled.safetensors "
            "(or umt5_xxl_fp16), and feed its CLIPTextEncode output here"
        )
    states = states.detach().to("cpu", torch.float32)
    rows = states.shape[1]
    if rows > text_len:
        if states[0, text_len:].abs().amax() > 0:
            warnings.warn(
                f"the prompt encodes to {rows} tokens; the DiT was trained on {text_len}, so "
                f"rows after {text_len} are dropped (as the upstream tokenizer truncates). "
                "Shorten the prompt to keep all of it",
                stacklevel=2,
            )
        return states[:, :text_len].contiguous()
    context = torch.zeros((1, text_len, width), dtype=torch.float32)
    context[:, :rows] = states
    return context
