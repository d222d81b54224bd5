"""``comfy_native``: inside ComfyUI, ComfyUI owns the device memory and offloadkit streams.

Protocol with ``comfy.model_management`` (checked against ComfyUI v0.33 source):

1. **Stage.** The model is packed into offloadkit's home tier by the shared engine, as for
   any strategy; nothing is on the device yet.
2. **Ask for room.** The model is wrapped in a small *patcher* object that speaks the
   interface ComfyUI's ``LoadedModel`` drives (``model_size``, ``loaded_size``,
   ``partially_load``, ``partially_unload``, ``detach``, ...), and handed to
   ``load_models_gpu([patcher], memory_required=reserve, minimum_memory_required=reserve)``.
   ComfyUI frees or offloads its other models (``free_memory``) for it, exactly as for
   one of its own.
3. **Take the grant as the budget.** ComfyUI then calls ``partially_load(device, extra)``
   with the memory it can give (its lowvram arithmetic; 0.1 under ``--novram``; "all" under
   ``--highvram``, ``--cpu`` or when everything fits). The grant, capped by the budget the
   caller gave and raised to the strategy's minimum (non-block weights + one block slot: the
   least any streamed run needs), becomes the engine's budget; the engine keeps as many
   blocks resident as it holds and streams the rest, interleaved.
4. **Registered while placed.** ComfyUI lists the patcher in ``current_loaded_models`` and
   counts ``loaded_size()`` (the engine's measured device bytes) when it plans other loads.
   When another model needs the device, ComfyUI calls ``partially_unload(memory)``: the
   engine re-plans with fewer resident blocks and frees them. A full unload (``detach``)
   shrinks to the minimum and leaves the list; the model re-registers (step 2) before its
   next forward.
5. **Leave clean.** ``handle.remove()`` (after the run, a Cancel or an error) takes the
   patcher out of ``current_loaded_models`` and frees every device byte.

ComfyUI's own partial loading cannot do this for a foreign model: it streams only layers
built from ``comfy.ops`` and leaves buffers (int8 weights) out of its load list. Outside
ComfyUI this strategy is a clear error.
"""

from __future__ import annotations

import importlib
import uuid
from typing import Any

import torch

from offloadkit.engine.options import ENGINE_OPTIONS
from offloadkit.errors import OffloadError
from offloadkit.hookspecs import hookimpl
from offloadkit.ledger import OffloadStats, TraceEvent
from offloadkit.placement import Placement
from offloadkit.planner import make_plan
from offloadkit.strategies.adaptive import AdaptiveStrategy
from offloadkit.strategy import ModelProfile, Plan, Strategy

#: asked of ComfyUI on top of the weights for activations when the caller names none
DEFAULT_ACTIVATION_RESERVE = 512 * 1024**2


def comfy_model_management() -> Any:
    try:
        return importlib.import_module("comfy.model_management")
    except ImportError as exc:
        raise OffloadError(
            "strategy 'comfy_native' needs ComfyUI: it asks comfy.model_management for device "
            f"memory, which cannot be imported here ({exc}). Run inside ComfyUI, or use "
            "strategy='adaptive' (the default) outside it."
        ) from None


class ComfyPatcher:
    """What ComfyUI's ``LoadedModel`` holds for an offloadkit model: ModelPatcher's memory
    interface, answered by re-planning the engine. Kept alive by its placement."""

    def __init__(self, placement: ComfyPlacement, model: torch.nn.Module, device: torch.device,
                 offload_device: torch.device) -> None:
        self._placement = placement
        self.model = model  # ComfyUI reads the class name and keeps a weakref finalizer
        self.load_device = device
        self.offload_device = offload_device
        self.parent = None
        self.model_options: dict[str, Any] = {"transformer_options": {}}
        self.clone_base_uuid = uuid.uuid4()
        self.is_multigpu_base_clone = False

    # sizes ComfyUI plans with
    def model_size(self) -> int:
        return self._placement.engine.profile.total_bytes

    def loaded_size(self) -> int:
        return self._placement.device_bytes()

    def current_loaded_device(self) -> torch.device:
        return self.load_device if self.loaded_size() > 0 else self.offload_device

    # grow / shrink / unload, called by LoadedModel
    def partially_load(self, device_to: Any, extra_memory: float = 0,
                       force_patch_weights: bool = False) -> int:
        return self._placement.grow(extra_memory)

    def partially_unload(self, device_to: Any, memory_to_free: float = 0,
                         force_patch_weights: bool = False) -> int:
        return self._placement.shrink(memory_to_free)

    def detach(self, unpatch_all: bool = True) -> torch.nn.Module:
        self._placement.unloaded_by_comfy()
        return self.model

    # the rest of ModelPatcher's interface that model management touches
    def is_dynamic(self) -> bool:
        return False

    def model_patches_to(self, device: Any) -> None:
        pass

    def model_patches_models(self) -> list:
        return []

    def model_dtype(self) -> torch.dtype | None:
        return None

    def lowvram_patch_counter(self) -> int:
        return 0

    def is_clone(self, other: Any) -> bool:
        return getattr(other, "model", None) is self.model

    def get_nested_additional_models(self) -> list:
        return []

    def pinned_memory_size(self) -> int:
        return 0

    def loaded_ram_size(self) -> int:
        return 0

    def partially_unload_ram(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def cleanup(self) -> None:
        pass


class ComfyPlacement(Placement):
    """offloadkit's engine plus its registration with ComfyUI (see the module docstring)."""

    accepts_options = frozenset(ENGINE_OPTIONS)
    packs_at_stage = True  # packed by stage(), on a background thread if the caller likes

    @classmethod
    def check_host(cls) -> None:
        comfy_model_management()  # outside ComfyUI: the error, before anything is packed

    def __init__(self, model: torch.nn.Module, *, plan: Plan, strategy: Strategy,
                 device: torch.device, budget_bytes: int, engine: Any,
                 **engine_options: Any) -> None:
        self._mm = comfy_model_management()
        self._least = strategy.min_device_bytes(engine.profile)
        self._cap = budget_bytes
        self._reserve = int(strategy.options["activation_reserve"])
        self._registered = False
        self.engine = engine  # packed at stage(); placed when ComfyUI grants room
        offload = torch.device(getattr(self._mm, "unet_offload_device", lambda: "cpu")())
        self.patcher = ComfyPatcher(self, model, self.engine.device, offload)
        self._hook = model.register_forward_pre_hook(self._before_forward)
        try:
            self.register()
        except BaseException:
            self.remove()
            raise

    @property
    def plan(self) -> Plan:
        return self.engine.plan

    def device_bytes(self) -> int:
        return int(self.engine.ledger.current_device_bytes) if self.engine.placed else 0

    # ------------------------------------------------------------------ ComfyUI side
    def register(self) -> None:
        """Ask ComfyUI for room and be listed; ComfyUI answers through partially_load."""
        self._mm.load_models_gpu([self.patcher], memory_required=self._reserve,
                                 minimum_memory_required=self._reserve)
        if not self.engine.placed:  # a ComfyUI that did not call partially_load
            self.grow(0)
        self._registered = True

    def _before_forward(self, module: torch.nn.Module, args: Any) -> None:
        if not self._registered:  # ComfyUI unloaded it for another model: ask again
            self.register()

    def _resize(self, target: float) -> int:
        """Re-plan for ``target`` device bytes (capped, at least the minimum); returns the
        change in device bytes."""
        total = self.engine.profile.total_bytes
        budget = int(max(self._least, min(self._cap, total, target)))
        before = self.device_bytes()
        plan = make_plan(self.engine.strategy, self.engine.profile, budget)
        if not self.engine.placed:
            self.engine.place(plan, budget)
        elif (plan.resident, plan.num_slots) != (self.engine.plan.resident, self.engine.plan.num_slots):
            self.engine.reconfigure(plan, budget)
        else:  # same placement: only the ceiling moves
            self.engine.budget_bytes = budget
        return self.device_bytes() - before

    def grow(self, extra_memory: float) -> int:
        return max(0, self._resize(self.device_bytes() + extra_memory))

    def shrink(self, memory_to_free: float) -> int:
        return max(0, -self._resize(self.device_bytes() - memory_to_free))

    def unloaded_by_comfy(self) -> None:
        """ComfyUI dropped it from its list: keep only the minimum until the next forward."""
        self._registered = False
        if self.engine.placed and not self.engine._removed:
            self._resize(0)

    def _unregister(self) -> None:
        self._registered = False
        loaded = getattr(self._mm, "current_loaded_models", None)
        if not isinstance(loaded, list):
            return
        for entry in [m for m in loaded if getattr(m, "model", None) is self.patcher]:
            loaded.remove(entry)
            finalizer = getattr(entry, "model_finalizer", None)
            if finalizer is not None:
                finalizer.detach()

    # ------------------------------------------------------------------ handle side
    def stats(self) -> OffloadStats:
        return self.engine.stats()

    def trace_events(self) -> list[TraceEvent]:
        return self.engine.trace_events()

    def replan(self) -> Plan | None:
        return self.engine.replan()

    def state_dict(self) -> dict[str, Any]:
        return self.engine.state_dict()

    def remove(self, *, restore: bool = True) -> None:
        self._hook.remove()
        try:
            self._unregister()
        finally:
            self.engine.remove(restore=restore)


class ComfyNativeStrategy(Strategy):
    name = "comfy_native"
    description = ("Inside ComfyUI: takes the memory ComfyUI grants, streams the rest, and "
                   "shrinks when ComfyUI needs room.")
    option_defaults = {"activation_reserve": DEFAULT_ACTIVATION_RESERVE}
    budget_hint = ("comfy_native needs at least the non-block weights and one block on the "
                   "device; raise the budget, or use strategy 'cpu_only'.")
    placement = ComfyPlacement

    def plan(self, profile: ModelProfile, budget_bytes: int) -> Plan:
        """Fewest blocks streamed for this budget (adaptive's placement, one prefetch)."""
        return AdaptiveStrategy(prefetch_depth=1).plan(profile, budget_bytes)


@hookimpl
def offloadkit_register_strategies() -> list[type[Strategy]]:
    return [ComfyNativeStrategy]
