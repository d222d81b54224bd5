"""Wrapping block ``forward`` so the engine runs before and after each block.

A wrapper (an instance attribute shadowing the class's ``forward``) rather than
forward pre/post hooks, because OOM recovery must catch the exception raised *inside* the
block and run the block again, which hooks cannot. ``uninstall`` leaves the module exactly as
it was: the instance attribute removed (or the user's own instance ``forward`` put back).

Under ``torch.compile`` the engine's steps (binding, transfers, locks, checks) are kept out of
the graph: :func:`run_block` runs as an eager frame between them, and the block's own
``forward`` it calls is compiled on its own (one graph shared by every block of the same
class and shapes, since its weights are graph inputs). torch._dynamo is imported only when
something is being compiled: importing it costs seconds.
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
        self.forward = forward

    def uninstall(self) -> None:
        if self.previous is _MISSING:
            self.block.__dict__.pop("forward", None)
        else:
            self.block.__dict__["forward"] = self.previous


def run_block(index: int, forward: Callable[..., Any], args: tuple, kwargs: dict,
              enter: Callable[..., Any], leave: Callable[..., Any],
              failed: Callable[..., Any]) -> Any:
    """One block: the engine's ``enter`` step, the block, its ``leave`` step; on an error,
    ``failed`` either re-raises or returns a token to run the block again with (OOM)."""
    token = enter(index, args, kwargs)
    while True:
        try:
            out = forward(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - failed() re-raises what it cannot handle
            token = failed(index, exc, token)
            continue
        leave(index, token)
        return out


def excluded_runner(enter: Callable[..., Any], leave: Callable[..., Any],
                    failed: Callable[..., Any], *frames: Callable[..., Any]) -> Callable[..., Any]:
    """:func:`run_block` as dynamo should meet it: its own frame and the engine's steps are
    not traced (a graph break before and after the block body), the block's forward it calls
    is compiled. Built once per engine, when a compile first reaches a block. ``frames``:
    functions on the way in (the wrapper, the engine's dispatch) whose own frames dynamo
    should skip too; they hold no tensor work, and compiling them once per block index
    would count as a recompile per block."""
    from torch._dynamo import eval_frame

    skip_code = getattr(eval_frame, "skip_code", None)  # private: best effort
    if skip_code is not None:
        for fn in frames:
            skip_code(getattr(fn, "__func__", fn).__code__)
    disable = torch.compiler.disable
    skipped = disable(run_block, recursive=False)
    steps = disable(enter), disable(leave), disable(failed)

    def runner(index: int, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        return skipped(index, forward, args, kwargs, *steps)

    return disable(runner, recursive=False)
