"""Home tier shared by the processes of one node: one packed copy in a shared-memory file.

The ranks of a multi-GPU run hold the same weights. With a private home each keeps its own
packed copy in host RAM (eight GPUs: eight copies of a 27 GB model). With ``home="shared"``
the first process to arrive packs the blocks into a file in ``/dev/shm`` (a valid
safetensors file, one ``uint8`` tensor per block, like the disk tier's) and the others map
that file instead of packing: the node holds one copy.

The processes agree through the file system alone, no collective, so staging may run on a
background thread while another model's collectives run:

- ``<name>.lock`` is created exclusively by the packer, which holds an exclusive ``flock``
  on it while it lives (its pid inside, for messages; a lock nobody holds is a dead
  packer's, taken over). It packs into ``<name>.<pid>.partial`` and renames that to
  ``<name>`` once complete, so a process never maps a half-written copy.
- every user holds a shared ``flock`` on the file while it maps it, and appends its pid to
  the lock file. The names are removed once the expected number of processes has opened
  the file, or else by the last user to close; the memory goes with the last mapping. A
  file nobody holds a lock on is left from a dead run: the next packer removes it.
- the file's name holds the job's key, the layout's fingerprint and a digest of a sample of
  every tensor's bytes, so equal models meet in one copy (two pipelines of one process
  too) and different ones of equal layout (the two experts) get their own; the mapping
  process checks the header against its own model as well.

The copy is read-only for the processes that share it: a block whose forward writes a
buffer in place (BatchNorm in train mode) is refused, since one rank's write would change
every rank's weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # Windows: no flock, no /dev/shm
    fcntl = None  # type: ignore[assignment]

from offloadkit.engine.disk import _bytes_of, block_file_header
from offloadkit.engine.layout import BlockLayout, TensorEntry, require_data
from offloadkit.engine.modes import engine_mode
from offloadkit.engine.packing import (
    BlocksInMemory,
    HostSource,
    default_pin_limit,
    fill_block_buffer,
    local_processes,
)
from offloadkit.errors import OffloadError
from offloadkit.ledger import Ledger
from offloadkit.units import describe_bytes

PREFIX = "offloadkit-shared-"
DEFAULT_DIR = "/dev/shm"
DEFAULT_TIMEOUT_S = 600.0  # packing a 14B expert from a slow disk takes minutes
POLL_S = 0.02
SAMPLE_PIECES, SAMPLE_BYTES = 32, 64  # per tensor: 2 KiB from all over it


def shared_home_supported() -> bool:
    """This system has what home="shared" needs (file locks): POSIX, not Windows."""
    return fcntl is not None


def default_key() -> str | None:
    """The torchrun launcher this process was started by, or None outside torchrun: its job
    id, rendezvous address and its own pid (the local workers' parent). The pid tells two
    jobs apart even when both use torchrun's default job id "none" and one port (a re-run
    after a crash); a copy is per machine, so the processes that share it are one launcher's."""
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    if not run:
        return None
    return (f"{run}-{os.environ.get('MASTER_ADDR', '')}-{os.environ.get('MASTER_PORT', '')}"
            f"-{os.getppid()}")


def resolve_key(key: str | None) -> str:
    key = key if key is not None else default_key()
    if not key:
        raise OffloadError(
            "home='shared' needs a name the processes sharing one copy agree on: run under "
            "torchrun (its job id is used), or pass shared_key='...' (the same string in "
            "every process of the job)."
        )
    return key


def layout_fingerprint(layouts: list[BlockLayout]) -> str:
    """Names, shapes, dtypes and offsets of every block tensor: equal for equal models."""
    described = [[b.name, b.nbytes, [[e.ref.qualname, list(e.shape), str(e.dtype), e.offset]
                                     for e in b.entries]] for b in layouts]
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()


def _sample(data: torch.Tensor) -> bytes:
    """SAMPLE_PIECES pieces of SAMPLE_BYTES spread evenly over a flat uint8 tensor, first
    and last included (the whole tensor when it is that small)."""
    n = data.numel()
    if n <= SAMPLE_PIECES * SAMPLE_BYTES:
        return data.numpy().tobytes()
    step = (n - SAMPLE_BYTES) / (SAMPLE_PIECES - 1)
    starts = [round(i * step) for i in range(SAMPLE_PIECES)]
    return b"".join(data[a:a + SAMPLE_BYTES].numpy().tobytes() for a in starts)


def block_digest(layout: BlockLayout, tensor_bytes: Callable[[TensorEntry], torch.Tensor]
                 ) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for entry in layout.entries:
        digest.update(_sample(tensor_bytes(entry)))
    return digest.hexdigest()


def free_bytes(directory: str | Path) -> int:
    """Bytes a new file in ``directory`` may still take."""
    return shutil.disk_usage(directory).free  # f_bavail * f_frsize; also where no statvfs


def default_dir() -> Path:
    return Path(DEFAULT_DIR if os.path.isdir(DEFAULT_DIR) else "/tmp")


def room_message(directory: Path, free: int, need: int, why: str = "") -> str:
    return (f"home='shared': {directory} has {describe_bytes(free)} free, the shared copy "
            f"needs {describe_bytes(need)}{f' ({why})' if why else ''}. Enlarge it (docker: "
            "--shm-size), pass shared_dir= on a larger RAM file system, or use home='host'.")


def shared_dir(directory: str | Path | None) -> Path:
    """``directory`` (default ``/dev/shm``), refused with the fix when it is not one."""
    where = Path(directory) if directory is not None else default_dir()
    if not where.is_dir():
        raise OffloadError(f"shared_dir {str(where)!r} is not a directory; pass an existing "
                           "directory on a RAM file system (/dev/shm)")
    return where


def check_shared_room(nbytes: int, directory: str | Path | None = None) -> None:
    """Raise :class:`OffloadError` (naming the fix) when ``directory`` (default
    ``/dev/shm``) has no room for ``nbytes`` of shared copies: a pipeline asks this before
    it loads anything, rather than failing when its second model is packed."""
    where = shared_dir(directory)
    free = free_bytes(where)
    if free < nbytes:
        raise OffloadError(room_message(where, free, nbytes))


def _read_pid(lock_path: Path) -> int | None:
    try:
        first = lock_path.read_bytes().split(b"\n", 1)[0]
        return int(first) if first else None
    except (OSError, ValueError):  # gone, or another user's (0600) in a shared /dev/shm
        return None


def _take_over(lock_path: Path) -> int | None:
    """Remove a lock whose packer is gone and return its pid; None while it lives.

    A packer holds an exclusive ``flock`` on its lock file for as long as it lives and the
    kernel drops it with the process: unlike a pid, which the system reuses (a restarted
    container numbers its processes alike), this cannot outlive the packer. The lock is
    removed under that flock and only if its name is still that file, so of several processes
    taking over one dead packer's lock, one removes it and the others find the new one."""
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        first = os.pread(fd, 32, 0).split(b"\n", 1)[0]
        # empty: its packer created it a moment ago and writes its pid once it holds it
        if not first or os.stat(lock_path).st_ino != os.fstat(fd).st_ino:
            return None
        pid = int(first)
        os.unlink(lock_path)
        return pid
    except (OSError, ValueError):  # held by its packer, gone, or another user's
        return None
    finally:
        os.close(fd)


def _held(path: Path, *, missing: bool) -> bool:
    """Some process holds a flock on the file (every user holds a shared one on the copy
    while it maps it, a packer an exclusive one on its lock while it lives). A file we may
    not open is another user's: held. ``missing``: the answer when there is no file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return missing
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def sweep(directory: Path) -> list[str]:
    """Remove copies left by dead runs (files no process holds, locks of dead packers).
    Returns the names removed."""
    removed: list[str] = []
    try:
        names = sorted(p for p in directory.iterdir() if p.name.startswith(PREFIX))
    except OSError:
        return removed
    for path in names:
        if path.suffix == ".lock":
            if not path.with_suffix("").exists() and _take_over(path) is not None:
                removed.append(path.name)
            continue
        if path.suffix == ".partial":
            # its packer holds the lock while it lives (it locks the partial file itself
            # only a moment after creating it)
            lock = path.with_name(path.stem.rsplit(".", 1)[0] + ".lock")
            stale = not _held(lock, missing=False) and not _held(path, missing=True)
        else:
            stale = not _held(path, missing=True)
        if stale:
            with contextlib.suppress(OSError):  # gone, or another user's
                path.unlink()
                removed.append(path.name)
    return removed


class SharedStore(BlocksInMemory):
    """Packed block buffers in one node-wide shared-memory file (see the module docstring)."""

    tier = "shared"

    def __init__(self, ledger: Ledger, layouts: list[BlockLayout], *, key: str | None,
                 directory: str | Path | None = None, users: int | None = None,
                 timeout_s: float | None = None, device: torch.device,
                 pin_limit_bytes: int | None = None,
                 interrupt_check: Callable[[], None] | None = None) -> None:
        if fcntl is None:
            raise OffloadError("home='shared' needs a POSIX system (file locks, /dev/shm); "
                               "use home='host' here")
        self.ledger = ledger
        self.layouts = {b.index: b for b in layouts}
        self.interrupt_check = interrupt_check
        self.directory = shared_dir(directory)
        self.key = resolve_key(key)
        if users is None and os.environ.get("LOCAL_WORLD_SIZE"):
            users = local_processes()
        self.users = users  # None: not known, the names go with the last user
        self.timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else float(timeout_s)
        self.fingerprint = layout_fingerprint(layouts)
        # a sample of this process's own weights names the copy: equal models meet in one
        # file, different ones (two experts of one layout) get their own
        self.digests = "".join(block_digest(b, lambda e: _bytes_of(require_data(e.ref)))
                               for b in layouts)
        content = hashlib.blake2b(self.digests.encode(), digest_size=8).hexdigest()
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.key)[:80]
        self.path = self.directory / f"{PREFIX}{safe}-{self.fingerprint[:16]}-{content}"
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        _, self.offsets, self.data_start, self.total = block_file_header(
            layouts, {"fingerprint": self.fingerprint, "pinned": "0", "digests": self.digests})
        self.sources: dict[int, HostSource] = {}
        self.registered = False
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._view: torch.Tensor | None = None
        self._cuda = device.type == "cuda"
        self._pin = self._cuda and self.total <= (
            default_pin_limit(per_process=False) if pin_limit_bytes is None else pin_limit_bytes)
        self._published = False
        self._counted = False
        self.packer = False
        try:  # an interrupt while waiting for another packer closes what was opened too
            self.packer = self._open_or_claim()
            if self.packer:
                self._create()
            else:
                self._map_existing()
        except BaseException:
            self.close()
            raise
        self.ledger.host_shared_add(self.total)
        self._counted = True

    # ------------------------------------------------------------------ agreeing
    def _open_or_claim(self) -> bool:
        """True: this process packs. False: another one did, and ``self._fd`` is its file."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                self._fd = os.open(self.path, os.O_RDWR)
            except FileNotFoundError:
                pass
            else:
                fcntl.flock(self._fd, fcntl.LOCK_SH)
                if self._is_our_file():
                    return False
                # its last user (or a sweep) removed the name between our open and our
                # lock: that copy is on its way out, find or make the current one
                os.close(self._fd)
                self._fd = None
                continue
            try:
                self._lock_fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY,
                                        0o600)
            except FileExistsError:
                pass
            except OSError as exc:
                raise OffloadError(
                    f"home='shared': cannot create {self.lock_path} ({exc.strerror}); pass "
                    "shared_dir= a writable directory on a RAM file system, or use "
                    "home='host'.") from exc
            else:
                try:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_EX)  # held while this process lives
                    os.write(self._lock_fd, f"{os.getpid()}\n".encode())
                except OSError as exc:  # a full /dev/shm: no lock without its pid is left
                    os.close(self._lock_fd)
                    self._lock_fd = None
                    with contextlib.suppress(FileNotFoundError):
                        self.lock_path.unlink()
                    raise OffloadError(room_message(
                        self.directory, free_bytes(self.directory),
                        self.data_start + self.total, exc.strerror)) from exc
                return True
            if not self.path.exists():
                dead = _take_over(self.lock_path)
                if dead is not None:
                    # its packer died before finishing: clear what it left and try again
                    with contextlib.suppress(FileNotFoundError):
                        self._partial(dead).unlink()
                    continue
            pid = _read_pid(self.lock_path)
            if self.interrupt_check is not None:
                self.interrupt_check()
            if time.monotonic() > deadline:
                raise OffloadError(
                    f"home='shared': waited {self.timeout_s:.0f} s for process {pid} to pack "
                    f"{self.path}; it has not finished. Raise shared_timeout_s if packing is "
                    "slow (a slow disk), or check that process."
                )
            time.sleep(POLL_S)

    def _partial(self, pid: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{pid}.partial")

    def _create(self) -> None:
        sweep(self.directory)
        partial = self._partial(os.getpid())
        self._fd = os.open(partial, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_SH)
        # every page reserved now: a full /dev/shm fails here, not with SIGBUS later (macOS
        # has no posix_fallocate: only the size is set there)
        reserve = getattr(os, "posix_fallocate", None)
        try:
            if reserve is not None:
                reserve(self._fd, 0, self.data_start + self.total)
            else:
                os.ftruncate(self._fd, self.data_start + self.total)
        except OSError as exc:
            raise OffloadError(room_message(self.directory, free_bytes(self.directory),
                                            self.data_start + self.total, exc.strerror)
                               ) from exc
        self._map()

    def _map_existing(self) -> None:
        assert self._fd is not None
        header = self._read_header()
        if (header.get("fingerprint"), header.get("digests")) != (self.fingerprint,
                                                                   self.digests):
            raise OffloadError(
                f"home='shared': {self.path} (key {self.key!r}) holds other weights than this "
                "model's; give each model its own shared_key."
            )
        # the packer's cap decision (it counted the node's free RAM before the copy took
        # it), but only for a process that copies to CUDA: a CPU process never registers
        self._pin = self._cuda and header.get("pinned") == "1"
        self._map()
        self._count_user()

    def _read_header(self) -> dict[str, str]:
        assert self._fd is not None
        size = int.from_bytes(os.pread(self._fd, 8, 0), "little")
        if size + 8 != self.data_start or os.fstat(self._fd).st_size != self.data_start + self.total:
            raise OffloadError(f"home='shared': {self.path} does not hold this model's blocks; "
                               "give each model its own shared_key")
        return json.loads(os.pread(self._fd, size, 8))["__metadata__"]

    def _map(self) -> None:
        assert self._fd is not None
        mapping = mmap.mmap(self._fd, self.data_start + self.total, flags=mmap.MAP_SHARED,
                            prot=mmap.PROT_READ | mmap.PROT_WRITE)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._view = torch.frombuffer(mapping, dtype=torch.uint8)
        if self._pin:
            self.registered = _register(self._view)
        for index, (start, nbytes) in self.offsets.items():
            buffer = self._view[self.data_start + start:self.data_start + start + nbytes]
            self.sources[index] = HostSource(buffer, self.registered)

    def _count_user(self) -> None:
        """One more process maps the copy: once all expected have, nobody needs its name.
        The lock file holds the packer's pid, then one line per mapping; a process that maps
        the copy twice (two pipelines of one model) counts once."""
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_APPEND)
        except FileNotFoundError:
            return
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
            processes = set(os.pread(fd, os.fstat(fd).st_size, 0).split())
        finally:
            os.close(fd)
        if self.users is not None and len(processes) >= self.users:
            self._forget_names()

    def _forget_names(self) -> None:
        # the lock first: while the copy's name exists no process makes a new lock, so the
        # lock removed is this copy's, never the next packer's
        for path in (self.lock_path, self.path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # ------------------------------------------------------------------ store interface
    def add(self, layout: BlockLayout) -> None:
        """Packer: copy the block in. Others: nothing (the copy was checked when mapped)."""
        if self.packer:
            fill_block_buffer(self.sources[layout.index].buffer, layout)

    def finish(self) -> None:
        """Packer: write the header and publish the complete copy under its name."""
        if not self.packer:
            return
        assert self._fd is not None
        header, *_ = block_file_header(list(self.layouts.values()), {
            "fingerprint": self.fingerprint, "pinned": "1" if self.registered else "0",
            "digests": self.digests})
        os.pwrite(self._fd, header, 0)
        os.rename(self._partial(os.getpid()), self.path)
        self._published = True
        if self.users is not None and self.users <= 1:
            self._forget_names()

    def write_entry(self, index: int, entry: TensorEntry, value: torch.Tensor) -> None:
        raise OffloadError(
            f"{entry.ref.qualname!r} was written by its block's forward, but home='shared' is "
            "read-only (one process's write would change every process's weights). Use "
            "home='host' for a model whose blocks update buffers in place (BatchNorm in train "
            "mode), or keep such buffers outside the offloaded blocks."
        )

    def drop(self, index: int) -> None:
        self.sources.pop(index, None)

    @engine_mode()
    def close(self) -> None:
        """Unmap. A packer that did not finish removes its partial file and its lock (a
        waiting process then packs instead); otherwise the last process to close removes the
        names left. The memory goes when the last mapping does."""
        self.sources.clear()
        if self.registered and self._view is not None:
            _unregister(self._view)
            self.registered = False
        self._view = None  # the mapping goes with the last view of it
        if self._counted:
            self.ledger.host_shared_add(-self.total)
            self._counted = False
        unfinished = self.packer and not self._published
        if self._fd is not None:
            if not unfinished:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    if self._is_our_file():
                        self._forget_names()
                except OSError:
                    pass  # another process still maps it
            os.close(self._fd)
            self._fd = None
        if unfinished:
            for path in (self._partial(os.getpid()), self.lock_path):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _is_our_file(self) -> bool:
        assert self._fd is not None
        try:
            return os.stat(self.path).st_ino == os.fstat(self._fd).st_ino
        except FileNotFoundError:
            return False


def _register(view: torch.Tensor) -> bool:
    """Page-lock the mapping for this process's CUDA context, so copies from it are truly
    asynchronous. The pages are shared: locking them in every process costs no more RAM."""
    try:
        err = int(torch.cuda.cudart().cudaHostRegister(view.data_ptr(), view.numel(), 0))
    except (RuntimeError, AssertionError, AttributeError) as exc:
        warnings.warn(f"home='shared': could not page-lock the shared copy ({exc}); copies "
                      "from it will not overlap compute", stacklevel=3)
        return False
    if err != 0:
        warnings.warn(f"home='shared': cudaHostRegister failed (cudaError {err}); copies from "
                      "the shared copy will not overlap compute", stacklevel=3)
        return False
    return True


def _unregister(view: torch.Tensor) -> None:
    with contextlib.suppress(RuntimeError, AssertionError, AttributeError):
        torch.cuda.cudart().cudaHostUnregister(view.data_ptr())
