"""I2V conditioning: the start image at the target size, the clip to encode, the mask, y.

Resize modes:
- ``"crop"`` (default): centre-crop the image to the target aspect ratio, then resize. Nothing
  is distorted; the edges that do not fit are cut off. This is what the ComfyUI node pack does.
- ``"stretch"``: resize straight to the target size, as the upstream script does; an image
  whose aspect differs from the target is distorted.
Both use the same antialiased bilinear filter, so when the aspects already match they give
the same pixels. We default to crop because a distorted start image distorts the whole clip.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

RESIZE_MODES = ("crop", "stretch")
DEFAULT_RESIZE = "crop"

ImageInput = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor


def check_resize_mode(mode: str) -> str:
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; choose 'crop' (default, no distortion) or 'stretch'")
    return mode


def open_image(image: ImageInput) -> Image.Image:
    """A PIL RGB image from a path, PIL image, uint8 HxWx3 array or (3,H,W) tensor in [-1,1].

    A file's (or PIL image's) EXIF orientation is applied, so a phone photo stored sideways
    with an orientation tag is used upright, as every image viewer shows it."""
    if isinstance(image, Image.Image):
        return _upright(image).convert("RGB")
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"an image tensor must be (3, H, W) in [-1, 1], got {tuple(image.shape)}")
        array = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return Image.fromarray(array.permute(1, 2, 0).cpu().numpy())
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(f"an image array must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
        return Image.fromarray(image[:, :, :3])
    path = Path(image)
    if not path.is_file():
        raise ValueError(f"start image {str(path)!r} not found; pass an existing image file with --image")
    try:
        with Image.open(path) as img:
            img.load()
            return _upright(img).convert("RGB")
    except Exception as exc:  # PIL raises several types for unreadable files
        raise ValueError(
            f"start image {str(path)!r} cannot be read as an image ({exc}); use a PNG, JPEG or WebP file"
        ) from exc


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag (a no-op without one)."""
    from PIL import ImageOps

    return ImageOps.exif_transpose(image) or image


def resize_image(image: Image.Image, width: int, height: int, mode: str = DEFAULT_RESIZE) -> Image.Image:
    """The start image at exactly (width, height), cropped or stretched (see module doc)."""
    check_resize_mode(mode)
    if mode == "crop":
        src_w, src_h = image.size
        target_aspect = width / height
        if src_w / src_h > target_aspect:  # too wide: keep the full height
            crop_w, crop_h = round(src_h * target_aspect), src_h
        else:
            crop_w, crop_h = src_w, round(src_w / target_aspect)
        if (crop_w, crop_h) != (src_w, src_h):
            left, top = (src_w - crop_w) // 2, (src_h - crop_h) // 2
            image = image.crop((left, top, left + crop_w, top + crop_h))
    if image.size == (width, height):
        return image
    return image.resize((width, height), resample=Image.Resampling.BILINEAR, reducing_gap=None)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float32 in [-1, 1] ((x/255 - 0.5) / 0.5)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return (torch.from_numpy(array).permute(2, 0, 1).contiguous() - 0.5) / 0.5


def build_clip(image: torch.Tensor, frames: int) -> torch.Tensor:
    """(1, 3, F, H, W): the image as frame 0, then F-1 mid-grey (zero) frames.

    The VAE encodes this whole clip; its later latent frames are not zero, because the
    causal encoder carries the image into them.
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image, got {tuple(image.shape)}")
    clip = torch.zeros((1, 3, frames, *image.shape[1:]), dtype=image.dtype, device=image.device)
    clip[:, :, 0] = image
    return clip


def i2v_mask(latent_frames: int, latent_height: int, latent_width: int, *, batch: int = 1,
             dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, 4, T, H, W): ones on all four channels of latent frame 0, zeros elsewhere."""
    mask = torch.zeros((batch, 4, latent_frames, latent_height, latent_width), dtype=dtype, device=device)
    mask[:, :, 0] = 1
    return mask


def build_y(image_latents: torch.Tensor) -> torch.Tensor:
    """y = [mask 4 | image latents 16] along channels, (B, 20, T, H, W)."""
    if image_latents.dim() != 5 or image_latents.shape[1] != 16:
        raise ValueError(f"image latents must be (B, 16, T, H, W), got {tuple(image_latents.shape)}")
    b, _, t, h, w = image_latents.shape
    mask = i2v_mask(t, h, w, batch=b, dtype=image_latents.dtype, device=image_latents.device)
    return torch.cat([mask, image_latents], dim=1)
