"""One-line messages for running out of a resource: disk space, file size, host or device memory.

A full disk, a file-size limit or an exhausted allocator is not a bug in the run's inputs, and a
traceback from deep inside safetensors or torch's allocator names neither the stage nor the fix.
:func:`describe_resource_error` recognises those failures and says what ran out, during which
stage, and what to change; anything else returns ``None`` (the caller re-raises it).
"""

from __future__ import annotations

import errno

__all__ = ["describe_resource_error"]

_DISK_ERRNOS = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DISK_TEXT = ("no space left", "file too large", "disk quota", "ENOSPC", "EFBIG")
_HOST_MEMORY_TEXT = ("DefaultCPUAllocator", "not enough memory", "Cannot allocate memory")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def describe_resource_error(exc: BaseException, stage: str) -> str | None:
    """``"<stage>: <what ran out> (<error>); <fix>"`` for a resource failure, else None."""
    import torch

    detail = f"{type(exc).__name__}: {_first_line(exc)}"
    if isinstance(exc, torch.OutOfMemoryError):
        return (f"{stage}: out of device memory ({detail}); pass a smaller --budget or "
                "--offload layerwise")
    text = str(exc)
    disk = (isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS) or any(
        t.lower() in text.lower() for t in _DISK_TEXT)
    if disk:
        return (f"{stage}: the disk is full or a file-size limit was reached ({detail}); free "
                "space where the output goes and in $TMPDIR (the --home disk tier and the "
                "demo's files live there), point TMPDIR at a larger disk, or use --home host")
    if isinstance(exc, MemoryError) or (
            isinstance(exc, RuntimeError) and any(t in text for t in _HOST_MEMORY_TEXT)):
        return (f"{stage}: out of host memory ({detail}); lower --frames or the resolution, "
                "close other programs, or use --home disk to keep streamed weights on disk")
    return None
