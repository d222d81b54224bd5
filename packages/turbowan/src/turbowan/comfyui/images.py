"""Conversions between ComfyUI IMAGE tensors and what the pipeline reads and writes.

ComfyUI IMAGE is float (B, H, W, C) in [0, 1]; the pipeline starts from a PIL image and
returns video (1, 3, F, H, W) in about [-1, 1].
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from PIL import Image


def comfy_image_to_pil(image: torch.Tensor) -> Image.Image:
    """The first image of a ComfyUI IMAGE batch as PIL RGB (uint8, rounded)."""
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"image must be a ComfyUI IMAGE tensor, got {type(image).__name__}; connect LoadImage")
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[-1] not in (1, 3, 4) or image.shape[0] < 1:
        raise ValueError(
            f"image must be a ComfyUI IMAGE (batch, height, width, channels), got shape "
            f"{tuple(image.shape)}; connect LoadImage (or any node with an IMAGE output)"
        )
    if image.shape[0] > 1:
        warnings.warn(
            f"the image input holds {image.shape[0]} images; TurboDiffusion starts from one, so "
            "only the first is used", stacklevel=2,
        )
    pixels = image[0].detach().to("cpu", torch.float32)
    if pixels.shape[-1] == 1:
        pixels = pixels.expand(-1, -1, 3)
    array = (pixels[..., :3].clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
    return Image.fromarray(np.ascontiguousarray(array), mode="RGB")


def video_to_comfy_frames(video: torch.Tensor) -> torch.Tensor:
    """Video (1, 3, F, H, W) in [-1, 1] -> ComfyUI IMAGE (F, H, W, 3) float32 in [0, 1]."""
    if video.dim() != 5 or video.shape[:2] != (1, 3):
        raise ValueError(f"expected a (1, 3, F, H, W) video, got {tuple(video.shape)}")
    frames = ((video[0].to(torch.float32) + 1.0) * 0.5).clamp(0.0, 1.0)
    return frames.permute(1, 2, 3, 0).contiguous()


def comfy_frames_to_uint8(frames: torch.Tensor) -> np.ndarray:
    """ComfyUI IMAGE (F, H, W, 3) in [0, 1] -> uint8 (F, H, W, 3) for the video writer."""
    if not isinstance(frames, torch.Tensor) or frames.dim() != 4 or frames.shape[-1] not in (3, 4):
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise ValueError(
            f"frames must be a ComfyUI IMAGE batch (frames, height, width, 3), got {shape}; "
            "connect the frames output of TurboDiffusionI2VSampler"
        )
    if frames.shape[0] == 0:
        raise ValueError("frames is empty: there is nothing to save")
    scaled = (frames[..., :3].detach().to("cpu", torch.float32).clamp(0, 1) * 255.0).round()
    return scaled.to(torch.uint8).numpy()
