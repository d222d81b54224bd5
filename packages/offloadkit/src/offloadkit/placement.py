"""The one interface a mechanism implements: what an :class:`~offloadkit.OffloadHandle` drives.

offloadkit's engine is the mechanism every streaming strategy shares. A strategy that brings
its own mechanism (``cpu_only`` computes on the CPU; ``comfy_native`` hands the model to
ComfyUI) does not override anything on the strategy: it names a :class:`Placement` subclass
in ``Strategy.placement``, and ``StagedModel.place()`` constructs it on the compute thread::

    placement_cls(model, plan=plan, strategy=strategy, device=device,
                  budget_bytes=budget_bytes, **options)

``plan`` is the checked plan (``offloadkit.make_plan``), ``options`` the engine options the
user passed, restricted to the names the class lists in ``accepts_options`` (any other is
refused before anything moves). The constructor puts the model in place or raises with the
model untouched; :meth:`remove` puts it back.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from offloadkit.ledger import OffloadStats, TraceEvent
    from offloadkit.plans import Plan


class Placement(ABC):
    """A model carried out by a plan, until :meth:`remove`."""

    #: engine options (``offloadkit.apply(**options)``) this mechanism accepts
    accepts_options: ClassVar[frozenset[str]] = frozenset()
    #: the mechanism builds on offloadkit's engine: ``stage()`` packs the model into its home
    #: tier then (a background thread may do it), and ``place()`` passes the packed engine as
    #: ``engine=`` (its profile and block layout with it)
    packs_at_stage: ClassVar[bool] = False
    #: the placement in force (it may change after a re-plan or OOM recovery)
    plan: Plan

    @classmethod
    def check_host(cls) -> None:
        """Raise, naming the fix, when this mechanism cannot run here (called by ``stage()``
        before anything is packed); nothing to check by default."""
        return None

    @abstractmethod
    def stats(self) -> OffloadStats:
        """Measured counters so far (``OffloadStats.of(plan, ...)`` builds them)."""

    def trace_events(self) -> list[TraceEvent]:
        """Per-block timeline events, for ``handle.export_trace``; none by default."""
        return []

    def replan(self) -> Plan | None:
        """Put a better plan in force, or return None; a fixed placement never re-plans."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """The model's state dict with its real weights (``handle.state_dict()``); a
        mechanism that leaves the weights in the model returns ``model.state_dict()``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement state_dict()")

    @abstractmethod
    def remove(self, *, restore: bool = True) -> None:
        """Put the model back exactly as it was. ``restore=False`` may skip copying the
        weights back for a model the caller drops anyway (a placement that cannot, ignores it)."""
