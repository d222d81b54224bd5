"""SIGTERM and SIGHUP handled like Ctrl-C, and helper threads stopped before the process ends.

``docker stop``, Slurm, ``timeout`` and a closed terminal send SIGTERM or SIGHUP, whose default
action kills the process at once: no latents rescue, no temporary file removed. Inside
:func:`signals_as_interrupt` such a signal raises :class:`Terminated` (a ``KeyboardInterrupt``)
in the main thread, so every cleanup path Ctrl-C already takes runs; the command then exits
with 128 + the signal number, as a shell reports a process killed by it.
"""

from __future__ import annotations

import ctypes
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["HANDLED_SIGNALS", "Terminated", "TerminationState", "signals_as_interrupt", "stop_thread"]

HANDLED_SIGNALS: tuple[int, ...] = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)
)


class Terminated(KeyboardInterrupt):
    """The process was asked to stop by a signal; handled like Ctrl-C."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


class TerminationState:
    """Which signal (if any) arrived while :func:`signals_as_interrupt` was active."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def exit_code(self, code: int) -> int:
        """128 + signal number once a signal arrived (the shell's convention), else ``code``."""
        return code if self.signum is None else 128 + self.signum


@contextmanager
def signals_as_interrupt(signums: tuple[int, ...] = HANDLED_SIGNALS) -> Iterator[TerminationState]:
    """Make ``signums`` raise :class:`Terminated` in the main thread for the block.

    The first signal raises; later ones are only recorded, so the cleanup they started (saving
    latents, removing temporary files) is not itself interrupted. Outside the main thread
    (where Python cannot install handlers) this does nothing.
    """
    state = TerminationState()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum: int, _frame: object) -> None:
        if state.signum is None:
            state.signum = signum
            raise Terminated(signum)

    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield state
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def stop_thread(thread: threading.Thread, exc_type: type[BaseException] = KeyboardInterrupt) -> None:
    """Raise ``exc_type`` inside ``thread`` and wait for it to end.

    Python delivers it at the thread's next bytecode, i.e. after the C call it is in (one
    block's read or copy) returns, so a thread that loads or packs weights stops within one
    block and runs its own cleanup (the engine removes a half-written disk tier). A thread
    still running C++ code when the interpreter shuts down aborts the process instead
    ("terminate called without an active exception").
    """
    if thread.ident is None:
        return
    if thread.is_alive():
        ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(thread.ident), ctypes.py_object(exc_type)
        )
    thread.join()
