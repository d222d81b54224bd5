"""Engine options a user may pass through ``offloadkit.apply(**options)``."""

from __future__ import annotations

#: name -> one-line meaning (shown when an unknown option is passed)
ENGINE_OPTIONS: dict[str, str] = {
    "pin_limit_bytes": "cap on pinned host bytes (CUDA); past it blocks stay pageable",
    "disk_path": "directory or .safetensors file for home='disk' (default: a temp file)",
    "replan_every": "ask the strategy to re-plan after this many forwards (0 = never)",
    "trace": "record per-block timeline events (default True)",
    "interrupt_check": "callable run between blocks while packing and placing; raise to cancel",
}
