"""What machine, software and revision produced a set of figures, and the few raw rates
(host-to-device bandwidth, matmul throughput) that the planner turns into predictions.

Figures without this context cannot be compared, so every JSON report starts with it.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

_PACKAGES = ("torch", "offloadkit", "turbowan", "triton", "accelerate", "diffusers", "numpy")


def package_versions() -> dict[str, str | None]:
    """Installed version of each package the figures depend on (None where absent)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["cuda"] = torch.version.cuda
    return versions


def git_revision(start: Path | None = None) -> dict[str, str | bool | None]:
    """Commit of the source tree this package runs from, and whether it had local changes."""
    here = start or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_ram_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        return None


def machine_info(device: str) -> dict:
    """Hardware the run used: CPU, RAM and, on CUDA, the card and its memory."""
    info: dict = {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "ram_bytes": _total_ram_bytes(),
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "gpu": None,
        "gpu_memory_bytes": None,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = props.name
        info["gpu_memory_bytes"] = int(props.total_memory)
    return info


# ---------------------------------------------------------------- resident set size


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """Peak resident set size since the last :func:`reset_peak_rss` (VmHWM)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):
        return None


def current_rss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS so RSS figures of consecutive runs are separable."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------- raw rates


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def measure_copy_bandwidth(
    device: str, *, pinned: bool = True, nbytes: int = 256 * 2**20, repeats: int = 5
) -> float:
    """Host-to-device bandwidth in bytes/s (best of ``repeats`` copies of ``nbytes``).

    On CPU it is a host memcpy, which is what the CPU path of the engine pays per block.
    """
    src = torch.empty(nbytes, dtype=torch.uint8)
    if pinned and device.startswith("cuda"):
        src = src.pin_memory()
    src.fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src)
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src, non_blocking=pinned)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def measure_matmul_flops(device: str, *, size: int = 1024, dtype: torch.dtype | None = None) -> float:
    """Dense matmul throughput in FLOP/s, the rate the planner divides a block's FLOPs by."""
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    synchronize(device)
    repeats = 3 if device == "cpu" else 50
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    elapsed = time.perf_counter() - start
    return 2.0 * size**3 * repeats / elapsed
