"""``StagedModel``: a model packed into its home tier, not yet on the device.

"Pack now, place later": packing a large model (reading its pages, copying them into
pinned host buffers or writing the disk tier) takes seconds, while placing an already packed
model is a few large copies. Staging lets the packing run on a background thread while
another model computes, so swapping models costs only the placement.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from offloadkit.errors import OffloadError
from offloadkit.ledger import Ledger, OffloadStats

if TYPE_CHECKING:
    from offloadkit.engine.core import Engine
    from offloadkit.engine.profile import ModelLayout
    from offloadkit.handle import OffloadHandle
    from offloadkit.strategy import ModelProfile, Plan, Strategy


class StagedModel:
    """A model offloadkit has planned and packed; :meth:`place` puts it on the device.

    While staged, the model's block weights live only in the home tier (its block tensors
    are NaN stand-ins): do not run it before :meth:`place`. :meth:`discard` (alias
    :meth:`remove`) puts the model back exactly as it was.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        strategy: Strategy,
        *,
        device: torch.device,
        budget_bytes: int,
        budget_at_place: Callable[[], int] | None,
        profile: ModelProfile,
        layout: ModelLayout,
        engine_options: dict[str, Any],
        on_finish: Callable[[StagedModel], None],
    ) -> None:
        self.model = model
        self.strategy = strategy
        self.device = device
        self.budget_bytes = budget_bytes
        self.profile = profile
        self._budget_at_place = budget_at_place
        self._layout = layout
        self._engine_options = engine_options
        self._on_finish = on_finish
        self._lock = threading.Lock()
        self._state = "staging"
        self._handle: OffloadHandle | None = None
        self._engine: Engine | None = None
        self.staged_by = threading.current_thread().name
        start = time.perf_counter()
        if _has_own_mechanism(strategy):
            # the strategy places the model its own way (cpu_only, comfy_native): nothing can
            # be packed ahead; check the budget now and defer the whole apply to place()
            strategy.require_budget(profile, budget_bytes)
            self.plan = strategy.plan(profile, budget_bytes)
            self._ledger: Ledger | None = Ledger(max_trace_events=0)
        else:
            self._engine = strategy.stage(model, device=device, budget_bytes=budget_bytes,
                                          profile=profile, layout=layout, **engine_options)
            self.plan = self._engine.plan
            self._ledger = None
        #: ``time.perf_counter()`` when packing finished (compare with when place() ran)
        self.staged_at = time.perf_counter()
        self.stage_seconds = self.staged_at - start
        self._state = "staged"

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> str:
        """``"staged"``, ``"placed"`` or ``"discarded"``."""
        return self._state

    @property
    def handle(self) -> OffloadHandle | None:
        """The handle :meth:`place` returned (None until then)."""
        return self._handle

    @property
    def removed(self) -> bool:
        """True once this object no longer holds the model (placed or discarded)."""
        return self._state != "staged"

    def stats(self) -> OffloadStats:
        """Counters so far: host/disk bytes of the home tier and ``stage_seconds``."""
        if self._handle is not None:
            return self._handle.stats()
        if self._engine is not None:
            return self._engine.stats()
        assert self._ledger is not None
        snap = self._ledger.snapshot()
        snap["stage_seconds"] = self.stage_seconds
        return OffloadStats.of(self.plan, strategy=self.strategy.name, device=str(self.device),
                               budget_bytes=self.budget_bytes, counters=snap)

    # ------------------------------------------------------------------ place / discard
    def place(self) -> OffloadHandle:
        """Put the model on the device and return its handle (call on the thread that will
        run it). A budget given as ``"auto"`` is read again now, because free memory at
        staging time may have included another model. A budget that no longer fits raises
        :class:`BudgetError` and leaves the model staged (free memory and retry, or
        :meth:`discard`); any later failure restores the model and re-raises."""
        from offloadkit.handle import OffloadHandle

        with self._lock:
            if self._state != "staged":
                raise OffloadError(f"cannot place(): this staged model is already {self._state}; "
                                   "call offloadkit.stage() again")
            budget_bytes, plan = self._plan_now()
            if self._engine is None:
                self._state = "placed"
                try:
                    handle = self.strategy.apply(
                        self.model, device=self.device, budget_bytes=budget_bytes,
                        profile=self.profile, layout=self._layout, **self._engine_options)
                except BaseException:
                    self._finish("discarded")
                    raise
            else:
                try:
                    self._engine.place(plan, budget_bytes)
                except BaseException:
                    self._finish("discarded")  # the engine restored the model
                    raise
                handle = OffloadHandle(self._engine)
            self._handle = handle
            self._finish("placed")
            return handle

    def _plan_now(self) -> tuple[int, Plan | None]:
        """The budget and plan in force at placement: re-planned only for ``"auto"``."""
        if self._budget_at_place is None:
            return self.budget_bytes, None
        budget_bytes = self._budget_at_place()
        if budget_bytes == self.budget_bytes:
            return budget_bytes, None
        from offloadkit.engine.profile import with_device_memory

        profile = with_device_memory(self.profile, self.device)
        plan = self.strategy.make_plan(profile, budget_bytes)
        return budget_bytes, plan

    def discard(self, *, restore: bool = True) -> None:
        """Drop the staged copy and put the model back exactly as it was. Idempotent; a
        no-op once placed (remove the handle instead). ``restore=False`` only frees the
        home tier, for a model the caller drops anyway (it is left unusable)."""
        with self._lock:
            if self._state != "staged":
                return
            if self._engine is not None:
                self._engine.remove(restore=restore)
            self._finish("discarded")

    def remove(self, *, restore: bool = True) -> None:
        """Same as :meth:`discard` (the name handles use)."""
        self.discard(restore=restore)

    def _finish(self, state: str) -> None:
        self._state = state
        self._on_finish(self)

    def __enter__(self) -> StagedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()

    def __repr__(self) -> str:
        return f"StagedModel({self._state}, strategy={self.strategy.name!r}, plan={self.plan})"


def _has_own_mechanism(strategy: Strategy) -> bool:
    """A strategy that overrides ``apply`` but not ``stage`` brings its own mechanism."""
    from offloadkit.strategy import Strategy

    cls = type(strategy)
    return cls.apply is not Strategy.apply and cls.stage is Strategy.stage

