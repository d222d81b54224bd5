"""Test-wide setup: Triton kernels run in the interpreter when there is no GPU; the ComfyUI
stand-in (tests/comfy_standin.py) is importable from both packages' tests."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

if not torch.cuda.is_available():
    # Must be set before any module decorates a kernel with @triton.jit.
    os.environ.setdefault("TRITON_INTERPRET", "1")
