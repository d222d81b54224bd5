"""Home tier in host RAM: each block's tensors packed into one flat byte buffer.

One buffer per block means one large host-to-device copy per block instead of dozens of
small ones. Packing goes block by block and drops each original tensor as soon as its bytes
are in the buffer, so the weights never exist twice in RAM. On CUDA the buffers are pinned
(page-locked, required for truly asynchronous copies) up to a cap; past the cap, or if
pinning fails, they fall back to pageable memory.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch

from offloadkit.engine.layout import BlockLayout, TensorEntry, require_data, view_in
from offloadkit.engine.modes import engine_mode
from offloadkit.ledger import Ledger

DEFAULT_PIN_FRACTION = 0.5  # of the host's available RAM, when no pin_limit_bytes is given


def default_pin_limit(*, per_process: bool = True) -> int:
    """Half the host's available RAM: the node's cap on page-locked memory. Each of a
    node's processes pins its own private copy, so with ``per_process`` the cap is split
    among them (torchrun's ``LOCAL_WORLD_SIZE``); a home="shared" copy is one for the node
    and is checked against the whole cap."""
    try:
        import psutil

        available = int(psutil.virtual_memory().available * DEFAULT_PIN_FRACTION)
    except ImportError:  # pragma: no cover - psutil is a dependency
        return 0
    return available // local_processes() if per_process else available


def local_processes() -> int:
    """Processes of this job on this node (torchrun sets LOCAL_WORLD_SIZE), at least 1."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def pinned_footprint(nbytes: int) -> int:
    """Page-locked bytes an ``nbytes`` pinned request really takes: torch's caching host
    allocator rounds each request up to a power of two by default (a 700 MB block locks
    1 GiB), so the pin cap is checked against this, not against the block's size."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 0 else 0


def fill_block_buffer(buffer: torch.Tensor, layout: BlockLayout) -> None:
    """Copy every tensor of ``layout`` (as the model holds it now) into ``buffer``."""
    for entry in layout.entries:
        view_in(buffer, entry).copy_(require_data(entry.ref))


def release_memory() -> None:
    """Hand freed heap pages back to the OS so resident memory really falls (glibc keeps
    them otherwise). No-op where malloc_trim does not exist."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


class HostSource:
    """A block's bytes in host RAM."""

    on_disk = False

    def __init__(self, buffer: torch.Tensor, pinned: bool) -> None:
        self.buffer = buffer
        self.pinned = pinned
        self.nbytes = buffer.numel()

    def read_into(self, dst: torch.Tensor, non_blocking: bool = False) -> None:
        dst.copy_(self.buffer, non_blocking=non_blocking)


class BlocksInMemory:
    """Read access to block buffers in host memory, private (HostStore) or mapped from a
    file shared by the node's processes (SharedStore)."""

    sources: dict[int, HostSource]

    def source(self, index: int) -> HostSource:
        return self.sources[index]

    def read_block(self, index: int) -> torch.Tensor:
        """The block's bytes as a host tensor (used to restore the model)."""
        return self.sources[index].buffer

    def read_entry(self, index: int, entry: TensorEntry, out: torch.Tensor) -> None:
        """Copy one tensor of a block into ``out`` (state_dict while offloaded)."""
        out.copy_(view_in(self.sources[index].buffer, entry))


class HostStore(BlocksInMemory):
    """Packed block buffers in (pinned or pageable) host memory."""

    tier = "host"

    def __init__(self, ledger: Ledger, *, pin: bool, pin_limit_bytes: int | None = None) -> None:
        self.ledger = ledger
        self.pin = pin
        self.pin_limit = default_pin_limit() if pin_limit_bytes is None else pin_limit_bytes
        self.pinned_bytes = 0  # page-locked bytes held, as the allocator rounds them
        self.sources: dict[int, HostSource] = {}

    @engine_mode()  # home buffers are written back to later, from any mode
    def _allocate(self, nbytes: int) -> tuple[torch.Tensor, bool]:
        if self.pin and self.pinned_bytes + pinned_footprint(nbytes) <= self.pin_limit:
            try:
                return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), True
            except RuntimeError:  # pinning refused (locked-memory limit): stay pageable
                self.pin = False
        return torch.empty(nbytes, dtype=torch.uint8), False

    def add(self, layout: BlockLayout) -> None:
        """Pack one block; the caller then drops the model's references to the originals."""
        buffer, pinned = self._allocate(layout.nbytes)
        fill_block_buffer(buffer, layout)
        self.sources[layout.index] = HostSource(buffer, pinned)
        if pinned:
            self.pinned_bytes += pinned_footprint(layout.nbytes)
        self.ledger.host_add(layout.nbytes, pinned=pinned)

    def finish(self) -> None:
        """After the last block: nothing to flush in RAM."""

    def write_entry(self, index: int, entry: TensorEntry, value: torch.Tensor) -> None:
        """Overwrite one tensor of a block (a buffer its forward updated in place)."""
        view_in(self.sources[index].buffer, entry).copy_(value)

    def drop(self, index: int) -> None:
        source = self.sources.pop(index)
        if source.pinned:
            self.pinned_bytes -= pinned_footprint(source.nbytes)
        self.ledger.host_remove(source.nbytes, pinned=source.pinned)

    def close(self) -> None:
        for index in list(self.sources):
            self.drop(index)
