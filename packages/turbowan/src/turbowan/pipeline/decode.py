"""Decode a saved latents file into a video (the back end of `turbowan decode`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from turbowan.pipeline import preflight
from turbowan.pipeline.latents_io import load_latents
from turbowan.pipeline.outputs import default_decode_output
from turbowan.pipeline.settings import RunSettings
from turbowan.pipeline.timings import Timings
from turbowan.pipeline.video_io import DEFAULT_FPS, DEFAULT_QUALITY, to_uint8_frames, write_video


def decode_latents_file(
    latents_path: str | os.PathLike[str],
    *,
    output: str | os.PathLike[str] | None = None,
    vae: str | os.PathLike[str] | None = None,
    fps: float | None = None,
    quality: int | None = None,
    strategy: str = "adaptive",
    budget: Any = "auto",
    device: str | None = None,
    dtype: str | None = None,
) -> tuple[Path, Timings]:
    """Check everything, then load the VAE, decode and write; returns (video path, timings).

    The run's recorded settings (VAE, device, dtype, tiling, fps, quality, output) fill in
    what is not given: the same tiles give the video the run would have made."""
    from turbowan.pipeline.i2v import I2VPipeline

    latents, recorded = load_latents(latents_path)
    use_demo_vae = vae is None and (recorded.get("vae") == "demo" or bool(recorded.get("demo")))
    settings = RunSettings(
        vae=None if use_demo_vae else (vae if vae is not None else recorded.get("vae")),
        demo=use_demo_vae, strategy=strategy, budget=budget,
        device=device or recorded.get("device") or None, dtype=dtype or recorded.get("dtype"),
        **{k: recorded[k] for k in ("vae_tiling", "vae_tile", "vae_overlap") if k in recorded},
        output=output if output is not None else default_decode_output(latents_path, recorded.get("output")),
        fps=float(recorded.get("fps", DEFAULT_FPS)) if fps is None else fps,
        quality=int(recorded.get("quality", DEFAULT_QUALITY)) if quality is None else quality,
    )
    problems = preflight.Problems()
    preflight.check_output(settings.output, fps=settings.fps, quality=settings.quality,
                           collector=problems)
    facts = preflight.check_pipeline(settings, roles=("vae",), collector=problems)
    problems.raise_if_any()
    assert facts is not None

    pipe = I2VPipeline(settings, roles=("vae",), facts=facts)
    try:
        timings = Timings()
        video = pipe.decode(latents, timings)
        with timings.stage("write video"):
            path = write_video(to_uint8_frames(video), settings.output, fps=settings.fps,
                               quality=settings.quality)
    finally:
        pipe.close()
    return path, timings
