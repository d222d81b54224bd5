"""Sampled latents on disk (`.latents.safetensors`), so a finished sampling run is never lost.

Sampling is the expensive part; decoding can still fail (out of memory, Ctrl-C). The
latents and every setting needed to decode them (VAE, fps, quality, output path) are stored
together, and `turbowan decode FILE -o OUT` finishes the job later.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

LATENTS_SUFFIX = ".latents.safetensors"
FORMAT_TAG = "turbowan-latents/1"


def latents_path_for(output: str | os.PathLike[str]) -> Path:
    """out/clip.mp4 -> out/clip.latents.safetensors"""
    output = Path(output)
    return output.with_name(output.stem + LATENTS_SUFFIX)


def save_latents(path: str | os.PathLike[str], latents: torch.Tensor, settings: dict[str, Any]) -> Path:
    """Write float32 latents with the settings as JSON metadata (atomic rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT_TAG, "settings": json.dumps(settings, sort_keys=True, default=str)}
    tmp = path.with_name("." + path.name + ".partial")
    try:
        save_file({"latents": latents.detach().to("cpu", torch.float32).contiguous()}, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_latents(path: str | os.PathLike[str]) -> tuple[torch.Tensor, dict[str, Any]]:
    """(latents, settings) from a file written by :func:`save_latents`."""
    latents, settings = _read(path, with_latents=True)
    assert latents is not None
    return latents, settings


def read_latents_settings(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The settings of a latents file, read from its header only (the tensor stays on disk)."""
    return _read(path, with_latents=False)[1]


def _read(path: str | os.PathLike[str], *, with_latents: bool) -> tuple[torch.Tensor | None, dict[str, Any]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"latents file {str(path)!r} not found; it is written as <output>{LATENTS_SUFFIX}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != FORMAT_TAG or "latents" not in fh.keys():
                raise ValueError("not a turbowan latents file")
            latents = fh.get_tensor("latents") if with_latents else None
    except Exception as exc:
        raise ValueError(
            f"{str(path)!r} is not a turbowan latents file ({exc}); pass the "
            f"{LATENTS_SUFFIX} file that `turbowan generate` wrote"
        ) from exc
    return latents, json.loads(meta.get("settings", "{}"))
