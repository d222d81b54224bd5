"""home="shared": one packed copy per node, mapped by every process that holds the same
model. In-process checks of the file protocol, and one spawned several-process run that
measures the node's memory for the copy (Pss over the processes)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import resource
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from forkserver_context import forkserver
from models import make_inputs, make_model, snapshot
from safetensors import safe_open
from shared_home_ranks import MODEL_SIZES, rank_main

import offloadkit
from offloadkit import OffloadError
from offloadkit.engine.shared import PREFIX, SharedStore, sweep


@pytest.fixture
def key() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


def shared(model: torch.nn.Module, key: str, where: Path, **options) -> offloadkit.OffloadHandle:
    return offloadkit.apply(model, "layerwise", device="cpu", home="shared", shared_key=key,
                            shared_dir=str(where), **options)


def forward(model: torch.nn.Module) -> torch.Tensor:
    tokens, mask = make_inputs()
    with torch.inference_mode():
        return model(tokens, mask=mask)


def names(where: Path) -> list[str]:
    return sorted(p.name for p in where.iterdir() if p.name.startswith(PREFIX))


def store_of(handle: offloadkit.OffloadHandle) -> SharedStore:
    return handle._placement.store


def block_bytes(model: torch.nn.Module) -> int:
    return offloadkit.profile_model(model, "blocks").block_bytes


def test_two_equal_models_map_one_copy(tmp_path: Path, key: str) -> None:
    expected = forward(make_model())
    a, b = make_model(), make_model()
    before = snapshot(b)
    total = block_bytes(a)
    ha = shared(a, key, tmp_path, shared_users=2)
    assert len(names(tmp_path)) == 2  # the copy and its lock, until the second user maps it
    hb = shared(b, key, tmp_path, shared_users=2)
    assert (store_of(ha).packer, store_of(hb).packer) == (True, False)
    # one process mapping it twice is one user: the second process must still find the names
    assert len(names(tmp_path)) == 2
    assert store_of(ha).sources[0].buffer.data_ptr() != store_of(hb).sources[0].buffer.data_ptr()
    assert torch.equal(forward(a), expected) and torch.equal(forward(b), expected)
    for h in (ha, hb):
        stats = h.stats()
        assert (stats.home, stats.host_shared_bytes, stats.host_pageable_bytes,
                stats.host_pinned_bytes) == ("shared", total, 0, 0)
    state = b.state_dict()
    assert all(torch.equal(state[name], value) for name, (value, *_) in before.items())
    ha.remove()
    assert torch.equal(forward(b), expected)  # b's mapping outlives a's
    hb.remove()
    assert names(tmp_path) == []  # the last closer removed them
    after = snapshot(b)
    assert all(torch.equal(after[n][0], before[n][0]) and after[n][1:] == before[n][1:]
               for n in before)
    assert torch.equal(forward(b), expected)


def test_two_experts_of_one_layout_get_their_own_copies(tmp_path: Path, key: str) -> None:
    """Same tensors, other weights (the high and the low expert): never mixed up."""
    high, low = make_model(seed=0), make_model(seed=1)
    want = forward(make_model(seed=0)), forward(make_model(seed=1))
    handles = shared(high, key, tmp_path), shared(low, key, tmp_path)
    assert [store_of(h).packer for h in handles] == [True, True]
    assert store_of(handles[0]).path != store_of(handles[1]).path
    assert torch.equal(forward(high), want[0]) and torch.equal(forward(low), want[1])
    for h in handles:
        h.remove()
    assert names(tmp_path) == []  # last user of each removed its names


def test_the_copy_is_a_safetensors_file_of_the_packed_blocks(tmp_path: Path, key: str) -> None:
    model = make_model()
    handle = shared(model, key, tmp_path)
    path = store_of(handle).path
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format"] == "offloadkit-blocks"
        for index, source in store_of(handle).sources.items():
            assert torch.equal(f.get_tensor(f"block.{index}"), source.buffer)
    handle.remove()
    assert not path.exists()


def test_a_foreign_copy_under_the_name_is_refused(tmp_path: Path, key: str) -> None:
    first = shared(make_model(), key, tmp_path)
    path = store_of(first).path
    raw = bytearray(path.read_bytes()[:store_of(first).data_start])
    at = raw.index(b'"digests":"') + len(b'"digests":"')
    raw[at:at + 4] = b"ffff" if raw[at:at + 4] != b"ffff" else b"0000"
    with open(path, "r+b") as f:
        f.write(raw)
    model = make_model()
    before = snapshot(model)
    with pytest.raises(OffloadError, match="holds other weights.*own shared_key"):
        shared(model, key, tmp_path)
    assert all(torch.equal(model.state_dict()[n], v) for n, (v, *_) in before.items())
    first.remove()


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_dead_packers_lock_is_taken_over(tmp_path: Path, key: str) -> None:
    model = make_model()
    expected = forward(make_model())
    probe = shared(make_model(), key, tmp_path)  # learn the name, then leave a dead run's files
    path = store_of(probe).path
    probe.remove()
    pid = dead_pid()
    Path(f"{path}.lock").write_text(f"{pid}\n")
    Path(f"{path}.{pid}.partial").write_bytes(b"half a copy")
    handle = shared(model, key, tmp_path)
    assert store_of(handle).packer
    assert not Path(f"{path}.{pid}.partial").exists()
    assert torch.equal(forward(model), expected)
    handle.remove()
    assert names(tmp_path) == []


def test_waiting_for_a_live_packer_times_out_naming_it(tmp_path: Path, key: str) -> None:
    probe = shared(make_model(), key, tmp_path)
    path = store_of(probe).path
    probe.remove()
    lock = os.open(f"{path}.lock", os.O_CREAT | os.O_WRONLY, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)  # as a packer holds it: alive, never finishes
    os.write(lock, f"{os.getpid()}\n".encode())
    model = make_model()
    before = snapshot(model)
    try:
        with pytest.raises(OffloadError,
                           match=rf"waited 0 s for process {os.getpid()}.*shared_timeout_s"):
            shared(model, key, tmp_path, shared_timeout_s=0.2)
    finally:
        os.close(lock)
    assert all(torch.equal(model.state_dict()[n], v) for n, (v, *_) in before.items())


def test_a_dead_packers_lock_is_taken_over_when_its_pid_is_reused(tmp_path: Path,
                                                                  key: str) -> None:
    """A restarted container numbers its processes alike: the dead packer's pid may be a
    live process (here this one). Nobody holds the lock, so it is taken over at once
    rather than waited on until the timeout."""
    probe = shared(make_model(), key, tmp_path)
    path = store_of(probe).path
    probe.remove()
    Path(f"{path}.lock").write_text(f"{os.getpid()}\n")
    model = make_model()
    expected = forward(make_model())
    handle = shared(model, key, tmp_path, shared_timeout_s=5)
    assert store_of(handle).packer
    assert torch.equal(forward(model), expected)
    handle.remove()
    assert names(tmp_path) == []


def test_packing_sweeps_copies_of_dead_runs(tmp_path: Path, key: str) -> None:
    orphan = tmp_path / f"{PREFIX}old-run-x"
    orphan.write_bytes(b"x" * 4096)
    Path(f"{orphan}.lock").write_text(f"{dead_pid()}\n")
    in_use = tmp_path / f"{PREFIX}live-run-y"
    in_use.write_bytes(b"y" * 4096)
    fd = os.open(in_use, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)  # as a process mapping it holds it
    try:
        handle = shared(make_model(), key, tmp_path)
        assert not orphan.exists() and not Path(f"{orphan}.lock").exists()
        assert in_use.exists()
        handle.remove()
    finally:
        os.close(fd)


@contextlib.contextmanager
def file_size_limit(nbytes: int) -> Iterator[None]:
    """A file system with ``nbytes`` of room, as far as this process's writes go."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


def test_a_full_shared_directory_fails_before_packing(tmp_path: Path, key: str) -> None:
    """posix_fallocate reserves every page first: a short /dev/shm is an error naming the
    fix, never a SIGBUS halfway through packing."""
    model = make_model()
    before = snapshot(model)
    with file_size_limit(4096), pytest.raises(OffloadError,
                                           match=r"shared copy needs .*shm-size.*home='host'"):
        shared(model, key, tmp_path)
    assert names(tmp_path) == []  # no partial copy, no lock left for others to wait on
    assert all(torch.equal(model.state_dict()[n], v) for n, (v, *_) in before.items())


def test_a_shared_directory_too_full_for_the_lock_leaves_no_lock(tmp_path: Path,
                                                                 key: str) -> None:
    """/dev/shm so full that even the packer's pid cannot be written: the room message,
    and no pid-less lock that every other process would wait on until its timeout."""
    model = make_model()
    with file_size_limit(0), pytest.raises(OffloadError,
                                           match=r"shared copy needs .*shm-size.*home='host'"):
        shared(model, key, tmp_path)
    assert names(tmp_path) == []


def test_a_forward_that_writes_a_block_buffer_is_refused(tmp_path: Path, key: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(8, 8),
                                                      torch.nn.BatchNorm1d(8))
                                  for _ in range(3)]).train()
    handle = offloadkit.apply(model, "layerwise", device="cpu", home="shared", blocks=list(model),
                              shared_key=key, shared_dir=str(tmp_path))
    with torch.no_grad(), pytest.raises(OffloadError, match=r"running_mean.*read-only.*home='host'"):
        model(torch.randn(4, 8))
    handle.remove()


def test_a_key_is_needed_outside_torchrun(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    model = make_model()
    with pytest.raises(OffloadError, match="run under torchrun.*shared_key"):
        offloadkit.apply(model, "layerwise", device="cpu", home="shared",
                         shared_dir=str(tmp_path))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job42")
    monkeypatch.setenv("MASTER_PORT", "29511")
    handle = offloadkit.apply(model, "layerwise", device="cpu", home="shared",
                              shared_dir=str(tmp_path))
    # the job, its rendezvous and the launcher (the workers' parent): two jobs with
    # torchrun's default id "none" on one port are still told apart
    assert store_of(handle).path.name.startswith(f"{PREFIX}job42--29511-{os.getppid()}-")
    handle.remove()


def test_processes_of_a_node_hold_one_copy(tmp_path: Path, key: str) -> None:
    """Three processes (as torchrun starts them on one node) map one copy in /dev/shm: the
    Pss of the mapping summed over them is one copy, each sees all of it, outputs equal a
    private home's, and no name is left behind."""
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm on this system")
    users = 3
    ctx = forkserver("shared_home_ranks")  # torch imported once, by the server
    barrier = ctx.Barrier(users)
    procs = [ctx.Process(target=rank_main, args=(r, users, key, barrier, str(tmp_path)))
             for r in range(users)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * users
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(users)]
    model = make_model(**MODEL_SIZES)
    total = block_bytes(model)
    private = offloadkit.apply(model, "layerwise", device="cpu", home="host")
    tokens, mask = make_inputs()
    with torch.inference_mode():
        expected = model(tokens, mask=mask)
    assert private.stats().host_pageable_bytes == total
    private.remove()
    assert sum(r["packer"] for r in results) == 1
    assert [r["named"] for r in results] == [[]] * users  # names gone once all mapped it
    for r in results:
        assert torch.equal(r["out"], expected)
        assert (r["shared"], r["pageable"], r["pinned"]) == (total, 0, 0)
        assert total <= r["rss"] <= total + 64 * 1024  # all of the copy, mapped by each
    node = sum(r["pss"] for r in results)
    assert total * 0.98 <= node <= total * 1.05, (node, total)  # one copy, not three
    assert not [n for n in os.listdir("/dev/shm") if key in n]


def test_room_is_checked_against_the_real_free_space(tmp_path: Path) -> None:
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    offloadkit.check_shared_room(1 << 20, tmp_path)
    with pytest.raises(OffloadError, match=rf"{tmp_path} has .* free, the shared copy needs "
                                           rf"{free + 2**30} bytes"):
        offloadkit.check_shared_room(free + 2**30, tmp_path)
    with pytest.raises(OffloadError, match="not a directory"):
        offloadkit.check_shared_room(1, tmp_path / "missing")


def test_the_default_pin_cap_counts_the_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """Private homes: each of a node's processes pins its own copy, so each gets its share of
    the node's cap; a shared copy is one for the node and is checked against all of it."""
    from offloadkit.engine.packing import default_pin_limit

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    node, each = default_pin_limit(per_process=False), default_pin_limit()
    assert abs(4 * each - node) <= node * 0.05  # free RAM moves a little between the reads
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    alone = default_pin_limit()
    assert abs(alone - node) <= node * 0.05


def test_an_interrupt_while_packing_leaves_nothing_behind(tmp_path: Path, key: str) -> None:
    """Ctrl-C (or SIGTERM turned into it) halfway through packing: the partial copy and the
    lock go (a waiting process would pack instead), and the model is as it was."""
    model = make_model()
    before = snapshot(model)
    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        shared(model, key, tmp_path, interrupt_check=check)
    assert names(tmp_path) == []
    assert all(torch.equal(model.state_dict()[n], v) for n, (v, *_) in before.items())
    handle = shared(model, key, tmp_path)  # and the next run packs normally
    assert store_of(handle).packer
    handle.remove()


def test_a_reader_whose_name_goes_before_its_lock_packs_the_current_copy(
        tmp_path: Path, key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy's last user removes the names between a newcomer's open and its lock: the
    newcomer must not keep that nameless copy (later processes could not find it and would
    pack another); it packs the copy under the name."""
    first = shared(make_model(), key, tmp_path)
    path = store_of(first).path
    real = fcntl.flock
    removed = []

    def flock(fd: int, op: int) -> None:
        if op == fcntl.LOCK_SH and not removed:  # the last closer, just before our lock
            removed.append(True)
            first.remove()
        real(fd, op)

    monkeypatch.setattr("offloadkit.engine.shared.fcntl.flock", flock)
    model = make_model()
    expected = forward(make_model())
    handle = shared(model, key, tmp_path)
    assert removed and store_of(handle).packer
    assert os.stat(path).st_ino == os.fstat(store_of(handle)._fd).st_ino
    assert torch.equal(forward(model), expected)
    handle.remove()
    assert names(tmp_path) == []


def test_a_live_packers_partial_file_survives_a_sweep(tmp_path: Path) -> None:
    """A packer locks its partial file a moment after creating it; another packer's sweep
    in between must not remove it (the rename at the end would fail)."""
    live = tmp_path / f"{PREFIX}other-model.{os.getpid()}.partial"
    live.write_bytes(b"being packed")
    lock = os.open(tmp_path / f"{PREFIX}other-model.lock", os.O_CREAT | os.O_WRONLY, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)  # its packer lives
    os.write(lock, f"{os.getpid()}\n".encode())
    dead = tmp_path / f"{PREFIX}crashed-model.{dead_pid()}.partial"
    dead.write_bytes(b"left by a crash")
    try:
        assert sweep(tmp_path) == [dead.name]
        assert live.exists()
    finally:
        os.close(lock)


def test_packing_without_posix_fallocate(tmp_path: Path, key: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """macOS has no os.posix_fallocate: the copy is sized with ftruncate instead."""
    monkeypatch.delattr(os, "posix_fallocate")
    model = make_model()
    expected = forward(make_model())
    handle = shared(model, key, tmp_path)
    assert torch.equal(forward(model), expected)
    handle.remove()
    assert names(tmp_path) == []


def test_a_cpu_process_never_page_locks_a_copy_a_cuda_process_packed(
        tmp_path: Path, key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The readers follow the packer's page-lock decision only when they copy to CUDA: a
    CPU process mapping a copy that a CUDA rank packed must not call into CUDA (on a
    CPU-only build that is a warning per block set, with CUDA a context per process)."""
    from offloadkit.engine import shared as shared_module
    from offloadkit.ledger import Ledger

    registered: list[int] = []
    monkeypatch.setattr(shared_module, "_register", lambda view: registered.append(1) or True)
    monkeypatch.setattr(shared_module, "_unregister", lambda view: None)
    from offloadkit.engine.profile import layout_model

    model = make_model()
    names_ = [b.name for b in offloadkit.engine.profile_model(model, "blocks").blocks]
    layouts = list(layout_model(model, [model.get_submodule(n) for n in names_]).blocks)
    stores = []
    for device in ("cuda", "cpu"):  # the packer's is a stand-in: no CUDA here, _register faked
        stores.append(SharedStore(Ledger(), layouts, key=key, directory=tmp_path,
                                  device=torch.device(device), pin_limit_bytes=1 << 40))
        for layout in layouts:
            stores[-1].add(layout)
        stores[-1].finish()
    assert [s.packer for s in stores] == [True, False]
    assert registered == [1] and [s.registered for s in stores] == [True, False]
    for store in reversed(stores):
        store.close()
    assert names(tmp_path) == []
