"""``offloadkit.apply`` and ``offloadkit.offloaded``: the one-call public entry points."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from offloadkit.budget import parse_budget
from offloadkit.engine.options import ENGINE_OPTIONS
from offloadkit.engine.profile import BlocksArg, layout_model, profile_from_layout
from offloadkit.errors import AlreadyOffloadedError, DeviceUnavailableError
from offloadkit.handle import OffloadHandle
from offloadkit.registry import get_strategy
from offloadkit.strategy import HOME_TIERS, Strategy

#: attribute set on an offloaded model (and its blocks) while a handle is live
MARKER = "_offloadkit_handle"


def apply(
    model: torch.nn.Module,
    strategy: str | Strategy = "adaptive",
    *,
    device: str | torch.device | None = None,
    budget: int | str | None = "auto",
    blocks: BlocksArg = None,
    home: str = "host",
    **options: Any,
) -> OffloadHandle:
    """Run ``model`` on ``device`` within ``budget`` weight bytes, streaming its blocks.

    ``options`` go to the strategy (e.g. ``chunk_size=4`` for chunkwise) or to the engine
    (``pin_limit_bytes``, ``disk_path``, ``replan_every``); an unknown one is an error listing
    both. Everything is checked before any weight moves.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"offloadkit.apply() needs a torch.nn.Module, not {type(model).__name__}")
    _refuse_second_apply(model)
    if home not in HOME_TIERS:
        raise ValueError(f"home={home!r} is not a home tier; use one of: {', '.join(HOME_TIERS)}")
    strategy_obj, engine_options = _make_strategy(strategy, options)
    # cpu_only computes on the CPU whatever device is named
    target = resolve_device(device) if getattr(strategy_obj, "uses_device", True) \
        else torch.device("cpu")
    budget_bytes = parse_budget(budget, target) if _needs_budget(strategy_obj) else 0
    memory = _memory_or_none(target)
    layout = layout_model(model, blocks)
    profile = profile_from_layout(
        layout,
        device=target,
        home=home,
        device_total_bytes=memory.total_bytes if memory else None,
        device_free_bytes=memory.free_bytes if memory else None,
    )
    handle = strategy_obj.apply(
        model,
        device=target,
        budget_bytes=budget_bytes,
        profile=profile,
        layout=layout,
        **engine_options,
    )
    _mark(model, handle)
    return handle


@contextmanager
def offloaded(model: torch.nn.Module, strategy: str | Strategy = "adaptive", **kwargs: Any
              ) -> Iterator[OffloadHandle]:
    """``with offloaded(model, ...) as handle:`` applies, and removes on exit (even on error)."""
    handle = apply(model, strategy, **kwargs)
    try:
        yield handle
    finally:
        handle.remove()


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The compute device: CUDA when present if none is named; clear error if it is absent."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceUnavailableError(
            f"{device!r} is not a device name ({exc}). Use 'cpu', 'cuda' or 'cuda:N'."
        ) from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise DeviceUnavailableError(
            f"offloadkit streams to 'cuda' or 'cpu' devices, not {str(dev)!r}. Use one of those."
        )
    if not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"device={str(device)!r} was requested but CUDA is not available here "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}). "
            "Use device='cpu' (or strategy='cpu_only'), or install a CUDA build of torch "
            "on a machine with an NVIDIA GPU."
        )
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if not 0 <= index < torch.cuda.device_count():
        raise DeviceUnavailableError(
            f"device={str(device)!r} does not exist: {torch.cuda.device_count()} CUDA device(s) "
            "here. Pick cuda:0 .. cuda:N-1."
        )
    return torch.device("cuda", index)


def _make_strategy(strategy: str | Strategy, options: dict[str, Any]
                   ) -> tuple[Strategy, dict[str, Any]]:
    engine_options = {k: v for k, v in options.items() if k in ENGINE_OPTIONS}
    strategy_options = {k: v for k, v in options.items() if k not in ENGINE_OPTIONS}
    if isinstance(strategy, Strategy):
        if strategy_options:
            raise TypeError(
                f"options {sorted(strategy_options)} are neither engine options "
                f"({', '.join(sorted(ENGINE_OPTIONS))}) nor accepted here: pass strategy "
                "options to the strategy's constructor when giving a Strategy instance."
            )
        return strategy, engine_options
    cls = get_strategy(strategy)
    try:
        return cls(**strategy_options), engine_options
    except TypeError as exc:
        raise TypeError(f"{exc}; engine options: {', '.join(sorted(ENGINE_OPTIONS))}") from None


def _needs_budget(strategy: Strategy) -> bool:
    return getattr(strategy, "uses_budget", True)


def _memory_or_none(device: torch.device):
    try:
        from offloadkit.probe import probe

        return probe(device)
    except Exception:  # a profile without memory figures still plans; strategies cope
        return None


def _refuse_second_apply(model: torch.nn.Module) -> None:
    for name, module in model.named_modules():
        handle = module.__dict__.get(MARKER)
        if handle is not None and not handle.removed:
            where = f"submodule {name!r} of this model" if name else "this model"
            raise AlreadyOffloadedError(
                f"{where} is already under offload (offloadkit.apply() was called on it or on "
                "a model containing it). Call remove() on that handle before applying again, "
                "or keep using it."
            )


def _mark(model: torch.nn.Module, handle: OffloadHandle) -> None:
    """Tag the model and every submodule, so apply() on the model, a part of it, or a model
    containing it is refused while this handle lives; remove() takes the tags off."""
    modules = list(model.modules())
    for module in modules:
        module.__dict__[MARKER] = handle

    def unmark() -> None:
        for module in modules:
            module.__dict__.pop(MARKER, None)

    handle.add_finalizer(unmark)
