"""``turbowan-bench --lora-rank R``: what a LoRA costs per step, against the same run without.

Every measured run (all-resident and each strategy/budget/home) is repeated right after
itself with a random rank-R LoRA on all ten linears of every block, attached as the
pipeline attaches one (unmerged branches that stream with their blocks), so drift between
the two is minimal; the ratios of time and of bytes moved per step go in the records.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from turbowan.dit.config import BLOCK_LINEARS

NAME = "bench"


def random_lora(model: torch.nn.Module, rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A rank-``rank`` LoRA on every block linear of ``model``, in ComfyUI/PEFT naming."""
    generator = torch.Generator().manual_seed(seed + 7)
    tensors = {}
    for index, block in enumerate(model.blocks):
        for name in BLOCK_LINEARS:
            layer = block.get_submodule(name)
            stem = f"diffusion_model.blocks.{index}.{name}"
            tensors[f"{stem}.lora_A.weight"] = torch.randn(
                rank, layer.in_features, generator=generator) / layer.in_features**0.5
            tensors[f"{stem}.lora_B.weight"] = torch.randn(
                layer.out_features, rank, generator=generator) * 0.01
            tensors[f"{stem}.alpha"] = torch.tensor(float(rank))
    return tensors


@contextmanager
def lora_attached(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[int]:
    """The LoRA on ``model`` for the block; yields its bytes (in the model's dtype)."""
    from turbowan.lora import attach_lora, detach_lora, lora_nbytes

    attach_lora(model, tensors, name=NAME)
    try:
        yield lora_nbytes(model, NAME)
    finally:
        detach_lora(model, NAME)


def pair_lora_runs(runs: list[dict]) -> None:
    """Set ``lora_time_ratio`` / ``lora_bytes_per_step_ratio`` on each LoRA run: its time
    and traffic over the matching run without LoRA. With paired timing both sides are first
    divided by their own all-resident steps, which cancels machine drift between them. A step
    makes the same copies with and without the LoRA, so traffic is compared per copy (the
    timed window may cut the cross-step prefetch at a different copy)."""
    plain: dict[tuple, dict] = {}  # the latest run without LoRA, per strategy/budget/home
    for record in runs:
        if record.get("lora_rank") is None:
            plain[_key(record)] = record
            continue
        base = plain.get(_key(record))
        if base is None:
            continue
        mine, theirs = record.get("ratio_to_resident"), base.get("ratio_to_resident")
        if record.get("paired_resident_step_seconds") and mine and theirs:
            record["lora_time_ratio"] = mine / theirs
        elif record.get("seconds_per_step") and base.get("seconds_per_step"):
            record["lora_time_ratio"] = record["seconds_per_step"] / base["seconds_per_step"]
        if base.get("transfers") and record.get("transfers"):
            per_copy = record["bytes_transferred"] / record["transfers"]
            record["lora_bytes_per_step_ratio"] = per_copy / (base["bytes_transferred"] / base["transfers"])


def _key(record: dict) -> tuple:
    return (record["strategy"], record.get("budget"), record.get("home"))
