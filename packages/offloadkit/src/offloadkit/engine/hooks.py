"""Wrapping block ``forward`` so the engine runs before and after each block.

A wrapper (an instance attribute shadowing the class's ``forward``) rather than
forward pre/post hooks, because OOM recovery must catch the exception raised *inside* the
block and run the block again, which hooks cannot. ``uninstall`` leaves the module exactly as
it was: the instance attribute removed (or the user's own instance ``forward`` put back).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

_MISSING = object()

BlockRunner = Callable[[int, Callable[..., Any], tuple, dict], Any]


class ForwardWrapper:
    """Installs and removes the engine's wrapper on one block."""

    def __init__(self, block: torch.nn.Module, index: int, run: BlockRunner) -> None:
        self.block = block
        self.previous = block.__dict__.get("forward", _MISSING)
        original = block.forward

        @functools.wraps(original)
        def forward(*args: Any, **kwargs: Any) -> Any:
            return run(index, original, args, kwargs)

        block.forward = forward

    def uninstall(self) -> None:
        if self.previous is _MISSING:
            self.block.__dict__.pop("forward", None)
        else:
            self.block.__dict__["forward"] = self.previous
