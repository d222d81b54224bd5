"""Home tier on disk: every block's packed bytes in one safetensors file.

The file is a valid safetensors file (one ``uint8`` tensor per block, named ``block.<i>``),
so it can be inspected with any safetensors reader. Blocks are read with ``pread`` straight
into the destination (the CPU slot, or a pinned staging buffer on CUDA): the page cache is
not charged to the process, whereas pages of a long-lived mmap would be, so the process's
resident memory really falls by the size of the streamed weights.
"""

from __future__ import annotations

import json
import os
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch

from offloadkit.engine.layout import BlockLayout, TensorEntry, require_data
from offloadkit.engine.modes import engine_mode
from offloadkit.ledger import Ledger

HEADER_ALIGN = 4096  # data section starts on a page boundary


class DiskSource:
    """A block's bytes at ``offset`` in the store's file."""

    pinned = False
    on_disk = True

    def __init__(self, fd: int, offset: int, nbytes: int) -> None:
        self.fd = fd
        self.offset = offset
        self.nbytes = nbytes

    def read_into(self, dst: torch.Tensor, non_blocking: bool = False) -> None:
        if dst.device.type != "cpu" or not dst.is_contiguous() or dst.dtype != torch.uint8:
            raise ValueError("disk blocks are read into a contiguous uint8 CPU buffer")
        view = memoryview(dst.numpy()).cast("B")[: self.nbytes]
        done = 0
        while done < self.nbytes:
            got = os.preadv(self.fd, [view[done:]], self.offset + done)
            if got <= 0:
                raise OSError(f"offloadkit disk tier: short read at byte {self.offset + done}")
            done += got


class DiskStore:
    """Writes blocks to a safetensors file once, then serves reads from it."""

    tier = "disk"

    def __init__(self, ledger: Ledger, layouts: list[BlockLayout], path: str | Path | None) -> None:
        self.ledger = ledger
        self.owned = path is None or Path(path).is_dir()
        if path is None or Path(path).is_dir():
            fd, name = tempfile.mkstemp(prefix="offloadkit-", suffix=".safetensors",
                                        dir=None if path is None else str(path))
            os.close(fd)
            self.path = Path(name)
        else:
            self.path = Path(path)
            if self.path.exists():
                raise FileExistsError(
                    f"disk_path {str(self.path)!r} exists; offloadkit will not overwrite it. "
                    "Pass a new file name or a directory."
                )
        self.live: set[int] = set()
        header, self.offsets, self.data_start, self.total = block_file_header(layouts)
        self._fh = open(self.path, "wb+")  # noqa: SIM115 - lives as long as the store
        self._fh.write(header)
        self._fh.flush()
        self.fd = self._fh.fileno()
        if self.owned:
            self._forget_name()

    def _forget_name(self) -> None:
        """Our own temporary file is unlinked at once: its blocks stay readable through the
        open descriptor, and the OS frees it when the process ends however it ends (exit
        without remove(), a crash, SIGKILL). Where an open file cannot be unlinked
        (Windows), it is removed at interpreter exit instead."""
        try:
            os.unlink(self.path)
        except OSError:
            weakref.finalize(self, _remove_file, self._fh, self.path)

    def add(self, layout: BlockLayout) -> None:
        """Write one block: each tensor's bytes straight to its offset (no scratch copy);
        alignment gaps stay as file holes, which read back as zeros."""
        start, nbytes = self.offsets[layout.index]
        base = self.data_start + start
        for entry in layout.entries:
            _pwrite_all(self.fd, _bytes_of(require_data(entry.ref)), base + entry.offset)
        os.ftruncate(self.fd, max(os.fstat(self.fd).st_size, base + nbytes))
        self.ledger.disk_add(nbytes)
        self.live.add(layout.index)

    def read_entry(self, index: int, entry: TensorEntry, out: torch.Tensor) -> None:
        """Read one tensor of a block straight into ``out`` (used to restore the model)."""
        start, _ = self.offsets[index]
        DiskSource(self.fd, self.data_start + start + entry.offset, entry.nbytes).read_into(
            _bytes_of(out))

    def write_entry(self, index: int, entry: TensorEntry, value: torch.Tensor) -> None:
        """Overwrite one tensor of a block (a buffer its forward updated in place)."""
        start, _ = self.offsets[index]
        _pwrite_all(self.fd, _bytes_of(value), self.data_start + start + entry.offset)

    def finish(self) -> None:
        """Flush after the last block (readers use pread on the same descriptor)."""
        self._fh.flush()

    def source(self, index: int) -> DiskSource:
        start, nbytes = self.offsets[index]
        return DiskSource(self.fd, self.data_start + start, nbytes)

    @engine_mode()
    def read_block(self, index: int) -> torch.Tensor:
        out = torch.empty(self.offsets[index][1], dtype=torch.uint8)
        self.source(index).read_into(out)
        return out

    def drop(self, index: int) -> None:
        if index in self.live:
            self.live.discard(index)
            self.ledger.disk_add(-self.offsets[index][1])

    def close(self) -> None:
        for index in list(self.live):
            self.drop(index)
        if self._fh.closed:
            return
        self._fh.close()
        if self.owned:
            self.path.unlink(missing_ok=True)


def block_file_header(layouts: list[BlockLayout], metadata: dict[str, str] | None = None
                      ) -> tuple[bytes, dict[int, tuple[int, int]], int, int]:
    """The safetensors header of a file holding one ``uint8`` tensor per block, padded so
    the data starts on a page boundary. Returns the header bytes (length prefix included),
    each block's (offset in the data section, size), where the data starts, and its size."""
    header: dict[str, object] = {"__metadata__": {"format": "offloadkit-blocks",
                                                  **(metadata or {})}}
    offsets: dict[int, tuple[int, int]] = {}
    start = 0
    for layout in layouts:
        end = start + layout.nbytes
        header[f"block.{layout.index}"] = {
            "dtype": "U8", "shape": [layout.nbytes], "data_offsets": [start, end],
        }
        offsets[layout.index] = (start, layout.nbytes)
        start = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    padded = -(-(8 + len(raw)) // HEADER_ALIGN) * HEADER_ALIGN - 8
    raw = raw + b" " * (padded - len(raw))
    return len(raw).to_bytes(8, "little") + raw, offsets, 8 + len(raw), start


def _remove_file(fh: Any, path: Path) -> None:
    fh.close()
    path.unlink(missing_ok=True)


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor's memory as a flat uint8 tensor (no copy)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    return t.reshape(-1).view(torch.uint8)


def _pwrite_all(fd: int, data: torch.Tensor, offset: int) -> None:
    view = memoryview(data.numpy()).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
