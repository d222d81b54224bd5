"""Where a run's time and memory went, printed at the end of every run."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Stage:
    """One stage: wall seconds and the peak device bytes offloadkit measured for it."""

    name: str
    seconds: float = 0.0
    peak_device_bytes: int | None = None
    note: str = ""
    #: the expert switch (low-expert stage only): when staging finished and the switch
    #: began (perf_counter), seconds waited on the staging thread, packing and placing
    switch: dict[str, object] | None = None


@dataclass
class Timings:
    """Ordered stages of one run; ``on_start`` (optional) is told each stage's name as it
    begins, so a front end can show what a long run is doing."""

    stages: list[Stage] = field(default_factory=list)
    on_start: Callable[[str], None] | None = None

    @contextmanager
    def stage(self, name: str) -> Iterator[Stage]:
        if self.on_start is not None:
            self.on_start(name)
        record = Stage(name)
        start = time.perf_counter()
        try:
            yield record
        finally:
            record.seconds = time.perf_counter() - start
            self.stages.append(record)

    @property
    def total_seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    def get(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)

    def as_dict(self) -> dict[str, dict[str, object]]:
        return {
            s.name: {"seconds": round(s.seconds, 4), "peak_device_bytes": s.peak_device_bytes, "note": s.note}
            for s in self.stages
        }

    def summary(self, device: str = "") -> str:
        from offloadkit import format_bytes  # the units budgets are given in

        width = max([len(s.name) for s in self.stages] + [5])
        where = f" on {device}" if device else ""
        lines = [f"time and peak weight memory per stage{where} (peak from offloadkit's ledger):"]
        for s in self.stages:
            mem = format_bytes(s.peak_device_bytes) if s.peak_device_bytes is not None else "-"
            note = f"  {s.note}" if s.note else ""
            lines.append(f"  {s.name:<{width}}  {s.seconds:8.2f} s  {mem:>10}{note}")
        lines.append(f"  {'total':<{width}}  {self.total_seconds:8.2f} s")
        return "\n".join(lines)

