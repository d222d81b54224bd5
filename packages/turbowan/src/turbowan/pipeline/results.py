"""What a run hands back: the result, the run's record, and the errors that keep the latents."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from turbowan.pipeline.latents_io import latents_path_for, save_latents
from turbowan.pipeline.timings import Timings
from turbowan.pipeline.video_io import DEFAULT_FPS, DEFAULT_QUALITY, to_uint8_frames, write_video


class DecodeFailedError(RuntimeError):
    """Sampling finished but decoding or writing failed; the latents were saved."""

    def __init__(self, message: str, latents_path: Path | None) -> None:
        super().__init__(message)
        self.latents_path = latents_path


class DecodeInterrupted(KeyboardInterrupt):
    """Ctrl-C during decoding; the latents were saved (still a KeyboardInterrupt)."""

    def __init__(self, message: str, latents_path: Path | None) -> None:
        super().__init__(message)
        self.latents_path = latents_path


@dataclass
class GenerationResult:
    """What a run produced: float32 latents, the decoded video and where the time went."""

    latents: torch.Tensor
    video: torch.Tensor | None = None  # (1, 3, F, H, W) float32 in about [-1, 1]
    settings: dict[str, Any] = field(default_factory=dict)
    timings: Timings = field(default_factory=Timings)
    output: Path | None = None
    latents_path: Path | None = None

    @property
    def frames(self) -> np.ndarray | None:
        """uint8 (F, H, W, 3), what a video file stores."""
        return None if self.video is None else to_uint8_frames(self.video)

    def save(self, path: str | os.PathLike[str], *, fps: float = DEFAULT_FPS,
             quality: int = DEFAULT_QUALITY) -> Path:
        if self.video is None:
            raise ValueError("this result has no decoded video (decode=False); use turbowan decode")
        return write_video(self.frames, path, fps=fps, quality=quality)


def run_record(settings: Any, facts: Any, run: Any, *, vae: Path | None) -> dict[str, Any]:
    """The run's resolved settings, as a JSON-able dict: kept in the result and in a latents
    file (so `turbowan decode` finishes the run with the same VAE, tiling, fps...)."""
    clip = run.clip
    return {
        "prompt": run.prompt, "frames": clip.frames, "width": clip.width, "height": clip.height,
        "steps": clip.steps, "sigma_max": clip.sigma_max, "boundary": clip.boundary,
        "seed": clip.seed, "ode": clip.ode, "resize": clip.resize, "fps": settings.fps,
        "quality": settings.quality, "demo": settings.is_demo, "image": run.image_label,
        "vae": "demo" if settings.is_demo else str(vae),
        "dtype": str(facts.dtype).replace("torch.", ""), "device": str(facts.device),
        "strategy": settings.strategy, "attention": settings.attention,
        "sla_topk": facts.sla_topk, "home": settings.home, "vae_tiling": settings.vae_tiling,
        "vae_tile": settings.vae_tile, "vae_overlap": settings.vae_overlap,
        "loras": [f"{s.path}:{s.strength:g} ({s.expert})" for s in facts.loras],
        "output": str(settings.output) if settings.output is not None else None,
    }


def save_latents_file(output: Path, latents: torch.Tensor, settings: dict[str, Any]) -> Path:
    return save_latents(latents_path_for(output), latents, settings)
