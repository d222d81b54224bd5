"""The object ``offloadkit.apply`` returns: stats, trace, re-plan, and the way back."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from offloadkit.ledger import OffloadStats
    from offloadkit.placement import Placement
    from offloadkit.plans import Plan


class OffloadHandle:
    """Controls one offloaded model. ``remove()`` puts the model back exactly as it was."""

    def __init__(self, placement: Placement) -> None:
        """Drive ``placement``: the engine, or a strategy's own :class:`Placement`."""
        self._placement = placement
        self._removed = False
        self._finalizers: list[Callable[[], None]] = []

    @property
    def plan(self) -> Plan:
        """The placement now in force (it changes after a re-plan or OOM recovery)."""
        return self._placement.plan

    @property
    def removed(self) -> bool:
        return self._removed

    def stats(self) -> OffloadStats:
        """Measured counters so far (peak device bytes, bytes moved, stall seconds, ...)."""
        return self._placement.stats()

    def state_dict(self) -> dict[str, Any]:
        """The model's state dict with its real weights: streamed and resident block tensors
        are read from the home tier (as new CPU tensors), the rest as the model holds them.
        ``model.state_dict()`` gives the same while the offload lives."""
        self._check_live("state_dict")
        return self._placement.state_dict()

    def replan(self) -> Plan | None:
        """Ask the strategy for a better plan from the measured stats; apply it if any.

        With the engine option ``process_group`` this is a collective: every rank of the
        group must call it, between the same two forwards, from the thread that runs the
        model (a rank that skips it leaves the others waiting, then failing at the group's
        timeout). The group's first rank decides from its own measurements and every rank
        puts that plan in force, so the ranks keep running one plan. Returns the new plan,
        or None when it did not change."""
        self._check_live("replan")
        return self._placement.replan()

    def export_trace(self, path: str | Path) -> Path:
        """Write the per-block timeline as Chrome-trace JSON (open in chrome://tracing or
        ui.perfetto.dev) and return the path."""
        tracks = {"compute": 1, "transfer": 2, "stall": 3, "stage": 4}
        events: list[dict[str, Any]] = [
            {"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": track}}
            for track, tid in tracks.items()
        ]
        for ev in self._placement.trace_events():
            events.append(
                {
                    "name": ev.name,
                    "cat": ev.track,
                    "ph": "X",
                    "pid": 1,
                    "tid": tracks.get(ev.track, 5),
                    "ts": round(ev.start_s * 1e6, 3),
                    "dur": round(ev.duration_s * 1e6, 3),
                    "args": ev.args,
                }
            )
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
        return out

    def remove(self, *, restore: bool = True) -> None:
        """Undo the offload: weights back where they were, hooks gone. Idempotent.

        ``restore=False`` is for a model the caller drops right after (a pipeline switching
        models): device and home-tier memory are freed but the weights are not copied back,
        so the model is left unusable (NaN stand-ins). A placement that cannot skip the copy
        (cpu_only, comfy_native) restores anyway."""
        if self._removed:
            return
        self._placement.remove(restore=restore)
        self._removed = True
        for finalize in reversed(self._finalizers):
            finalize()

    def add_finalizer(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` after the placement is removed (the API uses it to untag the model)."""
        self._finalizers.append(fn)

    def _check_live(self, what: str) -> None:
        if self._removed:
            raise RuntimeError(f"cannot {what}(): this offload was removed; call apply() again")

    def __enter__(self) -> OffloadHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else f"plan={self.plan}"
        return f"OffloadHandle({state})"
