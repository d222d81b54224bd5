"""Moving a group of blocks from the home tier into a device slot, ahead of use.

Two transports with one interface, so the CPU tests drive the same bookkeeping as the GPU:

- :class:`CudaTransport`: copies run on a side stream. A copy into a slot first waits (on
  the GPU, not the host) for the event recorded after the last compute that read the slot;
  compute waits (again on the GPU) for the copy's event. Nothing in the hot path
  synchronises the host with the device or empties the allocator cache. Disk reads happen
  on a worker thread into pinned staging buffers, then go up on the side stream.
- :class:`CpuTransport`: a worker thread does the copies (or disk reads) into the slot;
  compute waits on the thread's future. Time spent waiting is the stall.

Timings on CUDA come from events and are read lazily (only events that have completed),
so measuring never stalls the stream.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from offloadkit.engine.modes import engine_mode
from offloadkit.ledger import Ledger


class Source(Protocol):
    nbytes: int
    pinned: bool
    on_disk: bool  # read with pread into a CPU buffer first (the disk tier), not copied directly

    def read_into(self, dst: torch.Tensor, non_blocking: bool = False) -> None: ...


@dataclass
class Ticket:
    """A transfer in flight; ``wait`` makes the compute stream (or thread) wait for it."""

    name: str
    future: Future | None = None
    ready_event: Any = None  # torch.cuda.Event on CUDA
    done: bool = False


@dataclass
class _Timing:
    kind: str  # "transfer", "compute" or "stall"
    index: int
    name: str
    nbytes: int
    start: Any
    end: Any


class CpuTransport:
    """Prefetch with one worker thread: the CPU stand-in for a copy stream."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offloadkit-prefetch")
        self._inflight: set[Future] = set()
        self._lock = threading.Lock()

    def submit(self, name: str, copies: Sequence[tuple[Source, torch.Tensor]], after: Any = None
               ) -> Ticket:
        future = self._pool.submit(self._run, name, list(copies))
        with self._lock:
            self._inflight.add(future)
        future.add_done_callback(self._forget)
        return Ticket(name, future=future)

    def _forget(self, future: Future) -> None:
        with self._lock:
            self._inflight.discard(future)

    @engine_mode()  # a worker thread: copies into normal tensors, whatever the caller's mode
    def _run(self, name: str, copies: list[tuple[Source, torch.Tensor]]) -> None:
        start = self.ledger.now()
        t = time.perf_counter()
        for source, dst in copies:
            source.read_into(dst)
        self.ledger.record_transfer(name, sum(s.nbytes for s, _ in copies), start,
                                    time.perf_counter() - t)

    def wait(self, ticket: Ticket, index: int) -> None:
        """Block the compute thread until the ticket's copy is done; count the stall."""
        if ticket.done:
            return
        assert ticket.future is not None
        if not ticket.future.done():
            start = self.ledger.now()
            t = time.perf_counter()
            ticket.future.result()
            self.ledger.record_stall(index, start, time.perf_counter() - t)
        else:
            ticket.future.result()  # re-raise a failed copy here, on the compute thread
        ticket.done = True

    def release(self, slot_buffer: torch.Tensor) -> Any:
        """Compute that read the slot is finished (CPU compute is synchronous): no token."""
        return None

    def compute_begin(self, index: int) -> Any:
        return (self.ledger.now(), time.perf_counter())

    def compute_end(self, index: int, token: Any) -> None:
        start, t = token
        self.ledger.record_compute(index, start, time.perf_counter() - t)

    def copy_now(self, source: Source, dst: torch.Tensor) -> None:
        """Synchronous copy outside the hot path (resident blocks at apply/re-plan time)."""
        source.read_into(dst)

    def drain(self) -> None:
        with self._lock:
            pending = list(self._inflight)
        for future in pending:
            future.result()

    def resolve(self) -> None:
        """Nothing to resolve: CPU timings are recorded as they happen."""

    @engine_mode()
    def allocate(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def ensure_staging(self, nbytes: int) -> None:
        """CPU reads land straight in the slot: no staging buffers."""

    def close(self) -> None:
        self.drain()
        self._pool.shutdown(wait=True)


class CudaTransport:
    """Side-stream copies with events; lazily resolved event timings."""

    def __init__(self, ledger: Ledger, device: torch.device, *, disk: bool = False,
                 staging_count: int = 2) -> None:
        self.ledger = ledger
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self._pending: deque[_Timing] = deque()
        self._lock = threading.Lock()
        with torch.cuda.device(device):
            self._origin = torch.cuda.Event(enable_timing=True)
            self._origin.record(torch.cuda.current_stream(device))
        self._origin_host = ledger.now()
        # disk tier: a worker thread reads blocks into pinned staging buffers (sized by
        # ensure_staging once the slot size is known), then uploads them on the side stream
        self._pool: ThreadPoolExecutor | None = None
        self._staging_count = staging_count
        self._staging: list[tuple[torch.Tensor, Any]] = []
        self._staging_next = 0
        if disk:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offloadkit-disk")

    def _event(self) -> Any:
        return torch.cuda.Event(enable_timing=True)

    def submit(self, name: str, copies: Sequence[tuple[Source, torch.Tensor]], after: Any = None
               ) -> Ticket:
        copies = list(copies)
        nbytes = sum(s.nbytes for s, _ in copies)
        if any(s.on_disk for s, _ in copies):
            assert self._pool is not None and self._staging, "disk tier needs staging buffers"
            ready = self._event()
            future = self._pool.submit(self._disk_then_copy, name, copies, after, ready, nbytes)
            return Ticket(name, future=future, ready_event=ready)
        ready = self._event()
        self._issue(name, copies, after, ready, nbytes)
        return Ticket(name, ready_event=ready)

    def _issue(self, name: str, copies: list, after: Any, ready: Any, nbytes: int) -> None:
        start = self._event()
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)  # slot reuse only after its last reader finished
            start.record(self.stream)
            for source, dst in copies:
                source.read_into(dst, non_blocking=True)
            ready.record(self.stream)
        with self._lock:
            self._pending.append(_Timing("transfer", -1, name, nbytes, start, ready))

    @engine_mode()
    def _disk_then_copy(self, name: str, copies: list, after: Any, ready: Any, nbytes: int
                        ) -> None:
        which = self._staging_next
        self._staging_next = (which + 1) % len(self._staging)
        buf, busy = self._staging[which]
        if busy is not None:
            busy.synchronize()  # worker thread only: the staging buffer's last upload is done
        staged = []
        offset = 0
        for source, dst in copies:
            part = buf[offset : offset + source.nbytes]
            source.read_into(part)
            staged.append((_Pinned(part), dst))
            offset += source.nbytes
        self._issue(name, staged, after, ready, nbytes)
        self._staging[which] = (buf, ready)  # reusable once this upload has finished

    @engine_mode()
    def ensure_staging(self, nbytes: int) -> None:
        """Disk tier: pinned staging buffers at least one slot large (re-plans may grow
        slots). Allocated outside the hot path: at set-up and re-plan time."""
        if self._pool is None:
            return
        if self._staging and self._staging[0][0].numel() >= nbytes:
            return
        self.drain()
        self._drop_staging()
        self._staging = [(torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), None)
                         for _ in range(self._staging_count)]
        self.ledger.host_add(nbytes * self._staging_count, pinned=True)
        self._staging_next = 0

    def _drop_staging(self) -> None:
        for buf, _ in self._staging:
            self.ledger.host_remove(buf.numel(), pinned=True)
        self._staging = []

    def wait(self, ticket: Ticket, index: int) -> None:
        if ticket.future is not None and not ticket.done:
            t0 = self.ledger.now()
            t = time.perf_counter()
            ticket.future.result()
            waited = time.perf_counter() - t
            if waited > 1e-4:
                self.ledger.record_stall(index, t0, waited)
        want = self._event()
        compute = torch.cuda.current_stream(self.device)
        want.record(compute)
        compute.wait_event(ticket.ready_event)
        if not ticket.done:
            with self._lock:
                self._pending.append(_Timing("stall", index, ticket.name, 0, want,
                                             ticket.ready_event))
        ticket.done = True

    def release(self, slot_buffer: torch.Tensor) -> Any:
        """Record when the compute that read a slot is done; the next copy waits on it."""
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def compute_begin(self, index: int) -> Any:
        start = self._event()
        start.record(torch.cuda.current_stream(self.device))
        return start

    def compute_end(self, index: int, token: Any) -> None:
        end = self._event()
        end.record(torch.cuda.current_stream(self.device))
        with self._lock:
            self._pending.append(_Timing("compute", index, f"block {index}", 0, token, end))
            if len(self._pending) > 4096:
                self._resolve_locked()

    @engine_mode()
    def copy_now(self, source: Source, dst: torch.Tensor) -> None:
        if source.on_disk:
            staging = torch.empty(source.nbytes, dtype=torch.uint8)
            source.read_into(staging)
            dst.copy_(staging)
        else:
            source.read_into(dst)

    def resolve(self) -> None:
        with self._lock:
            self._resolve_locked()

    def _resolve_locked(self) -> None:
        """Move completed event pairs into the ledger; stop at the first incomplete one."""
        while self._pending:
            item = self._pending[0]
            if not (item.end.query() and item.start.query()):
                break
            self._pending.popleft()
            seconds = item.start.elapsed_time(item.end) / 1e3
            begin = self._origin_host + self._origin.elapsed_time(item.start) / 1e3
            if item.kind == "transfer":
                self.ledger.record_transfer(item.name, item.nbytes, begin, seconds)
            elif item.kind == "compute":
                self.ledger.record_compute(item.index, begin, seconds)
            elif seconds > 0:
                self.ledger.record_stall(item.index, begin, seconds)

    def drain(self) -> None:
        if self._pool is not None:
            self._pool.submit(lambda: None).result()
        self.stream.synchronize()

    @engine_mode()
    def allocate(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def close(self) -> None:
        self.drain()
        torch.cuda.current_stream(self.device).synchronize()
        self.resolve()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._drop_staging()


class _Pinned:
    """A staged (pinned) piece of a disk block, ready for an async upload."""

    pinned = True

    def __init__(self, buffer: torch.Tensor) -> None:
        self.buffer = buffer
        self.nbytes = buffer.numel()

    def read_into(self, dst: torch.Tensor, non_blocking: bool = False) -> None:
        dst.copy_(self.buffer, non_blocking=non_blocking)
