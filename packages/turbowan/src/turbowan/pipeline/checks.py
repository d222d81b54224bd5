"""The single checks of a run, one function each; :mod:`turbowan.pipeline.preflight` runs them.

Each check adds its problems (with their fixes) to a :class:`Problems` collector, or, given
none, raises :class:`PreflightError` itself. None of them reads a checkpoint's tensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from turbowan.dit.config import attention_problems
from turbowan.dtypes import parse_float_dtype
from turbowan.pipeline import resolution, video_io
from turbowan.pipeline.conditioning import check_resize_mode, open_image
from turbowan.pipeline.problems import Problems, collecting


@dataclass(frozen=True)
class ClipSettings:
    """The validated sampling settings of one clip: size, frame count, schedule, seed."""

    frames: int
    width: int
    height: int
    steps: int
    sigma_max: float
    boundary: float
    seed: int
    ode: bool
    resize: str


def check_clip(*, frames: int, resolution_key: str | None, aspect_ratio: str | None,
               width: int | None, height: int | None, steps: int, sigma_max: float,
               boundary: float, seed: int, ode: bool, resize: str,
               collector: Problems | None = None) -> ClipSettings | None:
    """Frame count, output size, schedule parameters and resize mode."""
    from turbowan.sampler.rcm import rcm_schedule

    with collecting(collector) as c:
        before = len(c.problems)
        c.check(lambda: resolution.check_frames(frames))
        size = c.check(lambda: resolution.resolve_size(resolution_key, aspect_ratio, width, height))
        c.check(lambda: rcm_schedule(steps, float(sigma_max), float(boundary)))
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            c.add(f"seed must be a non-negative integer below 2**63, got {seed!r}")
        c.check(lambda: check_resize_mode(resize))
        failed = len(c.problems) > before
    if size is None or failed:
        return None
    return ClipSettings(frames, size[0], size[1], steps, float(sigma_max), float(boundary), seed,
                        bool(ode), resize)


def check_output(output: str | os.PathLike[str] | None, *, fps: float, quality: int,
                 collector: Problems | None = None) -> None:
    with collecting(collector) as c:
        if output is not None:
            c.check(lambda: video_io.check_output_path(output))
        c.check(lambda: video_io.check_fps(fps))
        c.check(lambda: video_io.check_quality(quality))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None -> cuda if present, else cpu. offloadkit places every model, so it decides which
    devices work; its refusal (no CUDA, a missing cuda:N, mps) becomes a preflight problem."""
    import offloadkit

    try:
        return offloadkit.resolve_device(device)
    except offloadkit.DeviceUnavailableError as exc:
        raise ValueError(f"--device {device}: {exc}") from None


def check_placement(strategy: str, budget: Any, device: str | torch.device | None,
                    collector: Problems | None = None) -> torch.device | None:
    """The offload strategy exists (built-in or plugin) and the budget parses for the device."""
    import offloadkit

    with collecting(collector) as c:
        dev = c.check(lambda: resolve_device(device))
        c.check(lambda: offloadkit.get_strategy(strategy))
        if dev is not None:
            c.check(lambda: offloadkit.parse_budget(budget, str(dev)))
    return dev


def check_attention(attention: str, sla_topk: float, collector: Problems | None = None) -> None:
    """The attention backend and SLA's kept share (the DiT's own rule)."""
    with collecting(collector) as c:
        for problem in attention_problems(attention, sla_topk):
            c.add(problem)


def check_home(home: str, collector: Problems | None = None) -> None:
    """The offloadkit home tier for the DiT experts."""
    from offloadkit import HOME_TIERS

    with collecting(collector) as c:
        if home not in HOME_TIERS:
            c.add(f"unknown home tier {home!r} for the experts; choose one of {', '.join(HOME_TIERS)} "
                  "(host: RAM; pinned: page-locked RAM, fastest uploads; disk: a temporary file, "
                  "least RAM; shared: one copy per node in /dev/shm for several processes)")


def check_shared_room(models: dict[str, Any], collector: Problems | None = None) -> None:
    """home="shared": /dev/shm holds one copy of each expert on this node (the low expert is
    packed while the high one still runs, so both at once); asked before any weight loads,
    rather than failing at the switch with half the sampling done."""
    import offloadkit

    need = sum(offloadkit.profile_model(placed.model, placed.blocks).block_bytes
               for role, placed in models.items() if role in ("high", "low"))
    with collecting(collector) as c:
        try:
            offloadkit.check_shared_room(need)
        except offloadkit.OffloadError as exc:
            c.add(str(exc))


def check_vae_tiling(tiled: bool, tile: int, overlap: int, collector: Problems | None = None) -> None:
    """Tile and overlap of a tiled VAE decode: multiples of 8 pixels, overlap < tile."""
    from turbowan.vae.tiling import check_tiling

    with collecting(collector) as c:
        if tiled:
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (tile, overlap)):
                c.add(f"VAE tile and overlap must be whole pixels, got {tile!r} and {overlap!r}")
            else:
                try:
                    check_tiling(tile, overlap)
                except ValueError as exc:
                    c.add(f"VAE tiling: {exc} (--vae-tile/--vae-overlap)")


def check_threads(threads: int | None, collector: Problems | None = None) -> None:
    with collecting(collector) as c:
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            c.add(f"--threads must be at least 1, got {threads!r}")


def default_dtype(device: torch.device | None) -> torch.dtype:
    """The compute dtype of a run that names none (also the ComfyUI sampler's)."""
    # bf16 is what the models were trained and distilled in, and what GPUs run fast;
    # on the CPU float32 is faster and exact, which the offload-equality tests rely on.
    # None: the device was refused (the preflight reports why); any answer will do.
    return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32


def parse_dtype(dtype: torch.dtype | str | None, device: torch.device | None) -> torch.dtype:
    return parse_float_dtype(dtype, what="the pipeline") or default_dtype(device)


def check_image(image: Any, collector: Problems | None = None) -> Any:
    with collecting(collector) as c:
        img = c.check(lambda: open_image(image))
    return img


def check_tokenizer(tokenizer: Any, collector: Problems | None = None) -> None:
    """A tokenizer path must exist and be a umT5 tokenizer (pad 0, EOS 1); it is small, so
    it is opened here. None (found next to the text encoder) and "demo" pass through."""
    if tokenizer is None or tokenizer == "demo" or not isinstance(tokenizer, (str, os.PathLike)):
        return
    p = Path(tokenizer)
    with collecting(collector) as c:
        if not p.exists():
            c.add(
                f"--tokenizer {str(p)!r} does not exist; pass the umT5 tokenizer (spiece.model, "
                "tokenizer.json or a folder holding one, e.g. from google/umt5-xxl) or leave it "
                "out to use the one stored with the text encoder"
            )
        else:
            from turbowan.text_encoder.tokenizer import UMT5Tokenizer

            def load() -> None:
                try:
                    UMT5Tokenizer.from_file(p)
                except (ValueError, OSError) as exc:
                    raise ValueError(f"--tokenizer: {exc}") from exc

            c.check(load)
