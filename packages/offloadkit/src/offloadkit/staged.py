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

from offloadkit.budget import Budget
from offloadkit.engine.core import Engine
from offloadkit.engine.profile import with_device_memory
from offloadkit.errors import OffloadError
from offloadkit.handle import OffloadHandle
from offloadkit.ledger import Ledger, OffloadStats
from offloadkit.planner import make_plan

if TYPE_CHECKING:
    from offloadkit.engine.profile import ModelLayout
    from offloadkit.plans import ModelProfile, Plan
    from offloadkit.strategy import Strategy


class StagedModel:
    """A model offloadkit has planned and packed; :meth:`place` puts it on the device.

    While staged, the model's block weights live only in the home tier (its block tensors
    are NaN stand-ins): do not run it before :meth:`place`. :meth:`discard` (alias
    :meth:`remove`) puts the model back exactly as it was.

    This is where the mechanism is built: the plan comes from ``make_plan`` (the strategy's
    policy, checked), the engine packs the model now, and a strategy with its own
    ``placement`` is constructed at :meth:`place` (nothing of it can be packed ahead).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        strategy: Strategy,
        *,
        device: torch.device,
        budget: Budget,
        budget_bytes: int,
        reread_budget: bool,
        profile: ModelProfile,
        layout: ModelLayout,
        engine_options: dict[str, Any],
        on_finish: Callable[[StagedModel], None],
    ) -> None:
        self.model = model
        self.strategy = strategy
        self.device = device
        self.budget = budget
        self.budget_bytes = budget_bytes
        self.profile = profile
        self._reread_budget = reread_budget
        self._engine_options = engine_options
        self._layout = layout
        self._on_finish = on_finish
        self._lock = threading.Lock()
        self._state = "staging"
        self._handle: OffloadHandle | None = None
        self._engine: Engine | None = None
        self.staged_by = threading.current_thread().name
        start = time.perf_counter()
        # the one budget check, before anything is packed (stated as the user gave it)
        self.plan: Plan = make_plan(strategy, profile,
                                    budget if budget.bytes == budget_bytes else budget_bytes)
        self._ledger: Ledger | None = None
        placement_cls = strategy.placement
        if placement_cls is not None:
            placement_cls.check_host()
        if placement_cls is None or placement_cls.packs_at_stage:
            self._engine = Engine(model, profile=profile, plan=self.plan, strategy=strategy,
                                  device=device, budget_bytes=budget_bytes, layout=layout,
                                  **engine_options)
        else:  # its own mechanism places the model at place(); nothing to pack ahead
            self._ledger = Ledger(max_trace_events=0)
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
        with self._lock:
            if self._state != "staged":
                raise OffloadError(f"cannot place(): this staged model is already {self._state}; "
                                   "call offloadkit.stage() again")
            budget_bytes, plan = self._plan_now()
            placement_cls = self.strategy.placement
            if placement_cls is not None:
                self._state = "placed"
                # a mechanism built on the engine gets the one packed at stage()
                staged = {"engine": self._engine} if placement_cls.packs_at_stage else {}
                try:
                    handle = OffloadHandle(placement_cls(
                        self.model, plan=plan or self.plan, strategy=self.strategy,
                        device=self.device, budget_bytes=budget_bytes, **staged,
                        **self._engine_options))
                except BaseException:
                    if self._engine is not None:
                        self._engine.remove()  # restores the model (a no-op if done)
                    self._finish("discarded")
                    raise
            else:
                assert self._engine is not None
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
        if not self._reread_budget:
            return self.budget_bytes, None
        budget_bytes = self.budget.resolve()
        if budget_bytes == self.budget_bytes:
            return budget_bytes, None
        profile = with_device_memory(self.profile, self.device)
        return budget_bytes, make_plan(self.strategy, profile, budget_bytes)

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

