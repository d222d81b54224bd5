"""Helpers shared by the built-in strategies (spreading, option checks)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from offloadkit.strategy import ModelProfile


def spread(count: int, total: int) -> list[int]:
    """``count`` positions spread evenly over ``range(total)``, each in the middle of its
    share: ``spread(4, 8) == [1, 3, 5, 7]``."""
    if count <= 0:
        return []
    return sorted({min(total - 1, int((k + 0.5) * total / count)) for k in range(count)})


def fewest_streamed(profile: ModelProfile, room: int, among: Iterable[int] | None = None
                    ) -> list[int] | None:
    """Resident blocks for ``room`` bytes: stream as few blocks as possible, and put the
    streamed ones evenly between resident ones so each transfer hides behind compute.
    ``among`` limits the choice to these block indices (the rest are not considered).
    None if even streaming every block leaves ``room`` negative."""
    if room < 0:
        return None
    pool = list(range(profile.num_blocks)) if among is None else sorted(among)
    by_size = sorted(pool, key=lambda i: -profile.blocks[i].nbytes)
    for streamed_count in range(0, len(pool) + 1):
        # evenly spread first; with blocks of unequal size, the largest ones if spread
        # ones do not free enough
        for streamed in ({pool[k] for k in spread(streamed_count, len(pool))},
                         set(by_size[:streamed_count])):
            resident = [i for i in pool if i not in streamed]
            if profile.bytes_of(resident) <= room:
                return resident
    return []


def positive_int(name: str, value: Any, strategy: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"strategy {strategy!r}: option {name}={value!r} must be an int >= 1")
    return value


def boolean(name: str, value: Any, strategy: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"strategy {strategy!r}: option {name}={value!r} must be True or False")
    return value
