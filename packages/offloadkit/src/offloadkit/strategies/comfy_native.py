"""``comfy_native``: inside ComfyUI, let ``comfy.model_management`` place the model
(its partial / lowvram loading) instead of offloadkit's engine; outside ComfyUI, a clear
error. The node pack builds on this."""

from __future__ import annotations

import importlib
from typing import Any

import torch

from offloadkit.errors import OffloadError
from offloadkit.hookspecs import hookimpl
from offloadkit.ledger import Ledger, OffloadStats, TraceEvent
from offloadkit.strategy import ModelProfile, Plan, Strategy


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


class ComfyNativeStrategy(Strategy):
    name = "comfy_native"
    description = "Inside ComfyUI: let comfy.model_management place the model (lowvram)."

    def min_device_bytes(self, profile: ModelProfile) -> int:
        return profile.non_block_bytes + profile.max_block_bytes

    def plan(self, profile: ModelProfile, budget_bytes: int) -> Plan:
        """What ComfyUI's partial loading amounts to: a prefix of blocks fits, the rest is
        handled by its lowvram patching. Used for reporting only."""
        self.require_budget(profile, budget_bytes)
        room = budget_bytes - profile.non_block_bytes
        resident, used = [], 0
        for block in profile.blocks:
            if used + block.nbytes > room:
                break
            resident.append(block.index)
            used += block.nbytes
        plan = Plan.build(profile, resident, group_size=1, prefetch_depth=0,
                          note="placement delegated to comfy.model_management")
        return plan

    def apply(self, model: torch.nn.Module, *, device: torch.device, budget_bytes: int,
              profile: ModelProfile, **engine_options: Any):
        from offloadkit.handle import OffloadHandle

        management, patcher_mod = _comfy()
        self.require_budget(profile, budget_bytes)
        return OffloadHandle(ComfyPlacement(model, self.plan(profile, budget_bytes), self.name,
                                            management, patcher_mod, device, budget_bytes))


class ComfyPlacement:
    """Wraps the model in a ComfyUI ModelPatcher and asks model_management to load it
    within the budget; remove() unloads it back to the offload device."""

    def __init__(self, model: torch.nn.Module, plan: Plan, name: str, management: Any,
                 patcher_mod: Any, device: torch.device, budget_bytes: int) -> None:
        self.plan = plan
        self._name = name
        self._device = device
        self._budget = budget_bytes
        self._ledger = Ledger(max_trace_events=0)
        self._management = management
        self.patcher = patcher_mod.ModelPatcher(
            model, load_device=device, offload_device=management.unet_offload_device())
        management.load_models_gpu([self.patcher], memory_required=0,
                                   minimum_memory_required=budget_bytes)

    def stats(self) -> OffloadStats:
        snap = self._ledger.snapshot()
        loaded = int(getattr(self.patcher, "loaded_size", lambda: 0)())
        snap["peak_device_bytes"] = max(snap["peak_device_bytes"], loaded)
        snap["current_device_bytes"] = loaded
        return OffloadStats(strategy=self._name, device=str(self._device),
                            budget_bytes=self._budget, resident_blocks=len(self.plan.resident),
                            streamed_blocks=len(self.plan.streamed), group_size=1,
                            prefetch_depth=0, num_slots=0, home="host", **snap)

    def trace_events(self) -> list[TraceEvent]:
        return []

    def replan(self) -> Plan | None:
        return None

    def remove(self) -> None:
        self.patcher.unpatch_model(device_to=self.patcher.offload_device)


@hookimpl
def offloadkit_register_strategies() -> list[type[Strategy]]:
    return [ComfyNativeStrategy]
