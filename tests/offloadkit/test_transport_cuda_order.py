"""The CUDA transport's ordering, checked on any machine with stand-ins for streams and
events: a copy into a slot waits (on the side stream) for the compute token of the slot's
last reader, the ready event is recorded after the copy, compute waits (on the GPU) for
that event, and none of it synchronises the host. The real CUDA run is test_engine_cuda."""

from __future__ import annotations

import contextlib

import pytest
import torch

from offloadkit.engine.packing import HostSource
from offloadkit.engine.transfer import CudaTransport
from offloadkit.ledger import Ledger


class Stream:
    def __init__(self, log: list, name: str) -> None:
        self.log, self.name = log, name

    def wait_event(self, event: Event) -> None:
        self.log.append(("wait", self.name, event))

    def synchronize(self) -> None:
        self.log.append(("host-sync", self.name, None))


class Event:
    def __init__(self, log: list, enable_timing: bool = False) -> None:
        self.log = log

    def record(self, stream: Stream) -> None:
        self.log.append(("record", stream.name, self))

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Event) -> float:
        return 1.0

    def synchronize(self) -> None:
        self.log.append(("host-sync", "event", self))


@pytest.fixture
def fake_cuda(monkeypatch):
    log: list = []
    compute = Stream(log, "compute")
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: Stream(log, "side"))
    monkeypatch.setattr(torch.cuda, "Event", lambda enable_timing=False: Event(log, enable_timing))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    return log


class LoggedSource(HostSource):
    def __init__(self, log: list, buffer: torch.Tensor) -> None:
        super().__init__(buffer, pinned=True)
        self.log = log

    def read_into(self, dst: torch.Tensor, non_blocking: bool = False) -> None:
        self.log.append(("copy", "side" if non_blocking else "blocking", None))
        super().read_into(dst, non_blocking)


def test_slot_copy_waits_for_its_last_reader_and_compute_waits_for_the_copy(fake_cuda):
    log = fake_cuda
    transport = CudaTransport(Ledger(), torch.device("cuda", 0))
    slot = torch.zeros(16, dtype=torch.uint8)
    source = LoggedSource(log, torch.arange(16, dtype=torch.uint8))
    log.clear()

    token = transport.release(slot)  # after the compute that last read the slot
    ticket = transport.submit("group 0", [(source, slot)], after=token)
    transport.wait(ticket, 0)
    steps = [(kind, where) for kind, where, _ in log]
    assert steps == [("record", "compute"),  # the release token
                     ("wait", "side"), ("record", "side"),  # wait for it, transfer start
                     ("copy", "side"), ("record", "side"),  # async copy, ready event
                     ("record", "compute"), ("wait", "compute")]  # stall mark, wait for ready
    assert log[1][2] is token and log[4][2] is ticket.ready_event and log[6][2] is ticket.ready_event
    assert torch.equal(slot, torch.arange(16, dtype=torch.uint8))

    log.clear()
    transport.submit("group 1", [(source, slot)], after=None)  # a slot never read: no wait
    assert [(k, w) for k, w, _ in log] == [("record", "side"), ("copy", "side"), ("record", "side")]
    transport.resolve()
    assert all(kind != "host-sync" for kind, _, _ in log)  # nothing stalls the host
    assert transport.ledger.transfers == 2 and transport.ledger.stall_seconds > 0
