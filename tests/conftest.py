"""Test-wide setup: Triton kernels run in the interpreter when there is no GPU."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before any module decorates a kernel with @triton.jit.
    os.environ.setdefault("TRITON_INTERPRET", "1")
