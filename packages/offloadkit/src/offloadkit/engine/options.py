"""Engine options a user may pass through ``offloadkit.apply(**options)``."""

from __future__ import annotations

#: name -> one-line meaning (shown when an unknown option is passed)
ENGINE_OPTIONS: dict[str, str] = {
    "pin_limit_bytes": "cap on pinned host bytes (CUDA); past it blocks stay pageable",
    "disk_path": "directory or .safetensors file for home='disk' (default: a temp file)",
    "replan_every": "ask the strategy to re-plan after this many forwards (0 = never)",
    "trace": "record per-block timeline events (default True)",
    "interrupt_check": "callable run between blocks while packing and placing; raise to cancel",
    "shared_key": "home='shared': a name every process sharing the copy agrees on "
    "(default: the torchrun job)",
    "shared_dir": "home='shared': directory of the shared file (default /dev/shm)",
    "shared_users": "home='shared': processes that will map the copy (default torchrun's "
    "LOCAL_WORLD_SIZE); its name is removed once all have",
    "shared_timeout_s": "home='shared': how long to wait for another process to pack the "
    "copy (default 600)",
    "process_group": "torch.distributed group running this model in lockstep: its first "
    "rank decides the re-plans for all (handle.replan() is then collective) and an OOM in a "
    "block is an error, not retried (see offloadkit.distributed)",
}
