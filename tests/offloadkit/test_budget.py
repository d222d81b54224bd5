"""Budget strings resolve to exact byte counts; anything else is refused with the accepted forms."""

from __future__ import annotations

import pytest
import torch

from offloadkit import budget as budget_module
from offloadkit.budget import auto_reserve_bytes, format_bytes, parse_budget
from offloadkit.errors import BudgetError, DeviceUnavailableError
from offloadkit.probe import DeviceMemory, probe

GiB = 1024**3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12GiB", 12 * GiB),
        ("12 GB", 12 * 10**9),
        ("500MB", 500 * 10**6),
        ("500mib", 500 * 1024**2),
        ("1.5GiB", 3 * GiB // 2),
        (" 2 KiB ", 2048),
        ("1TB", 10**12),
        ("4096", 4096),
        ("4096B", 4096),
        (".5 KB", 500),
        (1234, 1234),
        (0, 0),
        (2.9e3, 2900),
    ],
)
def test_sizes_resolve_to_exact_bytes(text: str | int, expected: int) -> None:
    assert parse_budget(text, "cpu") == expected


def test_fixed_sizes_never_probe_the_device() -> None:
    # No CUDA here (or any): a fixed size must not need the device to exist.
    assert parse_budget("12GiB", "cuda:7") == 12 * GiB


def test_percent_is_a_share_of_the_device_total() -> None:
    total = probe("cpu").total_bytes
    assert parse_budget("80%", "cpu") == total * 80 // 100
    assert parse_budget("100%", "cpu") == total
    assert parse_budget("12.5 %", "cpu") == int(total * 0.125)


def fake_memory(total: int, free: int) -> DeviceMemory:
    return DeviceMemory("cuda:0", "test GPU", total, free, "nvml")


def test_auto_is_free_memory_less_the_activation_reserve(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(budget_module, "probe", lambda device: fake_memory(80 * GiB, 40 * GiB))
    assert auto_reserve_bytes(80 * GiB) == 8 * GiB  # 10 % of the total
    assert parse_budget("auto", "cuda") == 32 * GiB
    assert parse_budget(None, "cuda") == 32 * GiB  # None means "auto"
    assert parse_budget(" AUTO ", "cuda") == 32 * GiB


def test_auto_keeps_at_least_one_gib_on_small_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(budget_module, "probe", lambda device: fake_memory(4 * GiB, 3 * GiB))
    assert parse_budget("auto", "cuda") == 2 * GiB


def test_auto_with_too_little_free_memory_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(budget_module, "probe", lambda device: fake_memory(8 * GiB, GiB // 2))
    with pytest.raises(BudgetError) as info:
        parse_budget("auto", "cuda")
    message = str(info.value)
    assert "512.00 MiB free on cuda:0" in message
    assert "1.00 GiB kept for activations" in message
    assert "explicit budget" in message


def test_auto_on_cpu_uses_the_os_figures() -> None:
    memory = probe("cpu")
    auto = parse_budget("auto", "cpu")
    reserve = auto_reserve_bytes(memory.total_bytes)
    assert 0 < auto <= memory.total_bytes - reserve


@pytest.mark.parametrize(
    ("bad", "hint"),
    [
        ("12G", "Write '12GiB' (powers of 1024) or '12GB' (powers of 1000)"),
        ("1.5 m", "Write '1.5MiB'"),
        ("12 parsecs", "unknown unit 'parsecs'"),
        ("abc", "Accepted forms"),
        ("", "Accepted forms"),
        ("-1GiB", "negative"),
        (-5, "negative"),
        ("0%", "above 0% and at most 100%"),
        ("101%", "above 0% and at most 100%"),
        (True, "is a bool"),
        ([1], "not list"),
        (float("nan"), "not a finite number"),
    ],
)
def test_malformed_budgets_name_the_problem_and_the_accepted_forms(bad: object, hint: str) -> None:
    with pytest.raises(BudgetError) as info:
        parse_budget(bad, "cpu")  # type: ignore[arg-type]
    assert hint in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_percent_of_a_missing_cuda_device_is_a_clear_error() -> None:
    with pytest.raises(DeviceUnavailableError, match="CUDA is not available"):
        parse_budget("80%", "cuda")


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1536, "1.50 KiB"),
        (500 * 10**6, "476.84 MiB"),
        (12 * GiB, "12.00 GiB"),
        (-2048, "-2.00 KiB"),
        (5 * 1024**4, "5.00 TiB"),
        (1024**5, "1024.00 TiB"),
    ],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text
