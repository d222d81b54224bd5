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
from dataclasses import dataclass

import torch

from offloadkit.errors import BudgetError
from offloadkit.probe import probe
from offloadkit.units import GIB, describe_bytes, format_bytes

__all__ = ["AUTO_RESERVE_FRACTION", "AUTO_RESERVE_MIN_BYTES", "Budget", "auto_reserve_bytes",
           "format_bytes", "parse_budget"]


#: "auto" keeps this share of the device's total memory free for activations ...
AUTO_RESERVE_FRACTION = 0.10
#: ... but never less than this many bytes.
AUTO_RESERVE_MIN_BYTES = 1 * GIB

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


@dataclass(frozen=True)
class Budget:
    """A budget parsed once, then passed through staging, planning and placing.

    ``bytes`` is what checks compare against: the fixed budget, or for ``"auto"`` its
    ceiling, the most it can ever give (the device's total less the activation reserve).
    ``"auto"`` is read from free memory only when a model is placed (:meth:`resolve`),
    because memory free earlier may be held by the model being replaced.
    """

    bytes: int
    auto: bool = False
    device: str = "cpu"
    total_bytes: int | None = None  # the device total "80%" or "auto" was taken from
    reserve_bytes: int = 0  # "auto" only: kept free for activations
    text: str = ""  # what the user gave, for messages

    @classmethod
    def parse(cls, value: Budget | int | float | str | None, device: str | torch.device = "cpu",
              *, total_bytes: int | None = None) -> Budget:
        """Parse what a user typed (see the module docstring). ``total_bytes`` is the
        device's memory when known (a card planned for, a profile's figure): then ``"80%"``
        and ``"auto"`` never probe. A :class:`Budget` is returned as it is."""
        if isinstance(value, Budget):
            return value
        text = _text_of(value)
        if _is_auto(value):
            total = probe(device).total_bytes if total_bytes is None else int(total_bytes)
            reserve = auto_reserve_bytes(total)
            return cls(max(0, total - reserve), auto=True, device=str(device),
                       total_bytes=total, reserve_bytes=reserve, text=text)
        return cls(_fixed_bytes(value, device, total_bytes), device=str(device),
                   total_bytes=total_bytes, text=text)

    def resolve(self) -> int:
        """Bytes in force now: the fixed size, or for ``"auto"`` the memory free on the
        device now (the allocator's reusable cache included) less the reserve."""
        return _auto_budget(self.device) if self.auto else self.bytes

    def describe(self) -> str:
        """The budget for a message: ``'12GiB' = 12884901888 bytes (12.000 GiB)``; for
        ``"auto"`` its ceiling and where that comes from."""
        if self.auto:
            return (f"'auto' (at most {describe_bytes(self.bytes)}: the {format_bytes(self.total_bytes or 0)} "
                    f"of {self.device} less {format_bytes(self.reserve_bytes)} kept for activations)")
        shown = describe_bytes(self.bytes)
        return shown if self.text in ("", str(self.bytes)) else f"{self.text!r} = {shown}"


def parse_budget(budget: Budget | int | float | str | None,
                 device: str | torch.device = "cpu") -> int:
    """Resolve ``budget`` to bytes for ``device`` now; ``None`` means ``"auto"`` (free memory
    now less the reserve). The device is only probed for ``"80%"`` and ``"auto"``."""
    if isinstance(budget, Budget):
        return budget.resolve()
    if _is_auto(budget):
        return _auto_budget(device)
    return _fixed_bytes(budget, device, None)


def _is_auto(value: object) -> bool:
    """``None`` or ``"auto"`` (any case, any surrounding space)."""
    return value is None or (isinstance(value, str) and value.strip().lower() == "auto")


def _text_of(value: object) -> str:
    return "auto" if value is None else value.strip() if isinstance(value, str) else repr(value)


def _fixed_bytes(budget: object, device: str | torch.device, total_bytes: int | None) -> int:
    """Bytes of a size, a number or a percentage (of ``total_bytes``, probed if None)."""
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
    percent = _PERCENT.match(text)
    if percent:
        share = float(percent["num"])
        if not 0 < share <= 100:
            raise BudgetError(f"budget={budget!r}: a percentage must be above 0% and at most 100%.")
        total = probe(device).total_bytes if total_bytes is None else total_bytes
        return math.floor(total * share / 100)
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
