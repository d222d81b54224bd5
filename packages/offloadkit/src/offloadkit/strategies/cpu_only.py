"""``cpu_only``: no accelerator. The model computes on the CPU; nothing is placed on a
device, so the budget is irrelevant and the measured device peak is 0."""

from __future__ import annotations

from typing import Any

import torch

from offloadkit.engine.layout import TensorRef, module_tensor_refs, tensor_nbytes
from offloadkit.engine.options import ENGINE_OPTIONS
from offloadkit.hookspecs import hookimpl
from offloadkit.ledger import Ledger, OffloadStats
from offloadkit.placement import Placement
from offloadkit.strategy import ModelProfile, Plan, Strategy


class CpuOnlyPlacement(Placement):
    """Moves any non-CPU tensor to the CPU (and back on remove); otherwise leaves the model
    alone, so outputs are the model's own, bit for bit."""

    # accepted and ignored: nothing streams, so pinning, disk and re-plans do not apply
    accepts_options = frozenset(ENGINE_OPTIONS)

    def __init__(self, model: torch.nn.Module, *, plan: Plan, strategy: Strategy,
                 device: torch.device, budget_bytes: int, **options: Any) -> None:
        self.plan = plan
        self._name = strategy.name
        self._model = model
        self._ledger = Ledger(max_trace_events=0)
        self._moved: list[tuple[TensorRef, torch.Tensor]] = []
        for ref in module_tensor_refs(model, ""):
            tensor = ref.get()
            if tensor.device.type == "cpu":  # includes a slot shared with one already moved
                continue
            if tensor.device.type == "meta":
                raise ValueError(f"{ref.qualname!r} is on the meta device; load the weights "
                                 "before offloadkit.apply()")
            self._moved.append((ref, tensor))
            ref.set(tensor.to("cpu"))
            self._ledger.host_add(tensor_nbytes(tensor), pinned=False)

    def stats(self) -> OffloadStats:
        return OffloadStats.of(self.plan, strategy=self._name, device="cpu", budget_bytes=0,
                               counters=self._ledger.snapshot())

    def state_dict(self) -> dict[str, Any]:
        return self._model.state_dict()

    def remove(self, *, restore: bool = True) -> None:
        for ref, original in reversed(self._moved):
            ref.set(original)
        self._moved = []


class CpuOnlyStrategy(Strategy):
    name = "cpu_only"
    description = "No accelerator: compute on CPU, nothing placed on the device."
    uses_budget = False  # a budget means nothing here: neither parsed nor checked
    uses_device = False  # computes on the CPU whatever device is named
    placement = CpuOnlyPlacement

    def min_device_bytes(self, profile: ModelProfile) -> int:
        return 0

    def plan(self, profile: ModelProfile, budget_bytes: int) -> Plan:
        return Plan(resident=tuple(b.index for b in profile.blocks), streamed=(), group_size=1,
                    prefetch_depth=0, num_slots=0, home="host", predicted_peak_device_bytes=0,
                    note="computes on the CPU; no device memory used")


@hookimpl
def offloadkit_register_strategies() -> list[type[Strategy]]:
    return [CpuOnlyStrategy]
