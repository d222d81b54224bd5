"""Decode a saved latents file into a video (the back end of `turbowan decode`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from turbowan.pipeline import preflight
from turbowan.pipeline.latents_io import load_latents
from turbowan.pipeline.timings import Timings
from turbowan.pipeline.video_io import DEFAULT_FPS, DEFAULT_QUALITY, write_video


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
    """Check everything, then load the VAE, decode and write; returns (video path, timings)."""
    from turbowan.pipeline.i2v import (
        DEFAULT_VAE_OVERLAP,
        DEFAULT_VAE_TILE,
        I2VPipeline,
        ModelFiles,
        _parse_dtype,
    )

    latents, settings = load_latents(latents_path)
    c = preflight.new_collector()
    output = output if output is not None else settings.get("output")
    if output is None:
        c.add("no output recorded in the latents file: pass -o OUT.mp4")
    fps = float(settings.get("fps", DEFAULT_FPS)) if fps is None else fps
    quality = int(settings.get("quality", DEFAULT_QUALITY)) if quality is None else quality
    preflight.check_output(output, fps=fps, quality=quality, collector=c)
    recorded_vae = settings.get("vae")
    use_demo_vae = vae is None and (recorded_vae == "demo" or settings.get("demo"))
    if vae is None and not use_demo_vae:
        vae = recorded_vae
    headers: dict[str, Any] = {}
    if not use_demo_vae:
        if vae is None:
            c.add("the latents file names no VAE: pass --vae Wan2.1_VAE.pth")
        else:
            headers = preflight.inspect_model_files({"vae": vae}, collector=c)[1]
    device = device or settings.get("device") or None
    dev = preflight.check_placement(strategy, budget, device, collector=c)
    torch_dtype = c.check(lambda: _parse_dtype(dtype or settings.get("dtype"), dev))
    # the run's VAE tiling is recorded: the same tiles give the video the run would have made
    tiling = {k: settings[k] for k in ("vae_tiling", "vae_tile", "vae_overlap") if k in settings}
    preflight.check_vae_tiling(bool(tiling.get("vae_tiling")),
                               tiling.get("vae_tile", DEFAULT_VAE_TILE),
                               tiling.get("vae_overlap", DEFAULT_VAE_OVERLAP), collector=c)
    if not c.problems:  # the budget holds the VAE (from its header) before anything loads
        if use_demo_vae:
            placed = {"vae": preflight.demo_placed_models(
                dtype=torch_dtype, attention="sla", sla_topk=1.0, home="host")["vae"]}
        else:
            placed = preflight.placed_models_from_specs(headers, dtype=torch_dtype,
                                                        attention="sla", sla_topk=1.0, home="host")
        preflight.check_budget_fits(placed, strategy=strategy, budget=budget, device=dev,
                                    collector=c)
    c.raise_if_any()

    with tempfile.TemporaryDirectory(prefix="turbowan-decode-") as tmp:
        if use_demo_vae:
            from turbowan.pipeline.demo import write_demo_vae

            vae = write_demo_vae(tmp)
        files = ModelFiles(high=Path(), low=None, vae=Path(vae), text_encoder=Path())
        pipe = I2VPipeline(files, strategy=strategy, budget=budget, device=dev, dtype=torch_dtype,
                           **tiling)
        timings = Timings()
        video = pipe.decode(latents, timings)
        from turbowan.pipeline.video_io import to_uint8_frames

        with timings.stage("write video"):
            path = write_video(to_uint8_frames(video), output, fps=fps, quality=quality)
    return path, timings
