"""One grad/inference mode for everything the engine does itself, whatever mode the caller
is in.

Inference mode is thread-local and sticky: a tensor allocated inside it is an *inference
tensor*, which may not be updated in place outside inference mode (the prefetch thread is
outside it) and whose views carry no version counter. So every engine tensor (home-tier
buffers, slots, staging buffers, stand-ins, the per-tensor aliases bound to the model) is
allocated and written under :func:`engine_mode`: a normal tensor, with autograd off. Such
tensors work in any mode the model later runs in (inference mode, ``no_grad`` or plain).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def engine_mode() -> Iterator[None]:
    """Outside inference mode, without autograd: how the engine allocates and copies."""
    with torch.inference_mode(False), torch.no_grad():
        yield
