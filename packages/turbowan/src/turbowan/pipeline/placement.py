"""Placing one model with offloadkit for a stage of the run, and giving the memory back."""

from __future__ import annotations

import gc
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from turbowan.pipeline.timings import Stage


def vae_blocks(vae: torch.nn.Module) -> list[torch.nn.Module]:
    """The VAE's streamable blocks: the encoder and the decoder (the small 1x1x1 convs
    around them stay on the device while the VAE is placed)."""
    return [vae.encoder, vae.decoder]


@contextmanager
def placed(model: torch.nn.Module, strategy: str, *, device: torch.device, budget: Any,
           options: Mapping[str, Any], stage: Stage | None, restore: bool = True,
           **extra: Any) -> Iterator[Any]:
    """Place ``model`` with offloadkit for the duration of the block; record its peak.
    ``restore=False`` for a model dropped after the block (no copy of its weights back)."""
    import offloadkit

    handle = offloadkit.apply(model, strategy, device=device, budget=budget, **{**options, **extra})
    try:
        yield handle
    finally:
        remove_recording_peak(handle, stage, restore=restore)


def remove_recording_peak(handle: Any, stage: Stage | None, *, restore: bool) -> None:
    """Remove an offloadkit placement; its peak device bytes go to ``stage`` (the larger
    of what the stage already holds and this placement's peak)."""
    try:
        if stage is not None:
            stage.peak_device_bytes = max(stage.peak_device_bytes or 0,
                                          handle.stats().peak_device_bytes)
    finally:
        handle.remove(restore=restore)


def release_device_cache(device: torch.device) -> None:
    """Between models only, never inside a model's run; on the CPU dropping the last
    reference already frees the memory, and a full gc pass costs more than it saves."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
