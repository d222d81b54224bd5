"""One forkserver for the tests that start processes (tests/turbowan/worlds.py's gloo worlds,
the shared-home ranks of tests/offloadkit/test_home_shared.py).

multiprocessing keeps one forkserver per Python process, and the test that starts it fixes
what it imports before forking; so every user asks for the same modules (plus its own
worker module). A process forked from it pays no import of torch and turbowan (about 3 s
each on the test machine's 2 cores). The server only imports: no thread of ours and no torch
op runs in it, so forking it is safe.
"""

from __future__ import annotations

import multiprocessing
from typing import Any

PRELOAD = ("torch", "torch.distributed", "offloadkit", "turbowan.pipeline.i2v",
           "turbowan.pipeline.demo", "turbowan.distributed", "turbowan.cli.main",
           "turbowan.cli.generate")


def forkserver(*extra: str) -> Any:
    """The forkserver context; the server, when this call is the first to start it, imports
    PRELOAD and ``extra`` (module names importable from sys.path now)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([*PRELOAD, *extra])
    return ctx
