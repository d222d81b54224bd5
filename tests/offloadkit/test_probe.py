"""Device memory figures: the OS for the CPU (capped by a cgroup limit), clear errors otherwise."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import psutil
import pytest
import torch

import offloadkit
from offloadkit.errors import DeviceUnavailableError
from offloadkit.probe import DeviceMemory, probe

# `offloadkit.probe` is the function once the package is imported; fetch the module itself.
probe_module = importlib.import_module("offloadkit.probe")
GiB = 1024**3


def test_cpu_probe_reports_os_figures() -> None:
    memory = probe("cpu")
    assert (memory.device, memory.name, memory.source) == ("cpu", "host RAM", "os")
    limit = probe_module._cgroup_limit(probe_module._CGROUP_V2)
    expected_total = psutil.virtual_memory().total
    if limit is not None:
        expected_total = min(expected_total, limit[0])
    assert memory.total_bytes == expected_total
    assert 0 < memory.free_bytes <= memory.total_bytes
    assert memory.used_bytes == memory.total_bytes - memory.free_bytes
    assert offloadkit.probe(torch.device("cpu")).total_bytes == memory.total_bytes


def test_proc_meminfo_agrees_with_psutil() -> None:
    total, available = probe_module._proc_meminfo()
    assert total == psutil.virtual_memory().total
    assert 0 < available <= total


def write_cgroup(root: Path, limit: str, usage: int) -> Path:
    root.mkdir(exist_ok=True)
    (root / "memory.max").write_text(f"{limit}\n")
    (root / "memory.current").write_text(f"{usage}\n")
    return root


def test_cgroup_limit_caps_the_cpu_figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_cgroup(tmp_path / "cg", str(2 * GiB), GiB // 2)
    assert probe_module._cgroup_limit(root) == (2 * GiB, GiB // 2)
    monkeypatch.setattr(probe_module, "_os_memory", lambda: (64 * GiB, 60 * GiB))
    monkeypatch.setattr(probe_module, "_CGROUP_V2", root)
    memory = probe("cpu")
    assert (memory.total_bytes, memory.free_bytes) == (2 * GiB, 3 * GiB // 2)


def test_unlimited_or_missing_cgroup_leaves_the_os_figures(tmp_path: Path) -> None:
    assert probe_module._cgroup_limit(write_cgroup(tmp_path / "cg", "max", 123)) is None
    assert probe_module._cgroup_limit(tmp_path / "absent") is None


def test_device_memory_is_json_ready() -> None:
    memory = DeviceMemory("cuda:0", "GPU", 80 * GiB, 30 * GiB, "nvml")
    assert json.loads(json.dumps(memory.to_dict())) == {
        "device": "cuda:0",
        "name": "GPU",
        "total_bytes": 80 * GiB,
        "free_bytes": 30 * GiB,
        "source": "nvml",
    }
    assert memory.used_bytes == 50 * GiB


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda", 0)])
def test_cuda_without_cuda_is_a_clear_error(device: str | torch.device) -> None:
    with pytest.raises(DeviceUnavailableError) as info:
        probe(device)
    assert "CUDA is not available here" in str(info.value)
    assert "device='cpu'" in str(info.value)  # the fix


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with a GPU has NVML")
def test_nvml_without_a_driver_declines_instead_of_failing() -> None:
    assert probe_module._probe_nvml(0) is None


@pytest.mark.parametrize(
    ("device", "hint"),
    [("banana", "not a device name"), ("meta", "only 'cpu', 'cuda' and 'cuda:N'")],
)
def test_unsupported_devices_are_refused(device: str, hint: str) -> None:
    with pytest.raises(DeviceUnavailableError, match=hint):
        probe(device)


class FakeNVML:
    """Stands in for the pynvml module: two GPUs, the second one visible to torch as cuda:0
    (CUDA_VISIBLE_DEVICES=1), so NVML's index 0 is the wrong card."""

    class NVMLError(Exception):
        pass

    def __init__(self) -> None:
        self.gpus = [
            ("GPU-aaaaaaaa-0000", b"Other GPU", 10 * GiB, 1 * GiB),
            ("GPU-BBBBBBBB-1111", b"Our GPU", 80 * GiB, 70 * GiB),
        ]
        self.open = False

    def nvmlInit(self) -> None:
        self.open = True

    def nvmlShutdown(self) -> None:
        self.open = False

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return self.gpus[handle][0]

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return self.gpus[handle][1]

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> object:
        _, _, total, free = self.gpus[handle]
        return type("Memory", (), {"total": total, "free": free, "used": total - free})()


def test_nvml_figures_belong_to_the_card_torch_means(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNVML()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    props = type("Props", (), {"uuid": "bbbbbbbb-1111"})()  # torch prints UUIDs bare, lower case
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    memory = probe_module._probe_nvml(0)
    assert memory == DeviceMemory("cuda:0", "Our GPU", 80 * GiB, 70 * GiB, "nvml")
    assert not fake.open  # NVML shut down again


def test_nvml_declines_when_no_card_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML())
    props = type("Props", (), {"uuid": "cccccccc-2222"})()  # e.g. a MIG slice
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    assert probe_module._probe_nvml(0) is None  # torch.cuda.mem_get_info answers instead
