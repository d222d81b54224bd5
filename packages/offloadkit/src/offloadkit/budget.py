"""Turn what a user types as a budget into a number of bytes.

The budget bounds the weight bytes offloadkit places on the device. Accepted forms:

- an ``int`` number of bytes (``12_000_000_000``);
- a size string: ``"12GiB"``, ``"12 GB"``, ``"500MB"``, ``"1.5TiB"``, ``"4096"``. Binary units
  (KiB, MiB, GiB, TiB) are powers of 1024, decimal units (KB, MB, GB, TB) powers of 1000, as
  on disk labels and in accelerate's ``max_memory``;
- a percentage of the device's total memory: ``"80%"``;
- ``"auto"`` (or ``None``): the memory free right now, less a reserve for activations.

A bare ``"12G"`` is refused rather than guessed: 12 GiB and 12 GB differ by 7 %, which is
more than one Wan block.
"""

from __future__ import annotations

import math
import re

import torch

from offloadkit.errors import BudgetError
from offloadkit.probe import probe

GiB = 1024**3

#: "auto" keeps this share of the device's total memory free for activations ...
AUTO_RESERVE_FRACTION = 0.10
#: ... but never less than this many bytes.
AUTO_RESERVE_MIN_BYTES = 1 * GiB

_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(?P<num>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[a-z]*)\s*$", re.IGNORECASE)
_PERCENT = re.compile(r"^\s*(?P<num>\d+(?:\.\d*)?|\.\d+)\s*%\s*$")
_ACCEPTED = (
    "Accepted forms: an int number of bytes, a size such as '12GiB', '12 GB' or '500MB' "
    "(KiB/MiB/GiB/TiB = powers of 1024, KB/MB/GB/TB = powers of 1000), a share of the "
    "device's total memory such as '80%', or 'auto' (free memory now, less an activation reserve)."
)


def parse_budget(budget: int | float | str | None, device: str | torch.device = "cpu") -> int:
    """Resolve ``budget`` to bytes for ``device``; ``None`` means ``"auto"``.

    The device is only probed for ``"80%"`` and ``"auto"``; fixed sizes never touch it.
    """
    if budget is None:
        budget = "auto"
    if isinstance(budget, bool):
        raise BudgetError(f"budget={budget!r} is a bool, not a budget. {_ACCEPTED}")
    if isinstance(budget, int):
        return _non_negative(budget, budget)
    if isinstance(budget, float):
        if not math.isfinite(budget):
            raise BudgetError(f"budget={budget!r} is not a finite number of bytes. {_ACCEPTED}")
        return _non_negative(math.floor(budget), budget)
    if not isinstance(budget, str):
        raise BudgetError(
            f"budget must be an int or a string, not {type(budget).__name__}. {_ACCEPTED}"
        )

    text = budget.strip()
    if text.lower() == "auto":
        return _auto_budget(device)
    percent = _PERCENT.match(text)
    if percent:
        share = float(percent["num"])
        if not 0 < share <= 100:
            raise BudgetError(f"budget={budget!r}: a percentage must be above 0% and at most 100%.")
        return math.floor(probe(device).total_bytes * share / 100)
    if text.startswith("-"):
        raise BudgetError(f"budget={budget!r} is negative; a budget is a number of bytes >= 0.")
    size = _SIZE.match(text)
    if size:
        unit = size["unit"].lower() or "b"
        if unit not in _UNITS:
            raise BudgetError(_unit_message(budget, size["num"], size["unit"]))
        return math.floor(float(size["num"]) * _UNITS[unit])
    raise BudgetError(f"budget={budget!r} is not a budget. {_ACCEPTED}")


def auto_reserve_bytes(total_bytes: int) -> int:
    """Bytes ``"auto"`` leaves free for activations on a device of ``total_bytes``."""
    return max(AUTO_RESERVE_MIN_BYTES, math.floor(total_bytes * AUTO_RESERVE_FRACTION))


def format_bytes(n: int | float) -> str:
    """``1536 -> '1.50 KiB'``: binary units, so figures match what budgets in GiB mean."""
    sign = "-" if n < 0 else ""
    value = float(abs(n))
    if value < 1024:
        return f"{sign}{int(value)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{sign}{value:.2f} {unit}"
    raise AssertionError("unreachable")


def _auto_budget(device: str | torch.device) -> int:
    memory = probe(device)
    free = memory.free_bytes + _reusable_cuda_cache(memory.device)
    reserve = auto_reserve_bytes(memory.total_bytes)
    if free <= reserve:
        raise BudgetError(
            f"budget='auto' found only {format_bytes(free)} free on {memory.device} "
            f"({memory.source}), not more than the {format_bytes(reserve)} kept for activations. "
            "Free memory on the device, or pass an explicit budget such as '2GiB'."
        )
    return free - reserve


def _reusable_cuda_cache(device: str) -> int:
    """Bytes torch's caching allocator holds but no tensor uses: free for us, not for NVML."""
    if not device.startswith("cuda") or not torch.cuda.is_initialized():
        return 0
    index = torch.device(device).index
    return max(0, torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index))


def _non_negative(value: int, given: object) -> int:
    if value < 0:
        raise BudgetError(f"budget={given!r} is negative; a budget is a number of bytes >= 0.")
    return int(value)


def _unit_message(budget: str, number: str, unit: str) -> str:
    if unit.lower() in {"k", "m", "g", "t"}:
        letter = unit.upper()
        return (
            f"budget={budget!r}: the unit {unit!r} is ambiguous. Write '{number}{letter}iB' "
            f"(powers of 1024) or '{number}{letter}B' (powers of 1000)."
        )
    return f"budget={budget!r}: unknown unit {unit!r}. {_ACCEPTED}"
