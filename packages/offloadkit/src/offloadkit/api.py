"""``offloadkit.apply``, ``offloadkit.stage`` and ``offloadkit.offloaded``: the public entry
points. ``apply`` is ``stage`` + ``place`` at once: one mechanism, two timings."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from offloadkit.budget import Budget
from offloadkit.engine.guards import refuse_foreign
from offloadkit.engine.profile import (
    BlocksArg,
    layout_model,
    profile_from_layout,
    with_device_memory,
)
from offloadkit.errors import AlreadyOffloadedError
from offloadkit.handle import OffloadHandle
from offloadkit.planner import build_strategy
from offloadkit.plans import HOME_TIERS
from offloadkit.probe import resolve_device
from offloadkit.staged import StagedModel
from offloadkit.strategy import Strategy

#: attribute set on an offloaded model (and its blocks) while a handle is live
MARKER = "_offloadkit_handle"


def apply(
    model: torch.nn.Module,
    strategy: str | Strategy = "adaptive",
    *,
    device: str | torch.device | None = None,
    budget: Budget | int | str | None = "auto",
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
    budget: Budget | int | str | None = "auto",
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
           budget: Budget | int | str | None, blocks: BlocksArg, home: str,
           options: dict[str, Any], auto_at_place: bool) -> StagedModel:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"offloadkit.apply()/stage() needs a torch.nn.Module, not "
                        f"{type(model).__name__}")
    _refuse_second_apply(model)
    refuse_foreign(model.named_modules(), "offloadkit.apply()/stage()")
    if home not in HOME_TIERS:
        raise ValueError(f"home={home!r} is not a home tier; use one of: {', '.join(HOME_TIERS)}")
    strategy_obj, engine_options = build_strategy(strategy, options)  # checks every option
    # cpu_only computes on the CPU whatever device is named
    target = resolve_device(device) if strategy_obj.uses_device else torch.device("cpu")
    if not strategy_obj.uses_budget:  # a budget means nothing to it: not even parsed
        parsed, budget_bytes, reread = Budget(0, device=str(target), text="unused"), 0, False
    else:
        parsed = Budget.parse(budget, target)
        # stage(): "auto" is checked against its ceiling now and read again at place(),
        # since memory free now may be held by the model being replaced
        reread = auto_at_place and parsed.auto
        budget_bytes = parsed.bytes if reread else parsed.resolve()
    layout = layout_model(model, blocks)
    profile = with_device_memory(profile_from_layout(layout, device=target, home=home), target)
    modules = list(model.modules())

    def finished(staged: StagedModel) -> None:
        if staged.handle is not None:
            _mark(modules, staged.handle)
        else:
            _unmark(modules)

    staged = StagedModel(model, strategy_obj, device=target, budget=parsed,
                         budget_bytes=budget_bytes, reread_budget=reread, profile=profile,
                         layout=layout, engine_options=dict(engine_options), on_finish=finished)
    for module in modules:  # apply()/stage() on it (or a part of it) is refused meanwhile
        module.__dict__[MARKER] = staged
    return staged


@contextmanager
def offloaded(model: torch.nn.Module, strategy: str | Strategy = "adaptive", **kwargs: Any
              ) -> Iterator[OffloadHandle]:
    """``with offloaded(model, ...) as handle:`` applies, and removes on exit (even on error)."""
    handle = apply(model, strategy, **kwargs)
    try:
        yield handle
    finally:
        handle.remove()


def _live_mark(model: torch.nn.Module) -> str | None:
    """The name of the first module of ``model`` (``""``: itself) a live handle or staged
    model holds, or None."""
    for name, module in model.named_modules():
        handle = module.__dict__.get(MARKER)
        if handle is not None and not handle.removed:
            return name
    return None


def _refuse_second_apply(model: torch.nn.Module) -> None:
    name = _live_mark(model)
    if name is not None:
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
    return _live_mark(model) is not None
