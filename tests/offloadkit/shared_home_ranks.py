"""Worker for the several-process home="shared" test: one process of a node, as torchrun
would start it. Spawned, so it must live in an importable module."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from models import make_inputs, make_model

import offloadkit

MODEL_SIZES = {"dim": 256, "hidden": 1024, "num_blocks": 6}


def mapped_bytes(name_part: str) -> tuple[int, int]:
    """(Rss, Pss) in bytes of this process's mappings whose file name holds ``name_part``:
    Pss divides each shared page among the processes mapping it, so the Pss of all
    processes adds up to the node's real memory for the file."""
    rss = pss = 0
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            inside = name_part in line  # a new mapping's first line
        elif inside and head[0] == "Rss:":
            rss += int(head[1]) * 1024
        elif inside and head[0] == "Pss:":
            pss += int(head[1]) * 1024
    return rss, pss


def rank_main(rank: int, users: int, key: str, barrier: Any, where: str) -> None:
    torch.set_num_threads(1)
    model = make_model(**MODEL_SIZES)
    tokens, mask = make_inputs()
    handle = offloadkit.apply(model, "layerwise", device="cpu", home="shared",
                              shared_key=key, shared_users=users)
    with torch.inference_mode():
        out = model(tokens, mask=mask)
    barrier.wait()  # every process maps the copy and has read all of it
    named = [n for n in os.listdir("/dev/shm") if key in n]  # all users counted: none left
    rss, pss = mapped_bytes(f"offloadkit-shared-{key}")
    stats = handle.stats()
    packer = handle._placement.store.packer
    barrier.wait()  # measured before anyone unmaps
    handle.remove()
    torch.save({"out": out, "rss": rss, "pss": pss, "packer": packer,
                "shared": stats.host_shared_bytes, "pageable": stats.host_pageable_bytes,
                "pinned": stats.host_pinned_bytes, "pid": os.getpid(), "named": named},
               os.path.join(where, f"rank{rank}.pt"))
