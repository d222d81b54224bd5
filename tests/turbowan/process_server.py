"""Real `turbowan` and `turbowan-bench` processes for the tests, forked from one server.

One Python imports torch and both CLIs once (no thread runs in it yet); each run is a fork of
it: its own process with its own signal handlers, limits, exit and clean-up, that does not pay
torch's import again. The `server` fixture (tests/turbowan/conftest.py) starts it once per
session; :func:`run_cli` runs one command in it.

The child runs the real CLI; the only test addition is a *gate* (a wait at one point of the run,
announced on stderr) so a signal lands at a known stage instead of racing the run.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

DRIVER = r'''
import os, signal, sys, threading, time

# Ctrl-C as a terminal delivers it: a test runner started in the background (`pytest &` in a
# script) ignores SIGINT, and every process it starts would inherit that
signal.signal(signal.SIGINT, signal.default_int_handler)

def wait_here(tag):
    print(f"GATE {tag}", file=sys.stderr, flush=True)
    for _ in range(1200):
        time.sleep(0.05)

gate = os.environ.get("GATE")
if gate == "decode":  # sampling finished; hold before decoding
    from turbowan.pipeline.i2v import I2VPipeline
    original_decode = I2VPipeline.decode
    def decode(self, *args, **kwargs):
        wait_here("decode")
        return original_decode(self, *args, **kwargs)
    I2VPipeline.decode = decode
elif gate == "staging":  # the low expert's disk tier is half written by the staging thread
    from offloadkit.engine import disk
    original_add = disk.DiskStore.add
    def add(self, layout):
        original_add(self, layout)
        if threading.current_thread().name == "turbowan-stage-low":
            wait_here("staging")
    disk.DiskStore.add = add
elif gate == "bench-offloaded":  # inside a block of a bench run's offloaded forward (the
    import offloadkit                # partial JSON of the runs before it is written)
    from turbowan.bench import sweep
    from turbowan.dit.model import WanBlock
    offloaded = [False]
    original_time_steps, original_block = sweep.time_steps, WanBlock.forward
    def time_steps(model, *args, **kwargs):
        offloaded[0] = offloadkit.is_offloaded(model)
        return original_time_steps(model, *args, **kwargs)
    def block_forward(self, *args, **kwargs):
        if offloaded[0]:
            wait_here("bench-offloaded")
        return original_block(self, *args, **kwargs)
    sweep.time_steps, WanBlock.forward = time_steps, block_forward
if os.environ.get("FSIZE"):  # a full disk: writes past this size fail with EFBIG
    import resource, signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit = int(os.environ["FSIZE"])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
if os.environ.get("ADDRESS_SPACE"):  # a machine without that much memory
    import resource
    limit = int(os.environ["ADDRESS_SPACE"])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
if os.environ["PROGRAM"] == "turbowan-bench":
    from turbowan.bench.cli import main
else:
    from turbowan.cli.main import main
sys.exit(main(sys.argv[1:]))
'''

SERVER = r'''
import json, os, sys, tempfile
import torch  # noqa: F401  (the expensive imports, paid once)
import turbowan.bench.cli, turbowan.cli.generate, turbowan.cli.main, turbowan.pipeline.demo  # noqa: F401,E401
driver = sys.argv[1]
for line in sys.stdin:
    request = json.loads(line)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:  # the run: stdio of its own, then the driver exactly as a script runs it
        os.close(0)
        err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(err, 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        os.environ.update(request["env"])
        tempfile.tempdir = None  # TMPDIR is read again
        sys.argv = [driver, *request["args"]]
        source = open(driver).read()
        exec(compile(source, driver, "exec"), {"__name__": "__main__"})  # ends in sys.exit
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
'''

Server = tuple[subprocess.Popen, queue.Queue]


def start_server(root: Path) -> Iterator[Server]:
    """The server process (a generator for a fixture: yields it, then stops it)."""
    (root / "driver.py").write_text(DRIVER)
    (root / "server.py").write_text(SERVER)
    proc = subprocess.Popen([sys.executable, str(root / "server.py"), str(root / "driver.py")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    replies: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [replies.put(json.loads(line)) for line in proc.stdout],
                     daemon=True).start()
    yield proc, replies
    proc.stdin.close()
    proc.wait(timeout=60)


def run_cli(server: Server, tmp_path: Path, args: list[str], *, gate: str | None = None,
            send: int | None = None, fsize: int | None = None,
            address_space: int | None = None,
            program: str = "turbowan") -> tuple[int, str, Path]:
    """Run ``program args`` (``turbowan`` or ``turbowan-bench``) in a fork of the server with
    ``$TMPDIR`` in ``tmp_path``; with a ``gate``, send signal ``send`` once the run waits at
    it. Returns the exit status, stderr and the ``$TMPDIR``."""
    proc, replies = server
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    stderr = tmp_path / "stderr.txt"
    env = {"TMPDIR": str(tmpdir), "GATE": gate or "", "FSIZE": str(fsize or ""),
           "ADDRESS_SPACE": str(address_space or ""), "PROGRAM": program}
    proc.stdin.write(json.dumps({"args": args, "env": env, "stderr": str(stderr)}) + "\n")
    proc.stdin.flush()
    pid = replies.get(timeout=60)["pid"]
    deadline = time.monotonic() + 240
    if gate is not None:
        while f"GATE {gate}" not in (stderr.read_text() if stderr.exists() else ""):
            if not replies.empty():
                pytest.fail("the run ended before reaching the gate:\n" + stderr.read_text())
            assert time.monotonic() < deadline, stderr.read_text()
            time.sleep(0.05)
        os.kill(pid, send)
    rc = replies.get(timeout=max(1.0, deadline - time.monotonic()))["rc"]
    return rc, stderr.read_text(), tmpdir
