"""Engine options a user may pass through ``offloadkit.apply(**options)``."""

from __future__ import annotations

#: name -> one-line meaning (shown when an unknown option is passed)
ENGINE_OPTIONS: dict[str, str] = {
    "pin_limit_bytes": "cap on pinned host bytes (CUDA); past it blocks stay pageable",
    "disk_path": "directory or .safetensors file for home='disk' (default: a temp file)",
    "replan_every": "ask the strategy to re-plan after this many forwards (0 = never)",
    "trace": "record per-block timeline events (default True)",
    "interrupt_check": "callable run between blocks while packing and placing; raise to cancel",
    "process_group": "torch.distributed group running this model in lockstep: its first "
    "rank decides the re-plans for all (handle.replan() is then collective) and an OOM in a "
    "block is an error, not retried (see offloadkit.distributed)",
}
