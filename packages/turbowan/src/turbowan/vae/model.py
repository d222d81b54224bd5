"""The Wan2.1 causal video VAE: encoder, decoder and the public encode/decode interface.

Attribute names mirror ``Wan2.1_VAE.pth`` so ``state_dict()`` has its 194 keys exactly.
Time is processed in chunks through a :class:`CausalCache`: the encoder sees frame 0 alone and
then 4 frames at a time; the decoder sees one latent frame at a time, and every decoded chunk
can be handed to the caller before the next one is computed (``decode_stream``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from turbowan.vae.cache import CausalCache
from turbowan.vae.config import LATENT_MEAN, LATENT_STD, VAEConfig
from turbowan.vae.frames import (
    SPATIAL_FACTOR,
    TEMPORAL_FACTOR,
    check_frame_count,
    check_spatial_size,
)
from turbowan.vae.layers import (
    AttentionBlock,
    CausalConv3d,
    Resample,
    ResidualBlock,
    RMSNorm,
    cached_conv,
    run_cached,
)


def _head(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        RMSNorm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1)
    )


def _middle(dim: int, dropout: float) -> nn.ModuleList:
    return nn.ModuleList(
        [ResidualBlock(dim, dim, dropout), AttentionBlock(dim), ResidualBlock(dim, dim, dropout)]
    )


class Encoder3d(nn.Module):
    """Pixels (3 channels) -> 2*z_dim moments at 1/8 the size and (with chunking) 1/4 the frames."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        dims = [config.dim * m for m in (1, *config.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        last_level = len(config.dim_mult) - 1
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(config.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, config.dropout))
                in_dim = out_dim
            if level != last_level:
                mode = "down3d" if config.temporal_downsample[level] else "down2d"
                blocks.append(Resample(out_dim, mode))
        self.downsamples = nn.ModuleList(blocks)
        self.middle = _middle(dims[-1], config.dropout)
        self.head = _head(dims[-1], 2 * config.z_dim)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        x = cached_conv(self.conv1, x, cache)
        for block in self.downsamples:
            x = block(x, cache)
        for block in self.middle:
            x = block(x, cache)
        return run_cached(self.head, x, cache)


class Decoder3d(nn.Module):
    """z_dim latents -> pixels; one latent frame per call when driven with a cache."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        mult = config.dim_mult
        dims = [config.dim * m for m in (mult[-1], *reversed(mult))]
        self.conv1 = CausalConv3d(config.z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0], config.dropout)
        blocks: list[nn.Module] = []
        last_level = len(mult) - 1
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if level > 0:
                in_dim //= 2  # the previous level's resample conv halved the width
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim, config.dropout))
                in_dim = out_dim
            if level != last_level:
                mode = "up3d" if config.temporal_upsample[level] else "up2d"
                blocks.append(Resample(out_dim, mode))
        self.upsamples = nn.ModuleList(blocks)
        self.head = _head(dims[-1], 3)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        x = cached_conv(self.conv1, x, cache)
        for block in self.middle:
            x = block(x, cache)
        for block in self.upsamples:
            x = block(x, cache)
        return run_cached(self.head, x, cache)


class WanVAE(nn.Module):
    """The Wan2.1 VAE with the upstream key names and a pipeline-ready interface.

    ``encode`` returns normalised latents ((mu - mean) / std, float32); ``decode`` takes them
    back to video in [-1, 1] (not clamped, float32). Input chunks move to the compute device
    one at a time, so a long clip may stay on the CPU.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder3d(config)
        self.conv1 = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config)
        # Where chunks are computed; None means "where the weights are". A placement engine
        # that keeps weights elsewhere between calls sets this to the compute device.
        self.compute_device: torch.device | None = None

    # ------------------------------------------------------------------ helpers
    def offload_blocks(self) -> list[nn.Module]:
        """The 32 repeated blocks (residual, resample, attention) in execution order, for
        ``offloadkit.apply(vae, blocks=vae.offload_blocks())``: the generic block search finds
        no same-typed ModuleList here. The small entry/exit convs stay resident."""
        return [
            *self.encoder.downsamples,
            *self.encoder.middle,
            *self.decoder.middle,
            *self.decoder.upsamples,
        ]

    @property
    def device(self) -> torch.device:
        if self.compute_device is not None:
            return self.compute_device
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    def _latent_stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.config.z_dim, 1, 1, 1)
        mean = torch.tensor(LATENT_MEAN, dtype=torch.float32, device=device).view(shape)
        inv_std = 1.0 / torch.tensor(LATENT_STD, dtype=torch.float32, device=device)
        return mean, inv_std.view(shape)

    def _check_video(self, video: torch.Tensor) -> None:
        if not isinstance(video, torch.Tensor) or video.dim() != 5 or video.shape[1] != 3:
            shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(
                f"encode expects a video tensor shaped (B, 3, F, H, W), got {shape}; "
                "add the batch axis with video.unsqueeze(0) or move channels to axis 1"
            )
        if not video.is_floating_point():
            raise ValueError(
                f"encode expects float pixels in [-1, 1], got dtype {video.dtype}; "
                "convert with video.float() / 127.5 - 1"
            )
        check_frame_count(video.shape[2])
        check_spatial_size(video.shape[3], video.shape[4])
        low, high = torch.aminmax(video.detach())
        peak = max(-float(low), float(high))  # no |video| copy of a large clip
        if peak > 2.0:
            raise ValueError(
                f"encode expects pixels in [-1, 1], but values reach {peak:g}; "
                "for 0-255 pixels use video / 127.5 - 1"
            )

    def _check_latents(self, latents: torch.Tensor) -> None:
        z = self.config.z_dim
        if not isinstance(latents, torch.Tensor) or latents.dim() != 5 or latents.shape[1] != z:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else latents
            raise ValueError(
                f"decode expects latents shaped (B, {z}, T, H, W), got {shape}; "
                "pass what encode() or the sampler returned"
            )
        if latents.shape[2] < 1:
            raise ValueError("decode got latents with 0 frames; it needs at least one")

    # ------------------------------------------------------------------ encode
    @torch.no_grad()
    def encode_moments(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw (mu, logvar) before normalisation, float32; mostly for tests and research."""
        self._check_video(video)
        mus, logvars = [], []
        for moments in self._encode_chunks(video):
            mu, logvar = moments.float().chunk(2, dim=1)
            mus.append(mu)
            logvars.append(logvar)
        return torch.cat(mus, dim=2), torch.cat(logvars, dim=2)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, F, H, W) in [-1, 1], F = 4n+1 -> normalised latents (B, 16, n+1, H/8, W/8)."""
        self._check_video(video)
        mean, inv_std = self._latent_stats(self.device)
        latents = []
        for moments in self._encode_chunks(video):
            mu = moments[:, : self.config.z_dim].float()  # the mean only; logvar is unused
            latents.append((mu - mean) * inv_std)
        return torch.cat(latents, dim=2)

    def _encode_chunks(self, video: torch.Tensor) -> Iterator[torch.Tensor]:
        """Frame 0 alone, then 4 frames at a time, through one shared causal cache."""
        cache = CausalCache()
        frames = video.shape[2]
        bounds = [(0, 1)] + [(s, s + TEMPORAL_FACTOR) for s in range(1, frames, TEMPORAL_FACTOR)]
        for start, stop in bounds:
            cache.start_chunk()
            chunk = video[:, :, start:stop].to(self.device, self.dtype)
            yield self.conv1(self.encoder(chunk, cache))

    # ------------------------------------------------------------------ decode
    def _prepare_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation (in float32), then the 1x1x1 ``conv2``."""
        self._check_latents(latents)
        mean, inv_std = self._latent_stats(self.device)
        z = latents.to(self.device, torch.float32) / inv_std + mean
        return self.conv2(z.to(self.dtype))

    @torch.no_grad()
    def decode_stream(
        self,
        latents: torch.Tensor,
        *,
        tiled: bool = False,
        tile: int = 256,
        overlap: int = 64,
    ) -> Iterator[torch.Tensor]:
        """Yield float32 pixel chunks as each latent frame is decoded (1 frame, then 4 each).

        Only the causal cache (two frames per convolution) is kept between chunks, so the
        caller can write or move each chunk before the next is computed. ``tiled`` decodes
        overlapping spatial tiles of ``tile`` pixels and blends ``overlap`` pixels at seams.
        """
        z = self._prepare_latents(latents)
        if tiled:
            from turbowan.vae.tiling import decode_tiles_stream

            yield from decode_tiles_stream(self.decoder, z, tile=tile, overlap=overlap)
            return
        cache = CausalCache()
        for t in range(z.shape[2]):
            cache.start_chunk()
            yield self.decoder(z[:, :, t : t + 1], cache).float()

    @torch.no_grad()
    def decode(
        self,
        latents: torch.Tensor,
        *,
        tiled: bool = False,
        tile: int = 256,
        overlap: int = 64,
        output_device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Normalised latents (B, 16, T, h, w) -> video (B, 3, 4T-3, 8h, 8w), float32, unclamped.

        ``output_device`` (e.g. "cpu") collects the frames off the accelerator as they come.
        """
        chunks = [
            chunk if output_device is None else chunk.to(output_device)
            for chunk in self.decode_stream(latents, tiled=tiled, tile=tile, overlap=overlap)
        ]
        return torch.cat(chunks, dim=2)

    @staticmethod
    def latent_shape(frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(T, h, w) of the latents of a (frames, height, width) clip, after checking the sizes."""
        latent_frames = check_frame_count(frames)
        check_spatial_size(height, width)
        return latent_frames, height // SPATIAL_FACTOR, width // SPATIAL_FACTOR
