"""The home tier a plan names, opened for the engine: where the packed blocks live."""

from __future__ import annotations

from collections.abc import Callable

import torch

from offloadkit.engine.disk import DiskStore
from offloadkit.engine.layout import BlockLayout
from offloadkit.engine.packing import HostStore
from offloadkit.engine.shared import SharedStore
from offloadkit.ledger import Ledger

Store = HostStore | DiskStore | SharedStore


def open_home(home: str, ledger: Ledger, blocks: list[BlockLayout], device: torch.device, *,
              pin_limit_bytes: int | None, disk_path: str | None, shared_key: str | None,
              shared_dir: str | None, shared_users: int | None,
              shared_timeout_s: float | None,
              interrupt_check: Callable[[], None] | None) -> Store:
    if home == "disk":
        return DiskStore(ledger, blocks, disk_path)
    if home == "shared":
        return SharedStore(ledger, blocks, key=shared_key, directory=shared_dir,
                           users=shared_users, timeout_s=shared_timeout_s, device=device,
                           pin_limit_bytes=pin_limit_bytes, interrupt_check=interrupt_check)
    # pinned memory makes host-to-device copies truly asynchronous; it only exists with
    # CUDA. home="pinned" lifts the default cap; "host" pins up to it.
    if pin_limit_bytes is None and home == "pinned":
        pin_limit_bytes = 1 << 62
    return HostStore(ledger, pin=device.type == "cuda", pin_limit_bytes=pin_limit_bytes)
