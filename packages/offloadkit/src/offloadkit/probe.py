"""How much memory a device has, and how much is free right now.

Budgets such as ``"80%"`` and ``"auto"`` are resolved against these figures. For CUDA the
driver's own view (NVML) is preferred: it needs no CUDA context and counts other processes.
``torch.cuda.mem_get_info`` is the fallback (ROCm, MIG slices, no NVML library). For the CPU
the figures come from the operating system, capped by a cgroup memory limit when the process
runs in a container, since that limit is what actually bounds us.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Literal

import torch

from offloadkit.errors import DeviceUnavailableError

MemorySource = Literal["nvml", "torch", "os"]

_CGROUP_V2 = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class DeviceMemory:
    """A snapshot of one device's memory, with where the figures came from."""

    device: str
    name: str
    total_bytes: int
    free_bytes: int
    source: MemorySource

    @property
    def used_bytes(self) -> int:
        return self.total_bytes - self.free_bytes

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def probe(device: str | torch.device = "cuda") -> DeviceMemory:
    """Report total and free memory of ``device`` ("cpu", "cuda" or "cuda:N")."""
    dev = parse_device(device)
    if dev.type == "cpu":
        return _probe_os()
    if dev.type == "cuda":
        index = cuda_index(dev)
        return _probe_nvml(index) or _probe_torch_cuda(index)
    raise DeviceUnavailableError(
        f"offloadkit cannot probe device {str(device)!r}: only 'cpu', 'cuda' and 'cuda:N' "
        "are supported. Pass one of those."
    )


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The compute device: CUDA when present if none is named; clear error if it is absent."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
    dev = parse_device(device)
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise DeviceUnavailableError(
            f"offloadkit streams to 'cuda' or 'cpu' devices, not {str(dev)!r}. Use one of those."
        )
    return torch.device("cuda", cuda_index(dev))


def parse_device(device: str | torch.device) -> torch.device:
    """``torch.device(device)``, with an error that says which names work."""
    if isinstance(device, torch.device):
        return device
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceUnavailableError(
            f"{device!r} is not a device name ({exc}). Use 'cpu', 'cuda' or 'cuda:N'."
        ) from None


def cuda_index(dev: torch.device) -> int:
    """The index of CUDA device ``dev`` (current device if unnumbered), checked to exist."""
    if not torch.cuda.is_available():
        cuda_build = torch.version.cuda or "none (CPU-only build)"
        raise DeviceUnavailableError(
            f"device {str(dev)!r} was requested but CUDA is not available here "
            f"(torch {torch.__version__}, CUDA build: {cuda_build}). Use device='cpu' (or "
            "strategy='cpu_only'), or install a CUDA build of torch on a machine with an "
            "NVIDIA GPU and driver."
        )
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if not 0 <= index < count:
        raise DeviceUnavailableError(
            f"device {str(dev)!r} does not exist: this machine has {count} CUDA device(s), "
            f"cuda:0 to cuda:{count - 1}. Pick one of those."
        )
    return index


def _probe_nvml(index: int) -> DeviceMemory | None:
    """NVML figures for torch's device ``index``, or None when NVML cannot answer for it."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        handle = _nvml_handle_for_torch_index(pynvml, index)
        if handle is None:
            return None
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        name = pynvml.nvmlDeviceGetName(handle)
    except pynvml.NVMLError:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass
    if isinstance(name, bytes):
        name = name.decode()
    return DeviceMemory(f"cuda:{index}", str(name), int(info.total), int(info.free), "nvml")


def _nvml_handle_for_torch_index(pynvml: ModuleType, index: int) -> object | None:
    """Match by UUID: torch's index counts CUDA_VISIBLE_DEVICES, NVML's counts every GPU."""
    torch_uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", "")).lower()
    if not torch_uuid:
        return None
    for nvml_index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index)
        uuid = pynvml.nvmlDeviceGetUUID(handle)
        if isinstance(uuid, bytes):
            uuid = uuid.decode()
        if uuid.lower().removeprefix("gpu-") == torch_uuid.removeprefix("gpu-"):
            return handle
    return None  # e.g. a MIG slice: NVML's whole-GPU figure would be wrong, let torch answer


def _probe_torch_cuda(index: int) -> DeviceMemory:
    free, total = torch.cuda.mem_get_info(index)
    name = torch.cuda.get_device_name(index)
    return DeviceMemory(f"cuda:{index}", name, int(total), int(free), "torch")


def _probe_os() -> DeviceMemory:
    total, free = _os_memory()
    limit = _cgroup_limit(_CGROUP_V2)
    if limit is not None and limit[0] < total:
        cg_total, cg_used = limit
        total, free = cg_total, max(0, min(free, cg_total - cg_used))
    return DeviceMemory("cpu", "host RAM", total, free, "os")


def _os_memory() -> tuple[int, int]:
    """(total, available) host RAM in bytes: psutil, else /proc/meminfo."""
    try:
        import psutil
    except ImportError:
        return _proc_meminfo()
    vm = psutil.virtual_memory()
    return int(vm.total), int(vm.available)


def _proc_meminfo() -> tuple[int, int]:
    fields: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            fields[key] = int(parts[0]) * 1024  # the file states kB, meaning KiB
    return fields["MemTotal"], fields.get("MemAvailable", fields.get("MemFree", 0))


def _cgroup_limit(root: Path) -> tuple[int, int] | None:
    """(limit, usage) of this process's cgroup v2 memory controller, or None if unlimited."""
    try:
        limit_text = (root / "memory.max").read_text().strip()
        usage_text = (root / "memory.current").read_text().strip()
    except OSError:
        return None
    if limit_text == "max":
        return None
    return int(limit_text), int(usage_text)
