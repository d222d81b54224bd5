"""``offloadkit.apply``, ``offloadkit.stage`` and ``offloadkit.offloaded``: the public entry
points. ``apply`` is ``stage`` + ``place`` at once: one mechanism, two timings."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from offloadkit.budget import auto_reserve_bytes, parse_budget
from offloadkit.engine.options import ENGINE_OPTIONS
from offloadkit.engine.profile import (
    BlocksArg,
    layout_model,
    profile_from_layout,
    with_device_memory,
)
from offloadkit.errors import AlreadyOffloadedError, DeviceUnavailableError
from offloadkit.handle import OffloadHandle
from offloadkit.probe import cuda_index, parse_device, probe
from offloadkit.registry import get_strategy
from offloadkit.staged import StagedModel
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
    both. Everything is checked before any weight moves. Same as ``stage(...).place()``.
    """
    return _stage(model, strategy, device=device, budget=budget, blocks=blocks, home=home,
                  options=options, auto_at_place=False).place()


def stage(
    model: torch.nn.Module,
    strategy: str | Strategy = "adaptive",
    *,
    device: str | torch.device | None = None,
    budget: int | str | None = "auto",
    blocks: BlocksArg = None,
    home: str = "host",
    **options: Any,
) -> StagedModel:
    """Pack now, place later: plan ``model`` and pack its blocks into the home tier (pinned
    host buffers on CUDA, pageable host memory, or the disk tier) without touching the
    device. Safe to run on a background thread while another model computes; then
    ``staged.place()`` (on the compute thread) returns the :class:`OffloadHandle`, and
    ``staged.discard()`` restores the model instead. Same arguments as :func:`apply`.

    Budget errors are raised here, before any packing. ``budget="auto"`` is checked now
    against the device's total memory (less the activation reserve) and read again at
    ``place()``, since memory free now may be held by the model being replaced.
    """
    return _stage(model, strategy, device=device, budget=budget, blocks=blocks, home=home,
                  options=options, auto_at_place=True)


def _stage(model: torch.nn.Module, strategy: str | Strategy, *, device: str | torch.device | None,
           budget: int | str | None, blocks: BlocksArg, home: str, options: dict[str, Any],
           auto_at_place: bool) -> StagedModel:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"offloadkit.apply()/stage() needs a torch.nn.Module, not "
                        f"{type(model).__name__}")
    _refuse_second_apply(model)
    if home not in HOME_TIERS:
        raise ValueError(f"home={home!r} is not a home tier; use one of: {', '.join(HOME_TIERS)}")
    strategy_obj, engine_options = _make_strategy(strategy, options)
    # cpu_only computes on the CPU whatever device is named
    target = resolve_device(device) if getattr(strategy_obj, "uses_device", True) \
        else torch.device("cpu")
    budget_at_place = None
    if not _needs_budget(strategy_obj):
        budget_bytes = 0
    elif auto_at_place and _is_auto(budget):
        budget_bytes = _auto_ceiling(target)
        def budget_at_place() -> int:
            return parse_budget("auto", target)
    else:
        budget_bytes = parse_budget(budget, target)
    layout = layout_model(model, blocks)
    profile = with_device_memory(profile_from_layout(layout, device=target, home=home), target)
    modules = list(model.modules())

    def finished(staged: StagedModel) -> None:
        if staged.handle is not None:
            _mark(modules, staged.handle)
        else:
            _unmark(modules)

    staged = StagedModel(model, strategy_obj, device=target, budget_bytes=budget_bytes,
                         budget_at_place=budget_at_place, profile=profile, layout=layout,
                         engine_options=dict(engine_options), on_finish=finished)
    for module in modules:  # apply()/stage() on it (or a part of it) is refused meanwhile
        module.__dict__[MARKER] = staged
    return staged


def _is_auto(budget: int | str | None) -> bool:
    return budget is None or (isinstance(budget, str) and budget.strip().lower() == "auto")


def _auto_ceiling(device: torch.device) -> int:
    """The most ``"auto"`` could ever give on this device: all of it less the reserve."""
    total = probe(device).total_bytes
    return max(0, total - auto_reserve_bytes(total))


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
    dev = parse_device(device)
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise DeviceUnavailableError(
            f"offloadkit streams to 'cuda' or 'cpu' devices, not {str(dev)!r}. Use one of those."
        )
    return torch.device("cuda", cuda_index(dev))


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


def _refuse_second_apply(model: torch.nn.Module) -> None:
    for name, module in model.named_modules():
        handle = module.__dict__.get(MARKER)
        if handle is not None and not handle.removed:
            where = f"submodule {name!r} of this model" if name else "this model"
            raise AlreadyOffloadedError(
                f"{where} is already under offload (offloadkit.apply() or stage() was called "
                "on it or on a model containing it). Call remove() on that handle (discard() "
                "on a staged model) before applying again, or keep using it."
            )


def _mark(modules: list[torch.nn.Module], handle: OffloadHandle) -> None:
    """Tag the model and every submodule, so apply() on the model, a part of it, or a model
    containing it is refused while this handle lives; remove() takes the tags off."""
    for module in modules:
        module.__dict__[MARKER] = handle
    handle.add_finalizer(lambda: _unmark(modules))


def _unmark(modules: list[torch.nn.Module]) -> None:
    for module in modules:
        module.__dict__.pop(MARKER, None)


def is_offloaded(model: torch.nn.Module) -> bool:
    """True while ``model``, a part of it, or a model containing it is staged or placed by
    offloadkit. Code that adds or removes tensors (a LoRA, say) must wait until the handle
    is removed: the engine packs a model's tensors once, when it is staged."""
    for module in model.modules():
        handle = module.__dict__.get(MARKER)
        if handle is not None and not handle.removed:
            return True
    return False
