"""``comfy_native``: inside ComfyUI, let ``comfy.model_management`` load the model and
count it; outside ComfyUI, a clear error. The turbowan node pack offers it as a choice.

What ComfyUI can and cannot do with a model it did not build (checked against ComfyUI's
ModelPatcher): its partial "lowvram" loading streams only layers made by ``comfy.ops``
(they carry ``comfy_cast_weights``); any other layer that does not fit is simply left on
the CPU, and modules whose weights are buffers (int8 layers) are not in its load list at
all. So a partial load of a foreign model runs with weights on the wrong device. This
strategy therefore asks ComfyUI for a **full** load and refuses a budget that cannot hold
the whole model (use ``adaptive`` there: offloadkit streams what does not fit).

Two bugs of earlier ComfyUI shims are avoided on purpose:
- the size ComfyUI plans with is passed explicitly and counts buffers as well as
  parameters (an int8 model otherwise looks ~30x smaller than it is);
- the model is wrapped in a small container before ComfyUI sees it, because ModelPatcher
  writes attributes (``device``, ``model_loaded_weight_memory``, ...) onto the module it is
  given; the user's model stays untouched and a read-only ``device`` property cannot break it.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch

from offloadkit.errors import OffloadError
from offloadkit.hookspecs import hookimpl
from offloadkit.ledger import Ledger, OffloadStats
from offloadkit.placement import Placement
from offloadkit.strategy import ModelProfile, Plan, Strategy
from offloadkit.units import describe_bytes


def _comfy() -> tuple[Any, Any]:
    try:
        management = importlib.import_module("comfy.model_management")
        patcher = importlib.import_module("comfy.model_patcher")
    except ImportError as exc:
        raise OffloadError(
            "strategy 'comfy_native' needs ComfyUI: it hands placement to "
            f"comfy.model_management, which cannot be imported here ({exc}). Run inside "
            "ComfyUI, or use strategy='adaptive' (the default) outside it."
        ) from None
    return management, patcher


def module_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer (shared tensors once): what a full load moves."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


class _ComfyContainer(torch.nn.Module):
    """What ComfyUI's ModelPatcher is given: it may set attributes here, not on the model."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        super().__init__()
        self.inner = model
        self.device = device


def _load_full(management: Any, patcher: Any, size: int) -> None:
    load = management.load_models_gpu
    try:
        accepts_full = "force_full_load" in inspect.signature(load).parameters
    except (TypeError, ValueError):
        accepts_full = False
    if accepts_full:
        load([patcher], memory_required=size, force_full_load=True)
    else:  # older ComfyUI: a load with room for the whole size is a full load
        load([patcher], memory_required=size, minimum_memory_required=size)


def _off_device(model: torch.nn.Module, device: torch.device) -> list[str]:
    def on(t: torch.Tensor) -> bool:
        return t.device.type == device.type and (device.index is None or t.device.index == device.index)

    named = [*model.named_parameters(), *model.named_buffers()]
    return [name for name, t in named if not on(t)]


class ComfyPlacement(Placement):
    """The model inside a ComfyUI ModelPatcher, loaded whole by model_management;
    ``remove()`` moves it back to ComfyUI's offload device and drops ComfyUI's record.
    ComfyUI places the model, so no engine option applies."""

    def __init__(self, model: torch.nn.Module, *, plan: Plan, strategy: Strategy,
                 device: torch.device, budget_bytes: int) -> None:
        management, patcher_mod = _comfy()
        self.plan = plan
        self._name = strategy.name
        self._device = device
        self._budget = budget_bytes
        self._ledger = Ledger(max_trace_events=0)
        self._management = management
        self._size = module_bytes(model)
        offload_device = torch.device(management.unet_offload_device())
        self._container = _ComfyContainer(model, offload_device)
        self.patcher = patcher_mod.ModelPatcher(
            self._container, load_device=device, offload_device=offload_device, size=self._size)
        _load_full(management, self.patcher, self._size)
        stray = _off_device(model, device)
        if stray:
            self.remove()
            raise OffloadError(
                f"ComfyUI loaded only part of the model ({len(stray)} tensors stayed off "
                f"{device}, e.g. {stray[0]}); it could not make room for "
                f"{describe_bytes(self._size)}. Free GPU memory (unload other models) or use "
                "strategy 'adaptive', which streams what does not fit."
            )

    def stats(self) -> OffloadStats:
        snap = self._ledger.snapshot()
        loaded = int(getattr(self.patcher, "loaded_size", lambda: 0)() or 0)
        loaded = max(loaded, self._size if not _off_device(self._container.inner, self._device) else 0)
        snap["peak_device_bytes"] = max(snap["peak_device_bytes"], loaded)
        snap["current_device_bytes"] = loaded
        return OffloadStats(strategy=self._name, device=str(self._device),
                            budget_bytes=self._budget, resident_blocks=len(self.plan.resident),
                            streamed_blocks=len(self.plan.streamed), group_size=1,
                            prefetch_depth=0, num_slots=0, home="host", **snap)

    def state_dict(self) -> dict[str, Any]:
        return self._container.inner.state_dict()

    def remove(self, *, restore: bool = True) -> None:
        self.patcher.unpatch_model(device_to=self.patcher.offload_device)
        loaded = getattr(self._management, "current_loaded_models", None)
        if isinstance(loaded, list):  # ComfyUI would otherwise keep the model alive
            loaded[:] = [m for m in loaded if getattr(m, "model", None) is not self.patcher]


class ComfyNativeStrategy(Strategy):
    name = "comfy_native"
    description = "Inside ComfyUI: ComfyUI loads the whole model and counts it (no streaming)."
    budget_hint = ("comfy_native loads the whole model: ComfyUI's lowvram loading streams "
                   "only comfy.ops layers, not this model's. Raise the budget, or use "
                   "strategy 'adaptive' (offloadkit streams the blocks that do not fit).")

    placement = ComfyPlacement

    def min_device_bytes(self, profile: ModelProfile) -> int:
        return profile.total_bytes

    def plan(self, profile: ModelProfile, budget_bytes: int) -> Plan:
        """Everything resident: the one placement ComfyUI can do for a foreign model."""
        return Plan.build(profile, [b.index for b in profile.blocks], group_size=1,
                          prefetch_depth=0, note="whole model loaded by comfy.model_management")


@hookimpl
def offloadkit_register_strategies() -> list[type[Strategy]]:
    return [ComfyNativeStrategy]
