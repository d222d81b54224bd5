"""The ledger: every byte the engine places and every second it waits, counted as it happens.

``peak_device_bytes`` is the high-water mark of bytes the engine itself allocated on the
device (non-block weights, resident blocks, slots), updated on every allocation, so the
budget check is a measurement rather than a prediction.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class OffloadStats:
    """A snapshot of what an offloaded model has done so far."""

    strategy: str
    device: str
    budget_bytes: int
    peak_device_bytes: int
    current_device_bytes: int
    resident_blocks: int
    streamed_blocks: int
    group_size: int
    prefetch_depth: int
    num_slots: int
    home: str
    bytes_transferred: int
    transfers: int
    transfer_seconds: float
    compute_seconds: float
    stall_seconds: float
    forwards: int
    oom_recoveries: int
    replans: int
    host_pinned_bytes: int
    host_pageable_bytes: int
    disk_bytes: int
    mispredicted_loads: int = 0
    #: bytes of a home="shared" copy this process maps: one copy per node, shared by every
    #: process of the node that maps it (not counted in host_pinned/pageable_bytes)
    host_shared_bytes: int = 0
    stage_seconds: float = 0.0  # packing into the home tier (stage(); may run on another thread)
    place_seconds: float = 0.0  # place(): non-block weights, resident blocks, slots
    block_compute_seconds: dict[int, float] = field(default_factory=dict)  # mean per block

    @classmethod
    def of(cls, plan: Any, *, strategy: str, device: str, budget_bytes: int,
           counters: dict[str, Any]) -> OffloadStats:
        """Stats for a placement running ``plan`` (a :class:`~offloadkit.strategy.Plan`):
        the plan's shape plus the ledger's ``counters`` (:meth:`Ledger.snapshot`)."""
        return cls(strategy=strategy, device=device, budget_bytes=budget_bytes,
                   resident_blocks=len(plan.resident), streamed_blocks=len(plan.streamed),
                   group_size=plan.group_size, prefetch_depth=plan.prefetch_depth,
                   num_slots=plan.num_slots, home=plan.home, **counters)

    @property
    def transfer_gbps(self) -> float:
        """Achieved host-to-device rate in GB/s (0 when nothing moved)."""
        return self.bytes_transferred / self.transfer_seconds / 1e9 if self.transfer_seconds else 0.0


@dataclass
class TraceEvent:
    """One span on the timeline (Chrome-trace 'complete' event)."""

    name: str
    track: str  # "compute", "transfer", "stall" or "stage"
    start_s: float
    duration_s: float
    args: dict = field(default_factory=dict)


class Ledger:
    """Thread-safe counters; the transfer worker and the compute thread both write here."""

    def __init__(self, max_trace_events: int = 100_000) -> None:
        self._lock = threading.Lock()
        self.t0 = time.perf_counter()
        self.current_device_bytes = 0
        self.peak_device_bytes = 0
        self.host_pinned_bytes = 0
        self.host_pageable_bytes = 0
        self.host_shared_bytes = 0
        self.disk_bytes = 0
        self.bytes_transferred = 0
        self.transfers = 0
        self.transfer_seconds = 0.0
        self.compute_seconds = 0.0
        self.stall_seconds = 0.0
        self.forwards = 0
        self.oom_recoveries = 0
        self.replans = 0
        self.mispredicted_loads = 0
        self.stage_seconds = 0.0
        self.place_seconds = 0.0
        self._block_time: dict[int, list[float]] = {}  # index -> [total seconds, count]
        self.trace: list[TraceEvent] = []
        self.max_trace_events = max_trace_events

    # -- device bytes ---------------------------------------------------------------------
    def device_alloc(self, nbytes: int) -> None:
        with self._lock:
            self.current_device_bytes += nbytes
            self.peak_device_bytes = max(self.peak_device_bytes, self.current_device_bytes)

    def device_free(self, nbytes: int) -> None:
        with self._lock:
            self.current_device_bytes -= nbytes
            if self.current_device_bytes < 0:
                raise AssertionError("offloadkit ledger freed more device bytes than it placed")

    # -- host tiers -----------------------------------------------------------------------
    def host_add(self, nbytes: int, *, pinned: bool) -> None:
        with self._lock:
            if pinned:
                self.host_pinned_bytes += nbytes
            else:
                self.host_pageable_bytes += nbytes

    def host_remove(self, nbytes: int, *, pinned: bool) -> None:
        self.host_add(-nbytes, pinned=pinned)

    def host_shared_add(self, nbytes: int) -> None:
        with self._lock:
            self.host_shared_bytes += nbytes

    def disk_add(self, nbytes: int) -> None:
        with self._lock:
            self.disk_bytes += nbytes

    # -- timings --------------------------------------------------------------------------
    def record_transfer(self, name: str, nbytes: int, start_s: float, seconds: float) -> None:
        with self._lock:
            self.bytes_transferred += nbytes
            self.transfers += 1
            self.transfer_seconds += seconds
            self._add_event(TraceEvent(name, "transfer", start_s, seconds, {"bytes": nbytes}))

    def record_compute(self, index: int, start_s: float, seconds: float) -> None:
        with self._lock:
            self.compute_seconds += seconds
            acc = self._block_time.setdefault(index, [0.0, 0])
            acc[0] += seconds
            acc[1] += 1
            self._add_event(TraceEvent(f"block {index}", "compute", start_s, seconds))

    def record_stall(self, index: int, start_s: float, seconds: float) -> None:
        with self._lock:
            self.stall_seconds += seconds
            self._add_event(TraceEvent(f"wait block {index}", "stall", start_s, seconds))

    def record_stage(self, name: str, start_s: float, seconds: float) -> None:
        """Time spent packing the model into its home tier (the "pack now" half)."""
        with self._lock:
            self.stage_seconds += seconds
            self._add_event(TraceEvent(name, "stage", start_s, seconds))

    def record_place(self, start_s: float, seconds: float) -> None:
        """Time spent putting a staged model on the device (the "place later" half)."""
        with self._lock:
            self.place_seconds += seconds
            self._add_event(TraceEvent("place", "stage", start_s, seconds))

    def now(self) -> float:
        """Seconds since the ledger started (the trace's time base)."""
        return time.perf_counter() - self.t0

    def _add_event(self, event: TraceEvent) -> None:
        if len(self.trace) < self.max_trace_events:
            self.trace.append(event)

    def mean_block_seconds(self) -> dict[int, float]:
        with self._lock:
            return {i: t / n for i, (t, n) in self._block_time.items() if n}

    def snapshot(self) -> dict:
        """Counters as a dict (the engine adds plan fields to build OffloadStats)."""
        with self._lock:
            return {
                "peak_device_bytes": self.peak_device_bytes,
                "current_device_bytes": self.current_device_bytes,
                "bytes_transferred": self.bytes_transferred,
                "transfers": self.transfers,
                "transfer_seconds": self.transfer_seconds,
                "compute_seconds": self.compute_seconds,
                "stall_seconds": self.stall_seconds,
                "forwards": self.forwards,
                "oom_recoveries": self.oom_recoveries,
                "replans": self.replans,
                "host_pinned_bytes": self.host_pinned_bytes,
                "host_pageable_bytes": self.host_pageable_bytes,
                "host_shared_bytes": self.host_shared_bytes,
                "disk_bytes": self.disk_bytes,
                "mispredicted_loads": self.mispredicted_loads,
                "stage_seconds": self.stage_seconds,
                "place_seconds": self.place_seconds,
            }
