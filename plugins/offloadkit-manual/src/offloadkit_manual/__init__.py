"""offloadkit-manual: a strategy that keeps exactly the blocks you list on the device.

    offloadkit.apply(model, strategy="manual", device="cuda", budget="12GiB", resident=[0, 3, 7])
    offloadkit.apply(model, strategy="manual", device="cuda", resident_file="blocks.json")

``blocks.json`` holds a list of block indices, ``[0, 3, 7]``, or ``{"resident": [0, 3, 7]}``.
Every other block streams, one at a time, with the next one prefetched.

This package is also the template for writing a strategy plugin: a ``Strategy`` subclass
that turns a model profile and a budget into a ``Plan`` (policy only), one ``@hookimpl``
that registers it, and an ``[project.entry-points.offloadkit]`` table in ``pyproject.toml``.
It imports only offloadkit's public API. offloadkit does the rest: the budget check (against
``min_device_bytes``, with ``budget_hint`` as the fix), checking the plan, packing, slots,
prefetch and the ledger.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from offloadkit import ModelProfile, Plan, Strategy, hookimpl

__all__ = ["ManualStrategy"]


class ManualStrategy(Strategy):
    """Keep exactly the listed blocks resident; stream the rest."""

    name = "manual"
    description = "Keep exactly the blocks you list resident (resident=[...] or resident_file=...); stream the rest."
    option_defaults = {"resident": None, "resident_file": None}
    # the end of offloadkit's "budget below the minimum" error: here the fix is a shorter list
    budget_hint = ("The listed resident blocks, the non-block weights and the streaming slots "
                   "need that much: list fewer blocks or raise the budget.")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)  # rejects options not in option_defaults
        self.resident = _resident_from_options(
            self.options["resident"], self.options["resident_file"]
        )

    def min_device_bytes(self, profile: ModelProfile) -> int:
        """No fallback: the listed set is the plan, so its peak is the minimum."""
        return self._plan(profile).predicted_peak_device_bytes

    def plan(self, profile: ModelProfile, budget_bytes: int) -> Plan:
        """The listed set; offloadkit has checked the budget against min_device_bytes."""
        return self._plan(profile)

    def _plan(self, profile: ModelProfile) -> Plan:
        bad = [i for i in self.resident if not 0 <= i < profile.num_blocks]
        if bad:
            raise ValueError(
                f"strategy 'manual': resident block index(es) {bad} out of range; this model "
                f"has {profile.num_blocks} blocks, numbered 0 to {profile.num_blocks - 1}."
            )
        return Plan.build(profile, self.resident, note=f"manual: resident {list(self.resident)}")


def _resident_from_options(resident: object, resident_file: object) -> tuple[int, ...]:
    """The user's block list, from exactly one of the two options, checked for type."""
    if (resident is None) == (resident_file is None):
        raise ValueError(
            "strategy 'manual' needs exactly one of resident=[0, 3, 7] (block indices to keep "
            "on the device) or resident_file='blocks.json' (a JSON list of them)."
        )
    if resident_file is not None:
        resident = _read_block_file(Path(resident_file))
    if not isinstance(resident, list | tuple) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in resident
    ):
        raise TypeError(
            f"strategy 'manual': resident must be a list of block indices (ints), got {resident!r}."
        )
    if len(set(resident)) != len(resident):
        raise ValueError(f"strategy 'manual': resident lists a block twice: {list(resident)}.")
    return tuple(sorted(resident))


def _read_block_file(path: Path) -> object:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"strategy 'manual': resident_file {str(path)!r} does not exist."
        ) from None
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"strategy 'manual': resident_file {str(path)!r} is not valid JSON ({exc}); "
            'write a list such as [0, 3, 7] or {"resident": [0, 3, 7]}.'
        ) from None
    return data.get("resident") if isinstance(data, dict) else data


@hookimpl
def offloadkit_register_strategies() -> list[type[Strategy]]:
    return [ManualStrategy]
