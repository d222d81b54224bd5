"""Plan mode: answer "how many blocks should I swap on my card?" without a GPU or weights.

The full-size model is built on ``meta`` (shapes only), profiled, and every strategy is asked
for its plan at the weight budget a card leaves after activations. Each plan's cost is then
predicted by :mod:`turbowan.bench.simulate` from a host-to-device bandwidth and a per-block
compute time, measured here or given by the user.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from turbowan.bench.simulate import simulate_step
from turbowan.bench.workload import Workload

if TYPE_CHECKING:
    from offloadkit import ModelProfile, Plan
    from turbowan.dit.config import DiTConfig

DEFAULT_CARDS = "8GB,12GB,16GB,20GB,24GB,48GB,80GB"
# CUDA context, cuBLAS workspaces and allocator slack that no weight may use (estimate).
CUDA_OVERHEAD_BYTES = 768 * 2**20
# Share of dense attention work SLA does at topk 0.1 (sparse part plus the linear branch).
SLA_ATTENTION_SHARE = 0.12


@dataclass(frozen=True)
class Card:
    label: str
    total_bytes: int


def _as_binary_card_size(label: str) -> str:
    """GPU memory is sold in binary units: an "8GB" card has 8 GiB, a "24GB" one 24 GiB.

    offloadkit reads "GB" as 10**9 bytes (right for a budget someone typed); for a card label
    that would understate the card by 7 %, so plan mode reads GB/TB as GiB/TiB here.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([GT])B\s*", label, re.IGNORECASE)
    return f"{match.group(1)}{match.group(2).upper()}iB" if match else label


def parse_cards(text: str) -> list[Card]:
    """``"8GB,12GB"`` -> cards. Sizes only: a percentage or ``auto`` needs a real device."""
    from offloadkit import BudgetError, parse_budget

    cards = []
    for label in (part.strip() for part in text.split(",")):
        if not label:
            continue
        if label.endswith("%") or label.lower() == "auto":
            raise BudgetError(
                f"--gpu {label!r}: plan mode needs card sizes such as 8GB or 24GiB, "
                "not a share of this machine's memory"
            )
        cards.append(Card(label, parse_budget(_as_binary_card_size(label), "cpu")))
    if not cards:
        raise BudgetError(f"--gpu {text!r} names no card size; use e.g. --gpu {DEFAULT_CARDS}")
    return cards


def activation_bytes(config: DiTConfig, tokens: int, *, dtype_bytes: int = 2, batch: int = 1) -> int:
    """Estimate of the largest activation working set inside one DiT block (bytes).

    Counted: the fp32 residual stream, the normalised/modulated input, q, k, v and attention
    output in the compute dtype, and the FFN hidden state twice (before and after GELU), plus
    one dequantised int8 weight of the largest linear. An estimate, not a measurement: state
    your own with ``--reserve`` when you know better.
    """
    dim, ffn = config.dim, config.ffn_dim
    per_token = dim * 4 + dim * dtype_bytes * 6 + ffn * dtype_bytes * 2
    dequantised_weight = dim * ffn * dtype_bytes
    return int(batch * tokens * per_token + dequantised_weight)


def block_flops(config: DiTConfig, tokens: int, *, attention: str = "sla", batch: int = 1) -> float:
    """FLOPs of one block's forward at ``tokens`` tokens (matmuls only)."""
    dim, ffn, text = config.dim, config.ffn_dim, config.text_len
    linear = 2 * tokens * (4 * dim * dim + 2 * dim * dim + 2 * dim * ffn) + 2 * text * 2 * dim * dim
    self_attention = 4 * tokens * tokens * dim
    if attention != "original":
        self_attention *= SLA_ATTENTION_SHARE
    cross_attention = 4 * tokens * text * dim
    return float(batch * (linear + self_attention + cross_attention))


def plan_strategy_rows(
    profile: ModelProfile,
    strategies: Sequence[str],
    cards: Sequence[Card],
    *,
    reserve_bytes: int,
    bandwidth: float,
    block_seconds: float,
) -> list[dict]:
    """One row per card and strategy: the plan, its predicted peak and its predicted slowdown."""
    import offloadkit

    block_bytes = [b.nbytes for b in profile.blocks]
    per_block = [block_seconds] * len(block_bytes)
    rows = []
    for card in cards:
        budget = card.total_bytes - reserve_bytes
        # the strategy sees the card it plans for, as if probed with the model not yet loaded
        card_profile = dataclasses.replace(
            profile,
            device_total_bytes=card.total_bytes,
            device_free_bytes=max(0, card.total_bytes - CUDA_OVERHEAD_BYTES),
        )
        for name in strategies:
            row: dict = {"card": card.label, "card_bytes": card.total_bytes, "strategy": name,
                         "budget_bytes": budget}  # fmt: skip
            rows.append(row)
            if budget <= 0:
                row["note"] = "activations alone exceed the card"
                continue
            try:
                report = offloadkit.check_fits(card_profile, name, budget)
                if not report.fits:
                    row["note"] = f"does not fit: needs {report.minimum_bytes / 2**30:.2f} GiB for weights"
                    continue
                plan = report.plan
            except Exception as exc:  # a strategy that cannot plan here says why in the table
                row["note"] = f"cannot plan: {str(exc).splitlines()[0][:48]}..."
                row["error"] = str(exc)
                continue
            row.update(plan_summary(plan))
            if plan.predicted_peak_device_bytes == 0 and not plan.streamed:
                row["note"] = "nothing on the card: computes on the CPU"
                row["resident_count"] = row["streamed_count"] = None
                continue
            prediction = simulate_step(
                block_bytes=block_bytes,
                block_seconds=per_block,
                streamed=plan.streamed,
                bandwidth=bandwidth,
                group_size=plan.group_size,
                slots=plan.num_slots,
                prefetch_depth=plan.prefetch_depth,
            )
            row["predicted_slowdown"] = round(prediction.slowdown, 4)
            row["predicted_seconds_per_step"] = prediction.seconds
            row["predicted_stall_seconds"] = prediction.stall_seconds
            row["predicted_bytes_per_step"] = prediction.bytes_moved
    return rows


def plan_summary(plan: Plan) -> dict:
    """The fields of an offloadkit Plan that the table and the JSON show."""
    return {
        "resident_count": len(plan.resident),
        "streamed_count": len(plan.streamed),
        "resident_blocks": list(plan.resident),
        "streamed_blocks": list(plan.streamed),
        "group_size": plan.group_size,
        "prefetch_depth": plan.prefetch_depth,
        "slots": plan.num_slots,
        "home": plan.home,
        "predicted_peak_device_bytes": plan.predicted_peak_device_bytes,
        "plan_note": plan.note,
    }


def meta_profile(preset: str, *, quant: str, attention: str, device: str = "cuda") -> ModelProfile:
    """Profile of ``preset`` built on ``meta``: byte counts only, no memory, no device."""
    from offloadkit import profile_model
    from turbowan.dit.meta import build_manifest_model

    model = build_manifest_model(preset, quant=quant, attention=attention)
    return profile_model(model, device=device)


def measured_rates(device: str) -> tuple[float, float, str]:
    """(bandwidth bytes/s, matmul FLOP/s, where from) measured on this machine's ``device``."""
    from turbowan.bench.machine import measure_copy_bandwidth, measure_matmul_flops

    size = 4096 if device.startswith("cuda") else 1024
    bandwidth = measure_copy_bandwidth(device, pinned=True, nbytes=128 * 2**20, repeats=3)
    flops = measure_matmul_flops(device, size=size)
    return bandwidth, flops, f"measured on this machine's {device}"


def block_seconds_for(config: DiTConfig, workload: Workload, attention: str,
                      flops_rate: float) -> float:  # fmt: skip
    """Predicted compute seconds of one block: its matmul FLOPs at a measured rate."""
    return block_flops(config, workload.tokens, attention=attention, batch=workload.batch) / flops_rate
