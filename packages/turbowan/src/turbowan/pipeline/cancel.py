"""Cancel points inside long work, for a host with a Cancel button (ComfyUI).

A host gives the pipeline one ``interrupt_check`` callable that raises when the user
cancelled. It runs before every member of every ``nn.ModuleList`` of a placed model (each
DiT block, each VAE down/middle/up block, so within one VAE chunk or tile too), between
blocks while offloadkit packs and places a model, and around checkpoint loading, all on the
sampling thread. The background thread that stages the low-noise expert never calls the
host's check (it would consume ComfyUI's one-shot flag on the wrong thread): when the run
ends it is stopped by :func:`turbowan.interrupts.stop_thread`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

InterruptCheck = Callable[[], None]


def check_points(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Members of every ModuleList in ``model`` (blocks, VAE stages), each once."""
    seen: dict[int, torch.nn.Module] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):
            for member in module:
                seen.setdefault(id(member), member)
    return list(seen.values())


@contextmanager
def checked(model: torch.nn.Module, check: InterruptCheck | None) -> Iterator[None]:
    """Run ``check`` before each check point of ``model`` while the block runs."""
    if check is None:
        yield
        return
    hooks = [m.register_forward_pre_hook(lambda module, args: check()) for m in check_points(model)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
