"""Building blocks of the Wan2.1 VAE with the module names of ``Wan2.1_VAE.pth``.

Sub-module indices (``residual.2``, ``resample.1``, ``head.0`` ...) are part of the checkpoint's
key names, so containers keep upstream's positions, parameter-free layers included.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from turbowan.vae.cache import CACHE_FRAMES, FIRST_CHUNK, CausalCache, tail_frames


class CausalConv3d(nn.Conv3d):
    """3-D convolution padded only on the past side in time, so frame t never sees t+1.

    ``past`` (cached frames of the previous chunk) replaces that many zero-padding frames.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        self.time_pad = 2 * pt
        # F.pad order: (w_left, w_right, h_top, h_bottom, t_front, t_back)
        self.space_pad = (pw, pw, ph, ph)

    def forward(self, x: torch.Tensor, past: torch.Tensor | None = None) -> torch.Tensor:
        front = self.time_pad
        if past is not None and front > 0:
            x = torch.cat([past.to(x.device, x.dtype), x], dim=2)
            front -= past.shape[2]
        if front or any(self.space_pad):
            x = F.pad(x, (*self.space_pad, front, 0))
        return super().forward(x)


def cached_conv(conv: CausalConv3d, x: torch.Tensor, cache: CausalCache | None) -> torch.Tensor:
    """Run a temporal causal conv, feeding it and refreshing its slot of the feature cache."""
    if cache is None:
        return conv(x)
    slot = cache.next_slot()
    previous = cache[slot]
    tail = tail_frames(x, previous)
    out = conv(x, previous if isinstance(previous, torch.Tensor) else None)
    cache[slot] = tail
    return out


def run_cached(layers: nn.Sequential, x: torch.Tensor, cache: CausalCache | None) -> torch.Tensor:
    """Run a Sequential, sending its causal convs through ``cached_conv`` in visit order."""
    for layer in layers:
        x = cached_conv(layer, x, cache) if isinstance(layer, CausalConv3d) else layer(x)
    return x


class RMSNorm(nn.Module):
    """L2-normalise over channels, times sqrt(C) and a learned per-channel gain (no bias)."""

    def __init__(self, channels: int, *, images: bool) -> None:
        super().__init__()
        trailing = (1, 1) if images else (1, 1, 1)
        self.scale = math.sqrt(channels)
        self.gamma = nn.Parameter(torch.ones(channels, *trailing))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    """norm-SiLU-conv3 twice plus a (1x1x1 conv when widths differ) shortcut."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim, images=False),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim, images=False),
            nn.SiLU(),
            nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        skip = self.shortcut(x)
        return run_cached(self.residual, x, cache) + skip


def _frames_to_images(x: torch.Tensor) -> torch.Tensor:
    b, c, t, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)


def _images_to_frames(x: torch.Tensor, batch: int) -> torch.Tensor:
    bt, c, h, w = x.shape
    return x.reshape(batch, bt // batch, c, h, w).permute(0, 2, 1, 3, 4)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (middle of encoder/decoder)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        batch, c = x.shape[:2]
        images = _frames_to_images(x)
        qkv = self.to_qkv(self.norm(images))
        n, _, h, w = qkv.shape
        # (n, 3C, h, w) -> three (n, 1, h*w, C) tensors: one head of width C
        q, k, v = qkv.reshape(n, 1, 3 * c, h * w).transpose(-1, -2).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())
        out = out.squeeze(1).transpose(1, 2).reshape(n, c, h, w)
        return x + _images_to_frames(self.proj(out), batch)


class Upsample2x(nn.Module):
    """Nearest-neighbour x2 in height and width (parameter-free, keeps ``resample.1`` indices)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest-exact")


class Resample(nn.Module):
    """Spatial x2 down/up sampling per frame, optionally with a causal temporal x2.

    Modes: ``down2d``, ``down3d`` (adds ``time_conv``, stride 2 in time), ``up2d``, ``up3d``
    (adds ``time_conv`` C -> 2C whose halves become two consecutive output frames).
    """

    MODES = ("down2d", "down3d", "up2d", "up3d")

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"unknown resample mode {mode!r}; expected one of {self.MODES}")
        self.mode = mode
        if mode.startswith("up"):
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            # pad right and bottom only, then a stride-2 3x3 conv
            self.resample = nn.Sequential(
                nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2)
            )
        if mode == "up3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "down3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=0)

    def _time_upsample(self, x: torch.Tensor, cache: CausalCache | None) -> torch.Tensor:
        if cache is None:
            return self._double_frames(self.time_conv(x))
        slot = cache.next_slot()
        previous = cache[slot]
        if previous is None:
            # first latent frame: no temporal upsampling, one output frame
            cache[slot] = FIRST_CHUNK
            return x
        if previous is FIRST_CHUNK:
            tail = x[:, :, -CACHE_FRAMES:].clone()
            if tail.shape[2] < CACHE_FRAMES:
                tail = torch.cat([torch.zeros_like(tail), tail], dim=2)
            out = self.time_conv(x)  # zero padding, deliberately not the first frame's features
        else:
            tail = tail_frames(x, previous)
            out = self.time_conv(x, previous)
        cache[slot] = tail
        return self._double_frames(out)

    @staticmethod
    def _double_frames(x: torch.Tensor) -> torch.Tensor:
        """(B, 2C, T, H, W) -> (B, C, 2T, H, W): channels [0:C] -> frame 2t, [C:2C] -> 2t+1."""
        b, c2, t, h, w = x.shape
        c = c2 // 2
        return x.reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)

    def _time_downsample(self, x: torch.Tensor, cache: CausalCache | None) -> torch.Tensor:
        if cache is None:
            return self.time_conv(x)
        slot = cache.next_slot()
        previous = cache[slot]
        if previous is None:
            # first (single-frame) chunk: keep the frame as context, no temporal conv
            cache[slot] = x.clone()
            return x
        cache[slot] = x[:, :, -1:].clone()
        return self.time_conv(torch.cat([previous[:, :, -1:].to(x.device), x], dim=2))

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        if self.mode == "up3d":
            x = self._time_upsample(x, cache)
        batch = x.shape[0]
        x = _images_to_frames(self.resample(_frames_to_images(x)), batch)
        if self.mode == "down3d":
            x = self._time_downsample(x, cache)
        return x
