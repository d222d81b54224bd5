"""The two experts during sampling: one placed at a time, the low one staged ahead.

The sampler gets one callable per expert. The high-noise expert is loaded and placed on its
first step; meanwhile a background thread reads the low-noise expert and stages it with
``offloadkit.stage`` (packed into the home tier), so the switch waits only on device copies.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from turbowan.interrupts import stop_thread
from turbowan.pipeline.cancel import checked
from turbowan.pipeline.placement import release_device_cache, remove_recording_peak
from turbowan.pipeline.timings import Stage, Timings


class ExpertRunner:
    """Hands the sampler one callable per expert; places each on first use, releases the
    previous one, and stages the low expert (read and packed by ``offloadkit.stage``) in a
    background thread while the high one samples."""

    def __init__(self, pipe: Any, timings: Timings, *, stage_low: bool) -> None:
        self.pipe = pipe
        self.timings = timings
        self.active: str | None = None
        self.model: torch.nn.Module | None = None
        self.handle: Any = None
        self.stage: Stage | None = None
        self._stage_cm: Any = None
        self._staged: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._cancelled = False
        self._thread: threading.Thread | None = None
        # several ranks: one budget (the smallest) and rank 0's re-plans, agreed here on
        # the sampling thread (the staging thread must not run collectives)
        self._lockstep: dict[str, Any] = {}
        if getattr(pipe, "parallel", None) is not None:
            from turbowan.distributed.pipeline import lockstep_placement

            self._lockstep = lockstep_placement(pipe.parallel, pipe.budget)
        if pipe.home == "shared":
            from turbowan.distributed.pipeline import shared_home_options

            self._lockstep.update(shared_home_options(getattr(pipe, "parallel", None)))
        if stage_low:
            self._thread = threading.Thread(target=self._stage_low, name="turbowan-stage-low", daemon=True)

    def _offload_kwargs(self, check: Callable[[], None] | None = None) -> dict[str, Any]:
        """``check``: the host's Cancel, on the sampling thread only (the staging thread is
        stopped by :func:`~turbowan.interrupts.stop_thread` instead)."""
        pipe = self.pipe
        extra = {} if check is None else {"interrupt_check": check}
        return {**dict(device=pipe.device, budget=pipe.budget, blocks="blocks", home=pipe.home,
                       **pipe.strategy_options, **extra), **self._lockstep}

    def _stage_low(self) -> None:
        """Background thread: read the low expert and pack it into the home tier now, so the
        switch only has to place it."""
        import offloadkit

        staged = None
        try:
            model = self.pipe._load_expert(self.pipe.files.low)
            staged = offloadkit.stage(model, self.pipe.strategy, **self._offload_kwargs())
            with self._lock:
                if not self._cancelled:
                    self._staged["staged"], staged = staged, None
        except BaseException as exc:  # re-raised in the sampling thread at the switch
            self._staged["error"] = exc
        finally:
            if staged is not None:  # the run ended first: give the memory (or temp file) back
                staged.discard(restore=False)

    def expert(self, name: str) -> Callable[..., torch.Tensor]:
        def run(x, t, context, y):
            if self.active != name:
                self._activate(name)
            with checked(self.model, self.pipe.interrupt_check):
                return self.model(x, t, context, y)

        return run

    def _activate(self, name: str) -> None:
        self._deactivate()
        import offloadkit

        self._stage_cm = self.timings.stage(f"sampling ({name} expert)")
        self.stage = self._stage_cm.__enter__()
        home = self.pipe.home
        if name == "high":
            start = time.perf_counter()
            check = self.pipe.interrupt_check
            model = self.pipe._load_expert_checked(self.pipe.files.high, check)
            loaded = time.perf_counter() - start
            if self._thread is not None:
                self._thread.start()  # stage the low expert while the high one samples
            self.handle = offloadkit.apply(model, self.pipe.strategy, **self._offload_kwargs(check))
            stats = self.handle.stats()
            self.stage.note = (f"loaded in {loaded:.2f} s, packed ({home}) in "
                               f"{stats.stage_seconds:.2f} s, placed in {stats.place_seconds:.2f} s")
        else:
            model, self.handle = self._place_staged_low()
        self.model = model
        self.active = name

    def _place_staged_low(self) -> tuple[torch.nn.Module, Any]:
        """At the switch: wait for the staging thread (measured), then place its result."""
        import offloadkit

        assert self.stage is not None
        switch_at = time.perf_counter()
        if self._thread is not None:
            if self._thread.ident is not None:  # started by the high expert's first step
                self._thread.join()
            self._thread = None  # boundary 1: no high step, so the low expert is staged here
        waited = time.perf_counter() - switch_at
        if "error" in self._staged:
            raise self._staged.pop("error")
        staged = self._staged.pop("staged", None)
        background = staged is not None
        if staged is None:  # not staged ahead (no thread): stage now, on this thread
            check = self.pipe.interrupt_check
            model = self.pipe._load_expert_checked(self.pipe.files.low, check)
            staged = offloadkit.stage(model, self.pipe.strategy, **self._offload_kwargs(check))
        start = time.perf_counter()
        handle = staged.place()
        placed = time.perf_counter() - start
        self.stage.switch = {
            "staged_by": staged.staged_by, "staged_at": staged.staged_at,
            "switch_at": switch_at, "waited_seconds": waited,
            "stage_seconds": staged.stage_seconds, "place_seconds": placed,
        }
        where = ("staged in the background while the high expert sampled" if background
                 else "staged at the switch")
        self.stage.note = (f"{where} (packed ({self.pipe.home}) in {staged.stage_seconds:.2f} s); "
                           f"waited {waited:.2f} s at the switch, placed in {placed:.2f} s")
        return staged.model, handle

    def _deactivate(self) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            remove_recording_peak(handle, self.stage, restore=False)  # dropped: no copy back
        self.model = None
        self.active = None
        if self._stage_cm is not None:
            cm, self._stage_cm = self._stage_cm, None
            cm.__exit__(None, None, None)
            release_device_cache(self.pipe.device)

    def close(self, wait: bool = True) -> None:
        """Release the placed expert and any staged one. ``wait=False`` (an error, Ctrl-C,
        SIGTERM) stops a staging thread at once instead of letting it finish, and still waits
        for it to clean up: a thread left running into interpreter shutdown aborts the process
        and leaves its disk tier in $TMPDIR."""
        self._deactivate()
        if self._thread is not None:
            if not wait:
                with self._lock:
                    self._cancelled = True
                stop_thread(self._thread)
            elif self._thread.is_alive():
                self._thread.join()
        with self._lock:
            self._cancelled = True
            staged = self._staged.pop("staged", None)
        if staged is not None:
            staged.discard(restore=False)
        self._staged.clear()
