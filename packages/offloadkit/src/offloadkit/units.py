"""Byte counts as people read them. A leaf module: budgets, plans and errors all state sizes."""

from __future__ import annotations

GIB = 1024**3


def describe_bytes(n: int) -> str:
    """``'1234567 bytes (0.001 GiB)'``: budget errors state sizes in both units, exact and
    readable, so the number can be pasted back as a budget."""
    return f"{n} bytes ({n / GIB:.3f} GiB)"


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
